"""Precision of the ways to apply a folded BatchNorm in a convolution.

    python benchmarks/bn_fold_precision.py [--dtype bf16 fp16 fp32] [--seed 0]

- **fold (f64)**: ``w' = w * gamma / sqrt(var + eps)`` computed in float64, rounded once to the
  compute dtype; the epilogue adds ``shift`` (rounded once to fp32). This is what fastres does
  (``fastres.plan.fold_batchnorm``, which this script calls).
- **fold (fp32)**: the same, computed in fp32 (the rsqrt, the gamma product and the weight
  product each rounded); what fastres did before.
- **epilogue scale**: ``w`` rounded to the compute dtype unscaled; the epilogue computes
  ``acc * scale + shift`` in fp32 (one more per-channel load and multiply per output).

Both round the activations the same way and accumulate exactly here (float64 after rounding the
operands), so the difference between them is the rounding of the weights alone. Weights and
BatchNorm statistics are random with realistic spreads (per-channel scales from 0.05 to 5);
the layer shapes are ResNet-50's. Runs on the CPU in a few seconds; no GPU needed.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (C_in, C_out, kernel, stride, H): a selection of ResNet-50's convolutions
LAYERS = [(3, 64, 7, 2, 64), (64, 64, 1, 1, 28), (64, 64, 3, 1, 28), (64, 256, 1, 1, 28),
          (256, 128, 1, 1, 14), (128, 128, 3, 2, 14), (512, 256, 1, 1, 14),
          (256, 256, 3, 1, 7), (1024, 512, 1, 1, 7), (512, 512, 3, 1, 7), (512, 2048, 1, 1, 7)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def fastres_fold(w: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, mean: torch.Tensor,
                 var: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """fastres's own fold of these float64 parameters (stored as fp32, as a model holds them)."""
    from fastres.plan import fold_batchnorm

    conv = torch.nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:], bias=False)
    bn = torch.nn.BatchNorm2d(w.shape[0], eps=1e-5).eval()
    with torch.no_grad():
        conv.weight.copy_(w)
        for t, v in ((bn.weight, gamma), (bn.bias, beta), (bn.running_mean, mean),
                     (bn.running_var, var)):
            t.copy_(v)
    step = fold_batchnorm(conv, bn, dtype)
    return step.weight.double(), step.bias.double()


def measure(dtype: torch.dtype, seed: int) -> list[tuple[str, float, float, float]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for cin, cout, k, stride, h in LAYERS:
        x = torch.randn(2, cin, h, h, generator=g, dtype=torch.float64).relu()
        # the parameters as a model stores them (fp32), held in float64 for the reference
        w = (torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5).double()
        gamma = torch.empty(cout).uniform_(0.2, 2.0, generator=g).double()
        var = torch.empty(cout).uniform_(0.01, 4.0, generator=g).double()
        beta = (torch.randn(cout, generator=g) * 0.2).double()
        mean = (torch.randn(cout, generator=g) * 0.2).double()
        scale64 = gamma / torch.sqrt(var + 1e-5)
        shift64 = beta - mean * scale64
        pad = k // 2
        ref = F.conv2d(x, w, stride=stride, padding=pad) * scale64[:, None, None] \
            + shift64[:, None, None]

        xq = x.to(dtype).double()  # the activations, rounded to the compute dtype
        w_f64, shift_f64 = fastres_fold(w, gamma, beta, mean, var, dtype)
        y_f64 = F.conv2d(xq, w_f64, stride=stride, padding=pad) + shift_f64[:, None, None]
        scale32 = torch.rsqrt(var.float() + 1e-5) * gamma.float()
        shift32 = beta.float() - mean.float() * scale32
        w_fold = (w.float() * scale32[:, None, None, None]).to(dtype).double()
        y_fold = F.conv2d(xq, w_fold, stride=stride, padding=pad) \
            + shift32.double()[:, None, None]
        w_raw = w.float().to(dtype).double()
        acc = F.conv2d(xq, w_raw, stride=stride, padding=pad).float()  # fp32 accumulator
        y_epi = (acc * scale64.float()[:, None, None] + shift64.float()[:, None, None]).double()
        name = f"{k}x{k}/{stride} {cin}->{cout}"
        rows.append((name, rel_err(y_f64, ref), rel_err(y_fold, ref), rel_err(y_epi, ref)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp16"], choices=sorted(DTYPES))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for name in args.dtype:
        rows = measure(DTYPES[name], args.seed)
        print(f"\n{name}: relative error against float64 (conv + BN)")
        print("| layer | fold (f64) | fold (fp32) | epilogue scale |\n|---|---:|---:|---:|")
        for layer, *errs in rows:
            print(f"| {layer} | " + " | ".join(f"{e:.3e}" for e in errs) + " |")
        means = [sum(r[i] for r in rows) / len(rows) for i in (1, 2, 3)]
        print("| mean | " + " | ".join(f"{m:.3e}" for m in means) + " |")


if __name__ == "__main__":
    main()
