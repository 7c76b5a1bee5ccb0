// cuBLASLt for the CUDA backend's larger matrix products (cublaslt_plans.h).
#include "cublaslt_plans.h"

#include <nvtx3/nvToolsExt.h>

#include <new>
#include <string>

#include "../engine/errors.h"
#include "device_memory.h"

namespace lckv {

namespace {

void cublasOk(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return;
  if (s == CUBLAS_STATUS_ALLOC_FAILED) throw std::bad_alloc();
  throw EngineError(kErrCuda, std::string(what) + ": cuBLAS status " + std::to_string((int)s));
}

}  // namespace

void CublasLtPlans::open() {
  cublasOk(cublasLtCreate(&lt_), "cublasLtCreate");
  workspace_ = deviceAlloc(kWorkspace);
}

void CublasLtPlans::close() {
  if (lt_) cublasLtDestroy(lt_);
  lt_ = nullptr;
}

CublasLtPlans::MatmulPlan::~MatmulPlan() {
  if (a) cublasLtMatrixLayoutDestroy(a);
  if (b) cublasLtMatrixLayoutDestroy(b);
  if (c) cublasLtMatrixLayoutDestroy(c);
  if (op) cublasLtMatmulDescDestroy(op);
}

const CublasLtPlans::MatmulPlan& CublasLtPlans::matmulPlan(int O, int n, int I) {
  const std::array<int, 3> key{O, n, I};
  auto it = matmulPlans_.find(key);
  if (it != matmulPlans_.end()) return *it->second;
  if (matmulPlans_.size() >= kMaxMatmulPlans) matmulPlans_.clear();
  auto plan = std::make_unique<MatmulPlan>();
  cublasOk(cublasLtMatmulDescCreate(&plan->op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "matmulDesc");
  const cublasOperation_t tA = CUBLAS_OP_T, tB = CUBLAS_OP_N;
  cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSA, &tA, sizeof(tA));
  cublasLtMatmulDescSetAttribute(plan->op, CUBLASLT_MATMUL_DESC_TRANSB, &tB, sizeof(tB));
  cublasOk(cublasLtMatrixLayoutCreate(&plan->a, CUDA_R_16BF, I, O, I), "layout A");  // W as col-major [I, O]
  cublasOk(cublasLtMatrixLayoutCreate(&plan->b, CUDA_R_16BF, I, n, I), "layout B");  // X as col-major [I, n]
  cublasOk(cublasLtMatrixLayoutCreate(&plan->c, CUDA_R_32F, O, n, O), "layout C");   // C as col-major [O, n]
  cublasLtMatmulPreference_t pref = nullptr;
  cublasOk(cublasLtMatmulPreferenceCreate(&pref), "preference");
  size_t ws = kWorkspace;
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
  cublasLtMatmulHeuristicResult_t heur;
  int found = 0;
  const cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(lt_, plan->op, plan->a, plan->b, plan->c, plan->c, pref, 1, &heur, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  if (hs != CUBLAS_STATUS_SUCCESS || found == 0)
    throw EngineError(kErrCuda, "cuBLASLt found no algorithm for a bf16 matmul of " + std::to_string(n) + " x " +
                                       std::to_string(I) + " by " + std::to_string(I) + " x " + std::to_string(O));
  plan->algo = heur.algo;
  return *matmulPlans_.emplace(key, std::move(plan)).first->second;
}

void CublasLtPlans::matmulBf16(const void* W, const void* X, float* C, int O, int n, int I, cudaStream_t stream) {
  nvtxRangePushA("gemm_cublaslt");
  struct Pop { ~Pop() { nvtxRangePop(); } } pop;
  const MatmulPlan& p = matmulPlan(O, n, I);
  const float alpha = 1.0f, beta = 0.0f;
  cublasOk(cublasLtMatmul(lt_, p.op, &alpha, W, p.a, X, p.b, &beta, C, p.c, C, p.c, &p.algo, workspace_.get(), kWorkspace, stream),
           "cublasLtMatmul");
}

}  // namespace lckv
