"""TF32 convolutions emulated on the CPU: operands truncated vs rounded to TF32, whole networks.

    python benchmarks/tf32_emulation.py [--arch resnet18 resnet50 resnet101] [--seed 0]

Hopper's TF32 tensor-core instructions take fp32 bit patterns and ignore the low 13 mantissa
bits (truncation, triton-lang/triton#4574); cuDNN and cuBLAS convert to TF32 with round to
nearest first, as fastres's Triton kernels now do (``_round_tf32``). This runs a fastres model
end to end on the CPU with every convolution computed as the GPU would after each of the two
conversions (operands converted, products and sums in float64, output fp32) and prints the
relative error of the model's output against the float64 torchvision result:

- ``exact``: fp32 operands unconverted (the CPU's own fp32 result);
- ``round``: round to nearest even to TF32 (cuDNN; fastres's Triton kernels since stop 8);
- ``trunc``: truncation to TF32 (what the Triton kernels did before).

With ``--triton`` a last column runs fastres's own Triton kernels under the interpreter with
``cudnn.allow_tf32`` on, which rounds the operands in the kernel (``_round_tf32``) and then
takes an exact dot: the kernels' arithmetic, checked end to end (slow: ~1 minute for
resnet50).

On an H100 (stop 8) the Triton path before the rounding fix measured resnet18 5.1e-3,
resnet50 2.2e-2, resnet101 5.4e-2, and eager cuDNN TF32 1.1e-3, 5.0e-3, 1.26e-2: the ``trunc``
and ``round`` columns here. Inputs: 2x3x45x39, torchvision models with realistic BatchNorm
statistics. No GPU needed; seconds without ``--triton``.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (--triton runs on the CPU)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def truncate_tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 with the low 13 mantissa bits cleared (Hopper's TF32 MMA on raw fp32 bits)."""
    return (t.float().view(torch.int32) & -8192).view(torch.float32)


def round_tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 rounded to the nearest TF32 value, ties to even (the Triton kernels' _round_tf32;
    finite inputs: ResNet activations and weights are)."""
    i = t.float().view(torch.int32)
    return ((i + (0xFFF + ((i >> 13) & 1))) & -8192).view(torch.float32)


CONVERSIONS = {"exact": lambda t: t.float(), "round": round_tf32, "trunc": truncate_tf32}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


def emulated_conv(convert):
    """A ``conv_bias_act`` implementation computing like a TF32 tensor-core kernel."""

    def impl(x, weight, bias, stride, padding, dilation, groups, residual=None, relu=True):
        y = F.conv2d(convert(x).double(), convert(weight).double(), None, tuple(stride),
                     tuple(padding), tuple(dilation), groups)
        y = y + bias.double().view(1, -1, 1, 1)
        if residual is not None:
            y = y + residual.double()
        if relu:
            y = torch.relu(y)
        return y.float().contiguous(memory_format=torch.channels_last)

    return impl


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", nargs="+", default=["resnet18", "resnet50", "resnet101"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--triton", action="store_true",
                    help="also run fastres's Triton kernels (interpreted, TF32 emulated)")
    args = ap.parse_args(argv)

    import torchvision

    import fastres
    from fastres.ops import _backend
    from fastres.verify import realistic_bn

    reference = importlib.import_module("fastres.ops.conv_bias_act").conv_bias_act_reference
    head = "| model | exact fp32 | TF32 round to nearest | TF32 truncation | trunc / round |"
    print(head + (" Triton kernels, TF32 |" if args.triton else ""))
    print("|---|---:|---:|---:|---:|" + ("---:|" if args.triton else ""))
    try:
        for arch in args.arch:
            torch.manual_seed(args.seed)
            tv = realistic_bn(getattr(torchvision.models, arch)(weights=None)).eval()
            fr = fastres.from_torchvision(tv).eval()
            x = torch.randn(2, 3, 45, 39)
            with torch.no_grad():
                ref = copy.deepcopy(tv).double()(x.double())
            err = {}
            for name, convert in CONVERSIONS.items():
                _backend.register_impl("conv_bias_act", "torch", emulated_conv(convert))
                with torch.no_grad(), _backend.use_backend("torch"):
                    err[name] = rel_err(fr(x), ref)
            _backend.register_impl("conv_bias_act", "torch", reference)
            line = (f"| {arch} | {err['exact']:.2e} | {err['round']:.2e} | "
                    f"{err['trunc']:.2e} | {err['trunc'] / err['round']:.1f} |")
            if args.triton:
                tf32 = torch.backends.cudnn.allow_tf32
                torch.backends.cudnn.allow_tf32 = True
                try:
                    with torch.no_grad(), _backend.use_backend("triton"):
                        line += f" {rel_err(fr(x), ref):.2e} |"
                finally:
                    torch.backends.cudnn.allow_tf32 = tf32
            print(line, flush=True)
    finally:
        _backend.register_impl("conv_bias_act", "torch", reference)
    return 0


if __name__ == "__main__":
    sys.exit(main())
