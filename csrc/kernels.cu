// CUDA kernels of fastres._C: fused preprocessing, fused stem, the head's pooling (and a plain
// linear fallback). Each kernel runs a per-element body from bodies.h over its threads; the
// CPU implementations in ops.cpp run the same bodies over the same grid.
//
// No ATen here (only c10's scalar types and launch check), so this file compiles quickly.

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>

#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "bodies.h"
#include "kernels.h"

namespace fastres {
namespace {

// Calls f(T{}) with T the C++ type of `dt`.
template <typename F>
void dispatch_float(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat:
      f(float{});
      break;
    case DType::kHalf:
      f(c10::Half{});
      break;
    case DType::kBFloat16:
      f(c10::BFloat16{});
      break;
  }
}

unsigned grid_1d(int64_t total, int threads) {
  // Grid-stride loops below, so the grid is capped; 65535 * 32 blocks is far beyond any SM count.
  const int64_t blocks = (total + threads - 1) / threads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, 65535LL * 32)));
}

// -- preprocessing ---------------------------------------------------------------------------

template <typename T>
__global__ void preprocess_kernel(const uint8_t* __restrict__ in, T* __restrict__ out,
                                  PreprocessGeom g) {
  const int64_t total = g.N * g.H * g.W * 3;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = static_cast<T>(preprocess_elem(in, g, i));
  }
}

// -- stem ------------------------------------------------------------------------------------

// Shared memory: weights [49*Cin][CC] | bias [CC] | patch [PH*PW*Cin] | conv tile [CH*CW][CC].
__host__ __device__ constexpr int stem_weight_floats(int cin) { return 49 * cin * STEM_CC; }
__host__ __device__ constexpr int stem_patch_floats(int cin) {
  // Rounded up to a multiple of 4 floats so the conv tile stays 16-byte aligned.
  return (STEM_PH * STEM_PW * cin + 3) / 4 * 4;
}

template <typename T, int CIN>
__global__ void __launch_bounds__(STEM_THREADS, 2)  // two blocks per SM (smem allows it)
    stem_kernel(const T* __restrict__ x, const float* __restrict__ wpacked,
                const float* __restrict__ bias, T* __restrict__ out, StemGeom g) {
  extern __shared__ __align__(16) float smem[];
  float* wchunk = smem;
  float* bsm = wchunk + stem_weight_floats(g.Cin);
  float* patch = bsm + STEM_CC;
  float* conv = patch + stem_patch_floats(g.Cin);

  const int tid = threadIdx.x;
  const int chunk = blockIdx.y;
  for (int i = tid; i < stem_weight_floats(g.Cin); i += STEM_THREADS)
    wchunk[i] = stem_weight_elem(wpacked, g, chunk, i);
  for (int i = tid; i < STEM_CC; i += STEM_THREADS) {
    const int c = chunk * STEM_CC + i;
    bsm[i] = c < g.Cout ? bias[c] : 0.0f;
  }

  const int cl0 = (tid % STEM_CGROUPS) * STEM_NC;
  const int pg = tid / STEM_CGROUPS;
  const int npatch = STEM_PH * STEM_PW * g.Cin;
  const int64_t items = g.N * g.tiles_p * g.tiles_q;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    int64_t n;
    int tp, tq;
    stem_work_item(g, item, n, tp, tq);
    __syncthreads();  // the previous item is done with patch and conv (and weights are loaded)
    for (int i = tid; i < npatch; i += STEM_THREADS) patch[i] = stem_patch_elem(x, g, n, tp, tq, i);
    __syncthreads();

    float acc[STEM_NPX][STEM_NC];
    stem_conv_block<CIN>(patch, wchunk, bsm + cl0, g.Cin, cl0, pg, STEM_PGROUPS, acc);
FASTRES_UNROLL
    for (int j = 0; j < STEM_NPX; ++j) {
      const int pix = pg + j * STEM_PGROUPS;
      if (pix < STEM_CH * STEM_CW) {
        *reinterpret_cast<float4*>(conv + pix * STEM_CC + cl0) =
            make_float4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]);
      }
    }
    __syncthreads();

    for (int o = tid; o < STEM_TP * STEM_TQ * STEM_CC; o += STEM_THREADS) {
      stem_store_elem(conv, g, n, tp, tq, chunk, o, out);
    }
  }
}
static_assert(STEM_NC == 4, "the conv-tile store above writes float4");

// -- head ------------------------------------------------------------------------------------

template <typename T>
__global__ void head_pool_kernel(const T* __restrict__ x, T* __restrict__ pooled, PoolGeom g) {
  const int64_t total = g.N * g.C;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    pooled[i] = static_cast<T>(head_pool_elem(x, g, i / g.C, i % g.C));
  }
}

template <typename T>
__global__ void head_linear_kernel(const T* __restrict__ pooled, const T* __restrict__ weight,
                                   const float* __restrict__ bias, T* __restrict__ out, int64_t N,
                                   int64_t C, int64_t K) {
  const int64_t total = N * K;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = static_cast<T>(head_linear_elem(pooled, weight, bias, C, i / K, i % K));
  }
}

// Opting in to > 48 KB of dynamic shared memory is per kernel and device: always to the
// device's limit (less the kernel's static shared memory), the same value on every call, so
// that threads launching the generic kernel for different C_in never lower it below another's
// launch (a per-call value raced). Done once per kernel and device: `opted_in[device]` is set
// after the device-wide limit was set (a launch that needs more than that limit sets its own
// size each time, and fails there or at the launch, as before).
constexpr int kMaxDevices = 64;

template <typename T, int CIN>
std::atomic<bool>* stem_opted_in() {
  static std::atomic<bool> flags[kMaxDevices] = {};
  return flags;
}

template <typename Kernel>
void opt_in_shared_memory(Kernel kernel, std::atomic<bool>* opted_in, size_t smem_optin,
                          size_t smem) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached && opted_in[device].load(std::memory_order_acquire)) return;
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const size_t limit = smem_optin > attr.sharedSizeBytes ? smem_optin - attr.sharedSizeBytes
                                                         : smem;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(std::max(limit, smem))));
  if (cached && smem <= limit) opted_in[device].store(true, std::memory_order_release);
}

}  // namespace

// -- launchers -------------------------------------------------------------------------------

bool kernels_available() {
  // Every kernel here is compiled for the same targets: one stands for all.
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, preprocess_kernel<float>);
  if (err == cudaSuccess) return true;
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction ||
      err == cudaErrorUnsupportedPtxVersion || err == cudaErrorInvalidPtx) {
    (void)cudaGetLastError();  // (not a sticky error: clear it, nothing is wrong with the GPU)
    return false;
  }
  C10_CUDA_CHECK(err);
  return false;
}

void launch_preprocess(const uint8_t* in, void* out, DType out_dtype, const PreprocessGeom& g,
                       CUstream_st* stream) {
  const int64_t total = g.N * g.H * g.W * 3;
  if (total == 0) return;
  dispatch_float(out_dtype, [&](auto tag) {
    using T = decltype(tag);
    preprocess_kernel<T><<<grid_1d(total, 256), 256, 0, stream>>>(in, static_cast<T*>(out), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

size_t stem_smem_bytes(int cin) {
  return sizeof(float) * (static_cast<size_t>(stem_weight_floats(cin)) + STEM_CC +
                          stem_patch_floats(cin) + STEM_CH * STEM_CW * STEM_CC);
}

void launch_stem(const void* x, const float* wpacked, const float* bias, void* out, DType dtype,
                 const StemGeom& g, int num_sms, size_t smem_optin, CUstream_st* stream) {
  const int64_t items = g.N * g.tiles_p * g.tiles_q;
  if (items == 0 || g.Cout == 0) return;
  const size_t smem = stem_smem_bytes(g.Cin);
  // Two blocks per SM fit for C_in = 3 (86 KB each); each block loops over work items, so the
  // weight chunk is loaded once per block.
  const int64_t want = static_cast<int64_t>(std::max(num_sms, 1)) * 2;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(items, want)),
                  static_cast<unsigned>(g.chunks));
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    // C_in = 3 (RGB) gets the specialized kernel, anything else the generic one.
    auto kernel = g.Cin == 3 ? stem_kernel<T, 3> : stem_kernel<T, 0>;
    if (g.Cin == 3) {
      opt_in_shared_memory(kernel, stem_opted_in<T, 3>(), smem_optin, smem);
    } else {
      opt_in_shared_memory(kernel, stem_opted_in<T, 0>(), smem_optin, smem);
    }
    kernel<<<grid, STEM_THREADS, smem, stream>>>(static_cast<const T*>(x), wpacked, bias,
                                                 static_cast<T*>(out), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_head_pool(const void* x, void* pooled, DType dtype, const PoolGeom& g,
                      CUstream_st* stream) {
  const int64_t total = g.N * g.C;
  if (total == 0) return;
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    head_pool_kernel<T><<<grid_1d(total, 256), 256, 0, stream>>>(
        static_cast<const T*>(x), static_cast<T*>(pooled), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_head_linear(const void* pooled, const void* weight, const float* bias, void* out,
                        DType dtype, int64_t N, int64_t C, int64_t K, CUstream_st* stream) {
  const int64_t total = N * K;
  if (total == 0) return;
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    head_linear_kernel<T><<<grid_1d(total, 256), 256, 0, stream>>>(
        static_cast<const T*>(pooled), static_cast<const T*>(weight), bias,
        static_cast<T*>(out), N, C, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastres
