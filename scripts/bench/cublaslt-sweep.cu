// The CUDA backend's large-batch matrix products (cuBLASLt, bf16 weights and input, f32 output)
// at decode batches: for each TinyLlama-1.1B shape (and Q/K/V packed, gate and up packed) and
// 32, 64 and 128 input rows, every algorithm cuBLASLt's heuristic offers, each timed over 50
// launches that rotate through copies of the weights filling 512 MB (so L2 holds none of them).
// Prints the heuristic's first choice and the fastest, with the weight bytes read per second.
//
//   nvcc -O2 -std=c++17 -arch=sm_90 -o /tmp/cublaslt-sweep scripts/bench/cublaslt-sweep.cu -lcublasLt
//   /tmp/cublaslt-sweep
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

// A CUDA or cuBLAS call that returns nonzero: print it and exit.
#define CK(x)                                                                    \
  do {                                                                           \
    auto e = (x);                                                                \
    if ((int)e) {                                                                \
      std::printf("error %d: %s (line %d)\n", (int)e, #x, __LINE__);              \
      std::exit(1);                                                              \
    }                                                                            \
  } while (0)
int main() {
  cublasLtHandle_t lt; CK(cublasLtCreate(&lt));
  size_t wsBytes = 32 << 20; void* ws; CK(cudaMalloc(&ws, wsBytes));
  struct S { int O, I; const char* name; } shapes[] = {{2048, 2048, "q/o"}, {256, 2048, "k/v"}, {2560, 2048, "qkv fused"},
     {5632, 2048, "gate/up"}, {11264, 2048, "gate+up fused"}, {2048, 5632, "down"}, {32000, 2048, "lm head"}};
  int ns[] = {32, 64, 128};
  void *Wall, *X; float* C; const size_t wallBytes = 512ull << 20; CK(cudaMalloc(&Wall, wallBytes)); CK(cudaMalloc(&X, 256ull * 11264 * 2)); CK(cudaMalloc(&C, 256ull * 32000 * 4));
  cudaMemset(Wall, 0, wallBytes); cudaMemset(X, 0, 256ull * 11264 * 2);
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  cudaStream_t st; cudaStreamCreate(&st);
  for (auto s : shapes) for (int n : ns) {
    cublasLtMatmulDesc_t op; CK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    cublasOperation_t tA = CUBLAS_OP_T, tB = CUBLAS_OP_N;
    cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &tA, sizeof(tA));
    cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tB, sizeof(tB));
    cublasLtMatrixLayout_t la, lb, lc;
    CK(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, s.I, s.O, s.I));
    CK(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, s.I, n, s.I));
    CK(cublasLtMatrixLayoutCreate(&lc, CUDA_R_32F, s.O, n, s.O));
    cublasLtMatmulPreference_t pref; cublasLtMatmulPreferenceCreate(&pref);
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsBytes, sizeof(wsBytes));
    cublasLtMatmulHeuristicResult_t h[32]; int found = 0;
    cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, lc, lc, pref, 32, h, &found);
    float alpha = 1, beta = 0; double best = 1e9, first = 0; int bi = -1;
    const size_t wBytes = 2ull * s.O * s.I; const int copies = (int)(wallBytes / wBytes);
    auto Wk = [&](int k) { return (void*)((char*)Wall + (size_t)(k % copies) * wBytes); };
    for (int i = 0; i < found; ++i) {
      for (int w = 0; w < 3; ++w) cublasLtMatmul(lt, op, &alpha, Wk(w), la, X, lb, &beta, C, lc, C, lc, &h[i].algo, ws, wsBytes, st);
      cudaEventRecord(a, st);
      const int reps = 50;
      for (int r = 0; r < reps; ++r) cublasLtMatmul(lt, op, &alpha, Wk(r), la, X, lb, &beta, C, lc, C, lc, &h[i].algo, ws, wsBytes, st);
      cudaEventRecord(b, st); cudaEventSynchronize(b);
      float ms; cudaEventElapsedTime(&ms, a, b); double us = ms * 1000 / reps;
      if (cudaGetLastError() != cudaSuccess) us = 1e9;
      if (i == 0) first = us;
      if (us < best) { best = us; bi = i; }
    }
    double bytes = 2.0 * s.O * s.I;
    printf("%-14s O=%5d I=%5d n=%3d algos=%2d heuristic0 %7.2f us (%5.0f GB/s)  best #%d %7.2f us (%5.0f GB/s)\n", s.name, s.O, s.I, n, found,
           first, bytes / first / 1e3, bi, best, bytes / best / 1e3);
    cublasLtMatmulPreferenceDestroy(pref); cublasLtMatrixLayoutDestroy(la); cublasLtMatrixLayoutDestroy(lb); cublasLtMatrixLayoutDestroy(lc); cublasLtMatmulDescDestroy(op);
  }
}
