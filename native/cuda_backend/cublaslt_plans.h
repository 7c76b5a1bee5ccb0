// cuBLASLt for the CUDA backend's larger matrix products: the handle, its workspace, and a
// plan (descriptors and algorithm) kept per GEMM shape.
#pragma once
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <array>
#include <cstddef>
#include <map>
#include <memory>

namespace lckv {

class CublasLtPlans {
 public:
  CublasLtPlans() = default;
  CublasLtPlans(const CublasLtPlans&) = delete;
  CublasLtPlans& operator=(const CublasLtPlans&) = delete;
  ~CublasLtPlans() { close(); }

  // Creates the handle and the workspace (on the current device).
  void open();
  // Destroys the handle (the plans and the workspace go with the object).
  void close();

  // C[n, O] (row-major f32) = X[n, I] (bf16) . W[O, I]^T (bf16)
  void matmulBf16(const void* W, const void* X, float* C, int O, int n, int I, cudaStream_t stream);

 private:
  // A cuBLASLt matmul set up for one shape: descriptors and the heuristic's algorithm. Setting
  // one up costs tens of microseconds of host time, as much as the GEMM itself at prefill
  // chunk sizes, so plans are kept per shape (a prefill reuses a handful of shapes).
  struct MatmulPlan {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo{};
    MatmulPlan() = default;
    MatmulPlan(const MatmulPlan&) = delete;
    MatmulPlan& operator=(const MatmulPlan&) = delete;
    ~MatmulPlan();
  };
  static constexpr size_t kMaxMatmulPlans = 256;  // prompts of many lengths: start over past this
  static constexpr size_t kWorkspace = 32 << 20;

  const MatmulPlan& matmulPlan(int O, int n, int I);

  cublasLtHandle_t lt_ = nullptr;
  std::map<std::array<int, 3>, std::unique_ptr<MatmulPlan>> matmulPlans_;  // by (O, n, I)
  std::shared_ptr<void> workspace_;
};

}  // namespace lckv
