"""The measured choice and its on-disk cache (:mod:`fastres.tuning`).

On CPU the tuner is exercised with fake candidates (each a plain-torch implementation, some
deliberately wrong or failing) and an injectable timer that reports chosen numbers, through
the real ops and the real model: keys, cache hits and misses, corrupt/truncated/foreign
files, concurrent writers, pinned mode, and "a second process tunes nothing". The GPU tests
(``cuda`` marker) time the real implementations.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from conftest import assert_close_rel

import fastres
from fastres import tuning
from fastres.ops import _backend

REPO = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()


def _float64(args: tuple) -> tuple:
    """An op's arguments with its floating-point tensors in float64 (a precise reference)."""
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


# -- fixtures and fakes ------------------------------------------------------------------------

class FakeTimer:
    """Reports ``speeds[label]`` (default 5.0) ms, optionally per input shape; counts calls."""

    def __init__(self, speeds=None, per_shape=None):
        self.speeds = speeds or {"a": 3.0, "b": 1.0, "c": 2.0}
        self.per_shape = per_shape or {}
        self.calls = []
        self.lock = threading.Lock()

    def __call__(self, run, cand):
        run()
        with self.lock:
            self.calls.append(cand.label)
        return self.speeds.get(cand.label, 5.0)


def fake_candidates(labels=("a", "b", "c"), perturb=(), backend="torch"):
    """Candidates named ``labels`` that all run the op's torch reference (those in
    ``perturb`` add a small offset, so a test can tell which one ran), each of ``backend``
    (a name, or a function of the label)."""

    def hook(op, device, args, kwargs):
        ref = _backend.implementations(op)["torch"].fn
        out = []
        for label in labels:
            if label in perturb:
                def fn(*a, _ref=ref, **k):
                    return _ref(*a, **k) + 1e-3
            else:
                fn = ref
            out.append(tuning.Candidate(backend(label) if callable(backend) else backend,
                                        label, {"label": label}, fn))
        return out

    return hook


def bad_then_good(label: str, make_bad):
    """Candidates for any op: ``label``, which runs ``make_bad(ref)`` (``ref``: the op's torch
    reference), then ``good``, which runs the reference."""

    def hook(op, device, args, kwargs):
        ref = _backend.implementations(op)["torch"].fn
        return [tuning.Candidate("triton", label, None, make_bad(ref)),
                tuning.Candidate("triton", "good", None, ref)]

    return hook


def zeros_of(ref):
    """A candidate that computes zeros of the reference's shape."""
    return lambda *a, **k: torch.zeros_like(ref(*a, **k))


@pytest.fixture
def tuner(tmp_path, monkeypatch):
    """A fresh tuner that tunes CPU calls with fake candidates a/b/c (b fastest)."""
    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTRES_TUNE", raising=False)
    tuning.reset()
    timer = FakeTimer()
    tuning.configure(timer=timer, devices=("cpu",), candidates=fake_candidates())
    with _backend.use_backend("auto"):
        yield timer
    tuning.reset()


def pool(x):
    return torch.ops.fastres.max_pool2d(x, 3, 2, 1)


def read_cache(device="cpu") -> dict:
    return json.loads(tuning.cache_path(device).read_text())


def new_process():
    """Forget everything in memory, as a new process would (settings kept)."""
    saved = (tuning._settings.timer, tuning._settings.candidates)
    tuning.reset()
    tuning.configure(timer=saved[0], devices=("cpu",), candidates=saved[1])


# -- hit, miss, keys ---------------------------------------------------------------------------

def test_miss_tunes_once_then_memo_then_disk_hit(tuner):
    x = torch.randn(2, 8, 9, 9)
    y = pool(x)
    assert_close_rel(y, torch.nn.functional.max_pool2d(x, 3, 2, 1), 0.0)
    assert sorted(tuner.calls) == ["a", "b", "c"]
    assert tuning.stats()["tuned"] == 1
    entries = read_cache()["entries"]
    (key, rec), = entries.items()
    assert key.startswith("max_pool2d(f32[2,8,9,9]")
    assert rec["backend"] == "torch" and rec["label"] == "b" and rec["config"] == {"label": "b"}
    assert set(rec["timings"]) == {"torch:a", "torch:b", "torch:c"}

    pool(torch.randn(2, 8, 9, 9))  # same layer: memo, no timing, no disk
    assert len(tuner.calls) == 3 and tuning.stats()["disk_hits"] == 0

    new_process()
    pool(torch.randn(2, 8, 9, 9))
    assert len(tuner.calls) == 3, "a cached layer must not be timed again"
    assert tuning.stats() == {**tuning.stats(), "tuned": 0, "disk_hits": 1, "timed": 0}
    assert set(tuning.choices().values()) == {"torch:b"}


def test_memo_keeps_the_newest_choices_and_an_evicted_one_is_not_timed_again(tuner,
                                                                             monkeypatch):
    """The process's memo of choices is bounded (a service fed many input sizes grew it
    without end); a choice it dropped comes back from the tuning cache, not a new timing."""
    monkeypatch.setattr(tuning, "_MEMO_SIZE", 3, raising=False)
    xs = [torch.randn(1, 4, 7 + i, 9) for i in range(5)]
    for x in xs:
        assert_close_rel(pool(x), torch.nn.functional.max_pool2d(x, 3, 2, 1), 0.0)
    assert len(tuning._memo) == 3 and len(tuning.choices()) == 3
    assert tuning.stats()["tuned"] == 5 and len(tuner.calls) == 15
    x = torch.randn_like(xs[0])  # its choice was dropped first
    assert_close_rel(pool(x), torch.nn.functional.max_pool2d(x, 3, 2, 1), 0.0)
    assert len(tuner.calls) == 15 and tuning.stats()["disk_hits"] == 1
    assert len(tuning._memo) == 3 and set(tuning.choices().values()) == {"torch:b"}


def test_a_choice_remembered_again_evicts_nothing(tuner, monkeypatch):
    """Two threads that miss the same layer both remember it: with the memo full, the second
    evicted another layer's choice although the memo did not grow."""
    monkeypatch.setattr(tuning, "_MEMO_SIZE", 3, raising=False)
    for i in range(3):
        pool(torch.randn(1, 4, 7 + i, 9))
    keys = list(tuning._memo)
    impl = tuning._memo[keys[-1]]
    tuning._remember(keys[-1], "max_pool2d", tuning.Candidate("torch", "b", None, impl.fn),
                     _backend.implementations("max_pool2d"))
    assert list(tuning._memo) == keys and len(tuning.choices()) == 3


def test_keys_separate_shape_dtype_and_layout(tuner):
    x = torch.randn(1, 8, 9, 9)
    pool(x)
    pool(torch.randn(1, 8, 11, 9))                              # shape
    pool(x.to(torch.bfloat16))                                  # dtype
    pool(x.contiguous(memory_format=torch.channels_last))       # layout
    pool(x.clone())                                             # same layer again
    keys = sorted(read_cache()["entries"])
    assert len(keys) == 4, keys
    assert tuning.stats()["tuned"] == 4 and len(tuner.calls) == 12
    assert any("bf16[1,8,9,9]" in k for k in keys)
    assert any("f32[1,8,9,9]:cl" in k for k in keys)
    assert any("f32[1,8,11,9]" in k for k in keys)
    # a pool has no TF32 arithmetic: no key carries the flags (test_tf32_flag_is_part_of_fp32_key)
    assert not any("tf32=" in k for k in keys)

    # a strided (neither contiguous nor channels_last) input is a layout of its own on disk too
    strided = torch.randn(1, 8, 9, 18)[..., ::2]
    pool(strided)
    pool(strided.contiguous())  # (the first layer above again)
    keys = sorted(read_cache()["entries"])
    assert len(keys) == 5 and sum(":s" in k for k in keys) == 1, keys


def test_an_unaligned_operand_keys_a_layer_of_its_own(tuner):
    """An input whose data is not 16-byte aligned (a view 4 bytes into its storage) is a layer
    of its own on disk: a Triton TMA row runs without TMA on it, so such a call is tuned
    without those rows, and its choice must not replace the aligned calls' record. The key
    of an aligned input is what it was. (Within one process the memo, keyed by shapes and
    strides, serves both from the first one's choice: right either way, as a TMA row runs
    without TMA on an unaligned input.)"""
    x = torch.randn(1, 8, 9, 9)
    buf = torch.randn(x.numel() + 4)
    xu = buf[1:x.numel() + 1].view_as(x)
    assert xu.data_ptr() % 16 and xu.is_contiguous()
    pool(x)
    (aligned, record), = read_cache()["entries"].items()
    assert aligned.startswith("max_pool2d(f32[1,8,9,9], ")
    pool(xu)
    assert tuning.stats()["tuned"] == 1  # the memo's choice
    new_process()
    pool(xu)
    entries = read_cache()["entries"]
    assert len(entries) == 2 and tuning.stats()["tuned"] == 1
    assert entries[aligned] == record
    assert set(entries) - {aligned} == {aligned.replace("f32[1,8,9,9]", "f32[1,8,9,9]:unaligned")}
    new_process()  # 16 bytes in: aligned, the first layer's record
    pool(buf[4:x.numel() + 4].view_as(x))
    assert tuning.stats()["disk_hits"] == 1 and tuning.stats()["tuned"] == 0


def test_pinning_after_tuning_in_one_process_runs_the_pinned_choice(tuner, monkeypatch):
    """A layer timed first and then run with FASTRES_TUNE=0 in the same process runs the
    pinned choice, not the remembered timed one (the mode is part of the memo's key)."""
    x = torch.randn(1, 8, 9, 9)
    pool(x)
    assert tuning.stats()["tuned"] == 1 and tuning.stats()["pinned"] == 0
    monkeypatch.setenv("FASTRES_TUNE", "0")
    pool(x)
    assert tuning.stats()["pinned"] == 1


def _conv(x, bias_dtype=torch.float32):
    w = torch.randn(4, x.shape[1], 3, 3, dtype=x.dtype)
    return torch.ops.fastres.conv_bias_act(x, w, torch.randn(4, dtype=bias_dtype), [1, 1],
                                           [1, 1], [1, 1], 1, None, True)


def _head(x):
    return torch.ops.fastres.avgpool_linear(x, torch.randn(5, x.shape[1], dtype=x.dtype),
                                            torch.randn(5))


def test_tf32_flag_is_part_of_fp32_key(tuner):
    """An fp32 layer's key carries the one TF32 flag its arithmetic follows, as eager's: a
    convolution cuDNN's, the head's linear layer cuBLAS's. A 16-bit layer's key carries none
    (its fp32 bias must not split it: setting the matmul precision in a serving process
    retuned every bf16 layer), nor does a pool's."""
    x = torch.randn(1, 8, 9, 9)
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        for cudnn, matmul in ((True, False), (False, False), (False, True), (True, True)):
            torch.backends.cudnn.allow_tf32 = cudnn
            torch.backends.cuda.matmul.allow_tf32 = matmul
            _conv(x)
            _head(x)
            _conv(x.bfloat16())
            _head(x.bfloat16())
            pool(x)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
    keys = list(read_cache()["entries"])
    assert sorted(k.split("(")[0] + (" tf32=" + k.split(" tf32=")[1][0] if " tf32=" in k
                                     else "") + (" bf16" if "bf16[" in k else "")
                  for k in keys) == sorted([
        "avgpool_linear tf32=0", "avgpool_linear tf32=1", "avgpool_linear bf16",
        "conv_bias_act tf32=0", "conv_bias_act tf32=1", "conv_bias_act bf16",
        "max_pool2d"]), keys


def test_per_layer_winner(tmp_path, monkeypatch):
    """Different layers may pick different candidates; each keeps its own."""
    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path))
    tuning.reset()

    def timer(run, cand):
        run()
        return {"a": 1.0, "b": 2.0}[cand.label] if shape[0] == 9 else {"a": 2.0, "b": 1.0}[
            cand.label]

    tuning.configure(timer=timer, devices=("cpu",), candidates=fake_candidates(("a", "b")))
    try:
        with _backend.use_backend("auto"):
            for shape in ([9], [13]):
                pool(torch.randn(1, 4, shape[0], shape[0]))
        labels = {k.split("(")[1].split(",")[2]: v["label"]
                  for k, v in read_cache()["entries"].items()}
        assert labels == {"9": "a", "13": "b"}, labels
    finally:
        tuning.reset()


def test_wrong_or_failing_candidates_are_rejected(tmp_path, monkeypatch):
    """A fast candidate whose output disagrees with the reference, or that raises, is never
    chosen; the record says why."""
    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path))
    tuning.reset()

    def hook(op, device, args, kwargs):
        ref = _backend.implementations(op)["torch"].fn

        def garbage(*a, **k):
            return torch.randn_like(ref(*a, **k))

        def broken(*a, **k):
            raise RuntimeError("out of resources: shared memory")

        return [tuning.Candidate("triton", "garbage", None, garbage),
                tuning.Candidate("triton", "broken", None, broken),
                tuning.Candidate("torch", "torch", None, ref)]

    timer = FakeTimer({"garbage": 0.1, "broken": 0.1, "torch": 1.0})
    tuning.configure(timer=timer, devices=("cpu",), candidates=hook)
    try:
        with _backend.use_backend("auto"):
            x = torch.randn(1, 4, 9, 9)
            assert_close_rel(pool(x), torch.nn.functional.max_pool2d(x, 3, 2, 1), 0.0)
        (rec,) = read_cache()["entries"].values()
        assert rec["label"] == "torch"
        assert "relative error" in rec["rejected"]["triton:garbage"]
        assert "out of resources" in rec["rejected"]["triton:broken"]
        assert timer.calls == ["torch"]
    finally:
        tuning.reset()


@pytest.mark.parametrize("poison", ["nan", "inf", "empty"])
def test_check_is_not_disarmed_by_a_non_finite_first_input(poison, tmp_path, monkeypatch):
    """A layer first met on data with a NaN or an infinity (or on ``torch.empty()``) is still
    checked: the check runs on fresh finite data of the same layout, so a fast candidate
    that computes zeros is rejected, not chosen and saved (it used to be)."""
    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path))
    tuning.reset()

    hook = bad_then_good("zeros", zeros_of)
    timer = FakeTimer({"zeros": 0.1, "good": 1.0})
    tuning.configure(timer=timer, devices=("cpu",), candidates=hook)
    try:
        with _backend.use_backend("auto"):
            x = torch.randn(1, 8, 9, 9).contiguous(memory_format=torch.channels_last)
            if poison == "empty":
                x.fill_(float("nan"))  # what torch.empty may hold
            else:
                x[0, 3, 4, 4] = float(poison)
            pool(x)
            clean = torch.randn(1, 8, 9, 9).contiguous(memory_format=torch.channels_last)
            assert_close_rel(pool(clean), torch.nn.functional.max_pool2d(clean, 3, 2, 1), 0.0)
        (rec,) = read_cache()["entries"].values()
        assert rec["label"] == "good"
        assert "relative error" in rec["rejected"]["triton:zeros"]
        assert timer.calls == ["good"]  # timed on the real (non-finite) arguments
    finally:
        tuning.reset()


def test_a_few_wrong_elements_are_rejected(tmp_path, monkeypatch):
    """One element off by 2 in 262144 keeps the norm-wise error under the fp32 tolerance (5e-3);
    the element-wise part of the check still rejects the candidate."""
    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path))
    tuning.reset()

    def one_wrong(ref):
        def fn(*a, **k):
            y = ref(*a, **k).clone()
            y.view(-1)[y.numel() // 2] += 2.0
            return y

        return fn

    hook = bad_then_good("one_wrong", one_wrong)

    tuning.configure(timer=FakeTimer({"one_wrong": 0.1, "good": 1.0}), devices=("cpu",),
                     candidates=hook)
    try:
        with _backend.use_backend("auto"):
            x = torch.randn(1, 16, 256, 256)
            ref = torch.nn.functional.max_pool2d(x, 3, 2, 1)
            bad = ref.clone()
            bad.view(-1)[bad.numel() // 2] += 2.0
            assert tuning._rel_err(bad, ref) > 5e-3
            assert float(torch.linalg.vector_norm(bad - ref)
                         / torch.linalg.vector_norm(ref)) < 5e-3  # the norm alone passes it
            assert_close_rel(pool(x), ref, 0.0)
        (rec,) = read_cache()["entries"].values()
        assert rec["label"] == "good" and "triton:one_wrong" in rec["rejected"]
    finally:
        tuning.reset()


# (dtype, the check's bound: 5e-3 for fp32, 3e-2 for 16-bit, and a relative error to give)
TOLERANCE_CASES = [
    pytest.param(torch.float32, 5e-3, 1.2, id="fp32-0.6pct-rejected"),
    pytest.param(torch.float32, 5e-3, 0.6, id="fp32-0.3pct-accepted"),
    pytest.param(torch.bfloat16, 3e-2, 1.5, id="bf16-4.5pct-rejected"),
    pytest.param(torch.bfloat16, 3e-2, 1 / 3, id="bf16-1pct-accepted"),
    pytest.param(torch.float16, 3e-2, 1.5, id="fp16-4.5pct-rejected"),
    pytest.param(torch.float16, 3e-2, 1 / 3, id="fp16-1pct-accepted"),
]


@pytest.mark.parametrize("dtype, bound, ratio", TOLERANCE_CASES)
def test_candidate_check_bound_per_dtype(tmp_path, monkeypatch, dtype, bound, ratio):
    """A fast candidate off everywhere by ``ratio`` x the dtype's bound (a pure scale error:
    norm-wise and worst-element error alike, plus the dtype's rounding) is rejected over
    the bound and chosen under it: fp32 0.6% rejected, 0.3% chosen; bf16/fp16 4.5% rejected,
    1% chosen. Kills a looser bound (3e-2 -> 3e-1, 5e-3 -> 9e-3 passed every test: the only
    fp32 case was 1% off, none was 16-bit) and a tighter one."""
    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path))
    tuning.reset()
    scale = 1 + ratio * bound

    def off(ref):  # computed in float64, rounded once to the dtype
        return lambda *a, **k: (ref(*_float64(a), **k) * scale).to(dtype)

    hook = bad_then_good("off", off)
    timer = FakeTimer({"off": 0.1, "good": 1.0})
    tuning.configure(timer=timer, devices=("cpu",), candidates=hook)
    h, w = (int(v) for v in torch.randint(7, 20, (2,)))
    x = torch.randn(1, 8, h, w).to(dtype)
    ref = torch.nn.functional.max_pool2d(x.double(), 3, 2, 1)
    # the error the check sees, on the intended side of the bound by a wide margin
    err = tuning._rel_err((ref * scale).to(dtype), ref.to(dtype))
    rejected = ratio > 1
    assert (err > 1.15 * bound) if rejected else (err < 0.7 * bound), (err, bound)
    try:
        with _backend.use_backend("auto"):
            y = pool(x)
        (rec,) = read_cache()["entries"].values()
        if rejected:
            assert rec["label"] == "good", rec
            assert rec["rejected"]["triton:off"].endswith(f"> {bound:g}"), rec
            assert timer.calls == ["good"]
            assert_close_rel(y, ref, 0.0)  # (a max is exact in any dtype)
        else:
            assert rec["label"] == "off" and not rec["rejected"], rec
            assert sorted(timer.calls) == ["good", "off"]
            assert_close_rel(y, ref * scale, torch.finfo(dtype).eps)  # what "off" returned
    finally:
        tuning.reset()


def test_configure_takes_one_device_type_as_a_string():
    from fastres.ops import _backend as backend

    try:
        tuning.configure(devices="cpu")
        assert backend._TUNED_DEVICE_TYPES == frozenset({"cpu"})
    finally:
        tuning.reset()


def test_choices_name_each_layer(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path))  # never the user's own cache
    tuning.reset()
    tuning.configure(timer=lambda run, cand=None: 1.0, devices=("cpu",), progress=False)
    try:
        with _backend.use_backend("auto"):
            for _ in range(2):  # (the first call may register the providers: memo cleared)
                pool(torch.randn(1, 4, 9, 9))
                pool(torch.randn(1, 4, 11, 9))
        names = tuning.choices()
        assert len(names) == 2, names  # one entry per layer (they used to collapse to one)
        assert {k.split("]")[0] for k in names} == {
            "max_pool2d((torch.Size([1, 4, 9, 9", "max_pool2d((torch.Size([1, 4, 11, 9"}
    finally:
        tuning.reset()


def test_no_tuning_while_tracing_or_capturing(tuner, monkeypatch):
    """An untuned layer met during capture/tracing runs the pinned choice and is tuned at its
    next ordinary call."""
    x = torch.randn(1, 4, 9, 9)
    with monkeypatch.context() as patch:
        patch.setattr(fastres.plan, "_dynamo_tracing", lambda: True)  # (as dynamo traces)
        with pytest.warns(RuntimeWarning, match="cannot be tuned during torch.compile"):
            y = pool(x)
    assert_close_rel(y, torch.nn.functional.max_pool2d(x, 3, 2, 1), 0.0)
    assert tuner.calls == [] and tuning.stats()["deferred"] == 1
    assert not tuning.cache_path("cpu").exists()
    pool(x)
    assert sorted(tuner.calls) == ["a", "b", "c"]


# -- the cache file ----------------------------------------------------------------------------

def _assert_rewritten_valid(n_entries=1):
    data = read_cache()
    assert data["format"] == tuning.FORMAT and data["schema"] == tuning.SCHEMA
    assert data["env"] == tuning.environment(torch.device("cpu"))
    assert len(data["entries"]) == n_entries


@pytest.mark.parametrize("content", [
    "{\"format\": \"fastres-tuning-cache\", \"schema\": 1, \"entr",   # truncated JSON
    "\x00\x01garbage\n",                                             # not JSON at all
    "",                                                              # empty file
    "[" * 100000 + "]" * 100000,                # nested too deeply for json (RecursionError)
    b"\xff\xfe\x00binary",                            # not UTF-8 (it was "cannot read")
])
def test_corrupt_or_truncated_file_is_ignored_and_rewritten(tuner, content):
    path = tuning.cache_path("cpu")
    path.parent.mkdir(parents=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.warns(tuning.TuningCacheWarning, match="corrupt or truncated"):
        pool(torch.randn(1, 4, 9, 9))
    assert len(tuner.calls) == 3
    _assert_rewritten_valid()


def test_truncated_real_file(tuner):
    for s in (9, 11, 13):
        pool(torch.randn(1, 4, s, s))
    path = tuning.cache_path("cpu")
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    new_process()
    with pytest.warns(tuning.TuningCacheWarning, match="corrupt or truncated"):
        pool(torch.randn(1, 4, 9, 9))
    assert tuning.stats()["tuned"] == 1
    _assert_rewritten_valid(1)


def _valid_doc():
    return {"format": tuning.FORMAT, "schema": tuning.SCHEMA,
            "env": dict(tuning.environment(torch.device("cpu"))), "entries": {}}


@pytest.mark.parametrize("change", ["schema", "env", "format", "entries", "list"])
def test_foreign_file_is_ignored_and_rewritten(tuner, change):
    doc = _valid_doc()
    if change == "schema":
        doc["schema"] = 999
    elif change == "env":
        doc["env"]["torch"] = "0.0.1"
    elif change == "format":
        doc["format"] = "somebody-elses-cache"
    elif change == "entries":
        doc["entries"] = ["not", "a", "table"]
    else:
        doc = [1, 2, 3]
    path = tuning.cache_path("cpu")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(doc))
    with pytest.warns(tuning.TuningCacheWarning, match="foreign"):
        pool(torch.randn(1, 4, 9, 9))
    _assert_rewritten_valid()


def test_malformed_records_are_skipped(tuner):
    doc = _valid_doc()
    doc["entries"] = {"max_pool2d(junk)": {"backend": 3}, "other": "x"}
    path = tuning.cache_path("cpu")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(doc))
    pool(torch.randn(1, 4, 9, 9))
    _assert_rewritten_valid(1)


def test_cached_choice_no_longer_offered_is_retuned(tuner):
    pool(torch.randn(1, 4, 9, 9))
    new_process()
    tuning.configure(candidates=fake_candidates(("a", "c")))  # "b" is gone
    pool(torch.randn(1, 4, 9, 9))
    (rec,) = read_cache()["entries"].values()
    assert rec["label"] == "c"


def test_unwritable_cache_dir_keeps_working(tuner, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("FASTRES_CACHE_DIR", str(blocker / "cache"))
    x = torch.randn(1, 4, 9, 9)
    with pytest.warns(tuning.TuningCacheWarning, match="cannot write"):
        y = pool(x)
    assert_close_rel(y, torch.nn.functional.max_pool2d(x, 3, 2, 1), 0.0)
    pool(x)
    assert len(tuner.calls) == 3  # remembered in memory


def test_atomic_write_leaves_no_temporaries(tuner):
    for s in (9, 10, 11):
        pool(torch.randn(1, 4, s, s))
    files = sorted(p.name for p in tuning.cache_path("cpu").parent.iterdir())
    assert [f for f in files if f.endswith(".tmp")] == []
    assert len([f for f in files if f.endswith(".json")]) == 1


def test_a_write_stopped_halfway_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    """The file is replaced only once the new document is whole: a writer stopped after it
    wrote part of the JSON leaves the old file, readable, and no temporary."""
    path = tmp_path / "c.json"
    cache = tuning.TuningCache(path, {"device": "test"})
    cache.put("k1", {"backend": "torch", "label": "t"})
    before = path.read_text()

    def dump(data, f, **kwargs):
        f.write(json.dumps(data)[:20])
        raise KeyboardInterrupt

    monkeypatch.setattr(tuning.json, "dump", dump)
    with pytest.raises(KeyboardInterrupt):
        cache.put("k2", {"backend": "torch", "label": "t"})
    monkeypatch.undo()
    assert path.read_text() == before
    assert list(json.loads(before)["entries"]) == ["k1"]
    assert list(tmp_path.glob("*.tmp")) == []


def test_cache_file_follows_the_triton_version_and_gpu_capability(tuner, monkeypatch):
    """A choice depends on the Triton that compiled the kernel and the GPU that ran it: each
    has its own cache file (DESIGN: keyed by GPU name, capability and library versions)."""
    import triton

    first = tuning.cache_path("cpu")
    monkeypatch.setattr(triton, "__version__", "0.0.0-other", raising=False)
    monkeypatch.setattr(tuning, "_envs", {})
    assert tuning.environment(torch.device("cpu"))["triton"] == "0.0.0-other"
    assert tuning.cache_path("cpu") != first
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda idx=None: "Fake GPU")
    paths = []
    for cap in ((8, 0), (9, 0)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda idx=None, c=cap: c)
        monkeypatch.setattr(tuning, "_envs", {})
        env = tuning.environment(torch.device("cuda"))
        assert env["capability"] == "{}.{}".format(*cap) and env["device"] == "Fake GPU"
        paths.append(tuning._cache_file(torch.device("cuda")))
    assert paths[0] != paths[1]


@pytest.mark.skipif(not hasattr(os, "fchmod") or not os.path.isdir("/proc/self/fd"),
                    reason="POSIX file modes, /proc")
@pytest.mark.parametrize("error", [KeyboardInterrupt, PermissionError])
def test_an_interrupted_write_leaves_no_file_or_descriptor(tmp_path, monkeypatch, error):
    """A write stopped after its temporary was made (Ctrl-C, a failing chmod) removes the
    file and closes its descriptor (the descriptor was left open when fchmod raised). (An
    interrupt inside mkstemp, before the file has a name here, is left to the sweep below.)"""
    path = tmp_path / "c.json"
    cache = tuning.TuningCache(path, {"device": "test"})

    def fchmod(fd, mode):
        raise error("stopped here")

    fds = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "fchmod", fchmod)
    with contextlib.suppress(error), warnings.catch_warnings():
        warnings.simplefilter("ignore", tuning.TuningCacheWarning)  # (the OSError's)
        cache.put("k1", {"backend": "torch", "label": "t"})
    monkeypatch.undo()
    assert list(tmp_path.glob("*.tmp")) == []
    assert len(os.listdir("/proc/self/fd")) == fds, "the temporary's descriptor leaked"


def test_a_dead_writers_temporaries_are_swept(tmp_path):
    """A writer killed mid-write (or interrupted inside mkstemp) leaves its temporary: the
    next write removes old ones (writes happen under the lock, so they belong to no writer);
    a recent one and other files are left alone."""
    path = tmp_path / "c.json"
    old, recent, other = (tmp_path / "c.json.abc123.tmp", tmp_path / "c.json.def456.tmp",
                          tmp_path / "d.json.abc123.tmp")
    for f in (old, recent, other):
        f.write_text("{")
    an_hour_ago = time.time() - 3600
    for f in (old, other):
        os.utime(f, (an_hour_ago, an_hour_ago))
    tuning.TuningCache(path, {"device": "test"}).put("k1", {"backend": "torch", "label": "t"})
    assert not old.exists() and recent.exists() and other.exists()
    assert list(json.loads(path.read_text())["entries"]) == ["k1"]


def test_merge_on_write_keeps_other_writers_entries(tmp_path):
    env = {"device": "test"}
    path = tmp_path / "c.json"
    rec = {"backend": "torch", "label": "torch"}
    a, b = tuning.TuningCache(path, env), tuning.TuningCache(path, env)
    a.put("k1", rec)
    b.put("k2", rec)          # b loaded before k1 existed: the merge keeps k1
    a.put("k3", rec)
    assert sorted(json.loads(path.read_text())["entries"]) == ["k1", "k2", "k3"]
    assert sorted(tuning.TuningCache(path, env).entries) == ["k1", "k2", "k3"]


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX file modes")
def test_cache_file_is_readable_by_others(tmp_path):
    path = tmp_path / "c.json"
    tuning.TuningCache(path, {"device": "test"}).put("k1", {"backend": "torch", "label": "t"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # mkstemp's 0600 locked other users out


def test_unreadable_cache_file_is_not_replaced(tmp_path, monkeypatch):
    """A file that is there but cannot be read (another user's, say) is left alone: replacing
    it with this process's entries would drop everyone else's. Choices stay in memory."""
    env, rec = {"device": "test"}, {"backend": "torch", "label": "t"}
    path = tmp_path / "c.json"
    tuning.TuningCache(path, env).put("theirs", rec)
    before = path.read_text()
    real_read = type(path).read_bytes

    def read_bytes(self, *a, **k):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self, *a, **k)

    monkeypatch.setattr(type(path), "read_bytes", read_bytes)
    with pytest.warns(tuning.TuningCacheWarning, match="cannot read"):
        mine = tuning.TuningCache(path, env)
    with pytest.warns(tuning.TuningCacheWarning, match="not replacing it"):
        mine.put("mine", rec)
    assert mine.get("mine") == rec
    monkeypatch.undo()
    assert path.read_text() == before


# -- processes ---------------------------------------------------------------------------------

PREAMBLE = textwrap.dedent("""
    import json, os, sys, time
    import torch, fastres
    from fastres import tuning as T
    from fastres.ops import _backend

    def candidates(labels=("a", "b", "c"), perturb=()):
        def hook(op, device, args, kwargs):
            ref = _backend.implementations(op)["torch"].fn
            out = []
            for label in labels:
                fn = ref
                if label in perturb:
                    def fn(*a, _ref=ref, **k):
                        return _ref(*a, **k) + 1e-3
                out.append(T.Candidate("torch", label, {"label": label}, fn))
            return out
        return hook

    SPEEDS = {"a": 3.0, "b": 1.0, "c": 2.0}
    SLEEP = float(os.environ.get("FAKE_TIMER_SLEEP", "0"))

    def timer(run, cand):
        run()
        time.sleep(SLEEP)
        return SPEEDS[cand.label]

    def model_and_input():
        torch.manual_seed(int(os.environ["FASTRES_CHILD_SEED"]))  # the test's: fresh per run
        m = fastres.resnet18(num_classes=10)
        m.train()
        with torch.no_grad():
            m(torch.randn(4, 3, 32, 32))  # realistic BN statistics, deterministic
        m.eval()
        return m, torch.randn(2, 3, 32, 32)
""")


def child_seed() -> str:
    """The seed child processes draw their model and input from: new each run (mixed from the
    run's FASTRES_TEST_SEED, as conftest seeds the test itself), the same for every child of
    one test (their outputs are compared)."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
    return str((zlib.crc32(test.encode()) ^ int(os.environ["FASTRES_TEST_SEED"])) % (2**31))


def run_script(body: str, cache_dir: Path, extra_env=None, background=False):
    env = dict(os.environ)
    env.update({"FASTRES_CACHE_DIR": str(cache_dir), "FASTRES_BACKEND": "auto",
                "FASTRES_CHILD_SEED": child_seed(),
                "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", "")})
    env.pop("FASTRES_TUNE", None)
    env.update(extra_env or {})
    args = [sys.executable, "-c", PREAMBLE + textwrap.dedent(body)]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=str(REPO))
    if background:
        return proc
    return finish(proc)


def finish(proc) -> dict:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"subprocess failed:\n{err[-4000:]}"
    return json.loads(out.strip().splitlines()[-1])


MODEL_RUN = """
    T.configure(timer=timer, devices=("cpu",), candidates=candidates(perturb=("b",)))
    m, x = model_and_input()
    with torch.no_grad():
        y = m(x)
    torch.save(y, sys.argv[-1] if len(sys.argv) > 1 else os.environ["OUT_FILE"])
    print(json.dumps({"stats": T.stats(), "choices": sorted(set(T.choices().values())),
                      "cache_exists": T.cache_path("cpu").exists()}))
"""


def test_second_process_does_no_tuning(tmp_path):
    first = run_script(MODEL_RUN, tmp_path / "cache", {"OUT_FILE": str(tmp_path / "1.pt")})
    assert first["stats"]["tuned"] > 5 and first["stats"]["timed"] == 3 * first["stats"]["tuned"]
    assert first["choices"] == ["torch:b"]
    second = run_script(MODEL_RUN, tmp_path / "cache", {"OUT_FILE": str(tmp_path / "2.pt")})
    assert second["stats"]["tuned"] == 0 and second["stats"]["timed"] == 0
    # every layer the first process decided (tuned, or found on disk when another call with
    # a differently strided but same-layout argument had just tuned it) is a disk hit now
    assert second["stats"]["disk_hits"] == first["stats"]["tuned"] + first["stats"]["disk_hits"]
    assert second["choices"] == ["torch:b"]
    assert torch.equal(torch.load(tmp_path / "1.pt"), torch.load(tmp_path / "2.pt"))


def test_pinned_mode_is_bit_identical_across_processes(tmp_path):
    """FASTRES_TUNE=0: the first candidate runs (here the unperturbed reference, while timing
    would have picked the perturbed "b"), nothing is timed or written, outputs are equal
    bit for bit."""
    outs = []
    for i in range(2):
        out = tmp_path / f"{i}.pt"
        res = run_script(MODEL_RUN, tmp_path / "cache",
                         {"OUT_FILE": str(out), "FASTRES_TUNE": "0"})
        assert res["stats"]["timed"] == 0 and res["stats"]["tuned"] == 0
        assert res["stats"]["pinned"] > 5
        assert res["choices"] == ["torch:a"] and not res["cache_exists"]
        outs.append(torch.load(out))
    assert torch.equal(outs[0], outs[1])


def test_deterministic_algorithms_pin_the_choice(tuner):
    assert tuning.mode() == "tune"
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert tuning.mode() == "pinned"
        pool(torch.randn(1, 4, 9, 9))
    finally:
        torch.use_deterministic_algorithms(old)
    assert tuner.calls == [] and tuning.stats()["pinned"] == 1
    assert set(tuning.choices().values()) == {"torch:a"}


@pytest.mark.parametrize("value", ["0", "off", "false", " No "])
def test_fastres_tune_env_values(monkeypatch, value):
    monkeypatch.setenv("FASTRES_TUNE", value)
    assert tuning.mode() == "pinned"


@pytest.mark.parametrize("value", ["1", "true", "on", "YES", ""])
def test_fastres_tune_env_values_that_tune(monkeypatch, value):
    monkeypatch.setenv("FASTRES_TUNE", value)
    assert tuning.mode() == "tune"


@pytest.mark.parametrize("value", ["pinned", "disabled", "2", "n", "0.0"])
def test_fastres_tune_env_value_not_understood_is_an_error(tuner, monkeypatch, value, capsys):
    """A value fastres does not know (``pinned``, ``disabled``) raises instead of silently
    tuning, in the forward pass, in the Triton launcher's own choice and in ``fastres tune``
    (a usage error, exit 2)."""
    from fastres import cli
    from fastres.kernels import conv as kc

    monkeypatch.setenv("FASTRES_TUNE", value)
    with pytest.raises(ValueError, match=f"FASTRES_TUNE.*got {value!r}"):
        tuning.mode()
    with pytest.raises(ValueError, match="FASTRES_TUNE"):
        pool(torch.randn(1, 4, 9, 9))
    prob = kc.ConvProblem.from_tensors(torch.randn(1, 8, 9, 9), torch.randn(4, 8, 3, 3),
                                       1, 1, 1, 1)
    with pytest.raises(ValueError, match="FASTRES_TUNE"):
        kc._choose_config(prob, lambda cfg: None)
    # on the CPU and with the default --device cuda, also where there is no GPU (it said
    # "nothing to tune" there, exit 0, before reading the variable)
    for device in ("cpu", "cuda"):
        assert cli.main(["tune", "resnet18", "--batch", "1", "--device", device]) == 2
        err = capsys.readouterr().err
        assert "FASTRES_TUNE" in err and "Traceback" not in err


def test_pinned_mode_runs_the_first_row_even_after_tuning(monkeypatch):
    """The Triton launcher's own choice (a call with no explicit configuration): in pinned
    mode the documented first row, also for a problem this process timed before (it used to
    return the remembered, timed row)."""
    from fastres.kernels import conv as kc

    prob = kc.ConvProblem.from_tensors(torch.randn(1, 8, 9, 9), torch.randn(4, 8, 3, 3),
                                       1, 1, 1, 1)
    rows = [kc.KernelConfig(32, 32, 16, 4, 4, 1), kc.KernelConfig(64, 32, 16, 4, 4, 1)]
    monkeypatch.setattr(kc, "problem_configs", lambda prob, tensors=None: rows)
    monkeypatch.setitem(kc._TUNED, kc._tuned_key(prob), rows[1])
    monkeypatch.delenv("FASTRES_TUNE", raising=False)
    assert kc._choose_config(prob, lambda cfg: None) == rows[1]
    monkeypatch.setenv("FASTRES_TUNE", "0")
    assert kc._choose_config(prob, lambda cfg: None) == rows[0]


CONCURRENT = """
    T.configure(timer=timer, devices=("cpu",), candidates=candidates())
    # a pause between a write's read of the file and its replace: the window in which a
    # writer without the lock would lose another's entries (without it, a missing lock
    # failed this test about half the time)
    _read = T.TuningCache._read
    def _slow_read(self, warn, for_merge=False):
        out = _read(self, warn, for_merge)
        if for_merge:
            time.sleep(0.02)
        return out
    T.TuningCache._read = _slow_read
    start = float(os.environ["START_AT"])
    while time.time() < start:
        time.sleep(0.005)
    first = int(os.environ["FIRST_SIZE"])
    with _backend.use_backend("auto"):
        for s in range(first, first + 12):
            torch.ops.fastres.max_pool2d(torch.randn(1, 4, s, s), 3, 2, 1)
    print(json.dumps(T.stats()))
"""


def test_concurrent_writers_do_not_corrupt_or_lose_entries(tmp_path):
    cache = tmp_path / "cache"
    start = str(time.time() + 6.0)  # both processes start tuning at the same moment
    procs = [run_script(CONCURRENT, cache, {"START_AT": start, "FIRST_SIZE": str(first),
                                            "FAKE_TIMER_SLEEP": "0.01"}, background=True)
             for first in (8, 40, 72)]
    results = [finish(p) for p in procs]
    assert [r["tuned"] for r in results] == [12, 12, 12]
    files = list(cache.glob("tuning-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert len(data["entries"]) == 36
    assert not list(cache.glob("*.tmp"))


# -- candidates from the registered implementations ------------------------------------------

def test_default_candidates_pinned_order_and_triton_configs(monkeypatch):
    """With Triton interpreted on CPU, the Triton conv (its configuration table) comes first,
    the torch reference last; the pinned choice runs Triton's first configuration."""
    pytest.importorskip("triton")
    if not _backend.triton_interpreted() and not HAS_CUDA:
        pytest.skip("needs TRITON_INTERPRET=1 or a GPU")
    from fastres.kernels.conv import conv_configs

    dev = torch.device("cuda" if HAS_CUDA else "cpu")
    x = torch.randn(1, 16, 6, 6, device=dev).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 16, 3, 3, device=dev).contiguous(memory_format=torch.channels_last)
    b = torch.randn(16, device=dev)
    args = (x, w, b, [1, 1], [1, 1], [1, 1], 1, None, True)
    impls = _backend.implementations("conv_bias_act")
    cands = tuning.candidates("conv_bias_act", dev, "auto", impls, args, {})
    backends = [c.backend for c in cands]
    assert backends[0] == "triton" and backends[-1] == "torch"
    cfgs = conv_configs(x, w, [1, 1], [1, 1], [1, 1], 1, None, True)
    assert [c.label for c in cands if c.backend == "triton"] == [str(c) for c in cfgs]
    assert cands[0].config == cfgs[0].as_dict()

    # the Triton stem offers its convolution's table too (no untracked in-kernel autotuning)
    x3 = torch.randn(1, 3, 16, 16, device=dev)
    w7 = torch.randn(16, 3, 7, 7, device=dev)
    stem_args = (x3, w7, torch.randn(16, device=dev))
    stem = tuning.candidates("stem", dev, "auto", _backend.implementations("stem"), stem_args,
                             {})
    if "triton" in _backend.implementations("stem"):
        stem_cfgs = conv_configs(x3, w7, (2, 2), (3, 3), (1, 1), 1, None, True)
        assert [c.label for c in stem if c.backend == "triton"] == [str(c) for c in stem_cfgs]
    assert stem[-1].backend == "torch"

    # and so does the Triton head, for its linear layer's GEMM (it went through the launcher's
    # in-memory autotuner: timed again in every process, and not pinned by FASTRES_TUNE=0)
    from fastres.kernels.head import head_configs

    head_args = (x, torch.randn(10, 16, device=dev), torch.randn(10, device=dev))
    head = tuning.candidates("avgpool_linear", dev, "auto",
                             _backend.implementations("avgpool_linear"), head_args, {})
    if "triton" in _backend.implementations("avgpool_linear"):
        head_cfgs = head_configs(*head_args)
        assert head_cfgs == conv_configs(x.new_empty(1, 16, 1, 1), w.new_empty(10, 16, 1, 1),
                                         1, 0, 1, 1)
        assert [c.label for c in head if c.backend == "triton"] == [str(c) for c in head_cfgs]
    assert head[-1].backend == "torch"

    monkeypatch.setenv("FASTRES_TUNE", "0")
    tuning.reset()
    tuning.configure(devices=("cpu", "cuda"))
    try:
        with _backend.use_backend("auto"):
            impl = _backend.choose("conv_bias_act", dev, *args)
            assert impl.backend == "triton"
            y = impl.fn(*args)
            head_impl = _backend.choose("avgpool_linear", dev, *head_args)
            assert head_impl.backend == "triton"
            head_y = head_impl.fn(*head_args)
        # against the reference ops in float64: fp32 with cudnn.allow_tf32 (default on) is
        # TF32 on the GPU, emulated when interpreted (DESIGN.md's 2e-3), else 1e-5
        ref = _backend.implementations("conv_bias_act")["torch"].fn(*_float64(args))
        assert_close_rel(y, ref, 2e-3 if torch.backends.cudnn.allow_tf32 else 1e-5)
        head_ref = _backend.implementations("avgpool_linear")["torch"].fn(*_float64(head_args))
        assert_close_rel(head_y, head_ref,
                         2e-3 if torch.backends.cuda.matmul.allow_tf32 else 1e-5)
        assert tuning.stats()["pinned"] == 2
        assert sorted(tuning.choices().values()) == sorted(
            [f"triton:{cfgs[0]}", f"triton:{head_cfgs[0]}"])
    finally:
        tuning.reset()


def test_rows_are_pruned_for_the_gpus_shared_memory(monkeypatch):
    """The Triton rows are pruned against the current GPU's opt-in shared memory per block,
    not H100's alone: on an A100 (163 KiB) or an sm_86/89 GPU (99 KiB) the first row, the one
    pinned mode runs without trying it, must fit (it did not: the fp32 GEMM row 128x128x64
    with 3 stages needs 192 KiB)."""
    from fastres.kernels import conv as kc
    from fastres.kernels.configs import SMEM_LIMIT, smem_bytes

    class Props:
        def __init__(self, optin):
            self.shared_memory_per_block_optin = optin

    x = torch.randn(8, 256, 28, 28)
    for dtype in (torch.float32, torch.bfloat16):
        for w in (torch.randn(512, 256, 1, 1), torch.randn(256, 256, 3, 3)):
            prob = kc.ConvProblem.from_tensors(x.to(dtype), w.to(dtype), 1, w.shape[-1] // 2,
                                               1, 1)
            for optin in (SMEM_LIMIT, 167936, 101376):
                monkeypatch.setattr(kc, "_DEVICE_PROPS", {})
                monkeypatch.setattr(kc, "_interpreted", lambda: False)
                monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
                monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
                monkeypatch.setattr(torch.cuda, "get_device_properties",
                                    lambda i, optin=optin: Props(optin))
                rows = kc.problem_configs(prob)
                assert rows and all(smem_bytes(r, x.to(dtype).element_size()) <= optin
                                    for r in rows), (dtype, optin, rows)
                if optin == SMEM_LIMIT:
                    h100 = rows
                if w.shape[-1] == 1 and dtype == torch.float32 and optin < SMEM_LIMIT:
                    assert rows[0] != h100[0], "H100's first fp32 GEMM row needs 192 KiB"
            monkeypatch.undo()


# -- ahead of time: tune_model and the CLI ------------------------------------------------------

def test_tune_model_then_forward_needs_nothing(tuner):
    m = fastres.resnet18(num_classes=10).eval()
    res = tune_small(m)
    assert res["tuned"] > 5 and res["cache"] == str(tuning.cache_path("cpu"))
    assert m.training is False
    calls = len(tuner.calls)
    with torch.no_grad():
        m(torch.randn(2, 3, 32, 32))
    assert len(tuner.calls) == calls, "tune_model covered every layer of batch 2"
    m.train()
    res = tune_small(m)
    assert res["tuned"] == 0 and m.training is True


def test_tune_model_of_a_stem_weight_assigned_with_other_channels(tuner):
    """A grayscale stem made by assigning conv1's weight (conv1.in_channels still says 3):
    tune_model feeds the weight's channel count (it fed 3, which the forward refuses), and a
    later forward needs no timing."""
    m = fastres.resnet18(num_classes=10).eval()
    m.conv1.weight = torch.nn.Parameter(m.conv1.weight.detach().sum(1, keepdim=True))
    res = tune_small(m)
    assert res["tuned"] > 5, res
    calls = len(tuner.calls)
    with torch.no_grad():
        m(torch.randn(2, 1, 32, 32))
        m.forward_intermediates(torch.randn(1, 1, 32, 32), [0, 4])
    assert len(tuner.calls) == calls, "tune_model covered every layer of batch 2"


def test_tune_model_gives_every_module_its_own_mode_back(tuner):
    """tune_model runs in eval mode and then restores each module's flag, not only the top's:
    ``train()`` on the top would put a frozen stage's BatchNorms back in training (their
    statistics would then move), and ``eval()`` would end test-time BatchNorm adaptation."""
    m = fastres.resnet18(num_classes=10)
    m.train()
    m.layer1.eval()  # a frozen stage
    before = [mod.training for mod in m.modules()]
    tune_small(m)
    assert [mod.training for mod in m.modules()] == before
    m.eval()
    m.layer2[0].bn1.train()  # test-time adaptation of one BatchNorm
    before = [mod.training for mod in m.modules()]
    tuning.tune_model(m, 1, "fp32", image_size=32)
    assert [mod.training for mod in m.modules()] == before


def test_tune_model_of_a_backbone_tunes_its_features(tuner):
    """A backbone (fc replaced by nn.Identity()) runs its full forward eagerly, which would
    time nothing: tune_model tunes forward_features's layers instead, so that a later
    forward_features needs no timing."""
    m = fastres.resnet18(num_classes=10).eval()
    m.fc = torch.nn.Identity()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (the eager full forward would warn)
        res = tune_small(m)
    assert res["tuned"] > 5, res
    calls = len(tuner.calls)
    with torch.no_grad():
        m.forward_features(torch.randn(2, 3, 32, 32))
        m.forward_intermediates(torch.randn(1, 3, 32, 32), [1, 2, 3, 4])
    assert len(tuner.calls) == calls, "tune_model covered the features' layers"


def tune_small(m):
    return tuning.tune_model(m, [1, 2], "fp32", image_size=32)


def _fused_stem(x, weight, bias):
    """A stem that calls no fastres op (as the CUDA and Triton stems): timing it chooses
    nothing for stage 0's convolution and max-pool."""
    y = torch.nn.functional.conv2d(x, weight, bias, 2, 3).relu_()
    return torch.nn.functional.max_pool2d(y, 3, 2, 1).contiguous(
        memory_format=torch.channels_last)


@pytest.mark.parametrize("wrapped", [False, True])
def test_tune_model_tunes_stage_0_of_forward_intermediates(tuner, wrapped):
    """Stage 0 of forward_intermediates runs the stem as a convolution and a max-pool, which
    no other forward runs (the stem fuses them): tune_model times those two as well (for each
    ResNet in a model holding one), so that the first such call times nothing. Without it,
    a fused stem's timing covered neither and that call timed them (or ran the pinned
    choice, inside a CUDA graph capture) unless checking a stem candidate had run them."""
    fake = fake_candidates()

    def hook(op, device, args, kwargs):
        if op == "stem":
            return [tuning.Candidate("triton", label, {"label": label}, _fused_stem)
                    for label in ("a", "b")]
        return fake(op, device, args, kwargs)

    # (the check of a stem candidate runs the reference stem, whose conv_bias_act and
    # max_pool2d calls are then chosen, as a side effect: without the check, nothing is)
    tuning.configure(candidates=hook, check=False)
    m = fastres.resnet18(num_classes=10).eval()
    res = tuning.tune_model(torch.nn.Sequential(m) if wrapped else m, [1, 2], "fp32",
                            image_size=32)
    stage0 = [k for k in tuning.choices() if k.startswith("max_pool2d")
              or k.startswith("conv_bias_act") and "Size([64, 3, 7, 7])" in k]
    assert len(stage0) == 4, list(tuning.choices())  # a conv and a max-pool per batch size
    calls = len(tuner.calls)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, feats = m.forward_intermediates(x, [0, 2])
        ref_out, ref_feats = copy.deepcopy(m).double().forward_intermediates_eager(x.double(),
                                                                                   [0, 2])
    assert len(tuner.calls) == calls, "tune_model covered stage 0's layers"
    for got, ref in zip([out, *feats], [ref_out, *ref_feats]):
        assert_close_rel(got, ref, 1e-5, "stage 0 after tuning (against float64)")
    assert res["tuned"] > 5, res


class _CastWrapper(torch.nn.Module):
    """An fp32 preprocessing parameter before a bf16 backbone, cast in the forward."""

    def __init__(self):
        super().__init__()
        self.mean = torch.nn.Parameter(torch.zeros(1, 3, 1, 1), requires_grad=False)
        self.net = fastres.resnet18(num_classes=10).to(torch.bfloat16)

    def forward(self, x):
        return self.net((x - self.mean).to(torch.bfloat16))


def test_tune_model_feeds_stage_0_each_resnet_as_it_runs(tuner):
    """The stage-0 pass gives each ResNet an input in its own dtype and on its own device (a
    bf16 backbone in an fp32 wrapper raised 'input dtype must match the model's'; a ResNet
    on another device, 'the model is on meta'), and skips a ResNet whose feature paths run
    eagerly (its hooks ran once more per batch size, and nothing was tuned)."""
    wrapped = _CastWrapper().eval()
    res = tuning.tune_model(wrapped, [1, 2], image_size=32)
    keys = [k for k in tuning.choices() if k.startswith("max_pool2d")]
    assert res["tuned"] > 5 and len(keys) == 2 and all("bfloat16" in k for k in keys), keys

    class TwoNets(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = fastres.resnet18(num_classes=10)
            with torch.device("meta"):  # (a stand-in for a ResNet on another device)
                self.b = fastres.resnet18(num_classes=10)

        def forward(self, x):
            return self.a(x)

    assert tuning.tune_model(TwoNets(), [1], image_size=32)["tuned"] > 5

    m = fastres.resnet18(num_classes=10).eval()
    seen = []
    m.conv1.register_forward_hook(lambda mod, inp, out: seen.append(out.shape[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # (runs eagerly: said once a process)
        res = tuning.tune_model(m, [1, 2], "fp32", image_size=32)
    assert seen == [1, 2] and res["tuned"] == 0, (seen, res)  # one forward per batch size


def test_tune_model_writes_the_cache_in_force_now(tuner, tmp_path, monkeypatch, capsys):
    """Layers chosen while one cache directory was set are written to the one in force when
    ``tune_model`` (or ``fastres tune --cache-dir``) runs: the process's remembered choices
    used to return before any cache was consulted, and the reported file was never
    written."""
    from fastres import cli

    m = fastres.resnet18(num_classes=10).eval()
    first = tune_small(m)
    assert first["tuned"] > 5
    moved = tmp_path / "moved"
    monkeypatch.setenv("FASTRES_CACHE_DIR", str(moved))
    again = tune_small(m)
    assert again["tuned"] == first["tuned"] and again["cache"] == str(tuning.cache_path("cpu"))
    assert len(read_cache()["entries"]) == first["tuned"]
    again = tune_small(m)  # now cached there
    assert again["tuned"] == 0 and again["disk_hits"] >= first["tuned"]
    other = tmp_path / "other"
    assert cli.main(["tune", "resnet18", "--num-classes", "10", "--batch", "1", "2",
                     "--image-size", "32", "--dtype", "fp32", "--device", "cpu",
                     "--cache-dir", str(other)]) == 0
    out = capsys.readouterr().out
    files = list(other.glob("tuning-*.json"))
    assert len(files) == 1 and str(files[0]) in out
    assert len(json.loads(files[0].read_text())["entries"]) == first["tuned"]


def test_no_home_directory_keeps_choices_in_memory(tuner, monkeypatch, capsys):
    """No FASTRES_CACHE_DIR, no XDG_CACHE_HOME and no home directory (HOME unset, a uid
    without a passwd entry, as in a container run with an arbitrary user): one warning, the
    choices stay in memory and the forward runs (it raised "Could not determine home
    directory"); ``fastres tune`` says so as a usage error."""
    from pathlib import Path as _Path

    from fastres import cli

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    for var in ("FASTRES_CACHE_DIR", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(_Path, "home", staticmethod(no_home))
    with pytest.raises(OSError, match="FASTRES_CACHE_DIR"):
        tuning.cache_dir()
    with pytest.warns(tuning.TuningCacheWarning, match="keeps its choices in memory"):
        y = pool(torch.randn(1, 4, 9, 9))
    assert y.shape == (1, 4, 5, 5) and tuning.stats()["tuned"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pool(torch.randn(1, 4, 11, 11))  # (said once)
    assert tuning.stats()["tuned"] == 2
    res = tuning.tune_model(fastres.resnet18(num_classes=10).eval(), 1, "fp32", image_size=32)
    assert res["tuned"] > 5 and res["cache"] is None
    assert cli.main(["tune", "resnet18", "--batch", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "home directory" in err and "Traceback" not in err


@pytest.mark.parametrize("var", ["FASTRES_CACHE_DIR", "XDG_CACHE_HOME"])
def test_a_cache_dir_of_an_unknown_users_home_keeps_choices_in_memory(tuner, monkeypatch,
                                                                      capsys, var):
    """A cache directory given as ``~nosuchuser/...``: ``Path.expanduser`` raises
    RuntimeError, which came out of the tuned forward and out of ``fastres tune`` as a
    traceback. Now the variable is named in one warning (choices kept in memory), and
    ``fastres tune`` says it as a usage error, as for the option."""
    from fastres import cli

    monkeypatch.delenv("FASTRES_CACHE_DIR", raising=False)
    bad = "~fastres-no-such-user-4711/cache"
    monkeypatch.setenv(var, bad)
    with pytest.raises(OSError, match=f"{var} '{bad}' starts with a home directory"):
        tuning.cache_dir()
    with pytest.warns(tuning.TuningCacheWarning, match=f"{var}.*keeps its choices in memory"):
        y = pool(torch.randn(1, 4, 9, 9))
    assert y.shape == (1, 4, 5, 5) and tuning.stats()["tuned"] == 1
    assert cli.main(["tune", "resnet18", "--batch", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert var in err and "home directory" in err and "Traceback" not in err, err
    monkeypatch.delenv(var)
    assert cli.main(["tune", "resnet18", "--device", "cpu", "--cache-dir", bad]) == 2
    err = capsys.readouterr().err
    assert "--cache-dir" in err and "home directory" in err and "Traceback" not in err, err


def test_a_config_json_cannot_hold_does_not_stop_later_writes(tuner):
    """A configuration provider whose config holds a value JSON has no form for (at any
    depth) is recorded with that value as text; it used to fail every later write of the
    process."""
    def candidates(op, device, args, kwargs):
        ref = _backend.implementations(op)["torch"].fn
        return [tuning.Candidate("torch", lbl, {"label": lbl, "dtype": torch.float16}, ref)
                for lbl in ("a", "b")]

    tuning.configure(candidates=candidates)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pool(torch.randn(1, 4, 9, 9))
        pool(torch.randn(1, 4, 11, 11))
    entries = read_cache()["entries"]
    assert len(entries) == 2
    assert {e["config"]["dtype"] for e in entries.values()} == {"torch.float16"}


def test_tune_model_autocast_dtype(tuner):
    m = fastres.resnet18(num_classes=10).eval()
    res = tuning.tune_model(m, 1, "bf16", image_size=32)
    assert res["tuned"] > 5
    keys = list(read_cache()["entries"])
    assert all("bf16[" in k for k in keys if k.startswith("conv_bias_act"))
    assert next(m.parameters()).dtype == torch.float32


def test_tune_model_rejects_bad_arguments():
    m = fastres.resnet18(num_classes=10)
    with pytest.raises(ValueError, match="batch sizes"):
        tuning.tune_model(m, [0])
    with pytest.raises(ValueError, match="dtype must be one of"):
        tuning.tune_model(m, [1], "int8")


def test_tune_model_refuses_a_model_it_cannot_tune(tmp_path, monkeypatch):
    """A string, torchvision's own ResNet or another module were an AttributeError, a silent
    "tuned 0", a shape error from inside torch and a bare StopIteration."""
    import torchvision

    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path / "cache"))
    tuning.reset()  # (CPU calls are not tuned)

    cases = [("resnet18", "got str"),
             (torchvision.models.resnet18(num_classes=10), "fastres.from_torchvision"),
             (torch.nn.Linear(3, 4), "got torch.nn.modules.linear.Linear"),
             (torch.nn.ReLU(), "got torch.nn.modules.activation.ReLU")]
    for model, needle in cases:
        with pytest.raises(TypeError, match="tune_model expects a fastres ResNet") as info:
            tuning.tune_model(model, 1, image_size=32)
        assert needle in str(info.value)
    # a module holding a fastres ResNet (a preprocessing wrapper, torch.compile's) is fine
    wrapped = torch.nn.Sequential(torch.nn.Identity(), fastres.resnet18(num_classes=10))
    with pytest.warns(RuntimeWarning, match="nothing to tune"):  # (on the CPU: see below)
        res = tuning.tune_model(wrapped, 1, "fp32", image_size=32)
    assert res["tuned"] == 0


@pytest.mark.parametrize("kwargs, error, needle", [
    ({"batch_sizes": [1.5]}, TypeError, "batch sizes must be integers, got 1.5"),
    ({"batch_sizes": 2.0}, TypeError, "batch sizes must be integers, got 2.0"),
    ({"batch_sizes": "12"}, TypeError, "an int or a sequence of ints, got str '12'"),
    ({"batch_sizes": None}, TypeError, "an int or a sequence of ints, got None"),
    ({"batch_sizes": ["a"]}, TypeError, "batch sizes must be integers, got 'a'"),
    ({"batch_sizes": True}, TypeError, "batch sizes must be integers, got True"),
    ({"batch_sizes": []}, ValueError, "at least one batch size"),
    ({"batch_sizes": [2, -1]}, ValueError, "batch sizes must be >= 1, got [2, -1]"),
    ({"image_size": 0}, ValueError, "image_size must be >= 1, got 0"),
    ({"image_size": -5}, ValueError, "image_size must be >= 1, got -5"),
    ({"image_size": (32, 0)}, ValueError, "image_size must be >= 1, got (32, 0)"),
    ({"image_size": 32.5}, TypeError, "an int or an (H, W) pair of ints, got 32.5"),
    ({"image_size": "32"}, TypeError, "an int or an (H, W) pair of ints, got '32'"),
    ({"image_size": (32,)}, TypeError, "an int or an (H, W) pair of ints, got (32,)"),
    ({"image_size": True}, TypeError, "an int or an (H, W) pair of ints, got True"),
    ({"dtype": torch.int8}, ValueError, "floating-point dtype"),
    ({"dtype": "int8"}, ValueError, "dtype must be one of"),
])
def test_tune_model_bad_arguments_say_what_was_expected(kwargs, error, needle):
    """Before: 1.5 was tuned as 1 and "12" as batch sizes 1 and 2 (silently); None, 2.0 and
    "a" were Python's own iteration / int() errors; image sizes 0, -5, 32.5, "32" and (32,)
    failed inside torch or the model; torch.int8 was nn.Module.to's error."""
    m = fastres.resnet18(num_classes=10)
    args = {"batch_sizes": 1, "dtype": None, "image_size": 32, **kwargs}
    with pytest.raises(error) as info:
        tuning.tune_model(m, **args)
    assert needle in str(info.value)


def test_tune_model_on_a_device_that_is_not_tuned_says_so(tmp_path, monkeypatch):
    """A CPU model (only CUDA calls are tuned) ran every forward and returned "tuned 0"
    without a word."""
    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path / "cache"))
    tuning.reset()
    m = fastres.resnet18(num_classes=10)
    ran = []
    m.register_forward_pre_hook(lambda mod, args: ran.append(1))
    with pytest.warns(RuntimeWarning, match="the model is on cpu.*only cuda calls are tuned"):
        res = tuning.tune_model(m, [1, 2], "fp32", image_size=32)
    assert ran == [] and res["tuned"] == res["timed"] == 0 and res["cache"] is None
    assert not (tmp_path / "cache").exists()


def test_cache_path_bad_devices(tmp_path, monkeypatch):
    """A bogus device string was torch's RuntimeError, None torch's overload list, "meta" a
    path for a cache nothing can ever use, and "cuda" without a GPU "Found no NVIDIA
    driver" from deep inside torch.cuda; cache_for("cpu") was an AttributeError."""
    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path / "cache"))
    tuning.reset()
    for device, error, needle in [
            ("bogus", ValueError, "got 'bogus'"),
            ("", ValueError, "got ''"),
            (None, TypeError, "got None"),
            (1.5, TypeError, "got 1.5"),
            ("meta", ValueError, "meta tensors hold no data")]:
        with pytest.raises(error, match="cache_path") as info:
            tuning.cache_path(device)
        assert needle in str(info.value)
        assert "expected" in str(info.value)
    if HAS_CUDA:
        bad = f"cuda:{torch.cuda.device_count()}"
        with pytest.raises(ValueError, match=f"{bad}.*only {torch.cuda.device_count()}"):
            tuning.cache_path(bad)
    else:
        for bad in ("cuda", "cuda:0", torch.device("cuda")):
            with pytest.raises(ValueError, match="no CUDA GPU"):
                tuning.cache_path(bad)
    assert tuning.cache_for("cpu") is tuning.cache_for(torch.device("cpu"))


def test_cache_dir_that_is_a_file_is_one_clear_warning(tuner, tmp_path, monkeypatch):
    """FASTRES_CACHE_DIR naming a file gave two warnings: "cannot read ... [Errno 20] Not a
    directory" and "cannot write ... [Errno 17] File exists"; the forward pass went on."""
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    monkeypatch.setenv("FASTRES_CACHE_DIR", str(afile))
    x = torch.randn(1, 4, 9, 9)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        y = pool(x)
    said = [str(w.message) for w in seen if issubclass(w.category, tuning.TuningCacheWarning)]
    assert len(said) == 1, said
    assert "cannot write" in said[0] and f"{afile} is a file, not a directory" in said[0]
    assert "FASTRES_CACHE_DIR" in said[0] and "Errno" not in said[0]
    assert_close_rel(y, torch.nn.functional.max_pool2d(x, 3, 2, 1), 0.0)
    assert afile.read_text() == "not a directory"


def test_progress_bar_only_on_request_or_terminal(tuner, capsys):
    pool(torch.randn(1, 4, 9, 9))  # stderr is not a terminal under pytest: quiet
    assert "fastres: tuning" not in capsys.readouterr().err
    tuning.configure(progress=True)
    pool(torch.randn(1, 4, 10, 10))
    assert "fastres: tuning max_pool2d" in capsys.readouterr().err


def test_tune_cli_fastres_command(tuner, capsys):
    """``fastres tune`` through the CLI's plugin hook (argparse)."""
    from fastres import cli
    code = cli.main(["tune", "resnet18", "--batch", "1", "2", "--dtype", "fp32",
                     "--image-size", "32", "--device", "cpu", "--num-classes", "10"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "tuned" in out and len(read_cache()["entries"]) > 5
    assert cli.main(["tune", "resnet18", "--batch", "0", "--device", "cpu"]) == 2
    assert "batch sizes must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("extra, needle", [
    (["--num-classes", "-1"], "--num-classes must be >= 1"),
    (["--num-classes", "0"], "--num-classes must be >= 1"),
    (["--weights", "/no/such/file.pth"], "does not exist"),
    (["--device", "meta"], "unsupported device 'meta'"),
    (["--cache-dir", ""], "--cache-dir must name a directory, got an empty string"),
    (["--model-is-resnet50-for-an-r18-checkpoint"], "does not fit resnet50"),
])
def test_tune_cli_usage_errors(capsys, tmp_path, extra, needle):
    """Bad arguments are one-line usage errors (exit 2), not tracebacks."""
    from fastres import cli
    model = "resnet18"
    if extra == ["--model-is-resnet50-for-an-r18-checkpoint"]:
        ckpt = tmp_path / "r18.pth"
        torch.save(fastres.resnet18(num_classes=10).state_dict(), ckpt)
        model, extra = "resnet50", ["--weights", str(ckpt)]
    code = cli.main(["tune", model, "--batch", "1", "--device", "cpu", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and "Traceback" not in err


def test_tune_cli_without_gpu_says_so(capsys):
    if HAS_CUDA:
        pytest.skip("this machine has a GPU")
    from fastres.tune_cli import tune_main

    assert tune_main("resnet18", ["1"], ["bf16"]) == 0
    assert "no CUDA device" in capsys.readouterr().out


class _GpuTimeline:
    """A host and a GPU clock (ms) for cuda_event_timer, on the CPU: each call of ``run``
    costs the host ``host_ms`` to launch and queues ``gpu_ms`` of GPU work; events complete
    when the GPU reaches them; ``torch.cuda._sleep`` queues its cycles at ``khz``."""

    def __init__(self, monkeypatch, host_ms: float, gpu_ms: float, khz: int = 1_980_000,
                 with_sleep: bool = True):
        self.host, self.gpu_free, self.host_ms, self.gpu_ms = 0.0, 0.0, host_ms, gpu_ms
        self.slept: list[float] = []
        sim = self

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self, stream=None):
                self.t = max(sim.host, sim.gpu_free)

            def synchronize(self):
                sim.host = max(sim.host, self.t)

            def elapsed_time(self, end):
                return end.t - self.t

        def sleep(cycles):
            self.slept.append(cycles / khz)
            self._queue(cycles / khz)

        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: self._sync())
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device=None: type("P", (), {"clock_rate": khz})())
        if with_sleep:
            monkeypatch.setattr(torch.cuda, "_sleep", sleep)
        else:
            monkeypatch.delattr(torch.cuda, "_sleep")
        monkeypatch.setattr(tuning, "time", type("T", (), {
            "perf_counter": staticmethod(lambda: sim.host / 1e3)}))

    def _queue(self, ms: float) -> None:
        self.gpu_free = max(self.host, self.gpu_free) + ms

    def _sync(self) -> None:
        self.host = max(self.host, self.gpu_free)

    def run(self) -> None:
        self.host += self.host_ms
        self._queue(next(self.gpu_ms) if hasattr(self.gpu_ms, "__next__") else self.gpu_ms)


@pytest.mark.parametrize("host_ms,gpu_ms", [(0.06, 0.008), (0.06, 0.03), (0.05, 0.4)])
def test_the_tuners_timer_times_the_gpu_not_the_launch(monkeypatch, host_ms, gpu_ms):
    """A candidate whose kernels are shorter than the Python that launches it (batch 1 on a
    GPU: ~0.06 ms of launching, kernels of 0.01 ms) is timed by its GPU time: the timed calls
    wait behind a GPU sleep longer than their launching. Timed as launched (no
    ``torch.cuda._sleep``), every such candidate measures the launch path."""
    sim = _GpuTimeline(monkeypatch, host_ms, gpu_ms)
    assert tuning.cuda_event_timer(sim.run) == pytest.approx(gpu_ms, rel=1e-6)
    assert sim.slept and max(sim.slept) <= tuning._MAX_SLEEP_MS
    sim = _GpuTimeline(monkeypatch, host_ms, gpu_ms, with_sleep=False)
    assert tuning.cuda_event_timer(sim.run) == pytest.approx(max(host_ms, gpu_ms), rel=1e-6)


def test_the_tuners_timer_is_the_median_group(monkeypatch):
    """Median of the 7 groups' per-call times (the warm-up, the launch measurement and the
    estimate not counted); groups of one call when a call lasts 0.1 ms or more."""
    durations = iter([1.0, 1.0, 1.0] + [5.0, 1.0, 2.0, 3.0, 6.0, 7.0, 8.0])
    sim = _GpuTimeline(monkeypatch, 0.05, durations)
    assert tuning.cuda_event_timer(sim.run) == pytest.approx(5.0)
    assert next(durations, None) is None  # every call timed, none more


# -- GPU: the real implementations --------------------------------------------------------------

GPU_RUN = """
    torch.manual_seed(int(os.environ["FASTRES_CHILD_SEED"]))
    m = fastres.resnet18().cuda().eval()  # small: a fresh cache means compiling every config
    x = torch.randn(2, 3, 64, 64, device="cuda")
    t0 = time.time()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        y = m(x)
    torch.cuda.synchronize()
    torch.save(y.cpu(), os.environ["OUT_FILE"])
    print(json.dumps({"stats": T.stats(), "choices": T.choices(), "seconds": time.time() - t0,
                      "path": str(T.cache_path("cuda"))}))
"""


@pytest.mark.cuda
@pytest.mark.slow  # (tunes a whole model: over the GPU check's test stage)
def test_gpu_tuning_is_cached_for_the_next_process(tmp_path):
    first = run_script(GPU_RUN, tmp_path / "cache", {"OUT_FILE": str(tmp_path / "1.pt")})
    assert first["stats"]["tuned"] > 8 and first["stats"]["timed"] > first["stats"]["tuned"]
    data = json.loads(Path(first["path"]).read_text())
    assert data["env"]["device"] == torch.cuda.get_device_name()
    assert all(rec["ms"] > 0 for rec in data["entries"].values())
    second = run_script(GPU_RUN, tmp_path / "cache", {"OUT_FILE": str(tmp_path / "2.pt")})
    assert second["stats"]["tuned"] == 0 and second["stats"]["timed"] == 0
    assert second["stats"]["disk_hits"] == first["stats"]["tuned"] + first["stats"]["disk_hits"]
    assert second["choices"] == first["choices"]
    print("first process", first["seconds"], "s; second", second["seconds"], "s")


@pytest.mark.cuda
def test_gpu_pinned_mode_bit_identical_across_processes(tmp_path):
    outs = []
    for i in range(2):
        res = run_script(GPU_RUN, tmp_path / "cache",
                         {"OUT_FILE": str(tmp_path / f"{i}.pt"), "FASTRES_TUNE": "0"})
        assert res["stats"]["timed"] == 0 and res["stats"]["pinned"] > 8
        # (each choice is named "backend:configuration" where a backend has configurations)
        assert "triton" in {v.split(":", 1)[0] for v in res["choices"].values()}
        outs.append(torch.load(tmp_path / f"{i}.pt"))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.cuda
@pytest.mark.slow  # (tunes a whole model: over the GPU check's test stage)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_tuned_model_matches_torchvision(tmp_path, monkeypatch, dtype):
    from _models import assert_matches_torchvision, twin

    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FASTRES_TUNE", raising=False)  # the GPU check runs the suite pinned
    tuning.reset()
    try:
        tv, fr = twin("resnet50")
        x = torch.randn(2, 3, 64, 64, device="cuda")
        with torch.no_grad():
            fr = fr.to(dtype)
            y = fr(x.to(dtype))
        assert tuning.stats()["tuned"] > 5
        # (DESIGN.md's bound, or twice eager's own error in this dtype where that is larger:
        # with random weights, 64x64 ResNet-50 in TF32 or bf16 exceeds the fixed bounds)
        assert_matches_torchvision(y, tv, x, "tuned resnet50", dtype)
    finally:
        tuning.reset()


@pytest.mark.cuda
def test_gpu_untuned_layer_during_capture_runs_pinned(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FASTRES_TUNE", raising=False)
    tuning.reset()
    try:
        x = torch.randn(1, 64, 28, 28, device="cuda").contiguous(
            memory_format=torch.channels_last)
        w = torch.randn(64, 64, 3, 3, device="cuda").contiguous(
            memory_format=torch.channels_last)
        b = torch.randn(64, device="cuda")
        conv = torch.ops.fastres.conv_bias_act
        monkeypatch.setenv("FASTRES_TUNE", "0")  # compile the pinned kernel outside capture
        ref = conv(x, w, b, [1, 1], [1, 1], [1, 1], 1, None, True)
        monkeypatch.delenv("FASTRES_TUNE")
        g = torch.cuda.CUDAGraph()
        with pytest.warns(RuntimeWarning, match="during CUDA graph capture"), \
                torch.cuda.graph(g):
            out = conv(x, w, b, [1, 1], [1, 1], [1, 1], 1, None, True)
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, ref)
        assert tuning.stats()["deferred"] == 1 and tuning.stats()["tuned"] == 0
        conv(x, w, b, [1, 1], [1, 1], [1, 1], 1, None, True)  # ordinary call: tunes now
        assert tuning.stats()["tuned"] == 1
    finally:
        tuning.reset()
