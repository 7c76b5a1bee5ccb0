// How close the decode GEMV (cuda/gemv.cu) comes to the memory bandwidth, with nothing else
// between its launches: each TinyLlama-1.1B matrix shape alone, launched back to back on
// distinct copies of the weights (so L2 holds none of them), and a chain of 22 layers' four
// GEMVs, the GEMV part of a decode step. Rates are against the device-to-device copy rate and
// a plain read of the same bytes, measured in the same run.
//
//   nvcc -O3 -std=c++17 -arch=sm_90 -Icuda -Inative -o /tmp/gemv-rate scripts/bench/gemv-rate.cu cuda/gemv.cu cuda/elementwise.cu
//   /tmp/gemv-rate [rows]        (rows: input rows, default 1)
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda-check.h"
#include "kernels.h"

using lckv::cuda::GemvTarget;

// Sums 16-byte words: the rate at which the card reads a buffer once, as a GEMV must.
__global__ void readAll(const uint4* p, size_t words, unsigned* out) {
  unsigned acc = 0;
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < words; i += (size_t)gridDim.x * blockDim.x) {
    const uint4 v = __ldg(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x12345678u) *out = acc;  // keeps the loads
}


struct Timer {
  cudaEvent_t a, b;
  Timer() {
    CK(cudaEventCreate(&a));
    CK(cudaEventCreate(&b));
  }
  void start(cudaStream_t s) { CK(cudaEventRecord(a, s)); }
  float stopMs(cudaStream_t s) {
    CK(cudaEventRecord(b, s));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    return ms;
  }
};

int main(int argc, char** argv) {
  const int rows = argc > 1 ? std::atoi(argv[1]) : 1;
  lckv::cuda::enableProgrammaticLaunch(lckv::cuda::programmaticLaunchSupported());
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  Timer t;

  // Weights for 22 layers of TinyLlama-1.1B (hidden 2048, 4 KV heads of 64, intermediate 5632).
  const int H = 2048, KV = 256, F = 5632, L = 22;
  struct Layer {
    __nv_bfloat16 *q, *k, *v, *o, *gate, *up, *down;
  };
  std::vector<Layer> layers(L);
  auto alloc = [](size_t elems) {
    __nv_bfloat16* p;
    CK(cudaMalloc(&p, elems * 2));
    CK(cudaMemset(p, 0x3c, elems * 2));  // finite values; what they are does not change the reads
    return p;
  };
  for (Layer& l : layers) {
    l.q = alloc((size_t)H * H), l.k = alloc((size_t)KV * H), l.v = alloc((size_t)KV * H), l.o = alloc((size_t)H * H);
    l.gate = alloc((size_t)F * H), l.up = alloc((size_t)F * H), l.down = alloc((size_t)H * F);
  }
  float *x, *y, *y2, *y3;
  CK(cudaMalloc(&x, sizeof(float) * rows * F));
  CK(cudaMemset(x, 0, sizeof(float) * rows * F));
  CK(cudaMalloc(&y, sizeof(float) * rows * F));
  CK(cudaMalloc(&y2, sizeof(float) * rows * F));
  CK(cudaMalloc(&y3, sizeof(float) * rows * F));
  const double layerBytes = 2.0 * ((double)H * H * 2 + 2.0 * KV * H + 3.0 * F * H);
  const double stepBytes = layerBytes * L;

  // Copy and read rates over 1 GiB (what scripts/bench measures the roofline against): large
  // enough that ramp-up and tail do not count.
  const size_t bigBytes = (size_t)1 << 30;
  void *srcBig, *dstBig;
  CK(cudaMalloc(&srcBig, bigBytes));
  CK(cudaMalloc(&dstBig, bigBytes));
  CK(cudaMemset(srcBig, 1, bigBytes));
  Timer tc;
  CK(cudaMemcpyAsync(dstBig, srcBig, bigBytes, cudaMemcpyDeviceToDevice, s));  // warm-up
  tc.start(s);
  for (int i = 0; i < 4; ++i) CK(cudaMemcpyAsync(dstBig, srcBig, bigBytes, cudaMemcpyDeviceToDevice, s));
  const double copyGBs = 2.0 * bigBytes * 4 / (tc.stopMs(s) * 1e-3) / 1e9;
  unsigned* sink;
  CK(cudaMalloc(&sink, 4));
  readAll<<<prop.multiProcessorCount * 8, 512, 0, s>>>((const uint4*)srcBig, bigBytes / 16, sink);  // warm-up
  tc.start(s);
  for (int i = 0; i < 4; ++i) readAll<<<prop.multiProcessorCount * 8, 512, 0, s>>>((const uint4*)srcBig, bigBytes / 16, sink);
  const double readGBs = (double)bigBytes * 4 / (tc.stopMs(s) * 1e-3) / 1e9;
  CK(cudaFree(srcBig));
  CK(cudaFree(dstBig));
  std::printf("%s, %d SMs, input rows %d\n", prop.name, prop.multiProcessorCount, rows);
  std::printf("copy %.0f GB/s (read + write), read %.0f GB/s\n", copyGBs, readGBs);

  auto qkv = [&](const Layer& l) {
    GemvTarget g[3] = {{l.q, nullptr, H, y}, {l.k, nullptr, KV, y2}, {l.v, nullptr, KV, y3}};
    lckv::cuda::launchGemv(x, rows, H, g, 3, 1, s);
  };
  auto o = [&](const Layer& l) {
    GemvTarget g = {l.o, nullptr, H, y};
    lckv::cuda::launchGemv(x, rows, H, &g, 1, 1, s);
  };
  auto mlp = [&](const Layer& l) {
    lckv::cuda::launchGemvSwiglu(x, rows, H, {l.gate, nullptr, F, y}, {l.up, nullptr, F, nullptr}, 1, s);
  };
  auto down = [&](const Layer& l) {
    GemvTarget g = {l.down, nullptr, H, y};
    lckv::cuda::launchGemv(x, rows, F, &g, 1, 1, s);
  };
  auto report = [&](const char* name, double bytes, float ms, int launches) {
    const double gbs = bytes / (ms * 1e-3) / 1e9;
    std::printf("%-26s %8.2f us/launch  %6.0f GB/s  %5.1f%% of copy  %5.1f%% of read\n", name, ms * 1e3 / launches, gbs,
                100 * gbs / copyGBs, 100 * gbs / readGBs);
  };
  const int reps = 20;
  auto timeEach = [&](const char* name, double bytes, auto&& op) {
    for (const Layer& l : layers) op(l);  // warm-up
    t.start(s);
    for (int r = 0; r < reps; ++r)
      for (const Layer& l : layers) op(l);
    report(name, bytes * L * reps, t.stopMs(s), L * reps);
  };
  timeEach("q,k,v (2560 x 2048)", 2.0 * (H + 2 * KV) * H, qkv);
  timeEach("o (2048 x 2048)", 2.0 * H * H, o);
  timeEach("gate+up (2 x 5632 x 2048)", 4.0 * F * H, mlp);
  timeEach("down (2048 x 5632)", 2.0 * H * F, down);
  t.start(s);
  for (int r = 0; r < reps; ++r)
    for (const Layer& l : layers) {
      qkv(l);
      o(l);
      mlp(l);
      down(l);
    }
  report("22 layers, 4 GEMVs each", stepBytes * reps, t.stopMs(s), 4 * L * reps);
  std::printf("  (a step's GEMVs: %.0f MB, %.1f us at the copy rate)\n", stepBytes / 1e6, stepBytes / copyGBs / 1e3);
  CK(cudaGetLastError());
  return 0;
}
