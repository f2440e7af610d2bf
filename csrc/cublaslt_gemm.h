// cuBLASLt GEMM with a fused epilogue, the engine of the 1x1 convolution and the head's linear.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

namespace fastres {

// d[M, Nc] = act(a[M, K] @ b[Nc, K]^T + bias[Nc] (+ c[M, Nc]))
//
// a, b, c, d: dense row-major 2-D CUDA tensors of one dtype (float, half, bfloat16); bias:
// [Nc] float32 (added in fp32 where cuBLASLt allows a float bias with 16-bit outputs, otherwise
// rounded to d's dtype first). c is the accumulated operand (beta = 1): the residual. act is
// ReLU when `relu`: cuBLASLt's ReLU epilogue, which turns NaN into 0 (torch.relu keeps NaN).
// fp32 uses TF32 tensor cores exactly when `allow_tf32`.
//
// Returns false (d untouched) when cuBLASLt offers no algorithm for the problem (or K == 0);
// throws on a cuBLASLt error.
bool gemm_bias_act(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias,
                   const std::optional<at::Tensor>& c, const at::Tensor& d, bool relu,
                   bool allow_tf32);

}  // namespace fastres
