// Launchers of the CUDA kernels in kernels.cu. They take raw pointers and a stream so that
// kernels.cu needs no ATen headers (fast to compile); ops.cpp validates and allocates.
#pragma once

#include <cstddef>
#include <cstdint>

#include "bodies.h"

// cudaStream_t without including the CUDA runtime headers here.
struct CUstream_st;

namespace fastres {

enum class DType : int { kFloat = 0, kHalf = 1, kBFloat16 = 2 };

// Whether this build of the extension holds code the current CUDA device can run (machine
// code for its architecture, or PTX its driver can compile): false on a GPU the extension was
// not built for (TORCH_CUDA_ARCH_LIST), where every launch would fail with "no kernel image".
// Any other CUDA error is raised.
bool kernels_available();

// out: [N*H*W*3] in `out_dtype`, NHWC-physical.
void launch_preprocess(const uint8_t* in, void* out, DType out_dtype, const PreprocessGeom& g,
                       CUstream_st* stream);

// Bytes of dynamic shared memory the stem kernel needs for `cin` input channels.
size_t stem_smem_bytes(int cin);

// x: input in `dtype` with the strides in g; wpacked: [49*Cin, Cout] fp32; bias: [Cout] fp32;
// out: [N, P, Q, Cout] in `dtype`. smem_optin: the device's opt-in shared memory per block
// (at least stem_smem_bytes(g.Cin)).
void launch_stem(const void* x, const float* wpacked, const float* bias, void* out, DType dtype,
                 const StemGeom& g, int num_sms, size_t smem_optin, CUstream_st* stream);

// pooled: [N, C] in `dtype` (mean over H, W of x, rounded to dtype).
void launch_head_pool(const void* x, void* pooled, DType dtype, const PoolGeom& g,
                      CUstream_st* stream);

// out: [N, K] in `dtype` = pooled @ weight.T + bias (bias fp32), one thread per output.
void launch_head_linear(const void* pooled, const void* weight, const float* bias, void* out,
                        DType dtype, int64_t N, int64_t C, int64_t K, CUstream_st* stream);

}  // namespace fastres
