"""More checks of the measured choice (:mod:`fastres.tuning`) and the custom ops' fakes:
what the cache is keyed on, which files are trusted, which candidate wins, and what is said
when candidates fail. (Written from mutants that test_tuning.py and test_compile_export.py
let through.)"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import warnings

import pytest
import torch
from conftest import assert_close_rel
from test_tuning import (FakeTimer, bad_then_good, fake_candidates, pool, read_cache,
                         zeros_of)

from fastres import tuning
from fastres.ops import _backend


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTRES_TUNE", raising=False)
    tuning.reset()
    with _backend.use_backend("auto"):
        yield tmp_path
    tuning.reset()


def rand_hw():
    return int(torch.randint(7, 20, ()).item()), int(torch.randint(7, 20, ()).item())


# -- the environment the cache belongs to ------------------------------------------------------

@pytest.mark.parametrize("what", ["torch", "toolkit"])
def test_cache_file_follows_the_torch_and_toolkit_versions(fresh, monkeypatch, what):
    """A choice made under another torch (or CUDA toolkit) is not trusted: another file, and
    an old file under this name is foreign. (Mutants: "torch"/"cuda" dropped from env.)"""
    first = tuning.cache_path("cpu")
    if what == "torch":
        monkeypatch.setattr(torch, "__version__", "0.0.1+other")
    else:
        monkeypatch.setattr(torch.version, "cuda", "1.0-other")
    monkeypatch.setattr(tuning, "_envs", {})
    env = tuning.environment(torch.device("cpu"))
    assert env["torch" if what == "torch" else "cuda"] in ("0.0.1+other", "1.0-other")
    assert tuning.cache_path("cpu") != first


def test_cache_file_follows_the_candidate_tables(fresh, monkeypatch):
    """A choice made among other candidates is not trusted when the tables change (a new row
    may be faster): another file. Not every table edit is a new row; a changed one counts
    too. (Mutant: "triton_tables" dropped from env, or a digest of the row count only.)"""
    from dataclasses import replace

    from fastres.kernels import configs

    first = tuning.cache_path("cpu")
    paths = {first}
    gemm = configs.TABLES["gemm"]
    for rows in (gemm + [configs.KernelConfig(16, 16, 16)],
                 [replace(gemm[0], num_stages=gemm[0].num_stages + 1)] + gemm[1:]):
        monkeypatch.setitem(configs.TABLES, "gemm", rows)
        monkeypatch.setattr(tuning, "_envs", {})
        paths.add(tuning.cache_path("cpu"))
    assert len(paths) == 3
    monkeypatch.setitem(configs.TABLES, "gemm", gemm)
    monkeypatch.setattr(tuning, "_envs", {})
    assert tuning.cache_path("cpu") == first


def test_reset_forgets_the_environment(fresh, monkeypatch):
    """reset() is "as a fresh process": the environment is read again. (Mutant: _envs kept.)"""
    import triton

    tuning.environment(torch.device("cpu"))
    monkeypatch.setattr(triton, "__version__", "0.0.0-reset", raising=False)
    tuning.reset()
    assert tuning.environment(torch.device("cpu"))["triton"] == "0.0.0-reset"


@pytest.mark.parametrize("change", ["older_schema", "no_schema", "no_env"])
def test_older_schema_or_missing_env_is_foreign(fresh, change):
    """A file of an older schema, or with no schema or env, is ignored with a warning, never
    trusted and never an exception in the forward. (Mutants: schema ``>``; env defaulted.)"""
    tuning.configure(timer=FakeTimer({"a": 2.0, "b": 1.0}), devices=("cpu",),
                     candidates=fake_candidates(("a", "b")))
    h, w = rand_hw()
    x = torch.randn(1, 4, h, w)
    pool(x)
    key, = read_cache()["entries"]
    doc = json.loads(tuning.cache_path("cpu").read_text())
    doc["entries"][key]["label"] = "a"  # a stale choice the file must not impose
    if change == "older_schema":
        doc["schema"] = tuning.SCHEMA - 1
    elif change == "no_schema":
        del doc["schema"]
    else:
        del doc["env"]
    tuning.cache_path("cpu").write_text(json.dumps(doc))
    tuning.reset()
    timer = FakeTimer({"a": 2.0, "b": 1.0})
    tuning.configure(timer=timer, devices=("cpu",), candidates=fake_candidates(("a", "b")))
    with pytest.warns(tuning.TuningCacheWarning, match="foreign"):
        y = pool(x)
    assert_close_rel(y, torch.nn.functional.max_pool2d(x, 3, 2, 1), 0.0)
    assert sorted(timer.calls) == ["a", "b"]
    assert read_cache()["entries"][key]["label"] == "b"


# -- keys --------------------------------------------------------------------------------------

def test_stem_fp32_key_carries_the_cudnn_tf32_flag(fresh):
    """The stem is a convolution: its fp32 key follows cuDNN's TF32 flag, as conv_bias_act's.
    (Mutant: ``"stem": None`` in _TF32_FLAG.)"""
    tuning.configure(timer=FakeTimer({}), devices=("cpu",), candidates=fake_candidates(("a", "b")))
    h, w = rand_hw()
    x = torch.randn(1, 3, 2 * h, 2 * w)
    wt, b = torch.randn(8, 3, 7, 7), torch.randn(8)
    old = torch.backends.cudnn.allow_tf32  # (the legacy flag, as test_tuning's TF32 test)
    try:
        for flag in (True, False):
            torch.backends.cudnn.allow_tf32 = flag
            torch.ops.fastres.stem(x, wt, b)
    finally:
        torch.backends.cudnn.allow_tf32 = old
    keys = sorted(k for k in read_cache()["entries"] if k.startswith("stem("))
    assert len(keys) == 2 and {k.split(" tf32=")[1][0] for k in keys} == {"0", "1"}, keys


def test_a_new_backend_competing_is_timed_not_read_from_an_older_choice(fresh):
    """The key names the backends that compete: a choice made when only ``torch`` competed
    is not reused once ``triton`` candidates are offered. (Mutant: backends left out.)"""
    tuning.configure(timer=FakeTimer({"a": 2.0, "b": 1.0}), devices=("cpu",),
                     candidates=fake_candidates(("a", "b")))
    h, w = rand_hw()
    x = torch.randn(1, 4, h, w)
    pool(x)
    tuning.reset()
    timer = FakeTimer({"a": 2.0, "b": 1.0, "fast": 0.1})
    tuning.configure(timer=timer, devices=("cpu",),
                     candidates=fake_candidates(("a", "b", "fast"),
                                         backend=lambda lb: "triton" if lb == "fast" else "torch"))
    assert_close_rel(pool(x), torch.nn.functional.max_pool2d(x, 3, 2, 1), 0.0)
    assert "fast" in timer.calls
    assert set(tuning.choices().values()) == {"triton:fast"}


def test_configure_new_candidates_are_used_at_the_next_call(fresh):
    """configure() clears the choices this process remembers: new candidates are considered
    at the next call of an already-chosen layer. (Mutant: memo not cleared.)"""
    tuning.configure(timer=FakeTimer({"a": 2.0, "b": 1.0}), devices=("cpu",),
                     candidates=fake_candidates(("a", "b")))
    h, w = rand_hw()
    x = torch.randn(1, 4, h, w)
    pool(x)
    assert set(tuning.choices().values()) == {"torch:b"}
    timer = FakeTimer({"c": 1.0, "d": 0.5})
    tuning.configure(timer=timer, candidates=fake_candidates(("c", "d")))
    pool(x)
    assert sorted(timer.calls) == ["c", "d"]
    assert set(tuning.choices().values()) == {"torch:d"}


# -- the winner --------------------------------------------------------------------------------

def test_fp32_candidate_one_percent_off_is_rejected(fresh):
    """fp32 candidates must match the reference to 5e-3: one 1% off everywhere is rejected,
    however fast. (Mutant: fp32 tolerance 3e-2.)"""

    hook = bad_then_good("off", lambda ref: lambda *a, **k: ref(*a, **k) * 1.01)
    timer = FakeTimer({"off": 0.1, "good": 1.0})
    tuning.configure(timer=timer, devices=("cpu",), candidates=hook)
    h, w = rand_hw()
    x = torch.randn(1, 8, h, w) + 3.0  # (no sign changes: a pure 1% scale error)
    assert_close_rel(pool(x), torch.nn.functional.max_pool2d(x, 3, 2, 1), 0.0)
    rec, = read_cache()["entries"].values()
    assert rec["label"] == "good" and "relative error" in rec["rejected"]["triton:off"]
    assert timer.calls == ["good"]


def test_a_candidate_returning_no_tensor_is_rejected(fresh):
    """A candidate whose output is not a tensor (``None``: a launcher that forgot to return
    its output) is wrong, however fast: its error counted as 0, so it was chosen, cached, and
    the op returned ``None``."""

    hook = bad_then_good("none", lambda ref: lambda *a, **k: None)
    timer = FakeTimer({"none": 0.1, "good": 1.0})
    tuning.configure(timer=timer, devices=("cpu",), candidates=hook)
    h, w = rand_hw()
    x = torch.randn(1, 8, h, w)
    assert_close_rel(pool(x), torch.nn.functional.max_pool2d(x, 3, 2, 1), 0.0)
    rec, = read_cache()["entries"].values()
    assert rec["label"] == "good" and "relative error inf" in rec["rejected"]["triton:none"]
    assert timer.calls == ["good"]


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_timing_never_wins(fresh, bad):
    """A candidate whose timing is NaN or infinite is not a winner (NaN compared as
    smallest when first). (Mutant: non-finite timings kept.)"""
    timer = FakeTimer({"a": bad, "b": 2.0, "c": 3.0})
    tuning.configure(timer=timer, devices=("cpu",), candidates=fake_candidates(("a", "b", "c")))
    h, w = rand_hw()
    pool(torch.randn(1, 4, h, w))
    rec, = read_cache()["entries"].values()
    assert rec["label"] == "b" and math.isfinite(rec["ms"]), rec
    assert "torch:a" not in rec["timings"]


def test_when_every_candidate_fails_the_reference_runs(fresh):
    """All candidates raise or compute garbage: the torch reference runs (said once), nothing
    is cached. (Mutant: the first, failing, candidate returned.)"""

    def hook(op, device, args, kwargs):
        ref = _backend.implementations(op)["torch"].fn

        def broken(*a, **k):
            raise RuntimeError("out of resources")

        return [tuning.Candidate("triton", "broken", None, broken),
                tuning.Candidate("triton", "garbage", None,
                                 lambda *a, **k: torch.randn_like(ref(*a, **k)))]

    tuning.configure(timer=FakeTimer({}), devices=("cpu",), candidates=hook)
    h, w = rand_hw()
    x = torch.randn(1, 4, h, w)
    with pytest.warns(RuntimeWarning, match="no candidate ran"):
        y = pool(x)
    assert_close_rel(y, torch.nn.functional.max_pool2d(x, 3, 2, 1), 0.0)
    x2 = torch.randn(1, 4, h, w)
    assert_close_rel(pool(x2), torch.nn.functional.max_pool2d(x2, 3, 2, 1), 0.0)
    assert not tuning.cache_path("cpu").exists()


@pytest.mark.parametrize("kind", ["wrong", "raises"])
def test_rejections_are_logged_wrong_ones_as_warnings(fresh, caplog, kind):
    """A candidate computing a wrong result is a kernel defect: WARNING; one that cannot run
    here: INFO. Both name the candidate. (Mutant: always INFO.)"""

    def hook(op, device, args, kwargs):
        ref = _backend.implementations(op)["torch"].fn

        def bad(*a, **k):
            if kind == "raises":
                raise RuntimeError("unsupported here")
            return ref(*a, **k) + 1.0

        return [tuning.Candidate("triton", "bad", None, bad),
                tuning.Candidate("torch", "torch", None, ref)]

    tuning.configure(timer=FakeTimer({}), devices=("cpu",), candidates=hook)
    h, w = rand_hw()
    with caplog.at_level(logging.INFO, logger="fastres"):
        pool(torch.randn(1, 4, h, w))
    recs = [r for r in caplog.records if "rejected" in r.getMessage()]
    assert len(recs) == 1 and "triton:bad" in recs[0].getMessage()
    assert recs[0].levelno == (logging.WARNING if kind == "wrong" else logging.INFO)


def test_cuda_graph_capture_defers_tuning(monkeypatch):
    """An untuned layer met during CUDA graph capture is not timed there (CPU check of the
    rule; the GPU test runs a real capture). (Mutant: the capture check removed.)"""
    import fastres.plan

    monkeypatch.setattr(fastres.plan, "_dynamo_tracing", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert tuning._tuning_allowed(torch.device("cuda")) == "CUDA graph capture"
    assert tuning._tuning_allowed(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert tuning._tuning_allowed(torch.device("cuda")) is None


# -- fake implementations ------------------------------------------------------------------------

def _op_cases():
    n = int(torch.randint(1, 3, ()).item())
    h, w = rand_hw()
    x = torch.randn(n, 8, h, w)
    xcl = x.contiguous(memory_format=torch.channels_last)
    wt = torch.randn(6, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    b = torch.randn(6)
    res = torch.randn(n, 6, h, w)
    return [
        (torch.ops.fastres.conv_bias_act.default, (x, wt, b, [1, 1], [1, 1], [1, 1], 1, None,
                                                   True)),
        (torch.ops.fastres.conv_bias_act.default, (xcl, wt, b, [1, 1], [1, 1], [1, 1], 1, res,
                                                   False)),
        (torch.ops.fastres.max_pool2d.default, (x, 3, 2, 1)),
        (torch.ops.fastres.avgpool_linear.default, (xcl, torch.randn(5, 8), torch.randn(5))),
        (torch.ops.fastres.stem.default, (torch.randn(n, 3, 2 * h, 2 * w),
                                          torch.randn(8, 3, 7, 7), torch.randn(8))),
    ]


def test_fake_implementations_match_real_shapes_and_strides():
    """Each op's fake (what compile/export trace with) gives the real output's shape, dtype
    and strides (the channels-last layout inductor then relies on). (Mutant: the conv fake
    returning a contiguous tensor.)"""
    for op, args in _op_cases():
        torch.library.opcheck(op, args, test_utils=("test_faketensor",))


def test_check_is_not_disarmed_by_an_infinity_in_a_head_input(fresh):
    """One infinity in the head's input makes every reference output non-finite (the mean
    feeds every class): the check must run on finite data, not compare nothing and accept a
    candidate that computes zeros. (Mutant: only NaN inputs replaced for the check.)"""

    tuning.configure(timer=FakeTimer({"zeros": 0.1, "good": 1.0}), devices=("cpu",),
                     candidates=bad_then_good("zeros", zeros_of))
    h, w = rand_hw()
    x = torch.randn(1, 8, h, w)  # (one sample: each output row is non-finite)
    x[0, int(torch.randint(0, 8, ()).item()), 1, 1] = float("inf")
    wt, b = torch.randn(5, 8), torch.randn(5)
    torch.ops.fastres.avgpool_linear(x, wt, b)
    rec, = read_cache()["entries"].values()
    assert rec["label"] == "good" and "triton:zeros" in rec["rejected"], rec


# -- writing the file --------------------------------------------------------------------------

def test_a_forward_writes_the_cache_file_once(fresh, monkeypatch):
    """A forward that chooses its layers writes the cache file once at its end: each write
    re-reads and rewrites the whole file under its lock, so a write per new layer cost a
    large cache's full rewrite for each of ResNet-50's 27 layers. The choices are all there,
    and a later process finds them."""
    import fastres

    writes = []
    real_write = tuning.TuningCache._write
    monkeypatch.setattr(tuning.TuningCache, "_write",
                        lambda self, entries: (writes.append(len(entries)),
                                               real_write(self, entries)))
    tuning.configure(timer=FakeTimer({"a": 2.0, "b": 1.0}), devices=("cpu",),
                     candidates=fake_candidates(("a", "b")))
    m = fastres.resnet18(num_classes=int(torch.randint(2, 20, ()))).eval()
    with torch.no_grad():
        m(torch.randn(int(torch.randint(1, 4, ())), 3, 32, 32))
    tuned = tuning.stats()["tuned"]
    assert tuned > 5 and writes == [tuned], (tuned, writes)
    assert len(read_cache()["entries"]) == tuned
    # a forward that raises midway (at its head, the last op) writes what it chose before
    writes.clear()
    fakes = fake_candidates(("a", "b"))

    def hook(op, device, args, kwargs):
        if op == "avgpool_linear":
            raise RuntimeError("the head broke in this test")
        return fakes(op, device, args, kwargs)

    tuning.configure(candidates=hook)
    with torch.no_grad(), pytest.raises(RuntimeError, match="head broke"):
        m(torch.randn(1, 3, 40, 40))  # (new shapes: every layer is chosen again)
    more = tuning.stats()["tuned"] - tuned
    assert more > 5 and writes == [tuned + more], (more, writes)
    assert len(read_cache()["entries"]) == tuned + more


_HOLD_LOCK = """
import sys, time, filelock
lock = filelock.FileLock(sys.argv[1], timeout=10)
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_held_lock_holds_up_only_the_first_write(fresh, monkeypatch, capsys):
    """Another process holding the cache's lock (stopped with Ctrl-Z, or on a slow disk) made
    every new layer's forward wait the lock's full timeout, again and again, with one warning
    for the first. Now only the first write waits: later ones try the lock without waiting and
    keep their choices in memory, and a write that gets the lock writes them all. ``fastres
    tune`` fails (exit 1, saying why) when its choices could not be written."""
    import subprocess
    import sys
    import time

    from fastres import tune_cli

    monkeypatch.setattr(tuning, "_LOCK_TIMEOUT_S", 1.0)
    tuning.configure(timer=FakeTimer({"a": 2.0, "b": 1.0}), devices=("cpu",),
                     candidates=fake_candidates(("a", "b")))
    path = tuning.cache_path("cpu")
    path.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(path) + ".lock"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        first = int(torch.randint(7, 12, ()))
        times = []
        for s in range(first, first + 4):  # four new layers
            t0 = time.perf_counter()
            with pytest.warns(tuning.TuningCacheWarning) if s == first else _no_warning():
                pool(torch.randn(1, 4, s, s))
            times.append(time.perf_counter() - t0)
        assert times[0] >= 1.0 and max(times[1:]) < 0.5, times
        cache = tuning.cache_for("cpu")
        assert cache.unsaved == 4 and "Timeout" in cache.write_error
        assert not path.exists()
        rc = tune_cli.tune_main("resnet18", [1], ["fp32"], 32, "cpu", num_classes=10)
        err = capsys.readouterr().err
        assert rc == 1 and "could not be written" in err and str(path) in err, err
    finally:
        holder.kill()
        holder.wait()
    pool(torch.randn(1, 4, first + 4, first + 4))  # the lock is free: everything is written
    assert cache.unsaved == 0 and cache.write_error is None
    assert len(read_cache()["entries"]) == tuning.stats()["tuned"] >= 5 + 4


@contextlib.contextmanager
def _no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", tuning.TuningCacheWarning)
        yield


@pytest.mark.parametrize("value", ["", "   "])
def test_a_blank_cache_dir_variable_counts_as_unset(fresh, monkeypatch, value):
    """``FASTRES_CACHE_DIR="  "`` put the cache in a folder named by its spaces in the working
    directory (``fastres tune --cache-dir "  "`` is refused); blank counts as unset."""
    xdg = fresh / f"xdg{int(torch.randint(0, 1000, ()))}"
    monkeypatch.setenv("FASTRES_CACHE_DIR", value)
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    assert tuning.cache_dir() == xdg / "fastres"
    monkeypatch.setenv("XDG_CACHE_HOME", value)
    monkeypatch.setenv("HOME", str(xdg))
    assert tuning.cache_dir() == xdg / ".cache" / "fastres"
