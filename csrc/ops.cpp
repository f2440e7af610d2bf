// fastres._C: operator schemas (namespace fastres_C), argument checks, the CPU implementations
// (the per-element bodies of bodies.h run over the same grid the CUDA kernels use) and the CUDA
// entry points (which call the launchers in kernels.cu and the cuBLASLt GEMM).
//
// The Python ops (namespace `fastres`, fastres/ops/*.py) hold the contracts; these are their
// `cuda` implementations, registered from fastres/_ext_impls.py.

#include <Python.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "bodies.h"
#include "format.h"
#include "cublaslt_gemm.h"
#include "host.h"
#include "kernels.h"

// Importing fastres._C runs the static registrations below; the module's own functions are
// host-side helpers (host.cpp).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"tensor_state", fastres::tensor_state, METH_O,
       "tensor_state(tensors: list[Tensor]) -> bytes: every tensor's version counter (-1 for "
       "an inference tensor) and data pointer, as int64 pairs"},
      {"slots_hold", fastres::slots_hold, METH_VARARGS,
       "slots_hold(dicts: list[dict], names: list[str], held: list) -> bool: whether every "
       "dicts[i].get(names[i]) is held[i]"},
      {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fastres CUDA/C++ operators (torch.ops.fastres_C)", -1,
      methods, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}

namespace fastres {
namespace {

// -- checks ------------------------------------------------------------------------------------

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return DType::kFloat;
    case at::kHalf:
      return DType::kHalf;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "fastres_C: expected float32, float16 or bfloat16, got ", t);
  }
}

void check_float_activation(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a strided (dense) tensor, got ",
              t.layout());
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be 4-D [N, C, H, W], got ", t.dim(),
              "-D shape ", shape_str(t.sizes()));
  TORCH_CHECK(is_float_type(t.scalar_type()), op, ": ", name,
              " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

// For the convolutions (stem, conv1x1), after check_float_activation: C_in = 0 is a convolution
// over no input channels, whose every output would be ReLU(bias) (and an empty [N*P*Q, 0] GEMM
// operand); the Python ops' contract refuses it (fastres/ops/_checks.py), so do their
// implementations. (avgpool_linear keeps C = 0: the output is the bias, as in F.linear.)
void check_has_channels(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.size(1) >= 1, op,
              ": x must have at least one input channel (C_in >= 1), got shape ",
              shape_str(x.sizes()));
}

void check_same_device(const char* op, const char* name, const at::Tensor& t,
                       const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device (", device_str(x.device()),
              "), got ", device_str(t.device()));
}

void check_int32_index(const char* op, const at::Tensor& t) {
  // Per-element bodies index tiles with 32-bit ints; extents must fit.
  for (int64_t s : t.sizes()) {
    TORCH_CHECK(s < (int64_t{1} << 30), op, ": every dimension of x must be below 2^30 (32-bit ",
                "tile indices), got shape ", t.sizes());
  }
}

// -- preprocess ----------------------------------------------------------------------------------

struct PreprocessCall {
  PreprocessGeom g;
  at::Tensor out;
};

PreprocessCall preprocess_prepare(const at::Tensor& images, c10::string_view layout,
                                  at::ArrayRef<double> mean, at::ArrayRef<double> std_,
                                  at::ScalarType dtype) {
  const char* op = "fastres_C::preprocess";
  TORCH_CHECK(images.layout() == at::kStrided, op, ": images must be strided, got ",
              images.layout());
  TORCH_CHECK(images.scalar_type() == at::kByte, op, ": images must be uint8, got ",
              images.scalar_type());
  TORCH_CHECK(images.dim() == 4, op, ": images must be 4-D, got ", images.dim(), "-D shape ",
              shape_str(images.sizes()));
  const bool nhwc = layout == "NHWC";
  // (c10::string_view is std::string_view in recent torch, its own class in older ones.)
  const std::string layout_s(layout.data(), layout.size());
  TORCH_CHECK(nhwc || layout == "NCHW", op, ": layout must be \"NHWC\" or \"NCHW\", got \"",
              layout_s, "\"");
  const int cdim = nhwc ? 3 : 1;
  TORCH_CHECK(images.size(cdim) == 3, op, ": images must have 3 channels ([N, H, W, 3] for NHWC, "
              "[N, 3, H, W] for NCHW), got shape ", shape_str(images.sizes()), " with layout ",
              layout_s);
  TORCH_CHECK(mean.size() == 3 && std_.size() == 3, op,
              ": mean and std must have 3 values, got ", mean.size(), " and ", std_.size());
  for (double s : std_) {
    // checked in float32, the precision the arithmetic divides in (1e-50 is 0 there)
    const float f = static_cast<float>(s);
    TORCH_CHECK(f != 0.0f && std::isfinite(f), op,
                ": std values must be finite and non-zero in float32 (the precision the "
                "normalization runs in), got ", values_str(std_));
  }
  TORCH_CHECK(is_float_type(dtype), op, ": dtype must be float32, float16 or bfloat16, got ",
              dtype);
  PreprocessGeom g{};
  g.N = images.size(0);
  g.H = images.size(nhwc ? 1 : 2);
  g.W = images.size(nhwc ? 2 : 3);
  g.sN = images.stride(0);
  g.sC = images.stride(cdim);
  g.sH = images.stride(nhwc ? 1 : 2);
  g.sW = images.stride(nhwc ? 2 : 3);
  for (int c = 0; c < 3; ++c) {
    g.mean[c] = static_cast<float>(mean[c]);
    g.std[c] = static_cast<float>(std_[c]);
  }
  at::Tensor out = at::empty({g.N, 3, g.H, g.W},
                             images.options().dtype(dtype).memory_format(at::MemoryFormat::ChannelsLast));
  return {g, out};
}

at::Tensor preprocess_cpu(const at::Tensor& images, c10::string_view layout,
                          at::ArrayRef<double> mean, at::ArrayRef<double> std_,
                          at::ScalarType dtype) {
  auto call = preprocess_prepare(images, layout, mean, std_, dtype);
  const PreprocessGeom& g = call.g;
  const uint8_t* in = images.const_data_ptr<uint8_t>();
  const int64_t total = g.N * g.H * g.W * 3;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "preprocess_cpu", [&] {
    scalar_t* out = call.out.data_ptr<scalar_t>();
    at::parallel_for(0, total, 4096, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) out[i] = static_cast<scalar_t>(preprocess_elem(in, g, i));
    });
  });
  return call.out;
}

at::Tensor preprocess_cuda(const at::Tensor& images, c10::string_view layout,
                           at::ArrayRef<double> mean, at::ArrayRef<double> std_,
                           at::ScalarType dtype) {
  TORCH_CHECK(images.is_cuda(), "fastres_C::preprocess (CUDA): images must be a CUDA tensor, got ",
              device_str(images.device()));
  const c10::cuda::CUDAGuard guard(images.device());
  auto call = preprocess_prepare(images, layout, mean, std_, dtype);
  launch_preprocess(images.const_data_ptr<uint8_t>(), call.out.data_ptr(), to_dtype(dtype), call.g,
                    at::cuda::getCurrentCUDAStream().stream());
  return call.out;
}

// -- stem ----------------------------------------------------------------------------------------

struct StemCall {
  StemGeom g;
  at::Tensor wpacked;  // [49 * Cin, Cout] fp32
  at::Tensor bias;     // [Cout] fp32, contiguous
  at::Tensor out;      // [N, Cout, P, Q] channels_last
};

StemCall stem_prepare(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  const char* op = "fastres_C::stem";
  check_float_activation(op, "x", x);
  check_has_channels(op, x);
  check_int32_index(op, x);
  // (C_out >= 1, as the Python contract and the fakes say: an empty weight is refused)
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) >= 1 && weight.size(1) == x.size(1) &&
                  weight.size(2) == 7 && weight.size(3) == 7,
              op, ": weight must be [C_out >= 1, ", x.size(1), ", 7, 7], got ",
              shape_str(weight.sizes()));
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype must equal x's (",
              x.scalar_type(), "), got ", weight.scalar_type());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0), op, ": bias must be [",
              weight.size(0), "], got ", shape_str(bias.sizes()));
  TORCH_CHECK(bias.scalar_type() == at::kFloat, op, ": bias must be float32, got ",
              bias.scalar_type());
  check_same_device(op, "weight", weight, x);
  check_same_device(op, "bias", bias, x);
  TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1, op, ": input must be at least 1x1, got ",
              shape_str(x.sizes()));
  TORCH_CHECK(x.size(1) <= STEM_MAX_CIN_INDEX, op, ": C_in = ", x.size(1),
              " is too large (max ", STEM_MAX_CIN_INDEX, ": 32-bit tile indices)");
  StemGeom g{};
  g.N = x.size(0);
  g.Cin = static_cast<int>(x.size(1));
  g.H = static_cast<int>(x.size(2));
  g.W = static_cast<int>(x.size(3));
  g.Cout = static_cast<int>(weight.size(0));
  g.H1 = (g.H - 1) / 2 + 1;
  g.W1 = (g.W - 1) / 2 + 1;
  g.P = (g.H1 - 1) / 2 + 1;
  g.Q = (g.W1 - 1) / 2 + 1;
  g.tiles_p = (g.P + STEM_TP - 1) / STEM_TP;
  g.tiles_q = (g.Q + STEM_TQ - 1) / STEM_TQ;
  g.chunks = (g.Cout + STEM_CC - 1) / STEM_CC;
  g.sN = x.stride(0);
  g.sC = x.stride(1);
  g.sH = x.stride(2);
  g.sW = x.stride(3);
  StemCall call;
  call.g = g;
  // [C_out, C_in, 7, 7] (any memory format) -> [7, 7, C_in, C_out] fp32: k = (r*7+s)*Cin + ci.
  call.wpacked = weight.to(at::kFloat).permute({2, 3, 1, 0}).contiguous();
  call.bias = bias.contiguous();
  call.out = at::empty({g.N, g.Cout, g.P, g.Q},
                       x.options().memory_format(at::MemoryFormat::ChannelsLast));
  return call;
}

template <typename T, int CIN>
void stem_cpu_kernel(const T* x, const float* wpacked, const float* bias, T* out,
                     const StemGeom& g) {
  const int64_t items = g.N * g.tiles_p * g.tiles_q;
  const int nw = 49 * g.Cin * STEM_CC;
  const int npatch = STEM_PH * STEM_PW * g.Cin;
  // One "block" = (work item, chunk); its "threads" run in loops, phase by phase, exactly as
  // the CUDA kernel's threads do between its barriers.
  at::parallel_for(0, items * g.chunks, 1, [&](int64_t b, int64_t e) {
    std::vector<float> wchunk(nw), bsm(STEM_CC), patch(npatch),
        conv(STEM_CH * STEM_CW * STEM_CC);
    int loaded_chunk = -1;
    for (int64_t blk = b; blk < e; ++blk) {
      const int chunk = static_cast<int>(blk % g.chunks);
      const int64_t item = blk / g.chunks;
      if (chunk != loaded_chunk) {
        for (int i = 0; i < nw; ++i) wchunk[i] = stem_weight_elem(wpacked, g, chunk, i);
        for (int i = 0; i < STEM_CC; ++i) {
          const int c = chunk * STEM_CC + i;
          bsm[i] = c < g.Cout ? bias[c] : 0.0f;
        }
        loaded_chunk = chunk;
      }
      int64_t n;
      int tp, tq;
      stem_work_item(g, item, n, tp, tq);
      for (int i = 0; i < npatch; ++i) patch[i] = stem_patch_elem(x, g, n, tp, tq, i);
      for (int tid = 0; tid < STEM_THREADS; ++tid) {
        const int cl0 = (tid % STEM_CGROUPS) * STEM_NC;
        const int pg = tid / STEM_CGROUPS;
        float acc[STEM_NPX][STEM_NC];
        stem_conv_block<CIN>(patch.data(), wchunk.data(), bsm.data() + cl0, g.Cin, cl0, pg,
                             STEM_PGROUPS, acc);
        for (int j = 0; j < STEM_NPX; ++j) {
          const int pix = pg + j * STEM_PGROUPS;
          if (pix < STEM_CH * STEM_CW) {
            for (int u = 0; u < STEM_NC; ++u) conv[pix * STEM_CC + cl0 + u] = acc[j][u];
          }
        }
      }
      for (int o = 0; o < STEM_TP * STEM_TQ * STEM_CC; ++o) {
        stem_store_elem(conv.data(), g, n, tp, tq, chunk, o, out);
      }
    }
  });
}

at::Tensor stem_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  auto call = stem_prepare(x, weight, bias);
  if (call.out.numel() == 0) return call.out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "stem_cpu", [&] {
    // The same C_in specialization as the CUDA launcher picks.
    auto kernel = call.g.Cin == 3 ? stem_cpu_kernel<scalar_t, 3> : stem_cpu_kernel<scalar_t, 0>;
    kernel(x.const_data_ptr<scalar_t>(), call.wpacked.const_data_ptr<float>(),
           call.bias.const_data_ptr<float>(), call.out.data_ptr<scalar_t>(), call.g);
  });
  return call.out;
}

at::Tensor stem_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(x.is_cuda(), "fastres_C::stem (CUDA): x must be a CUDA tensor, got ", device_str(x.device()));
  const c10::cuda::CUDAGuard guard(x.device());
  auto call = stem_prepare(x, weight, bias);
  if (call.out.numel() == 0) return call.out;
  const auto* props = at::cuda::getCurrentDeviceProperties();
  const size_t smem = stem_smem_bytes(call.g.Cin);
  TORCH_CHECK(smem <= props->sharedMemPerBlockOptin, "fastres_C::stem (CUDA): C_in = ",
              call.g.Cin, " needs ", smem, " bytes of shared memory per block, the device allows ",
              props->sharedMemPerBlockOptin);
  TORCH_CHECK(call.g.chunks <= 65535, "fastres_C::stem (CUDA): C_out = ", call.g.Cout,
              " is too large (max ", 65535 * STEM_CC, ": one grid row per ", STEM_CC,
              " channels)");
  launch_stem(x.const_data_ptr(), call.wpacked.const_data_ptr<float>(),
              call.bias.const_data_ptr<float>(), call.out.data_ptr(), to_dtype(x.scalar_type()),
              call.g, props->multiProcessorCount, props->sharedMemPerBlockOptin,
              at::cuda::getCurrentCUDAStream().stream());
  return call.out;
}

// -- head: global average pool + linear -------------------------------------------------------

struct HeadCall {
  PoolGeom g;
  at::Tensor weight;  // [K, C] contiguous, x's dtype
  at::Tensor bias;    // [K] fp32, values rounded through x's dtype
  at::Tensor pooled;  // [N, C] x's dtype
  at::Tensor out;     // [N, K] x's dtype
};

HeadCall head_prepare(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  const char* op = "fastres_C::avgpool_linear";
  check_float_activation(op, "x", x);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), op,
              ": weight must be [num_classes, ", x.size(1), "], got ", shape_str(weight.sizes()));
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype must equal x's (",
              x.scalar_type(), "), got ", weight.scalar_type());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0), op, ": bias must be [",
              weight.size(0), "], got ", shape_str(bias.sizes()));
  TORCH_CHECK(bias.scalar_type() == x.scalar_type() || bias.scalar_type() == at::kFloat, op,
              ": bias must be float32 or x's dtype (", x.scalar_type(), "), got ",
              bias.scalar_type());
  check_same_device(op, "weight", weight, x);
  check_same_device(op, "bias", bias, x);
  HeadCall call;
  call.g = PoolGeom{x.size(0), x.size(1), x.size(2), x.size(3),
                    x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  call.weight = weight.contiguous();
  // The contract adds bias.to(x.dtype) (as eager F.linear does), so round it through x's dtype.
  call.bias = bias.to(x.scalar_type()).to(at::kFloat).contiguous();
  call.pooled = at::empty({x.size(0), x.size(1)}, x.options());
  call.out = at::empty({x.size(0), weight.size(0)}, x.options());
  return call;
}

at::Tensor avgpool_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& bias, bool allow_tf32) {
  auto call = head_prepare(x, weight, bias);
  const PoolGeom& g = call.g;
  const int64_t K = call.weight.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "head_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* pooled = call.pooled.data_ptr<scalar_t>();
    at::parallel_for(0, g.N * g.C, 64, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        pooled[i] = static_cast<scalar_t>(head_pool_elem(xp, g, i / g.C, i % g.C));
    });
    const scalar_t* w = call.weight.const_data_ptr<scalar_t>();
    const float* bp = call.bias.const_data_ptr<float>();
    scalar_t* out = call.out.data_ptr<scalar_t>();
    at::parallel_for(0, g.N * K, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        out[i] = static_cast<scalar_t>(head_linear_elem(pooled, w, bp, g.C, i / K, i % K));
    });
  });
  return call.out;
}

at::Tensor avgpool_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& bias, bool allow_tf32) {
  TORCH_CHECK(x.is_cuda(), "fastres_C::avgpool_linear (CUDA): x must be a CUDA tensor, got ",
              device_str(x.device()));
  const c10::cuda::CUDAGuard guard(x.device());
  auto call = head_prepare(x, weight, bias);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  const DType dt = to_dtype(x.scalar_type());
  launch_head_pool(x.const_data_ptr(), call.pooled.data_ptr(), dt, call.g, stream);
  if (call.out.numel() == 0) return call.out;
  if (!gemm_bias_act(call.pooled, call.weight, call.bias, std::nullopt, call.out, false,
                     allow_tf32)) {
    launch_head_linear(call.pooled.const_data_ptr(), call.weight.const_data_ptr(),
                       call.bias.const_data_ptr<float>(), call.out.data_ptr(), dt, call.g.N,
                       call.g.C, call.weight.size(0), stream);
  }
  return call.out;
}

// -- 1x1 convolution through cuBLASLt -------------------------------------------------------------

// The GEMM operands of a 1x1 convolution, as row-major 2-D views of NHWC memory:
// d[M, C_out] = act(a[M, C_in] @ b[C_out, C_in]^T + bias (+ c[M, C_out])), M = N*P*Q. `out` is
// the [N, C_out, P, Q] channels-last tensor whose memory `d` views. The CUDA implementation
// hands these to cuBLASLt and the CPU implementation to a host GEMM, so CPU tests check the
// argument checks and every view and copy made here.
struct Conv1x1Call {
  at::Tensor a, b, bias, d, out;
  std::optional<at::Tensor> c;
};

Conv1x1Call conv1x1_prepare(const char* op, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, int64_t stride,
                            const std::optional<at::Tensor>& residual) {
  check_float_activation(op, "x", x);
  check_has_channels(op, x);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) >= 1 && weight.size(1) == x.size(1) &&
                  weight.size(2) == 1 && weight.size(3) == 1,
              op, ": weight must be [C_out >= 1, ", x.size(1), ", 1, 1], got ",
              shape_str(weight.sizes()));
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype must equal x's (",
              x.scalar_type(), "), got ", weight.scalar_type());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0) &&
                  bias.scalar_type() == at::kFloat,
              op, ": bias must be float32 [", weight.size(0), "], got ", bias.scalar_type(), " ",
              shape_str(bias.sizes()));
  TORCH_CHECK(stride >= 1, op, ": stride must be >= 1, got ", stride);
  check_same_device(op, "weight", weight, x);
  check_same_device(op, "bias", bias, x);
  const int64_t N = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Cout = weight.size(0);
  TORCH_CHECK(H >= 1 && W >= 1, op, ": input must be at least 1x1, got ", shape_str(x.sizes()));
  const int64_t P = (H - 1) / stride + 1, Q = (W - 1) / stride + 1;
  if (residual) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef({N, Cout, P, Q}), op,
                ": residual must be [", N, ", ", Cout, ", ", P, ", ", Q, "], got ",
                shape_str(residual->sizes()));
    TORCH_CHECK(residual->scalar_type() == x.scalar_type(), op,
                ": residual dtype must equal x's (", x.scalar_type(), "), got ",
                residual->scalar_type());
    check_same_device(op, "residual", *residual, x);
  }
  Conv1x1Call call;
  // A strided 1x1 convolution reads every stride-th pixel: gather them into a dense NHWC tensor
  // (one copy kernel) so that the GEMM's A operand is [N*P*Q, C_in] row-major.
  // NHWC views: [N, C, H, W] in channels_last permuted to [N, H, W, C] is dense row-major, and
  // its [N*H*W, C] view is the GEMM operand (a view of the NCHW-ordered tensor would not be).
  const at::Tensor xs = stride > 1 ? x.slice(2, 0, H, stride).slice(3, 0, W, stride) : x;
  call.a = xs.permute({0, 2, 3, 1}).contiguous().view({N * P * Q, Cin});
  call.b = weight.reshape({Cout, Cin}).contiguous();
  call.bias = bias.contiguous();
  at::Tensor out_nhwc = at::empty({N, P, Q, Cout}, x.options());
  call.out = out_nhwc.permute({0, 3, 1, 2});  // [N, C_out, P, Q], channels_last strides
  call.d = out_nhwc.view({N * P * Q, Cout});
  if (residual) call.c = residual->permute({0, 2, 3, 1}).contiguous().view({N * P * Q, Cout});
  return call;
}

at::Tensor conv1x1_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       int64_t stride, const std::optional<at::Tensor>& residual, bool relu,
                       bool allow_tf32) {
  auto call = conv1x1_prepare("fastres_C::conv1x1 (CPU)", x, weight, bias, stride, residual);
  if (call.out.numel() == 0) return call.out;
  // The host stand-in for the cuBLASLt GEMM of the CUDA path: the same operands and epilogue
  // (fp32 accumulation, fp32 bias, the residual as the accumulated C, ReLU, one rounding).
  at::Tensor acc = at::addmm(call.bias, call.a.to(at::kFloat), call.b.to(at::kFloat).t());
  if (call.c) acc.add_(call.c->to(at::kFloat));
  if (relu) acc.clamp_min_(0);  // NaN stays NaN, as in torch.relu
  call.d.copy_(acc);
  return call.out;
}

at::Tensor conv1x1_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                        int64_t stride, const std::optional<at::Tensor>& residual, bool relu,
                        bool allow_tf32) {
  const char* op = "fastres_C::conv1x1";
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", device_str(x.device()));
  const c10::cuda::CUDAGuard guard(x.device());
  auto call = conv1x1_prepare(op, x, weight, bias, stride, residual);
  if (call.out.numel() == 0) return call.out;
  // cuBLASLt's ReLU epilogue turns NaN into 0 (a max with 0 that drops NaN); torch.relu, the
  // contract, the Triton kernel and the CPU implementation keep it. So the GEMM fuses bias and
  // residual only, and the ReLU runs after it, NaN-preserving (clamp_min propagates NaN).
  TORCH_CHECK(gemm_bias_act(call.a, call.b, call.bias, call.c, call.d, /*relu=*/false,
                            allow_tf32),
              op, ": cuBLASLt has no algorithm for M=", call.a.size(0), ", N=", call.b.size(0),
              ", K=", call.a.size(1), " in ", x.scalar_type());
  if (relu) call.d.clamp_min_(0);
  return call.out;
}

}  // namespace
}  // namespace fastres

TORCH_LIBRARY(fastres_C, m) {
  m.def("preprocess(Tensor images, str layout, float[] mean, float[] std, ScalarType dtype) -> "
        "Tensor");
  m.def("stem(Tensor x, Tensor weight, Tensor bias) -> Tensor");
  m.def("avgpool_linear(Tensor x, Tensor weight, Tensor bias, bool allow_tf32) -> Tensor");
  m.def("conv1x1(Tensor x, Tensor weight, Tensor bias, int stride, Tensor? residual, bool relu, "
        "bool allow_tf32) -> Tensor");
  // the fused stem's shared memory per block, for the Python side to check against the GPU's
  // limit before choosing the kernel (it needs more than some GPUs allow)
  m.def("stem_smem_bytes(int cin) -> int", [](int64_t cin) -> int64_t {
    TORCH_CHECK(cin >= 1 && cin <= fastres::STEM_MAX_CIN_INDEX,
                "fastres_C::stem_smem_bytes: cin must be >= 1 and <= ",
                fastres::STEM_MAX_CIN_INDEX, ", got ", cin);
    return static_cast<int64_t>(fastres::stem_smem_bytes(static_cast<int>(cin)));
  });
  // whether the extension's own kernels (preprocess, stem, head) run on CUDA device `device`:
  // the Python side asks once per device before choosing them (the cuBLASLt GEMMs need no code
  // of ours for the GPU's architecture)
  m.def("kernels_available(int device) -> bool", [](int64_t device) -> bool {
    const int64_t count = c10::cuda::device_count();
    TORCH_CHECK(device >= 0 && device < count, "fastres_C::kernels_available: no CUDA device ",
                device, " (", count, " visible)");
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    return fastres::kernels_available();
  });
}

TORCH_LIBRARY_IMPL(fastres_C, CPU, m) {
  m.impl("preprocess", &fastres::preprocess_cpu);
  m.impl("stem", &fastres::stem_cpu);
  m.impl("avgpool_linear", &fastres::avgpool_linear_cpu);
  m.impl("conv1x1", &fastres::conv1x1_cpu);
}

// The ops are inference-only: an input that requires grad gets a grad_fn whose backward raises
// "derivative for fastres_C::<op> is not implemented" (torch's fallback for ops without an
// Autograd kernel only warns, and backward then leaves those inputs' .grad unset)
TORCH_LIBRARY_IMPL(fastres_C, Autograd, m) {
  m.impl("preprocess", torch::autograd::autogradNotImplementedFallback());
  m.impl("stem", torch::autograd::autogradNotImplementedFallback());
  m.impl("avgpool_linear", torch::autograd::autogradNotImplementedFallback());
  m.impl("conv1x1", torch::autograd::autogradNotImplementedFallback());
}

TORCH_LIBRARY_IMPL(fastres_C, CUDA, m) {
  m.impl("preprocess", &fastres::preprocess_cuda);
  m.impl("stem", &fastres::stem_cuda);
  m.impl("avgpool_linear", &fastres::avgpool_linear_cuda);
  m.impl("conv1x1", &fastres::conv1x1_cuda);
}
