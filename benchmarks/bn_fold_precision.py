"""Precision of the two ways to apply a folded BatchNorm in a bf16/fp16 convolution.

    python benchmarks/bn_fold_precision.py [--dtype bf16 fp16] [--seed 0]

- **fold**: ``w' = w * gamma / sqrt(var + eps)`` computed in fp32, rounded once to the compute
  dtype; the epilogue adds ``shift`` (fp32). This is what fastres does.
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

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# (C_in, C_out, kernel, stride, H): a selection of ResNet-50's convolutions
LAYERS = [(3, 64, 7, 2, 64), (64, 64, 1, 1, 28), (64, 64, 3, 1, 28), (64, 256, 1, 1, 28),
          (256, 128, 1, 1, 14), (128, 128, 3, 2, 14), (512, 256, 1, 1, 14),
          (256, 256, 3, 1, 7), (1024, 512, 1, 1, 7), (512, 512, 3, 1, 7), (512, 2048, 1, 1, 7)]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def measure(dtype: torch.dtype, seed: int) -> list[tuple[str, float, float]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for cin, cout, k, stride, h in LAYERS:
        x = torch.randn(2, cin, h, h, generator=g, dtype=torch.float64).relu()
        w = torch.randn(cout, cin, k, k, generator=g, dtype=torch.float64) / (cin * k * k) ** 0.5
        gamma = torch.empty(cout, dtype=torch.float64).uniform_(0.2, 2.0, generator=g)
        var = torch.empty(cout, dtype=torch.float64).uniform_(0.01, 4.0, generator=g)
        beta = torch.randn(cout, generator=g, dtype=torch.float64) * 0.2
        mean = torch.randn(cout, generator=g, dtype=torch.float64) * 0.2
        scale64 = gamma / torch.sqrt(var + 1e-5)
        shift64 = beta - mean * scale64
        pad = k // 2
        ref = F.conv2d(x, w, stride=stride, padding=pad) * scale64[:, None, None] \
            + shift64[:, None, None]

        xq = x.to(dtype).double()  # the activations, rounded to the compute dtype
        scale32, shift32 = scale64.float(), shift64.float()
        w_fold = (w.float() * scale32[:, None, None, None]).to(dtype).double()
        y_fold = F.conv2d(xq, w_fold, stride=stride, padding=pad) \
            + shift32.double()[:, None, None]
        w_raw = w.float().to(dtype).double()
        acc = F.conv2d(xq, w_raw, stride=stride, padding=pad).float()  # fp32 accumulator
        y_epi = (acc * scale32[:, None, None] + shift32[:, None, None]).double()
        name = f"{k}x{k}/{stride} {cin}->{cout}"
        rows.append((name, rel_err(y_fold, ref), rel_err(y_epi, ref)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp16"], choices=sorted(DTYPES))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for name in args.dtype:
        rows = measure(DTYPES[name], args.seed)
        print(f"\n{name}: relative error against float64 (conv + BN)")
        print(f"| layer | fold into weights | epilogue scale |\n|---|---:|---:|")
        for layer, e_fold, e_epi in rows:
            print(f"| {layer} | {e_fold:.3e} | {e_epi:.3e} |")
        mf = sum(r[1] for r in rows) / len(rows)
        me = sum(r[2] for r in rows) / len(rows)
        print(f"| mean | {mf:.3e} | {me:.3e} |")


if __name__ == "__main__":
    main()
