// cuBLASLt GEMM with bias (+ ReLU) epilogue and the residual as the accumulated C operand.
//
// Row-major d[M, Nc] = a[M, K] @ b[Nc, K]^T is, in cuBLASLt's column-major terms,
// D (Nc x M, ld Nc) = op(B_lt) * A_lt with B_lt = b seen as K x Nc (ld K, transposed) and
// A_lt = a seen as K x M (ld K). The bias then runs along D's rows (Nc = output channels), which
// is what CUBLASLT_EPILOGUE_BIAS broadcasts.

#include "cublaslt_gemm.h"
#include "format.h"

#include <cublasLt.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

namespace fastres {
namespace {

#define FASTRES_LT_CHECK(expr)                                                            \
  do {                                                                                    \
    const cublasStatus_t status_ = (expr);                                                \
    TORCH_CHECK(status_ == CUBLAS_STATUS_SUCCESS, "fastres_C: cuBLASLt call " #expr       \
                " failed: ", cublasLtGetStatusString(status_), " (", static_cast<int>(status_), \
                ")");                                                                     \
  } while (0)

struct DescDeleter {
  void operator()(cublasLtMatmulDescOpaque_t* p) const { cublasLtMatmulDescDestroy(p); }
  void operator()(cublasLtMatrixLayoutOpaque_t* p) const { cublasLtMatrixLayoutDestroy(p); }
  void operator()(cublasLtMatmulPreferenceOpaque_t* p) const {
    cublasLtMatmulPreferenceDestroy(p);
  }
};
using MatmulDesc = std::unique_ptr<cublasLtMatmulDescOpaque_t, DescDeleter>;
using Layout = std::unique_ptr<cublasLtMatrixLayoutOpaque_t, DescDeleter>;
using Preference = std::unique_ptr<cublasLtMatmulPreferenceOpaque_t, DescDeleter>;

// 16 MiB: enough for the split-K / stream-K algorithms cuBLASLt picks at ResNet shapes; taken
// from PyTorch's caching allocator on the current stream, so it is reused, not reallocated.
constexpr size_t kWorkspaceBytes = 16u << 20;

cudaDataType_t cuda_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return CUDA_R_32F;
    case at::kHalf:
      return CUDA_R_16F;
    case at::kBFloat16:
      return CUDA_R_16BF;
    default:
      TORCH_CHECK(false, "fastres_C: cuBLASLt GEMM supports float32, float16 and bfloat16, got ",
                  t);
  }
}

uint32_t alignment(const void* p) {
  const auto addr = reinterpret_cast<uintptr_t>(p);
  uint32_t a = 1;
  while (a < 256 && (addr % (a * 2)) == 0) a *= 2;
  return a;
}

Layout make_layout(cudaDataType_t t, uint64_t rows, uint64_t cols, int64_t ld) {
  cublasLtMatrixLayout_t raw = nullptr;
  FASTRES_LT_CHECK(cublasLtMatrixLayoutCreate(&raw, t, rows, cols, ld));
  return Layout(raw);
}

struct Plan {
  bool found = false;
  bool float_bias = false;  // cuBLASLt accepted a float32 bias with this output type
  cublasLtMatmulAlgo_t algo{};
};

std::mutex g_plan_mutex;
std::unordered_map<std::string, Plan> g_plans;

// Matmul descriptor for this problem; `bias_type` is the bias element type.
MatmulDesc make_desc(cudaDataType_t dtype, bool allow_tf32, bool relu, cudaDataType_t bias_type,
                     const void* bias) {
  const cublasComputeType_t compute =
      (dtype == CUDA_R_32F && allow_tf32) ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  cublasLtMatmulDesc_t raw = nullptr;
  FASTRES_LT_CHECK(cublasLtMatmulDescCreate(&raw, compute, CUDA_R_32F));
  MatmulDesc desc(raw);
  const cublasOperation_t trans_a = CUBLAS_OP_T, trans_b = CUBLAS_OP_N;
  FASTRES_LT_CHECK(cublasLtMatmulDescSetAttribute(desc.get(), CUBLASLT_MATMUL_DESC_TRANSA,
                                                  &trans_a, sizeof(trans_a)));
  FASTRES_LT_CHECK(cublasLtMatmulDescSetAttribute(desc.get(), CUBLASLT_MATMUL_DESC_TRANSB,
                                                  &trans_b, sizeof(trans_b)));
  const cublasLtEpilogue_t epi = relu ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_BIAS;
  FASTRES_LT_CHECK(cublasLtMatmulDescSetAttribute(desc.get(), CUBLASLT_MATMUL_DESC_EPILOGUE, &epi,
                                                  sizeof(epi)));
  FASTRES_LT_CHECK(cublasLtMatmulDescSetAttribute(
      desc.get(), CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
  const int32_t bt = static_cast<int32_t>(bias_type);
  FASTRES_LT_CHECK(cublasLtMatmulDescSetAttribute(desc.get(), CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                                                  &bt, sizeof(bt)));
  return desc;
}

}  // namespace

bool gemm_bias_act(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias,
                   const std::optional<at::Tensor>& c, const at::Tensor& d, bool relu,
                   bool allow_tf32) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && d.dim() == 2,
              "fastres_C: gemm operands must be 2-D, got a ", shape_str(a.sizes()), ", b ", shape_str(b.sizes()),
              ", d ", shape_str(d.sizes()));
  const int64_t M = a.size(0), K = a.size(1), Nc = b.size(0);
  TORCH_CHECK(b.size(1) == K && d.size(0) == M && d.size(1) == Nc,
              "fastres_C: gemm shapes disagree: a ", shape_str(a.sizes()), ", b ", shape_str(b.sizes()), ", d ",
              shape_str(d.sizes()));
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && d.is_contiguous(),
              "fastres_C: gemm operands must be dense row-major");
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.numel() == Nc && bias.is_contiguous(),
              "fastres_C: gemm bias must be a dense float32 [", Nc, "], got ", bias.scalar_type(),
              " ", shape_str(bias.sizes()));
  if (c) {
    TORCH_CHECK(c->sizes() == d.sizes() && c->is_contiguous() &&
                    c->scalar_type() == d.scalar_type(),
                "fastres_C: gemm C operand must be a dense ", d.scalar_type(), " ", shape_str(d.sizes()),
                ", got ", c->scalar_type(), " ", shape_str(c->sizes()));
  }
  if (M == 0 || Nc == 0) return true;
  if (K == 0) return false;  // (a 0-long reduction: no valid cuBLASLt layout; the caller's kernel)

  const cudaDataType_t dt = cuda_type(a.scalar_type());
  const void* c_ptr = c ? c->data_ptr() : d.data_ptr();
  const float alpha = 1.0f, beta = c ? 1.0f : 0.0f;

  Layout la = make_layout(dt, K, M, K);     // a: K x M col-major
  Layout lb = make_layout(dt, K, Nc, K);    // b: K x Nc col-major, used transposed
  Layout lc = make_layout(dt, Nc, M, Nc);   // c, d: Nc x M col-major
  Layout ld = make_layout(dt, Nc, M, Nc);

  // The epilogue's bias pointer has no alignment preference: cuBLASLt's heuristic reads its
  // alignment from the pointer itself and may pick a kernel that assumes 16 bytes, which then
  // faults ("misaligned address") on a bias that is an offset view. Give it an aligned copy
  // in that case, and key the cached algorithm on the alignment it was chosen for.
  const at::Tensor bias_al = alignment(bias.data_ptr()) >= 16 ? bias : bias.clone();

  const int device = a.get_device();
  const uint32_t al_a = alignment(a.data_ptr()), al_b = alignment(b.data_ptr()),
                 al_c = alignment(c_ptr), al_d = alignment(d.data_ptr()),
                 al_bias = alignment(bias_al.data_ptr());
  const std::string key = std::to_string(device) + ":" + std::to_string(M) + "," +
                          std::to_string(Nc) + "," + std::to_string(K) + ":" +
                          std::to_string(static_cast<int>(dt)) + ":" + (relu ? "r" : "-") +
                          (c ? "c" : "-") + (allow_tf32 ? "t" : "-") + ":" +
                          std::to_string(al_a) + "," + std::to_string(al_b) + "," +
                          std::to_string(al_c) + "," + std::to_string(al_d) + "," +
                          std::to_string(al_bias);

  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(device).stream();

  // The bias as cuBLASLt will read it: float32 if allowed for this output type, else d's dtype.
  at::Tensor bias_lowp;
  auto bias_for = [&](bool float_bias) -> std::pair<cudaDataType_t, const void*> {
    if (float_bias || dt == CUDA_R_32F) return {CUDA_R_32F, bias_al.data_ptr()};
    if (!bias_lowp.defined()) bias_lowp = bias_al.to(a.scalar_type());  // a fresh, aligned copy
    return {dt, bias_lowp.data_ptr()};
  };

  Plan plan;
  {
    std::lock_guard<std::mutex> lock(g_plan_mutex);
    auto it = g_plans.find(key);
    if (it != g_plans.end()) plan = it->second;
  }
  if (!plan.found) {
    Preference pref;
    {
      cublasLtMatmulPreference_t raw = nullptr;
      FASTRES_LT_CHECK(cublasLtMatmulPreferenceCreate(&raw));
      pref.reset(raw);
    }
    const uint64_t ws = kWorkspaceBytes;
    FASTRES_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref.get(), CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> aligns[] = {
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, al_b},  // cuBLASLt's A is our b
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, al_a},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, al_c},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, al_d}};
    for (const auto& [attr, value] : aligns) {
      FASTRES_LT_CHECK(
          cublasLtMatmulPreferenceSetAttribute(pref.get(), attr, &value, sizeof(value)));
    }
    if (dt != CUDA_R_32F) {
      // Split-K partial sums in fp32 only: the INPLACE and OUTPUT_TYPE schemes add them up in
      // the 16-bit output type (one rounding per split), against fp32 accumulation.
      const uint32_t schemes =
          CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
      FASTRES_LT_CHECK(cublasLtMatmulPreferenceSetAttribute(
          pref.get(), CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &schemes, sizeof(schemes)));
    }
    // Try a float32 bias first (one rounding, as the contract says); fall back to a bias
    // rounded to the output dtype where cuBLASLt has no such kernel.
    const bool options[] = {true, false};
    for (const bool float_bias : options) {
      if (!float_bias && dt == CUDA_R_32F) break;
      auto [bt, bp] = bias_for(float_bias);
      MatmulDesc desc = make_desc(dt, allow_tf32, relu, bt, bp);
      cublasLtMatmulHeuristicResult_t result{};
      int returned = 0;
      const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(
          handle, desc.get(), lb.get(), la.get(), lc.get(), ld.get(), pref.get(), 1, &result,
          &returned);
      if (st == CUBLAS_STATUS_SUCCESS && returned > 0) {
        plan.found = true;
        plan.float_bias = float_bias;
        plan.algo = result.algo;
        break;
      }
      if (st != CUBLAS_STATUS_SUCCESS && st != CUBLAS_STATUS_NOT_SUPPORTED &&
          st != CUBLAS_STATUS_INVALID_VALUE) {
        FASTRES_LT_CHECK(st);
      }
    }
    if (!plan.found) return false;
    std::lock_guard<std::mutex> lock(g_plan_mutex);
    g_plans.emplace(key, plan);
  }

  auto [bt, bp] = bias_for(plan.float_bias);
  MatmulDesc desc = make_desc(dt, allow_tf32, relu, bt, bp);
  at::Tensor workspace = at::empty({static_cast<int64_t>(kWorkspaceBytes)},
                                   a.options().dtype(at::kByte));
  FASTRES_LT_CHECK(cublasLtMatmul(handle, desc.get(), &alpha, b.data_ptr(), lb.get(),
                                  a.data_ptr(), la.get(), &beta, c_ptr, lc.get(), d.data_ptr(),
                                  ld.get(), &plan.algo, workspace.data_ptr(), kWorkspaceBytes,
                                  stream));
  return true;
}

}  // namespace fastres
