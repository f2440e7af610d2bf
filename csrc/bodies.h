// Per-element bodies shared by the CUDA kernels (kernels.cu) and the CPU implementations
// (ops.cpp). Each is a __host__ __device__ function of one output element (or one load, for the
// stem's tiles): the CUDA kernel runs it over threads, the CPU implementation runs the very
// same function over the same grid in loops, so the CPU tests check the indexing and the
// arithmetic the GPU runs.
//
// Scalar types: float, c10::Half, c10::BFloat16 (both convert to/from float on host and
// device), uint8_t for images. Accumulation is always in float.
#pragma once

#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define FASTRES_HD __host__ __device__ __forceinline__
#else
#define FASTRES_HD inline
#endif
// Loop unrolling hint: `unroll` in nvcc's device pass, `GCC unroll` for g++ on the CPU path,
// nothing in nvcc's host pass (neither g++ nor nvcc's front end accepts the other's pragma there,
// and that pass only runs launchers).
#if defined(__CUDA_ARCH__)
#define FASTRES_UNROLL _Pragma("unroll")
#elif defined(__CUDACC__)
#define FASTRES_UNROLL
#else
#define FASTRES_UNROLL _Pragma("GCC unroll 16")
#endif

namespace fastres {

// ------------------------------------------------------------------------------------------
// Fused preprocessing: uint8 image -> ((x / 255) - mean) / std, written NHWC-physical
// ([N, 3, H, W] in channels_last memory format).
// ------------------------------------------------------------------------------------------
struct PreprocessGeom {
  int64_t N, H, W;
  int64_t sN, sC, sH, sW;  // input strides (elements) in [N, C, H, W] index order
  float mean[3];
  float std[3];
};

// Output element i, where i is the NHWC-physical offset ((n * H + h) * W + w) * 3 + c.
FASTRES_HD float preprocess_elem(const uint8_t* in, const PreprocessGeom& g, int64_t i) {
  const int c = static_cast<int>(i % 3);
  int64_t t = i / 3;
  const int64_t w = t % g.W;
  t /= g.W;
  const int64_t h = t % g.H;
  const int64_t n = t / g.H;
  const float v = static_cast<float>(in[n * g.sN + c * g.sC + h * g.sH + w * g.sW]);
  // Selects, not g.mean[c]: a dynamic index would put the parameter struct in local memory.
  const float m = c == 0 ? g.mean[0] : (c == 1 ? g.mean[1] : g.mean[2]);
  const float s = c == 0 ? g.std[0] : (c == 1 ? g.std[1] : g.std[2]);
  // Same operations, in the same order, as ToTensor (x / 255) then Normalize ((x - m) / s).
  return (v / 255.0f - m) / s;
}

// ------------------------------------------------------------------------------------------
// Fused stem: conv 7x7/2 pad 3 + bias + ReLU + max-pool 3x3/2 pad 1, NHWC output.
//
// Work is tiled: one work item is (image n, a STEM_TP x STEM_TQ tile of pooled outputs, a chunk
// of STEM_CC output channels). It needs a (2*TP+1) x (2*TQ+1) tile of convolution outputs, which
// needs a (4*TP+7) x (4*TQ+7) x C_in patch of the input. The three phases (load the patch and
// weights, compute the conv tile, pool it) are the bodies below; on the GPU the patch, the
// weights and the conv tile live in shared memory.
// ------------------------------------------------------------------------------------------
constexpr int STEM_TP = 4;                 // pooled rows per tile
constexpr int STEM_TQ = 8;                 // pooled cols per tile
constexpr int STEM_CC = 64;                // output channels per chunk
constexpr int STEM_CH = 2 * STEM_TP + 1;   // conv rows per tile
constexpr int STEM_CW = 2 * STEM_TQ + 1;   // conv cols per tile
constexpr int STEM_PH = 2 * (STEM_CH - 1) + 7;  // input rows per tile (4*TP + 7)
constexpr int STEM_PW = 2 * (STEM_CW - 1) + 7;  // input cols per tile (4*TQ + 7)
constexpr int STEM_THREADS = 256;
constexpr int STEM_NC = 4;                          // channels per thread (register block)
constexpr int STEM_CGROUPS = STEM_CC / STEM_NC;     // 16 channel groups of 4
constexpr int STEM_PGROUPS = STEM_THREADS / STEM_CGROUPS;  // 16 pixel groups
// Conv pixels per thread (register block): every thread covers its pixel group in one pass.
constexpr int STEM_NPX = (STEM_CH * STEM_CW + STEM_PGROUPS - 1) / STEM_PGROUPS;
// Largest C_in whose weight chunk (49 * C_in * STEM_CC floats, the largest per-work-item
// extent) and patch are indexed with 32-bit ints below without overflow.
constexpr int STEM_MAX_CIN_INDEX = std::numeric_limits<int>::max() / (49 * STEM_CC);

struct StemGeom {
  int64_t N;
  int Cin, H, W, Cout;
  int H1, W1;  // conv output size
  int P, Q;    // pooled output size
  int tiles_p, tiles_q, chunks;
  int64_t sN, sC, sH, sW;  // input strides (elements) in [N, C, H, W] index order
};

// Work item -> (n, tile row, tile col); chunk index is separate.
FASTRES_HD void stem_work_item(const StemGeom& g, int64_t item, int64_t& n, int& tp, int& tq) {
  tq = static_cast<int>(item % g.tiles_q);
  const int64_t t = item / g.tiles_q;
  tp = static_cast<int>(t % g.tiles_p);
  n = t / g.tiles_p;
}

// Phase 1a: packed weight element idx of chunk `chunk` -> float. wpacked is [7*7*Cin, Cout]
// fp32 (k = (r*7 + s)*Cin + ci); the chunk copy is [7*7*Cin, STEM_CC], zero past Cout.
FASTRES_HD float stem_weight_elem(const float* wpacked, const StemGeom& g, int chunk, int idx) {
  const int cl = idx % STEM_CC;
  const int k = idx / STEM_CC;
  const int c = chunk * STEM_CC + cl;
  return c < g.Cout ? wpacked[static_cast<int64_t>(k) * g.Cout + c] : 0.0f;
}

// Phase 1b: patch element idx ([PH][PW][Cin], ci fastest) of tile (n, tp, tq) -> float, zero
// in the padding.
template <typename T>
FASTRES_HD float stem_patch_elem(const T* x, const StemGeom& g, int64_t n, int tp, int tq,
                                 int idx) {
  const int ci = idx % g.Cin;
  const int t = idx / g.Cin;
  const int pw = t % STEM_PW;
  const int ph = t / STEM_PW;
  const int ih = 4 * (tp * STEM_TP) - 5 + ph;
  const int iw = 4 * (tq * STEM_TQ) - 5 + pw;
  if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) return 0.0f;
  return static_cast<float>(x[n * g.sN + ci * g.sC + static_cast<int64_t>(ih) * g.sH +
                              static_cast<int64_t>(iw) * g.sW]);
}

// Phase 2: conv outputs (bias added, no ReLU yet) for the STEM_NC local channels cl0.. and
// the STEM_NPX conv-tile pixels pix0, pix0 + step, ... (pixel = ty * STEM_CW + tx); pixels past
// the tile are computed on a clamped index and must be discarded by the caller. Each weight
// and patch value read is reused STEM_NPX resp. STEM_NC times (shared-memory reads are what
// bounds this loop on the GPU). fp32 accumulation.
// CIN > 0 fixes C_in at compile time (3 for ResNet), so the (s, ci) loops unroll into
// shared-memory loads with immediate offsets; CIN == 0 takes C_in from `cin_rt`.
template <int CIN>
FASTRES_HD void stem_conv_block(const float* patch, const float* wchunk, const float* bias,
                                int cin_rt, int cl0, int pix0, int step,
                                float (&acc)[STEM_NPX][STEM_NC]) {
  const int cin = CIN > 0 ? CIN : cin_rt;
  int base[STEM_NPX];
FASTRES_UNROLL
  for (int j = 0; j < STEM_NPX; ++j) {
    int pix = pix0 + j * step;
    if (pix >= STEM_CH * STEM_CW) pix = STEM_CH * STEM_CW - 1;
    const int ty = pix / STEM_CW;
    const int tx = pix - ty * STEM_CW;
    base[j] = (2 * ty * STEM_PW + 2 * tx) * cin;
FASTRES_UNROLL
    for (int u = 0; u < STEM_NC; ++u) acc[j][u] = 0.0f;
  }
  for (int r = 0; r < 7; ++r) {
    FASTRES_UNROLL
    for (int s = 0; s < 7; ++s) {
      FASTRES_UNROLL
      for (int ci = 0; ci < cin; ++ci) {
        const float* wp = wchunk + ((r * 7 + s) * cin + ci) * STEM_CC + cl0;
        float wv[STEM_NC];
FASTRES_UNROLL
        for (int u = 0; u < STEM_NC; ++u) wv[u] = wp[u];
        const int off = (r * STEM_PW + s) * cin + ci;
FASTRES_UNROLL
        for (int j = 0; j < STEM_NPX; ++j) {
          const float xv = patch[base[j] + off];
FASTRES_UNROLL
          for (int u = 0; u < STEM_NC; ++u) acc[j][u] += xv * wv[u];
        }
      }
    }
  }
FASTRES_UNROLL
  for (int j = 0; j < STEM_NPX; ++j)
FASTRES_UNROLL
    for (int u = 0; u < STEM_NC; ++u) acc[j][u] += bias[u];
}

// Phase 3: pooled output (pp, qq) of the tile (local), local channel cl, from the conv tile
// ([CH*CW][STEM_CC]). Conv positions outside the conv output count as -inf (max-pool padding);
// NaN propagates as in PyTorch. ReLU is applied after the max (they commute).
FASTRES_HD float stem_pool_elem(const float* conv, const StemGeom& g, int tp, int tq, int pp,
                                int qq, int cl) {
  const int h1_0 = 2 * (tp * STEM_TP + pp) - 1;  // first conv row of the window
  const int w1_0 = 2 * (tq * STEM_TQ + qq) - 1;
  float m = -std::numeric_limits<float>::infinity();
  for (int dy = 0; dy < 3; ++dy) {
    const int h1 = h1_0 + dy;
    if (h1 < 0 || h1 >= g.H1) continue;
    for (int dx = 0; dx < 3; ++dx) {
      const int w1 = w1_0 + dx;
      if (w1 < 0 || w1 >= g.W1) continue;
      const float v = conv[((2 * pp + dy) * STEM_CW + (2 * qq + dx)) * STEM_CC + cl];
      m = (v > m || v != v) ? v : m;
    }
  }
  return (m > 0.0f || m != m) ? m : 0.0f;
}

// Output o (0 <= o < STEM_TP*STEM_TQ*STEM_CC) of a work item: which pooled pixel and channel it
// is, and its NHWC store (nothing past the image's edge or the last channel).
template <typename T>
FASTRES_HD void stem_store_elem(const float* conv, const StemGeom& g, int64_t n, int tp, int tq,
                                int chunk, int o, T* out) {
  const int cl = o % STEM_CC;
  const int pq = o / STEM_CC;
  const int pp = pq / STEM_TQ;
  const int qq = pq % STEM_TQ;
  const int p = tp * STEM_TP + pp;
  const int q = tq * STEM_TQ + qq;
  const int c = chunk * STEM_CC + cl;
  if (p < g.P && q < g.Q && c < g.Cout) {
    out[((n * g.P + p) * g.Q + q) * g.Cout + c] =
        static_cast<T>(stem_pool_elem(conv, g, tp, tq, pp, qq, cl));
  }
}

// ------------------------------------------------------------------------------------------
// Head: global average pool (fp32 sum, mean rounded to x's dtype) + linear (fp32 accumulation).
// ------------------------------------------------------------------------------------------
struct PoolGeom {
  int64_t N, C, H, W;
  int64_t sN, sC, sH, sW;
};

// Mean over H, W of x[n, c] in fp32 (the caller rounds it to x's dtype).
template <typename T>
FASTRES_HD float head_pool_elem(const T* x, const PoolGeom& g, int64_t n, int64_t c) {
  const T* base = x + n * g.sN + c * g.sC;
  float acc = 0.0f;
  for (int64_t h = 0; h < g.H; ++h)
    for (int64_t w = 0; w < g.W; ++w) acc += static_cast<float>(base[h * g.sH + w * g.sW]);
  return acc / static_cast<float>(g.H * g.W);
}

// out[n, k] = sum_c pooled[n, c] * weight[k, c] + bias[k] (pooled [N, C], weight [K, C]
// row-major, bias fp32 already rounded through x's dtype).
template <typename T>
FASTRES_HD float head_linear_elem(const T* pooled, const T* weight, const float* bias, int64_t C,
                                  int64_t n, int64_t k) {
  const T* a = pooled + n * C;
  const T* b = weight + k * C;
  float acc = 0.0f;
  for (int64_t c = 0; c < C; ++c) acc += static_cast<float>(a[c]) * static_cast<float>(b[c]);
  return acc + bias[k];
}

}  // namespace fastres
