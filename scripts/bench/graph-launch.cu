// What a recorded decode step pays to start, apart from its kernels: a chain of N short
// kernels (132 blocks each, about a decode step's count) recorded as one CUDA graph and replayed
// back to back, against the same kernels launched one by one, with and without programmatic
// dependent launch, and with the three small copies a decode step has between two replays
// (chosen tokens to the host, inputs to the device, tokens forward on the device). Prints µs
// per replay and per kernel; the difference between a replay and its kernels is the launch.
//
//   nvcc -O3 -std=c++17 -arch=sm_90 -o /tmp/graph-launch scripts/bench/graph-launch.cu
//   /tmp/graph-launch [kernels per graph, default 200]
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cuda-check.h"

// About 2 µs of dependent work per kernel, as a decode step's small kernels take, after the
// same wait and trigger as every kernel in cuda/.
__global__ void stepKernel(float* buf, int spin) {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
  float v = buf[blockIdx.x * blockDim.x + threadIdx.x];
  for (int i = 0; i < spin; ++i) v = v * 0.999f + 0.001f;
  buf[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

void launch(float* buf, int spin, bool pdl, cudaStream_t s) {
  cudaLaunchAttribute a;
  a.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  a.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t c = {};
  c.gridDim = dim3(132);
  c.blockDim = dim3(128);
  c.stream = s;
  c.attrs = &a;
  c.numAttrs = pdl ? 1 : 0;
  CK(cudaLaunchKernelEx(&c, stepKernel, buf, spin));
}

int main(int argc, char** argv) {
  const int kernels = argc > 1 ? std::atoi(argv[1]) : 200;
  const int replays = 200, spin = 400;
  cudaStream_t s;
  CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  float* buf;
  CK(cudaMalloc(&buf, 132 * 128 * sizeof(float)));
  CK(cudaMemset(buf, 0, 132 * 128 * sizeof(float)));
  int32_t *hostTokens, *hostInputs, *devTokens, *devInputs;
  CK(cudaMallocHost(&hostTokens, 64));
  CK(cudaMallocHost(&hostInputs, 256));
  CK(cudaMalloc(&devTokens, 64));
  CK(cudaMalloc(&devInputs, 256));
  cudaEvent_t t0, t1;
  CK(cudaEventCreate(&t0));
  CK(cudaEventCreate(&t1));
  auto time = [&](auto body) {
    body();  // warm-up
    CK(cudaStreamSynchronize(s));
    CK(cudaEventRecord(t0, s));
    for (int r = 0; r < replays; ++r) body();
    CK(cudaEventRecord(t1, s));
    CK(cudaEventSynchronize(t1));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, t0, t1));
    return 1000.0 * ms / replays;  // µs per replay
  };
  auto copies = [&] {  // a decode step's copies between two replays
    CK(cudaMemcpyAsync(hostTokens, devTokens, 4, cudaMemcpyDeviceToHost, s));
    CK(cudaMemcpyAsync(devInputs, hostInputs, 16, cudaMemcpyHostToDevice, s));
    CK(cudaMemcpyAsync(devInputs, devTokens, 4, cudaMemcpyDeviceToDevice, s));
  };
  std::printf("%d kernels per replay, 132 blocks each; µs per replay (per kernel)\n", kernels);
  for (int pdl = 0; pdl < 2; ++pdl) {
    const double direct = time([&] {
      for (int k = 0; k < kernels; ++k) launch(buf, spin, pdl, s);
    });
    cudaGraph_t g;
    cudaGraphExec_t exec;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeRelaxed));
    for (int k = 0; k < kernels; ++k) launch(buf, spin, pdl, s);
    CK(cudaStreamEndCapture(s, &g));
    CK(cudaGraphInstantiate(&exec, g, 0));
    CK(cudaGraphUpload(exec, s));
    const double graph = time([&] { CK(cudaGraphLaunch(exec, s)); });
    const double graphCopies = time([&] {
      copies();
      CK(cudaGraphLaunch(exec, s));
    });
    const double copiesAlone = time(copies);
    std::printf("%-4s direct %8.1f (%5.2f)  graph %8.1f (%5.2f)  graph+copies %8.1f  copies alone %6.1f\n",
                pdl ? "pdl" : "off", direct, direct / kernels, graph, graph / kernels, graphCopies, copiesAlone);
    CK(cudaGraphExecDestroy(exec));
    CK(cudaGraphDestroy(g));
  }
  return 0;
}
