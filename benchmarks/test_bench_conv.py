"""pytest-benchmark: fastres's Triton ``conv_bias_act`` vs cuDNN on every distinct
convolution of ResNet-50 (derived from the model), batch 1/32/256, bf16 and fp16.

    pytest benchmarks/test_bench_conv.py --benchmark-enable [-m "not slow"]

Each benchmark first checks that fastres and eager agree on the same inputs (relative error
within DESIGN.md's bf16/fp16 bound), then times (each timed call ends with
``torch.cuda.synchronize()``; the Triton kernel is autotuned before timing). ``fastres`` is
the fused kernel; ``cudnn_fused`` is eager's ``conv2d(+bias)``, ``add_(residual)``,
``relu_()``; ``cudnn_conv`` is ``conv2d`` alone. The quick set (not ``slow``) is batch 32,
bf16, six representative layers; the rest is marked ``slow``. Skips without CUDA.
"""

from __future__ import annotations

import datetime

import pytest
import torch
from conv_layers import (
    TOL,
    cudnn_conv_fn,
    cudnn_fused_fn,
    fastres_checked_output,
    fastres_fn,
    make_inputs,
    model_conv_layers,
    rel_err,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

LAYERS = model_conv_layers("resnet50")  # meta device: no GPU touched at collection
QUICK = {"conv1", "layer1.0.conv2", "layer1.0.conv3", "layer2.0.conv2",
         "layer3.0.downsample.0", "layer4.0.conv3"}
IMPLS = {"fastres": fastres_fn, "cudnn_fused": cudnn_fused_fn, "cudnn_conv": cudnn_conv_fn}


def _params():
    out = []
    for dtype in (torch.bfloat16, torch.float16):
        for batch in (1, 32, 256):
            for layer in LAYERS:
                quick = batch == 32 and dtype == torch.bfloat16 and layer.name in QUICK
                out.append(pytest.param(
                    layer, batch, dtype, marks=[] if quick else [pytest.mark.slow],
                    id=f"{layer.name}-b{batch}-{str(dtype).split('.')[-1]}"))
    return out


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("layer,batch,dtype", _params())
def test_conv_layer(benchmark, layer, batch, dtype, impl, monkeypatch):
    # cuDNN's timed algorithm choice for this test only (the flag is put back after it: it
    # leaked into every later benchmark of the session before)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    x, w, b, res = make_inputs(layer, batch, dtype)
    fn = IMPLS[impl](layer, x, w, b, res)
    ours = fastres_checked_output(layer, x, w, b, res)  # tunes, then a poisoned-output launch
    ref = cudnn_fused_fn(layer, x, w, b, res)()
    err = rel_err(ours, ref)
    assert err <= TOL[dtype], f"fastres disagrees with eager on {layer.name}: {err:.2e}"
    fn()
    torch.cuda.synchronize()

    def timed():
        fn()
        torch.cuda.synchronize()

    benchmark.extra_info.update(
        layer=layer.name, shape=layer.shape_str(), batch=batch, dtype=str(dtype), impl=impl,
        flops=layer.flops(batch), gpu=torch.cuda.get_device_name(), torch=torch.__version__,
        date=datetime.date.today().isoformat(), rel_err=err)
    benchmark(timed)
