"""The ``fastres`` command line: bench, verify, classify (CPU, small sizes), and gpu_check.sh.

Commands run in-process through ``fastres.cli.main(argv)`` (the console script's entry point,
which returns the exit status); one test runs ``python -m fastres`` as a real subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import fresh_seed_args, rel_err

import fastres
from fastres import cli, tuning
from fastres.models import ResNet

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# Tiny sizes everywhere: resnet18 at 64x64, two timed calls.
def bench_argv(*batches: str) -> list[str]:
    """``fastres bench`` of resnet18 at 64 px on the CPU, quick, at these batch sizes."""
    return ["bench", "-m", "resnet18", "-b", *batches, "--image-size", "64", "--iters", "2",
            "--warmup", "1", "--no-progress", "--device", "cpu"]


SMALL_BENCH = bench_argv("1", "2")
SMALL_VERIFY = ["verify", "-m", "resnet18", "-b", "2", "--batches", "2", "--image-size", "64",
                "--device", "cpu"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``fastres ARGV``'s exit code, stdout and stderr. ``bench`` and ``verify`` (whose
    ``--seed`` defaults to 0) get a fresh ``--seed`` first, which a test's own overrides."""
    argv = list(argv)
    if argv[:1] in (["bench"], ["verify"]):
        argv[1:1] = fresh_seed_args()
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_usage_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


@pytest.fixture(scope="module")
def r18_checkpoint(tmp_path_factory) -> Path:
    """A random-weight torchvision resnet18 checkpoint (realistic BN statistics)."""
    from fastres.verify import realistic_bn

    torch.manual_seed(int(os.environ["FASTRES_TEST_SEED"]))  # (the run's salt: fresh weights)
    model = realistic_bn(torchvision.models.resnet18(weights=None))
    path = tmp_path_factory.mktemp("ckpt") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    """A real photograph bundled with scikit-image, saved as a JPEG file."""
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "chelsea.jpg"
    Image.fromarray(data.chelsea()).save(path, quality=95)
    return path


def corrupt_fastres(monkeypatch, scale: float = 1.5) -> None:
    """Make fastres's eval forward wrong (a check that can fail must fail here)."""
    original = ResNet.forward

    def wrong(self, x):
        out = original(self, x)
        return out * scale + 0.5

    monkeypatch.setattr(ResNet, "forward", wrong)


# -- the command itself ----------------------------------------------------------------------------


def test_help_and_version(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for name in ("bench", "verify", "classify"):
        assert name in out
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and fastres.__version__ in out
    for name in ("bench", "verify", "classify"):
        code, out, _ = run_cli(capsys, name, "--help")
        assert code == 0 and "--device" in out
    code, _, _ = run_cli(capsys)
    assert code == 2
    code, _, err = run_cli(capsys, "no-such-command")
    assert_usage_error(code, err, "invalid choice")


def test_python_dash_m_subprocess(tmp_path):
    """``python -m fastres`` in a real process: usage errors exit 2 without a traceback."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "fastres", "classify", str(tmp_path / "x.jpg"),
                           "--weights", str(tmp_path / "w.pth"), "--model", "resnet18"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
                          check=False)
    assert proc.returncode == 2, proc.stderr
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_checks_one_checkpoint_against_every_model_first(capsys, r18_checkpoint,
                                                               monkeypatch):
    """``-m resnet18,resnet34 --weights r18.pth``: refused before any model runs (resnet18
    was benchmarked first, then the run failed on resnet34 and its table was lost)."""
    from fastres import bench as bench_mod

    def no_run(*a, **k):
        raise AssertionError("a model was built before the checkpoint was checked")

    monkeypatch.setattr(bench_mod, "torchvision_model", no_run)
    code, out, err = run_cli(capsys, "bench", "-m", "resnet18,resnet34", "--weights",
                             str(r18_checkpoint), "-b", "1", "--image-size", "32",
                             "--iters", "1", "--device", "cpu")
    assert_usage_error(code, err, "does not fit resnet34", "--model resnet18")


def test_bench_repeated_batch_and_dtype_options_add_up(monkeypatch, capsys):
    """``-b 1 -b 2`` and ``--dtype fp32 --dtype fp16`` keep every value, as a repeated ``-m``
    does (the last one replaced the others)."""
    parser = cli.build_parser()
    args = parser.parse_args(["bench", "-b", "1", "-b", "2", "4", "--dtype", "fp32",
                              "--dtype", "fp16"])
    assert args.batch_sizes == ["1", "2", "4"] and args.dtypes == ["fp32", "fp16"]


def test_register_command_adds_a_subcommand(capsys, monkeypatch):
    """Other parts of fastres (the tuning engine) add subcommands through register_command."""
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))
    seen = {}

    def add_arguments(p):
        p.add_argument("--batch-sizes", nargs="+", type=int, default=[1])

    def run(args):
        seen["batch_sizes"] = args.batch_sizes
        return 0

    cli.register_command("tune-demo", "a demo", add_arguments, run)
    code, _, _ = run_cli(capsys, "tune-demo", "--batch-sizes", "1", "8")
    assert code == 0 and seen["batch_sizes"] == [1, 8]


# -- bench -------------------------------------------------------------------------------------


def test_bench_small_writes_json_markdown_png(capsys, tmp_path):
    out_dir = tmp_path / "bench"
    code, out, err = run_cli(capsys, *SMALL_BENCH, "--dtype", "fp32", "bf16",
                             "--out", str(out_dir))
    assert code == 0, out + err
    # the table: every implementation, the agreement, the environment
    for needle in ("torchvision eager fp32", "torchvision AMP + channels_last", "fastres",
                   "rel err", "agrees with torchvision", "torch 2", "fastres 0",
                   "n/a: CUDA graphs need a GPU", "result: all outputs agree"):
        assert needle in out, needle

    report = json.loads((out_dir / "bench.json").read_text())
    assert report["ok"] is True
    assert report["env"]["device"] == "cpu" and report["env"]["torch"] == torch.__version__
    rows = report["rows"]
    fr = [r for r in rows if r["impl"] == "fastres"]
    assert {(r["dtype"], r["batch"]) for r in fr} == {("fp32", 1), ("fp32", 2), ("bf16", 1),
                                                      ("bf16", 2)}
    for r in fr:
        assert r["status"] == "ok"
        assert r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"] and r["images_per_s"] > 0
        assert 0 <= r["rel_err"] <= r["tolerance"]
        assert r["speedup"]["eager_fp32"] > 0 and r["iters"] == 2
        if r["dtype"] == "fp32":
            assert r["rel_err"] <= 1e-5  # DESIGN.md's fp32 bound on the CPU
    assert all(r["status"] == "n/a" for r in rows if r["impl"] == "fastres_graphs")
    assert not any(r["impl"] == "compile" for r in rows)  # compile is off on the CPU

    md = (out_dir / "bench.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert table[0].startswith("| model | dtype | batch | implementation | img/s")
    assert set(table[1].replace("|", "").replace("-", "").replace(":", "").strip()) == set()
    # numbers right-aligned: every column but the names and the status
    heads = [c.strip() for c in table[0].strip("|").split("|")]
    aligns = [c.strip() for c in table[1].strip("|").split("|")]
    assert len(heads) == len(aligns) and "host ms" in heads
    assert [h for h, a in zip(heads, aligns) if a != "---:"] == ["model", "dtype",
                                                                  "implementation", "status"]
    assert len(table) == 2 + len(rows)

    png = out_dir / "bench.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    from PIL import Image

    with Image.open(png) as img:
        img.verify()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pixels = plt.imread(png)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100


def test_bench_compile_baseline_and_budget(capsys, tmp_path):
    """The torch.compile baseline (inductor on the CPU, ``--device cpu``; the GPU check runs
    the same code on the GPU): compiled once per shape, checked, timed, and the budget stops
    compiling new shapes."""
    code, out, err = run_cli(capsys, *SMALL_BENCH, "--dtype", "bf16", "--compile",
                             "--compile-budget", "0", "--out", str(tmp_path))
    assert code == 0, out + err
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    comp = {r["batch"]: r for r in rows if r["impl"] == "compile"}
    assert set(comp) == {1, 2}
    first, second = comp[1], comp[2]
    assert first["status"] == "ok" and "first call (compile)" in first["note"]
    assert first["median_ms"] > 0 and first["rel_err"] < 5e-2  # bf16 against fp32 eager
    # budget 0 s: the first shape's compile spent it, the second shape is not compiled
    assert second["status"] == "skipped" and "compile budget" in second["note"]
    fr = [r for r in rows if r["impl"] == "fastres" and r["batch"] == 1][0]
    assert fr["speedup"]["compile"] == pytest.approx(first["median_ms"] / fr["median_ms"])
    assert "torch.compile" in out


def test_bench_refuses_to_time_wrong_outputs(capsys, monkeypatch, tmp_path):
    corrupt_fastres(monkeypatch)
    code, out, _ = run_cli(capsys, *SMALL_BENCH, "--out", str(tmp_path))
    assert code == 1
    assert "FAILED" in out and "not timed" in out
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    fr = [r for r in rows if r["impl"] == "fastres"]
    assert fr and all(r["status"] == "FAILED" and r["median_ms"] is None for r in fr)
    assert all(r["status"] == "ok" for r in rows if r["impl"] == "eager_fp32")


def test_bench_with_weights_file(capsys, r18_checkpoint):
    code, out, err = run_cli(capsys, *bench_argv("1"), "--weights", str(r18_checkpoint))
    assert code == 0, out + err
    assert "result: all outputs agree" in out


def test_bench_time_budget_skips_groups(capsys, tmp_path):
    """Every group skipped: the table says so, and the exit status is 1 (it was 0: a gate on
    bench passed having compared nothing)."""
    code, out, err = run_cli(capsys, *SMALL_BENCH, "--time-budget", "0", "--out", str(tmp_path))
    assert code == 1, err
    assert "no fastres output was compared with torchvision" in err
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert rows and all(r["status"] == "skipped" for r in rows)
    assert "nothing was checked" in out and "all outputs agree" not in out


def test_bench_interrupted_writes_what_it_measured(capsys, monkeypatch, tmp_path):
    """Ctrl-C, or SIGTERM from a stage cap (the CLI turns it into the same): the rows timed so
    far are written with the report marked interrupted, the rest are skipped, exit 130."""
    from fastres import bench

    real = bench.Runner.check_and_time
    calls = []

    def stopped_at_the_fourth(self, row, *args, **kwargs):
        calls.append((row.batch, row.impl))
        if len(calls) == 4:  # batch 2's first row (batch 1: eager, AMP+CL, fastres)
            raise KeyboardInterrupt
        return real(self, row, *args, **kwargs)

    monkeypatch.setattr(bench.Runner, "check_and_time", stopped_at_the_fourth)
    code, out, err = run_cli(capsys, *SMALL_BENCH, "--out", str(tmp_path))
    assert code == 130 and "interrupted" in err, out + err
    assert "INTERRUPTED" in out and "Traceback" not in err
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["interrupted"] is True and (tmp_path / "bench.png").exists()
    rows = {(r["batch"], r["impl"]): r for r in report["rows"]}
    assert set(rows) == {(b, i) for b in (1, 2)
                         for i in ("eager_fp32", "eager_amp_cl", "fastres", "fastres_graphs")}
    assert rows[(1, "fastres")]["status"] == "ok" and rows[(1, "fastres")]["median_ms"] > 0
    assert rows[(1, "fastres")]["speedup"]["eager_fp32"] > 0
    for impl in ("eager_fp32", "eager_amp_cl", "fastres", "fastres_graphs"):
        assert rows[(2, impl)]["status"] == "skipped", rows[(2, impl)]
        assert rows[(2, impl)]["median_ms"] is None
    assert [(r["batch"], r["impl"]) for r in report["rows"]][:4] == [
        (1, "eager_fp32"), (1, "eager_amp_cl"), (1, "fastres"), (1, "fastres_graphs")]


def _checked_report():
    """A bench report of one fastres row compared with torchvision (what a fake run_bench
    returns: a report that compared nothing makes bench exit 1)."""
    from fastres import bench

    row = bench.Row("resnet18", "fp32", 1, "fastres", "fastres", rel_err=1e-6)
    return bench.BenchReport(env={"device": "cpu"}, config={}, rows=[row])


def test_bench_compile_options_imply_compile(capsys, monkeypatch):
    """--compile-models / --max-autotune ask for compile rows, also where compile is off by
    default (the CPU); --no-compile still wins."""
    from fastres import bench

    seen = []

    def fake_run_bench(cfg, on_update=None):
        seen.append(cfg)
        return _checked_report()

    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    assert run_cli(capsys, *SMALL_BENCH)[0] == 0
    assert run_cli(capsys, *SMALL_BENCH, "--compile-models", "resnet18")[0] == 0
    assert run_cli(capsys, *SMALL_BENCH, "--max-autotune")[0] == 0
    assert run_cli(capsys, *SMALL_BENCH, "--compile-models", "resnet18", "--no-compile")[0] == 0
    assert run_cli(capsys, *SMALL_BENCH, "--compile-reduce-overhead")[0] == 0
    assert run_cli(capsys, *SMALL_BENCH, "--compile-freezing", "--compile-reduce-overhead")[0] == 0
    assert [c.compile for c in seen] == [False, True, True, False, True, True]
    assert [c.compile_reduce_overhead for c in seen] == [False] * 4 + [True, True]
    assert [c.compile_freezing for c in seen] == [False] * 5 + [True]
    assert seen[1].compile_models == ["resnet18"]
    # the rows each group gets: reduce-overhead and freezing only when asked; eager_cl in
    # 16-bit groups
    assert bench.Runner(seen[4], None).impl_keys("resnet18", torch.bfloat16) == [
        "eager_fp32", "eager_amp_cl", "eager_cl", "compile", "compile_reduce_overhead",
        "fastres", "fastres_graphs"]
    assert bench.Runner(seen[5], None).impl_keys("resnet18", torch.bfloat16) == [
        "eager_fp32", "eager_amp_cl", "eager_cl", "compile", "compile_freezing",
        "compile_reduce_overhead", "fastres", "fastres_graphs"]
    assert bench.Runner(seen[0], None).impl_keys("resnet18", torch.float32) == [
        "eager_fp32", "eager_amp_cl", "fastres", "fastres_graphs"]
    words = seen[0].command.split()  # (run_cli puts a fresh --seed first)
    assert words[:3] == ["fastres", "bench", "--seed"] and words[4:] == SMALL_BENCH[1:], words


def test_bench_does_not_start_a_compile_past_its_time_budget():
    from fastres.bench import BenchConfig, Runner

    cfg = BenchConfig(models=["resnet18"], batch_sizes=[1], dtypes=[torch.float32],
                      device=torch.device("cpu"), time_budget=None)
    runner = Runner(cfg, None)
    runner.last_compile_s = 1e6
    assert not runner.compile_would_overrun()  # no budget: compile
    cfg.time_budget = 3600.0
    runner.last_compile_s = None
    assert not runner.compile_would_overrun()  # nothing compiled yet: no estimate
    runner.last_compile_s = 1e6
    assert runner.compile_would_overrun()  # the last compile took longer than what is left
    runner.last_compile_s = 1.0
    assert not runner.compile_would_overrun()
    cfg.time_budget = 0.0
    assert runner.compile_would_overrun()


def test_bench_and_verify_refuse_unusable_output_paths_before_running(capsys, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    code, _, err = run_cli(capsys, *SMALL_BENCH, "--out", str(afile))
    assert_usage_error(code, err, "--out", "cannot be used as a directory")
    code, out, err = run_cli(capsys, *SMALL_VERIFY, "--no-photos",
                             "--json", str(tmp_path / "no" / "such" / "dir" / "v.json"))
    assert_usage_error(code, err, "--json", "cannot be written")
    assert "verify:" not in out  # refused before comparing anything
    # an empty path was ignored: exit 0 and nothing written
    code, out, err = run_cli(capsys, *SMALL_BENCH, "--out", "")
    assert_usage_error(code, err, "--out must name a directory, got an empty string")
    code, out, err = run_cli(capsys, *SMALL_VERIFY, "--no-photos", "--json", "")
    assert_usage_error(code, err, "--json must name a file, got an empty string")
    assert "verify:" not in out


@pytest.mark.parametrize("extra, needles", [
    (["-m", "resnet19"], ["unknown model 'resnet19'", "resnet18"]),
    (["--dtype", "fp8"], ["unknown dtype 'fp8'", "bf16"]),
    (["-b", "0"], ["batch sizes must be >= 1"]),
    (["-b", "two"], ["integers"]),
    (["--weights", "/no/such/file.pth"], ["does not exist"]),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"],
     ["device"]),
    (["--dtype", ","], ["no dtype given"]),
    (["--seed", "-1"], ["--seed must be in"]),
    (["--seed", str(2**64)], ["--seed must be in"]),
])
def test_bench_usage_errors(capsys, extra, needles):
    argv = [a for a in SMALL_BENCH if a not in ("--device", "cpu")] + extra
    code, _, err = run_cli(capsys, *argv)
    assert_usage_error(code, err, *needles)


def test_bench_empty_model_list(capsys):
    argv = [a if a != "resnet18" else "," for a in SMALL_BENCH]
    code, _, err = run_cli(capsys, *argv)
    assert_usage_error(code, err, "no model given")


def test_bench_wrong_architecture_checkpoint(capsys, r18_checkpoint):
    argv = ["bench", "-m", "resnet34", "-b", "1", "--image-size", "64", "--iters", "1",
            "--no-progress", "--device", "cpu", "--weights", str(r18_checkpoint)]
    code, _, err = run_cli(capsys, *argv)
    assert_usage_error(code, err, "does not fit resnet34", "resnet18")


# -- verify --------------------------------------------------------------------------------------


def test_verify_random_and_photos(capsys, tmp_path):
    pytest.importorskip("skimage")
    out_json = tmp_path / "verify.json"
    code, out, err = run_cli(capsys, *SMALL_VERIFY, "--json", str(out_json))
    assert code == 0, out + err
    for needle in ("random", "photos", "astronaut", "max rel err", "top-1", "top-5",
                   "verify: PASSED"):
        assert needle in out, needle
    result = json.loads(out_json.read_text())
    parts = {p["name"]: p for p in result["parts"]}
    assert parts["random"]["images"] == 4 and parts["photos"]["images"] >= 3
    assert parts["random"]["max_error"] <= 1e-5 and parts["photos"]["max_error"] <= 1e-5
    assert parts["photos"]["top1"] == 1.0


def test_verify_bf16_no_photos(capsys):
    code, out, err = run_cli(capsys, *SMALL_VERIFY, "--dtype", "bf16", "--no-photos")
    assert code == 0, out + err
    assert "skipped: --no-photos" in out and "verify: PASSED" in out


def test_verify_fails_when_outputs_disagree(capsys, monkeypatch):
    corrupt_fastres(monkeypatch)
    code, out, _ = run_cli(capsys, *SMALL_VERIFY, "--no-photos")
    assert code == 1
    assert "FAILED" in out and "verify: FAILED" in out


def test_verify_fails_when_fastres_runs_eagerly(capsys, monkeypatch, tmp_path):
    """A model fastres runs with torchvision's eager code (here: every forward told to) is
    a FAILED verify naming why: eager compared with itself proved nothing about the fused
    path, and it said PASSED."""
    from fastres import plan as plan_mod

    monkeypatch.setattr(plan_mod, "eager_reason", lambda model, x: "a reason of this test")
    out_json = tmp_path / "v.json"
    code, out, _ = run_cli(capsys, *SMALL_VERIFY, "--no-photos", "--batches", "1",
                           "--json", str(out_json))
    assert code == 1, out
    assert "a reason of this test" in out and "verify: FAILED (the fused path did not run)" in out
    data = json.loads(out_json.read_text())
    assert data["ok"] is False
    assert data["parts"][0]["eager_fallback"] == "a reason of this test"


def test_verify_of_weights_whose_outputs_are_not_finite(capsys, tmp_path):
    """Weights that make torchvision's own output NaN: fastres's is NaN too, and verify said
    "outputs disagree beyond the tolerance". It fails saying the reference is not finite
    (nothing to compare against), as classify says of such weights."""
    sd = fastres.resnet18().state_dict()
    sd["fc.weight"] = torch.full_like(sd["fc.weight"], float("nan"))
    path = tmp_path / "nan.pth"
    torch.save(sd, path)
    out_json = tmp_path / "v.json"
    code, out, _ = run_cli(capsys, *SMALL_VERIFY, "--no-photos", "--batches", "1",
                           "--weights", str(path), "--json", str(out_json))
    assert code == 1, out
    assert "torchvision's own output is not finite" in out, out
    assert "verify: FAILED (torchvision's output is not finite" in out, out
    assert "disagree" not in out, out
    data = json.loads(out_json.read_text())
    assert data["ok"] is False and data["parts"][0]["reference_not_finite"] == 1


def test_verify_that_compares_nothing_fails(capsys, monkeypatch):
    """No random batches and no photographs to be had (scikit-image missing): FAILED, not
    PASSED with zeros that were never measured."""
    from fastres import verify as verify_mod

    monkeypatch.setattr(verify_mod, "skimage_photos",
                        lambda: ([], "scikit-image is not installed: photographs skipped"))
    code, out, _ = run_cli(capsys, *SMALL_VERIFY, "--batches", "0")
    assert code == 1, out
    assert "verify: FAILED (nothing was compared)" in out


def test_verify_tolerance_is_a_real_bound(capsys, monkeypatch):
    """A tiny perturbation passes the default bound and fails a tighter --tol."""
    original = ResNet.forward
    monkeypatch.setattr(ResNet, "forward", lambda self, x: original(self, x) * (1 + 1e-3))
    argv = [*SMALL_VERIFY, "--no-photos", "--batches", "1"]
    code, _, _ = run_cli(capsys, *argv)  # 1e-3 relative: over fp32's 1e-5
    assert code == 1
    code, _, _ = run_cli(capsys, *argv, "--tol", "2e-3")
    assert code == 0


@pytest.mark.parametrize("extra, needles", [
    (["-m", "resnet19"], ["unknown model 'resnet19'", "resnet18"]),
    (["--dtype", "int8"], ["unknown dtype 'int8'"]),
    (["--weights", "/no/such/file.pth"], ["does not exist"]),
    (["--batches", "0", "--no-photos"], ["nothing to compare"]),
    (["--tol", "-1"], ["--tol must be > 0"]),
    (["--seed", str(2**64)], ["--seed must be in"]),
])
def test_verify_usage_errors(capsys, extra, needles):
    code, _, err = run_cli(capsys, *SMALL_VERIFY, *extra)
    assert_usage_error(code, err, *needles)


def test_verify_prints_the_bound_it_applies(capsys):
    """--tol 1.5e-5 was printed as 2e-05 (one digit), the JSON said 1.5e-05."""
    tol = float(f"{1 + torch.rand(()).item() * 8:.2f}e-5")  # three significant digits
    code, out, err = run_cli(capsys, *SMALL_VERIFY, "--no-photos", "--batches", "1",
                             "--tol", repr(tol))
    assert code in (0, 1), err
    assert f"max({tol:.3g} (base)" in out, out


def test_verify_wrong_architecture_checkpoint(capsys, r18_checkpoint):
    code, _, err = run_cli(capsys, *SMALL_VERIFY[:2], "resnet50", *SMALL_VERIFY[3:],
                           "--weights", str(r18_checkpoint))
    assert_usage_error(code, err, "does not fit resnet50", "--model resnet18")


# -- classify ------------------------------------------------------------------------------------


def _torchvision_probs(checkpoint, path) -> torch.Tensor:
    """torchvision's own pipeline for one image: its ResNet-18 with these weights after
    Resize(256), CenterCrop(224), ToTensor and ImageNet's Normalize; softmax of the logits."""
    from PIL import Image
    from torchvision import transforms

    tv = torchvision.models.resnet18(weights=None)
    tv.load_state_dict(torch.load(checkpoint, weights_only=True))
    tv.eval()
    recipe = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224),
                                 transforms.ToTensor(),
                                 transforms.Normalize([0.485, 0.456, 0.406],
                                                      [0.229, 0.224, 0.225])])
    with Image.open(path) as img, torch.no_grad():
        return torch.softmax(tv(recipe(img.convert("RGB"))[None]), dim=1)[0]


def test_classify_photo_matches_torchvision_pipeline(capsys, r18_checkpoint, photo):
    """Top-k from ``fastres classify`` equals torchvision's own transforms + model (the model
    named in any case, as ``get_model`` takes it)."""
    code, out, err = run_cli(capsys, "classify", str(photo), str(photo), "--weights",
                             str(r18_checkpoint), "--model", "ResNet18", "--topk", "3",
                             "--device", "cpu")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"{photo}:" and len(lines) == 8  # two images x (name + 3 classes)
    probs = [float(line.split()[0]) for line in lines[1:4]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6

    p = _torchvision_probs(r18_checkpoint, photo)
    top = p.topk(3)
    from torchvision.models._meta import _IMAGENET_CATEGORIES as names

    for line, idx, prob in zip(lines[1:4], top.indices.tolist(), top.values.tolist()):
        assert line.endswith(f"{names[idx]} ({idx})"), (line, names[idx])
        # printed to 4 decimals: at most 5e-5 from the probability, plus fp32's own error
        assert abs(float(line.split()[0]) - prob) < 1e-4


def test_resize_center_crop_is_torchvisions():
    from PIL import Image
    from torchvision import transforms

    from fastres.classify import resize_center_crop

    g = torch.Generator().manual_seed(int(torch.randint(2**31, ())))
    recipe = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    # (256, 259) / (259, 256): no resize, and an odd margin of 35 px: the crop's offset is
    # round(17.5) = 18, as torchvision computes it (int(17.5) would be 17)
    for h, w in ((300, 451), (451, 300), (256, 256), (333, 1000), (256, 259), (259, 256)):
        arr = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=g).numpy()
        img = Image.fromarray(arr)
        ours = resize_center_crop(img)
        theirs = torch.from_numpy(np.array(recipe(img)))
        assert ours.shape == (224, 224, 3)
        assert torch.equal(torch.from_numpy(ours), theirs), (h, w)


def test_normalize_agrees_with_torchvision_normalize():
    from torchvision import transforms

    from fastres.classify import normalize

    u8 = torch.randint(0, 256, (2, 40, 48, 3), dtype=torch.uint8)
    ref = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])(
        u8.permute(0, 3, 1, 2).float() / 255)
    out, _ = normalize(u8, torch.float32)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_a_disagreeing_fused_preprocess_is_said_once(monkeypatch):
    """The fallback warning carried the measured error, so each batch's new value warned
    again: one warning per kind of fallback."""
    from fastres import classify

    def off_by_some(images, layout, mean, std, dtype):  # a wrong fused op, wrong differently
        ref = classify.normalize_torch(images, dtype, mean, std)
        return ref + torch.rand(()) + 1.0

    monkeypatch.setattr(classify, "_fused_preprocess", lambda: off_by_some)
    monkeypatch.setattr(classify, "_said_fallback", set())
    u8 = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        for _ in range(3):
            out, how = classify.normalize(u8)
            assert how == "torch"
            torch.testing.assert_close(out, classify.normalize_torch(u8, torch.float32))
    assert len([w for w in said if "disagrees" in str(w.message)]) == 1, said


@pytest.mark.parametrize("case", [
    "missing_image", "unreadable_image", "directory",
    pytest.param("fifo_image", marks=pytest.mark.skipif(not hasattr(os, "mkfifo"),
                                                        reason="no FIFOs on this platform")),
    "broken_link_image", "missing_weights", "not_a_checkpoint", "wrong_arch", "bad_model",
    "bad_dtype", "bad_topk", "empty_checkpoint", "image_as_checkpoint", "wrong_fc",
    "strip_image", "nan_weights", "truncated_jpeg"])
def test_classify_errors(capsys, tmp_path, r18_checkpoint, photo, case):
    bad = tmp_path / "not_an_image.jpg"
    bad.write_text("this is not a JPEG")
    image, weights, extra = str(photo), str(r18_checkpoint), ["--model", "resnet18"]
    needles = []
    if case == "missing_image":
        image, needles = str(tmp_path / "missing.jpg"), ["does not exist"]
    elif case == "unreadable_image":
        image, needles = str(bad), ["cannot read", "as an image"]
    elif case == "directory":
        image, needles = str(tmp_path), ["is a directory"]
    elif case == "fifo_image":  # PIL waited forever for a writer on the FIFO
        image, needles = str(tmp_path / "fifo"), ["is not a regular file", "an image file"]
        os.mkfifo(image)
    elif case == "broken_link_image":
        image, needles = str(tmp_path / "link.jpg"), ["broken symbolic link"]
        os.symlink(tmp_path / "gone.jpg", image)
    elif case == "missing_weights":
        weights, needles = str(tmp_path / "missing.pth"), ["weights file", "does not exist"]
    elif case == "not_a_checkpoint":
        weights, needles = str(bad), ["checkpoint"]
    elif case == "wrong_arch":
        extra, needles = ["--model", "wide_resnet50_2"], ["does not fit wide_resnet50_2",
                                                          "--model resnet18"]
    elif case == "bad_model":
        extra, needles = ["--model", "vgg16"], ["unknown model 'vgg16'"]
    elif case == "bad_dtype":
        extra, needles = ["--model", "resnet18", "--dtype", "fp64"], ["unknown dtype 'fp64'"]
    elif case == "bad_topk":
        extra, needles = ["--model", "resnet18", "--topk", "0"], ["--topk must be at least 1"]
    elif case == "empty_checkpoint":  # (the message ended at "checkpoint: ")
        weights, needles = str(tmp_path / "empty.pth"), ["the file is empty or truncated"]
        open(weights, "wb").close()
    elif case == "image_as_checkpoint":  # (it was explained as a whole pickled model)
        weights, needles = str(photo), ["it is not a PyTorch checkpoint"]
    elif case == "wrong_fc":  # (the message was "does not fit resnet18: ?")
        sd = torch.load(r18_checkpoint)
        sd["fc.weight"] = torch.randn(1000, 256)
        weights = str(tmp_path / "fc.pth")
        torch.save(sd, weights)
        needles = ["fc.weight: checkpoint [1000, 256], resnet18 [N, 512]"]
    elif case == "strip_image":  # resized to 256 x 10M pixels, it exhausted memory
        from PIL import Image
        image = str(tmp_path / "strip.png")
        Image.new("RGB", (40000, 1)).save(image)
        needles = ["40000x1 pixels is too elongated"]
    elif case == "nan_weights":  # NaN "probabilities" were printed as a ranking, exit 0
        sd = torch.load(r18_checkpoint)
        sd["fc.bias"] = sd["fc.bias"].clone()
        sd["fc.bias"][3] = float("nan")
        weights = str(tmp_path / "nan.pth")
        torch.save(sd, weights)
        needles = ["is not finite"]
    elif case == "truncated_jpeg":  # a download cut short: PIL raises on decoding the rest
        data = photo.read_bytes()
        cut = int(torch.randint(len(data) // 4, 3 * len(data) // 4, ()))
        image = str(tmp_path / "truncated.jpg")
        Path(image).write_bytes(data[:cut])
        needles = ["cannot read", "as an image", "truncated"]
    code, _, err = run_cli(capsys, "classify", image, "--weights", weights, *extra,
                             "--device", "cpu")
    assert_usage_error(code, err, *needles)
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback


def test_classify_needs_weights(capsys, photo):
    code, _, err = run_cli(capsys, "classify", str(photo))
    assert_usage_error(code, err, "--weights")


# -- helpers and the GPU check script ------------------------------------------------------------


def test_percentile_and_timing_helpers():
    from fastres.bench import host_times, percentile, time_calls

    assert percentile([3.0], 90) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([0.0, 10.0], 90) == pytest.approx(9.0)
    assert percentile([5.0, 1.0, 4.0, 2.0, 3.0], 90) == pytest.approx(4.6)  # unsorted input
    calls = []
    times = time_calls(lambda x: calls.append(x), [torch.zeros(1), torch.ones(1)], warmup=2,
                       iters=5, max_time=60, device=torch.device("cpu"))
    assert len(times) == 5 and len(calls) == 7 and all(t >= 0 for t in times)
    # inputs rotate over the pre-made batches
    assert [float(c) for c in calls[2:]] == [0.0, 1.0, 0.0, 1.0, 0.0]
    calls.clear()
    host = host_times(lambda x: (calls.append(x), time.sleep(0.002)),
                      [torch.zeros(1), torch.ones(1)], torch.device("cpu"), calls=3)
    assert len(host) == 3 and all(t >= 2.0 for t in host), host
    assert [float(c) for c in calls] == [0.0, 1.0, 0.0]


def test_error_and_agreement_measures():
    """verify's measures on hand-made values: the relative error divides by the reference's
    norm; top-k agreement compares the k classes as sets, every one of them."""
    from fastres.verify import rel_err, topk_agreement

    ref = torch.randn(3, 10)
    assert rel_err(2 * ref, ref) == pytest.approx(1.0)
    assert rel_err(ref, 2 * ref) == pytest.approx(0.5)
    logits = torch.tensor([[9.0, 8.0, 7.0, 6.0, 5.0, 0.0, 0.0],
                           [0.0, 0.0, 5.0, 6.0, 7.0, 8.0, 9.0]])
    same_set = torch.tensor([[5.0, 6.0, 7.0, 8.0, 9.0, 0.0, 0.0],   # same five, other order
                             [0.0, 0.0, 9.0, 8.0, 7.0, 6.0, 5.0]])
    assert topk_agreement(same_set, logits, 5) == 1.0
    assert topk_agreement(same_set, logits, 1) == 0.0
    one_differs = logits.clone()
    one_differs[0, 4], one_differs[0, 5] = 0.0, 5.0  # class 4 out of the top five, 5 in
    assert topk_agreement(one_differs, logits, 5) == 0.5


def test_gpu_check_script_syntax():
    script = REPO / "benchmarks" / "gpu_check.sh"
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    text = script.read_text()
    for needle in ("pip install --no-build-isolation --no-deps --no-index",
                   'TEST_ARGS=(tests -m "cuda and not slow")', '-m pytest "${TEST_ARGS[@]}"',
                   "--junitxml", "fastres bench", "all.tar.gz", "summary.md", "timeout",
                   "FASTRES_MARGIN_LOG", "PIP_DISABLE_PIP_VERSION_CHECK=1"):
        assert needle in text, needle
    import shutil

    shellcheck = shutil.which("shellcheck")
    if shellcheck:  # not installed everywhere; where it is, the script is clean
        proc = subprocess.run([shellcheck, "-x", str(script)], capture_output=True, text=True,
                              check=False)
        assert proc.returncode == 0, proc.stdout


def test_classify_reads_16_bit_and_float_grayscale_like_8_bit(tmp_path):
    """PIL's convert("RGB") clips 16-bit and float pixels to 0..255: a 16-bit photo came out
    white (mean 255) and a [0, 1] float one black. They now load as their 8-bit selves."""
    from PIL import Image

    from fastres.classify import load_image

    cam = np.asarray(Image.fromarray(
        np.random.default_rng(int(torch.randint(0, 2**31, ()))).integers(
            0, 256, (37, 41), dtype=np.uint8)))
    ref = np.asarray(load_image(_save(tmp_path / "cam8.png", Image.fromarray(cam))))
    cam16 = Image.fromarray(cam.astype(np.uint16) * 257)
    got16 = np.asarray(load_image(_save(tmp_path / "cam16.png", cam16)))
    assert np.array_equal(got16, ref)
    camf = Image.fromarray(cam.astype(np.float32) / 255.0)
    gotf = np.asarray(load_image(_save(tmp_path / "camf.tif", camf)))
    assert np.abs(gotf.astype(int) - ref.astype(int)).max() <= 1


def test_classify_reads_dark_16_bit_images_the_same_from_any_format(tmp_path):
    """A dark 16-bit image (every value below 256) kept its values as 8-bit ones when Pillow
    opened it in mode I (a 16-bit PGM), 256 times brighter than the same pixels from a 16-bit
    PNG (mode I;16), which kept their top 8 bits."""
    from PIL import Image

    from fastres.classify import load_image

    rng = np.random.default_rng(int(torch.randint(0, 2**31, ())))
    dark = rng.integers(1, 256, (23, 29)).astype(np.uint16)  # all below 256
    png = tmp_path / "dark16.png"
    Image.fromarray(dark).save(png)
    pgm = tmp_path / "dark16.pgm"  # P5 with maxval 65535: Pillow opens it as mode I
    pgm.write_bytes(b"P5\n29 23\n65535\n" + dark.astype(">u2").tobytes())
    assert Image.open(pgm).mode == "I"
    want = np.repeat((dark >> 8).astype(np.uint8)[..., None], 3, axis=2)
    for path in (png, pgm):
        assert np.array_equal(np.asarray(load_image(path)), want), path.name


def test_classify_says_an_image_has_nan_pixels(capsys, tmp_path, r18_checkpoint):
    """One NaN pixel in a float image was reported as 'no finite pixel values'."""
    from PIL import Image

    a = np.full((20, 30), 0.5, dtype=np.float32)
    a[int(torch.randint(0, 20, ())), int(torch.randint(0, 30, ()))] = float("nan")
    path = _save(tmp_path / "nan.tif", Image.fromarray(a))
    code, _, err = run_cli(capsys, "classify", str(path), "--weights", str(r18_checkpoint),
                           "--model", "resnet18", "--device", "cpu")
    assert_usage_error(code, err, "1 pixel value(s) that are NaN or infinite (of 600)")


def test_classify_refuses_a_decompression_bomb(capsys, tmp_path, r18_checkpoint, monkeypatch):
    from PIL import Image

    big = _save(tmp_path / "big.png", Image.new("RGB", (64, 64)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 4096 > 2 x 100: PIL refuses it
    code, _, err = run_cli(capsys, "classify", str(big), "--weights", str(r18_checkpoint),
                           "--model", "resnet18", "--device", "cpu")
    assert_usage_error(code, err, "cannot read", "as an image")


def _save(path, image):
    image.save(path)
    return path


# -- checkpoints as training code saves them, option values, output files -------------------------


def test_load_checkpoint_unwraps_training_checkpoints(tmp_path):
    """PyTorch's checkpoint tutorial ({"model_state_dict": ..., "optimizer_state_dict": ...}),
    DataParallel / DDP ("module." keys), torch.compile ("_orig_mod." keys) and torchvision's
    reference training script ({"model": ..., "args": argparse.Namespace}) all load as the
    plain state_dict (they were refused as 'does not fit' / 'not a state_dict')."""
    import argparse

    from fastres.classify import load_checkpoint

    sd = {"conv1.weight": torch.randn(4, 3, 3, 3), "bn1.running_mean": torch.randn(4),
          "fc.weight": torch.randn(10, 4)}
    variants = {
        "tutorial": {"epoch": 3, "model_state_dict": sd, "optimizer_state_dict": {"state": {}},
                     "loss": 0.5},
        "dataparallel": {f"module.{k}": v for k, v in sd.items()},
        "compiled": {f"_orig_mod.{k}": v for k, v in sd.items()},
        "ddp_in_tutorial": {"model_state_dict": {f"module.{k}": v for k, v in sd.items()}},
        "torchvision_reference": {"model": sd, "optimizer": {"state": {}}, "epoch": 7,
                                  "args": argparse.Namespace(model="resnet18", lr=0.5)},
    }
    for name, ckpt in variants.items():
        path = tmp_path / f"{name}.pth"
        torch.save(ckpt, path)
        got = load_checkpoint(path)
        assert set(got) == set(sd), name
        for k, v in sd.items():
            assert torch.equal(got[k], v), (name, k)
    # a state_dict whose keys merely share a prefix with others is left alone
    partial = {"module.a": torch.randn(2), "b": torch.randn(2)}
    torch.save(partial, tmp_path / "partial.pth")
    assert set(load_checkpoint(tmp_path / "partial.pth")) == {"module.a", "b"}


def test_classify_with_a_dataparallel_training_checkpoint(capsys, tmp_path, r18_checkpoint):
    """The same predictions from a DataParallel checkpoint saved by torchvision's reference
    training script as from the plain state_dict."""
    import argparse

    from PIL import Image

    image = tmp_path / "noise.png"
    Image.fromarray(torch.randint(0, 256, (230, 260, 3), dtype=torch.uint8).numpy()).save(image)
    sd = torch.load(r18_checkpoint, weights_only=True)
    wrapped = tmp_path / "model_89.pth"
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 89,
                "args": argparse.Namespace(model="resnet18")}, wrapped)
    argv = ["classify", str(image), "--model", "resnet18", "--topk", "3", "--device", "cpu"]
    code, plain, err = run_cli(capsys, *argv, "--weights", str(r18_checkpoint))
    assert code == 0, err
    code, out, err = run_cli(capsys, *argv, "--weights", str(wrapped))
    assert code == 0, err
    assert out == plain


def test_classify_topk_above_the_class_count_lists_every_class(capsys, tmp_path, photo):
    """``-k 10`` on a 3-class head lists the 3 classes (the documented clamp), most probable
    first, with torchvision's softmax probabilities."""
    from fastres.classify import imagenet_batch, load_image
    from fastres.verify import realistic_bn

    model = realistic_bn(torchvision.models.resnet18(weights=None, num_classes=3))
    ckpt = tmp_path / "r18_3.pth"
    torch.save(model.state_dict(), ckpt)
    code, out, err = run_cli(capsys, "classify", str(photo), "--weights", str(ckpt),
                             "--model", "resnet18", "-k", "10", "--device", "cpu")
    assert code == 0, err
    rows = [line.split() for line in out.strip().splitlines()[1:]]
    assert len(rows) == 3, out
    got = {int(r[-1].strip("()")): float(r[0]) for r in rows}
    batch, _ = imagenet_batch([load_image(photo)], torch.device("cpu"), torch.float32)
    with torch.no_grad():
        ref = torch.softmax(model(batch), dim=1)[0]
    assert sorted(got) == [0, 1, 2]
    printed = [float(r[0]) for r in rows]
    assert printed == sorted(printed, reverse=True), out
    for idx, prob in got.items():
        assert prob == pytest.approx(ref[idx].item(), abs=1e-4)


def test_weights_that_are_a_directory_or_a_torchvision_name(capsys, tmp_path, photo,
                                                           r18_checkpoint, monkeypatch):
    """--weights naming torchvision weights (IMAGENET1K_V1) reads the file torchvision keeps,
    as the path of that file does; when it is missing, fastres's hint on where torchvision
    would download it (the CLI said only 'does not exist'); a directory is named as one."""
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # torch.hub.set_dir's
    code, _, err = run_cli(capsys, "classify", str(photo), "--weights", "IMAGENET1K_V2",
                           "--model", "resnet50", "--device", "cpu")
    assert_usage_error(code, err, "not in torchvision's cache", "pass --weights",
                       "resnet50-11ad3fa6.pth")
    assert "pass weights=" not in err
    code, _, err = run_cli(capsys, *SMALL_VERIFY, "--weights", "DEFAULT")
    assert_usage_error(code, err, "not in torchvision's cache", "resnet18-f37072fd.pth")
    code, _, err = run_cli(capsys, "classify", str(photo), "--weights", str(tmp_path),
                           "--model", "resnet18", "--device", "cpu")
    assert_usage_error(code, err, "is a directory, expected a checkpoint file")

    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    shutil.copy(r18_checkpoint, tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    argv = ["classify", str(photo), "--model", "resnet18", "--device", "cpu"]
    code, by_path, err = run_cli(capsys, *argv, "--weights", str(r18_checkpoint))
    assert code == 0, err
    code, by_name, err = run_cli(capsys, *argv, "--weights", "IMAGENET1K_V1")
    assert code == 0, err
    assert by_name == by_path
    code, out, err = run_cli(capsys, *SMALL_VERIFY, "--weights", "DEFAULT")
    assert code == 0, err + out


@pytest.mark.parametrize("extra, needles", [
    (["--batches", "-1"], ["--batches must be >= 0, got -1"]),
    (["-b", "0"], ["--batch-size must be >= 1, got 0"]),
    (["--tol", "inf"], ["--tol must be > 0 and finite, got inf"]),  # inf made verify always pass
    (["--tol", "0"], ["--tol must be > 0 and finite, got 0.0"]),  # no batch could ever pass
    # (a traceback from inside torch, exit 1: "outputs disagree")
    (["-b", str(10**20)], ["--batch-size 100000000000000000000 at --image-size",
                           "more input than a tensor can hold"]),
    # (the CPU allocator's traceback, exit 1)
    (["-b", str(10**9)], ["out of memory on cpu for --batch-size 1000000000", "smaller"]),
])
def test_verify_number_options(capsys, extra, needles):
    code, out, err = run_cli(capsys, *SMALL_VERIFY, "--no-photos", *extra)
    assert_usage_error(code, err, *needles)
    assert "verify:" not in out


@pytest.mark.parametrize("extra, needles", [
    (["--max-time", "nan"], ["--max-time must be > 0, got nan"]),
    (["--max-time", "-1"], ["--max-time must be > 0"]),
    (["--max-time", "0"], ["--max-time must be > 0, got 0.0"]),
    (["--time-budget", "nan"], ["--time-budget must be >= 0"]),
    (["--compile-budget", "-5"], ["--compile-budget must be >= 0, got -5"]),
])
def test_bench_number_options(capsys, monkeypatch, extra, needles):
    from fastres import bench

    def no_run(cfg, on_update=None):
        raise AssertionError("bench ran with a bad option")

    monkeypatch.setattr(bench, "run_bench", no_run)
    code, _, err = run_cli(capsys, *SMALL_BENCH, *extra)
    assert_usage_error(code, err, *needles)


def test_verify_json_that_cannot_be_written(capsys, monkeypatch, tmp_path):
    """os.access says yes to root everywhere: an unwritable --json was found only after the
    whole comparison, with a traceback. It is refused up front, and a write that fails at the
    end anyway (the directory went away) is a one-line error after the printed results."""
    from fastres import verify as verify_mod

    monkeypatch.setattr(os, "access", lambda *a, **k: True)  # as for root
    code, out, err = run_cli(capsys, *SMALL_VERIFY, "--no-photos", "--json", "/proc/v.json")
    assert_usage_error(code, err, "--json", "cannot be written")
    assert "verify:" not in out
    monkeypatch.undo()

    target = tmp_path / "gone" / "v.json"
    target.parent.mkdir()
    real = verify_mod.verify

    def verify_then_remove_the_directory(*args, **kwargs):
        result = real(*args, **kwargs)
        target.parent.rmdir()
        return result

    monkeypatch.setattr(verify_mod, "verify", verify_then_remove_the_directory)
    code, out, err = run_cli(capsys, *SMALL_VERIFY, "--no-photos", "--batches", "1",
                             "--json", str(target))
    assert_usage_error(code, err, "--json", "could not be written")
    assert "verify: PASSED" in out
    assert not target.parent.exists()  # the up-front check left nothing behind


def test_verify_fails_cleanly_on_a_wrong_shaped_output(capsys, monkeypatch):
    """fastres returning the wrong shape is a FAILED verify (exit 1), not a traceback."""
    original = ResNet.forward
    drop = int(torch.randint(1, 5, ()))
    monkeypatch.setattr(ResNet, "forward", lambda self, x: original(self, x)[:, drop:])
    code, out, err = run_cli(capsys, *SMALL_VERIFY, "--no-photos", "--batches", "1")
    assert code == 1, err
    assert "Traceback" not in err and "verify: FAILED" in out
    assert f"(2, {1000 - drop})" in out


def test_image_arrays_convert_like_image_files():
    """uint16 arrays were clipped to white and out-of-range floats silently clipped."""
    from fastres.classify import to_pil_rgb

    u8 = torch.randint(0, 256, (33, 47, 3), dtype=torch.uint8).numpy()
    ref = np.asarray(to_pil_rgb(u8))
    assert np.array_equal(np.asarray(to_pil_rgb(u8.astype(np.uint16) * 257)), ref)
    assert np.array_equal(np.asarray(to_pil_rgb(u8.astype(np.int64))), ref)
    got = np.asarray(to_pil_rgb(u8.astype(np.float32) / 255.0)).astype(int)
    assert np.abs(got - ref).max() <= 1
    with pytest.raises(ValueError, match="expected"):
        to_pil_rgb(u8.astype(np.float32) / 127.5 - 1.0)  # [-1, 1] data: say so, never clip


def test_tune_cache_dir_is_for_that_command_only(capsys, monkeypatch, tmp_path,
                                                 r18_checkpoint):
    """``fastres tune --cache-dir`` set FASTRES_CACHE_DIR for the rest of the process; and its
    wrong-architecture hint named a --model option tune does not have."""
    before = str(tmp_path / "theirs")
    monkeypatch.setenv("FASTRES_CACHE_DIR", before)
    tuning.configure(devices=("cpu",))  # (CPU calls are tuned here, so tune runs)
    try:
        code, out, err = run_cli(capsys, "tune", "resnet18", "--batch", "1", "--dtype", "fp32",
                                 "--image-size", "32", "--device", "cpu",
                                 "--cache-dir", str(tmp_path / "mine"))
    finally:
        tuning.reset()
    assert code == 0, out + err
    assert str(tmp_path / "mine") in out
    assert os.environ["FASTRES_CACHE_DIR"] == before
    code, _, err = run_cli(capsys, "tune", "resnet50", "--device", "cpu", "--weights",
                           str(r18_checkpoint))
    assert_usage_error(code, err, "does not fit resnet50", "give MODEL as resnet18")
    assert "--model" not in err


def test_tune_repeated_batch_and_dtype_options_add_up(capsys, monkeypatch):
    """``-b 1 -b 32 --dtype fp16 --dtype bf16`` tunes both batches in both dtypes, as bench's
    options do (argparse kept the last of each: batch 1 and fp16 were dropped silently); with
    neither given, batch 1 in bf16."""
    from fastres import tune_cli

    seen = []
    monkeypatch.setattr(tune_cli, "tune_main", lambda *a: seen.append(a[1:3]) or 0)
    assert run_cli(capsys, "tune", "resnet18", "-b", "1", "--batch", "32,8", "--dtype", "fp16",
                   "-d", "bf16", "fp32")[0] == 0
    assert run_cli(capsys, "tune", "resnet18")[0] == 0
    assert seen == [(["1", "32,8"], ["fp16", "bf16", "fp32"]), (["1"], ["bf16"])]


@pytest.mark.parametrize("argv", [
    ["bench", "-m", "resnet18", "-b", "1", "--image-size", "32"],
    ["verify", "-m", "resnet18", "-b", "1", "--batches", "1", "--image-size", "32"],
    ["classify", "nothing.png", "-m", "resnet18", "--weights", "nothing.pth"],
    ["tune", "resnet18", "--device", "cpu"],
])
def test_a_bad_backend_variable_is_a_usage_error_of_every_command(capsys, monkeypatch, argv):
    """``FASTRES_BACKEND=bogus``: exit 2 with one line naming the variable and its choices,
    before anything runs (bench, verify and classify ended in a traceback)."""
    monkeypatch.setenv("FASTRES_BACKEND", "bogus")
    code, out, err = run_cli(capsys, *argv)
    assert_usage_error(code, err, "FASTRES_BACKEND", "'bogus'", "'triton'")
    assert "Traceback" not in err and out == ""


@pytest.mark.parametrize("value", ["abc", "0", "-2"])
def test_a_bad_compile_threads_variable_is_a_usage_error(capsys, monkeypatch, value):
    """``FASTRES_COMPILE_THREADS`` is read by the tuner's first compile, on a GPU only: a bad
    value was a traceback from deep inside ``fastres tune`` there (and passed unseen on a
    CPU). Every command now says so first, exit 2."""
    monkeypatch.setenv("FASTRES_COMPILE_THREADS", value)
    code, out, err = run_cli(capsys, "tune", "resnet18", "--device", "cpu")
    assert_usage_error(code, err, "FASTRES_COMPILE_THREADS must be a positive integer",
                       repr(value))
    assert out == ""


def test_tune_batch_option_without_a_number(capsys):
    """``fastres tune --batch ,`` tuned batch size 1 as if nothing had been asked."""
    code, out, err = run_cli(capsys, "tune", "resnet18", "--device", "cpu", "--batch", ",")
    assert_usage_error(code, err, "no batch size given (--batch ','); expected integers >= 1")
    assert out == ""


def test_tune_weights_that_are_a_directory(capsys, tmp_path):
    """``fastres tune --weights DIR`` said "weights file DIR does not exist" (tune reads the
    checkpoint through fastres.models.load_weights, without the other commands' check)."""
    code, _, err = run_cli(capsys, "tune", "resnet18", "--device", "cpu", "--weights",
                           str(tmp_path))
    assert_usage_error(code, err, "is a directory, expected a checkpoint file")
    assert "does not exist" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("where", ["option", "env", "below_a_file"])
def test_tune_cache_dir_that_is_a_file(capsys, monkeypatch, tmp_path, where):
    """A --cache-dir (or FASTRES_CACHE_DIR) naming a file was accepted: exit 0, and on a GPU
    every layer tuned then a TuningCacheWarning ("[Errno 17] File exists") and nothing
    saved, which is what tune is for. It is a usage error, before anything runs."""
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    argv = ["tune", "resnet18", "--device", "cpu"]
    if where == "option":
        argv += ["--cache-dir", str(afile)]
    elif where == "env":
        monkeypatch.setenv("FASTRES_CACHE_DIR", str(afile))
    else:
        argv += ["--cache-dir", str(afile / "sub" / "dir")]
    code, out, err = run_cli(capsys, *argv)
    what = "FASTRES_CACHE_DIR" if where == "env" else "--cache-dir"
    assert_usage_error(code, err, what, f"{afile}' is a file, expected a directory")
    assert len(err.strip().splitlines()) == 1, err
    assert out == "" and afile.read_text() == "not a directory"


def test_tune_on_cpu_says_nothing_is_tuned(capsys, monkeypatch, tmp_path):
    """``fastres tune --device cpu`` ran every forward and reported "tuned 0 layer(s)" and a
    cache file it never wrote: CPU calls are not tuned. It says so (exit 0) and writes
    nothing; bad arguments are still refused first."""
    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path / "cache"))
    tuning.reset()
    code, out, err = run_cli(capsys, "tune", "resnet18", "--device", "cpu", "--image-size",
                             "32")
    assert code == 0, err
    assert "cpu calls are not tuned" in out and "nothing to tune" in out, out
    assert "cache:" not in out and not (tmp_path / "cache").exists()
    code, _, err = run_cli(capsys, "tune", "resnet18", "--device", "cpu", "--num-classes", "0")
    assert_usage_error(code, err, "--num-classes must be >= 1")


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 96.00 GiB"),
    MemoryError(),  # the host's (pinned buffers, the inputs of a CPU-side copy)
    RuntimeError("CUDA error: out of memory"),  # a raw CUDA error, not the allocator's
], ids=["torch", "host", "cuda-runtime"])
def test_tune_out_of_memory_is_one_line(capsys, monkeypatch, tmp_path, error):
    """A batch or image size too big for the GPU was torch's OutOfMemoryError traceback; the
    other forms an allocation failure takes were tracebacks until they were caught alike."""
    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path / "cache"))

    def oom(*args, **kwargs):
        raise error

    monkeypatch.setattr(tuning, "tune_model", oom)
    tuning.configure(devices=("cpu",))  # (reach tune_model without a GPU)
    try:
        code, _, err = run_cli(capsys, "tune", "resnet18", "--device", "cpu", "--batch",
                               "4096", "--image-size", "32")
    finally:
        tuning.reset()
    assert_usage_error(code, err, "out of memory", "batch 4096", "--batch", "--image-size")
    assert len(err.strip().splitlines()) == 1, err


# -- bench: failures that must not stop the run or pass for fastres's speed ------------------------


def test_bench_wrong_shaped_non_tensor_or_nan_output_is_failed_not_timed(capsys, monkeypatch,
                                                                       tmp_path):
    """A fastres output of the wrong shape, a non-tensor or one with a NaN/inf: that group's
    fastres row is FAILED and untimed (a regression guard: rel_err raises on a shape mismatch),
    the other groups and the baselines go on, and bench.json stays valid JSON."""
    original = ResNet.forward
    drop = int(torch.randint(1, 5, ()))
    bad = float(["nan", "inf", "-inf"][int(torch.randint(0, 3, ()))])

    def broken(self, x):
        out = original(self, x)
        if x.shape[0] == 1:
            return out[:, drop:]
        if x.shape[0] == 2:
            return (out,)
        out = out.clone()
        out[int(torch.randint(0, out.shape[0], ())), int(torch.randint(0, 1000, ()))] = bad
        return out

    monkeypatch.setattr(ResNet, "forward", broken)
    code, out, err = run_cli(capsys, *bench_argv("1", "2", "3"), *fresh_seed_args(),
                             "--out", str(tmp_path))
    assert code == 1 and "Traceback" not in err, out + err
    report = json.loads((tmp_path / "bench.json").read_text())  # strict JSON (no NaN/Infinity)
    rows = {(r["batch"], r["impl"]): r for r in report["rows"]}
    for b in (1, 2, 3):
        fr = rows[(b, "fastres")]
        assert fr["status"] == "FAILED" and fr["median_ms"] is None and fr["iters"] == 0, fr
        assert all(v is None for v in fr["speedup"].values())
        assert rows[(b, "eager_fp32")]["status"] == "ok"
        assert rows[(b, "eager_fp32")]["median_ms"] > 0
    assert f"(1, {1000 - drop})" in rows[(1, "fastres")]["note"]
    assert "tuple" in rows[(2, "fastres")]["note"]
    assert rows[(3, "fastres")]["rel_err"] == "inf" and "not timed" in rows[(3, "fastres")]["note"]
    assert "result: FAILED" in out


def test_bench_eager_fallback_is_not_timed_as_fastres(capsys, monkeypatch):
    """When fastres's forward falls back to torchvision's eager code (here: a global module
    forward hook, which the fused plan would skip), its outputs agree -- they are eager's -- and
    the row was timed and reported as fastres's speed. It is an error row, not timed."""
    from torch.nn.modules.module import register_module_forward_hook

    calls = []
    handle = register_module_forward_hook(lambda module, args, output: calls.append(1))
    try:
        code, out, err = run_cli(capsys, *bench_argv("1"), *fresh_seed_args())
    finally:
        handle.remove()
    assert calls and code == 0 and "Traceback" not in err, out + err
    line = [ln for ln in out.splitlines() if ln.startswith("resnet18") and "  fastres  " in ln]
    assert len(line) == 1 and "error: fastres ran torchvision's eager code" in line[0], out
    assert "forward hooks" in line[0] and "not timed" in line[0]
    assert "fastres error" in out and "img/s (" not in out.split("fastres error")[1]
    assert "result: all outputs agree; 1 fastres row not timed (error, see above)" in out, out


def test_bench_goes_on_when_fastres_cannot_be_built_or_eager_raises(capsys, monkeypatch,
                                                                   tmp_path):
    """Building fastres raising: its rows are FAILED (exit 1), the baselines are still timed.
    Eager in the dtype raising (it only sets the tolerance): the bound is DESIGN.md's."""
    from fastres import bench

    def no_fastres(tv, dtype):
        raise RuntimeError("cannot build")

    monkeypatch.setattr(bench, "fastres_twin", no_fastres)
    code, out, err = run_cli(capsys, *bench_argv("1"), *fresh_seed_args(),
                             "--out", str(tmp_path))
    assert code == 1 and "Traceback" not in err, out + err
    rows = {r["impl"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert rows["fastres"]["status"] == "FAILED" and "cannot build" in rows["fastres"]["note"]
    assert rows["fastres_graphs"]["status"] == "FAILED"
    assert rows["eager_fp32"]["status"] == "ok" and rows["eager_amp_cl"]["median_ms"] > 0
    monkeypatch.undo()

    def eager_raises(*args, **kwargs):
        raise RuntimeError("no eager today")

    monkeypatch.setattr(bench, "eager_forward", eager_raises)
    code, out, err = run_cli(capsys, *bench_argv("1"), *fresh_seed_args(),
                             "--out", str(tmp_path))
    assert code == 0 and "Traceback" not in err, out + err
    rows = {r["impl"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    fr = rows["fastres"]
    assert fr["status"] == "ok" and fr["median_ms"] > 0 and fr["tolerance"] == 1e-5
    assert fr["rel_err"] <= 1e-5 and "eager fp32 raised RuntimeError: no eager today" in fr["note"]


def test_bench_batch_that_runs_out_of_memory_is_skipped(capsys, monkeypatch, tmp_path):
    """A batch size whose inputs or reference forward run out of memory is a skipped group
    saying so, and the other groups are measured and saved (the run died with a traceback,
    leaving a bench.json that said ok)."""
    from fastres import bench

    real = bench.reference_forward

    def oom_at_batch_2(tv, x, *a, **k):
        if x.shape[0] == 2:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                               "allocate 10000000000000 bytes")
        return real(tv, x, *a, **k)

    monkeypatch.setattr(bench, "reference_forward", oom_at_batch_2)
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, *SMALL_BENCH, *fresh_seed_args(), "--out", str(out_dir))
    assert "Traceback" not in err, err
    rows = json.loads((out_dir / "bench.json").read_text())["rows"]
    two = [r for r in rows if r["batch"] == 2]
    assert two and all(r["status"] == "skipped" and "out of memory" in r["note"] for r in two)
    one = [r for r in rows if r["batch"] == 1 and r["impl"] == "fastres"]
    assert one and one[0]["status"] == "ok" and one[0]["images_per_s"] > 0, one


def test_bench_out_dir_lost_mid_run_keeps_measuring(capsys, monkeypatch, tmp_path):
    """--out replaced by a file after the first group: the checkpoint write failed with a
    traceback and the results were lost. Now the run goes on, warns once, and the table
    (printed in full) says the results were not saved."""
    from fastres import bench

    out_dir = tmp_path / "out"
    real = bench.Runner.check_and_time

    def lose_the_directory(self, row, *args, **kwargs):
        if row.batch == 2 and out_dir.is_dir():
            import shutil

            shutil.rmtree(out_dir)
            out_dir.write_text("not a directory")
        return real(self, row, *args, **kwargs)

    monkeypatch.setattr(bench.Runner, "check_and_time", lose_the_directory)
    code, out, err = run_cli(capsys, *SMALL_BENCH, *fresh_seed_args(), "--out", str(out_dir))
    assert code == 2 and "Traceback" not in err, out + err  # the run is fine, --out is not
    assert err.count("warning: --out") == 1, err  # warned once, not after every group
    assert err.count("could not be written") == 2, err  # and the final error line
    assert "could not be written" in out and "wrote " not in out
    timed = [ln for ln in out.splitlines() if ln.startswith("resnet18 fp32 batch 2: fastres")]
    assert timed and "img/s" in timed[0], out  # the group after the loss was still measured
    assert out_dir.read_text() == "not a directory"


def test_bench_write_outputs_writes_each_file_it_can(tmp_path, capsys):
    """A bench.json that cannot be written (a directory in its place) does not keep bench.md
    from being written (one try wrapped both: the Markdown was skipped too); the failure is
    warned about once a run, and a later write that works clears it."""
    from fastres import bench

    ms = float(torch.rand(()) * 10 + 1)
    rows = [bench.Row("resnet18", "fp32", 1, "fastres", "fastres", median_ms=ms,
                      images_per_s=1000.0 / ms, iters=2, rel_err=1e-6)]
    report = bench.BenchReport(env={"device": "cpu"}, config={}, rows=rows)
    (tmp_path / "bench.json").mkdir()
    for _ in range(2):
        written = bench.write_outputs(report, str(tmp_path), png=False)
        assert written == [str(tmp_path / "bench.md")]
        assert f"{ms:.2f}" in (tmp_path / "bench.md").read_text()
        assert "bench.json" in report.output_error and "bench.md" not in report.output_error
    assert capsys.readouterr().err.count("warning") == 1
    (tmp_path / "bench.json").rmdir()
    assert len(bench.write_outputs(report, str(tmp_path), png=False)) == 2
    assert report.output_error is None
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][0]["median_ms"] == ms


def test_bench_write_outputs_survives_full_disk_and_plot_errors(monkeypatch, tmp_path, capsys):
    """write_outputs: a failing write (disk full) leaves no half-written file and no temporary
    one, and is reported, not raised; a plot that raises costs the picture only; a later write
    that works clears the error."""
    import errno

    from fastres import bench

    ms = float(torch.rand(()) * 10 + 1)
    rows = [bench.Row("resnet18", "fp32", 1, "eager_fp32", "e", median_ms=2 * ms,
                      images_per_s=500.0 / ms, iters=2),
            bench.Row("resnet18", "fp32", 1, "fastres", "fastres", median_ms=ms,
                      images_per_s=1000.0 / ms, iters=2, rel_err=float("nan"))]
    bench.fill_speedups({r.impl: r for r in rows})
    report = bench.BenchReport(env={"device": "cpu"}, config={}, rows=rows)
    out_dir = tmp_path / "out"
    (out_dir).mkdir()
    (out_dir / "bench.md").write_text("old")

    def disk_full(report):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bench, "to_markdown", disk_full)
    written = bench.write_outputs(report, str(out_dir), png=False)
    assert written == [str(out_dir / "bench.json")]
    assert (out_dir / "bench.md").read_text() == "old"  # untouched, not truncated
    assert sorted(p.name for p in out_dir.iterdir()) == ["bench.json", "bench.md"]
    assert "No space left on device" in report.output_error
    assert "No space left on device" in bench.format_table(report)
    assert "warning" in capsys.readouterr().err
    monkeypatch.undo()

    def broken_plot(report, path):
        raise ValueError("cannot draw")

    monkeypatch.setattr(bench, "plot", broken_plot)
    written = bench.write_outputs(report, str(out_dir), png=True)
    assert "No space" not in bench.format_table(report)
    assert "bench.png" in report.output_error and "cannot draw" in report.output_error
    assert "bench.png" in capsys.readouterr().err  # a failed plot is a failed write too
    assert sorted(os.path.basename(p) for p in written) == ["bench.json", "bench.md"]
    assert sorted(p.name for p in out_dir.iterdir()) == ["bench.json", "bench.md"]
    saved = json.loads((out_dir / "bench.json").read_text())
    assert any("bench.png not written: ValueError: cannot draw" in n for n in saved["notes"])
    assert saved["rows"][1]["rel_err"] == "nan"
    assert saved["rows"][1]["speedup"]["eager_fp32"] == pytest.approx(2.0)
    assert "cannot draw" in (out_dir / "bench.md").read_text()
    bench.write_outputs(report, str(out_dir), png=False)
    assert report.output_error is None


def test_bench_baseline_with_non_finite_output_is_no_speedup_reference(capsys, monkeypatch,
                                                                       tmp_path):
    """A baseline whose output is not finite (fp16 AMP overflowing, say) is timed and shown,
    but a speedup over it would compare with a broken run: none is reported against it."""
    import torchvision

    original = torchvision.models.ResNet.forward
    bad = float(["nan", "inf"][int(torch.randint(0, 2, ()))])

    def broken_when_channels_last(self, x):
        out = original(self, x)
        if not x.is_contiguous():  # the AMP + channels_last baseline's input only
            out = out.clone()
            out[0, int(torch.randint(0, out.shape[1], ()))] = bad
        return out

    monkeypatch.setattr(torchvision.models.ResNet, "forward", broken_when_channels_last)
    code, out, err = run_cli(capsys, *bench_argv("1"), *fresh_seed_args(),
                             "--out", str(tmp_path))
    assert code == 0 and "Traceback" not in err, out + err
    rows = {r["impl"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    amp = rows["eager_amp_cl"]
    assert amp["status"] == "ok" and amp["median_ms"] > 0 and amp["rel_err"] == "inf", amp
    assert "not used for speedups" in amp["note"]
    assert rows["fastres"]["status"] == "ok"
    assert rows["fastres"]["speedup"]["eager_amp_cl"] is None
    assert rows["fastres"]["speedup"]["eager_fp32"] > 0


def test_preprocessing_helpers_refuse_what_they_cannot_take():
    """classify's normalize takes uint8 [N, H, W, 3] images: float images already in [0, 1]
    were divided by 255 again, a zero std gave infinities and an int dtype a truncated
    tensor, silently; to_pil_rgb said 'builtin_function_or_method' for a tensor. NumPy
    means and a tensor std still work, through the fused op (its check refused the
    one-value tensors ``tuple(std)`` gave it, and the batch fell back to plain torch with a
    warning) and without torch's copy-construct warning."""
    from fastres.classify import normalize, normalize_torch, to_pil_rgb

    u8 = torch.randint(0, 256, (2, 5, 6, 3), dtype=torch.uint8)
    for bad, exc, match in [
        (lambda: normalize(u8.float() / 255), TypeError, "expects uint8"),
        (lambda: normalize(u8, std=(0.0, 1.0, 1.0)), ValueError, "finite and non-zero"),
        (lambda: normalize(u8, std=(1e-50, 1.0, 1.0)), ValueError, "non-zero in float32"),
        (lambda: normalize(u8, dtype=torch.int32), TypeError, "floating-point"),
        (lambda: normalize(u8.permute(0, 3, 1, 2)), ValueError, r"\[N, H, W, 3\]"),
        (lambda: normalize(u8[0]), ValueError, r"\[N, H, W, 3\]"),
        (lambda: normalize(u8, mean="abc"), TypeError, "mean must be a sequence of 3 num"),
        (lambda: normalize(u8, std=0.5), TypeError, "std must be a sequence of 3 numbers"),
        (lambda: normalize(u8, std=(0.5, 0.5)), ValueError, "must have 3 values"),
        (lambda: to_pil_rgb(u8[0]), TypeError, "PIL image or a NumPy array"),
        (lambda: to_pil_rgb(u8[0].permute(2, 0, 1).numpy()), ValueError, "HxW or HxWxC"),
    ]:
        with pytest.raises(exc, match=match):
            bad()
    from torchvision.transforms.v2 import functional as tvf

    mean = np.array(torch.rand(3).mul(0.5).add(0.25).tolist())
    std = torch.rand(3).mul(0.2).add(0.15)
    ref = tvf.normalize(
        u8.permute(0, 3, 1, 2).float() / 255, mean.tolist(), std.tolist())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither a fallback nor torch's copy-construct note
        out, how = normalize(u8, mean=mean, std=std)
        listed, how_listed = normalize(u8, mean=mean, std=list(std))  # one-value tensors
        plain = normalize_torch(u8, torch.float32, mean, std)
    assert (how, how_listed) == ("fused", "fused")
    for got in (out, listed, plain):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


# -- options taken in any case; a plot that cannot be written --------------------------------------


def _any_case(word: str) -> str:
    """``word`` with a fresh random mix of upper and lower case, at least one letter upper."""
    flips = torch.randint(0, 2, (len(word),)).tolist()
    letters = [i for i, c in enumerate(word) if c.isalpha()]
    flips[letters[int(torch.randint(0, len(letters), ()))]] = 1
    return "".join(c.upper() if f else c for c, f in zip(word, flips))


def test_bench_compile_models_any_case(capsys, monkeypatch):
    """``--compile-models ResNet18`` was "unknown model 'ResNet18'" (exit 2), while -m takes
    any case."""
    from fastres import bench
    from fastres.models import MODEL_NAMES

    seen = []

    def fake_run_bench(cfg, on_update=None):
        seen.append(cfg)
        return _checked_report()

    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    names = [MODEL_NAMES[int(i)] for i in torch.randperm(len(MODEL_NAMES))[:3]]
    code, out, err = run_cli(capsys, *SMALL_BENCH, "--compile-models", _any_case(names[0]),
                             "--compile-models", ",".join(_any_case(n) for n in names[1:]))
    assert code == 0, out + err
    assert seen[0].compile_models == names and seen[0].compile is True
    code, _, err = run_cli(capsys, *SMALL_BENCH, "--compile-models", "ResNet1000")
    assert_usage_error(code, err, "unknown model 'resnet1000'")


def test_tune_dtype_any_case(capsys, monkeypatch, tmp_path):
    """``fastres tune --dtype BF16`` was argparse's "invalid choice: 'BF16'" (exit 2), while
    bench and verify take dtypes in any case; each spelling means what it means there."""
    from fastres import tune_cli
    from fastres.classify import parse_dtype

    monkeypatch.setenv("FASTRES_CACHE_DIR", str(tmp_path / "cache"))
    tuned = []

    def fake_tune_model(net, batches, dtype, image_size, progress=None):
        tuned.append(dtype)
        return {"tuned": 0, "disk_hits": 0, "timed": 0, "unsaved": 0, "seconds": 0.0}

    monkeypatch.setattr(tuning, "tune_model", fake_tune_model)
    names = [tune_cli.DTYPE_CHOICES[int(i)]
             for i in torch.randperm(len(tune_cli.DTYPE_CHOICES))[:2]]
    given = [_any_case(n) for n in names]
    tuning.configure(devices=("cpu",))  # (reach tune_model without a GPU)
    try:
        code, out, err = run_cli(capsys, "tune", "resnet18", "--device", "cpu", "--image-size",
                                 "32", "--dtype", *given)
        bad, _, bad_err = run_cli(capsys, "tune", "resnet18", "--device", "cpu", "--dtype",
                                  _any_case("fp64"))
    finally:
        tuning.reset()
    assert code == 0, f"--dtype {' '.join(given)}: {err}"
    assert tuned == [parse_dtype(n) for n in names], (given, tuned)  # bench's / verify's dtypes
    for name in names:
        assert f"resnet18 {name} batch 1" in out, out
    assert_usage_error(bad, bad_err, "--dtype", "invalid choice: 'fp64'")


@pytest.mark.parametrize("how", ["plot_raises", "png_path_is_a_directory"])
def test_bench_png_that_cannot_be_written_is_exit_2(capsys, monkeypatch, tmp_path, how):
    """bench.png that could not be written (a directory in its place, matplotlib raising) was
    a note in bench.json only, and exit 0; a bench.json or bench.md that could not be written
    is a warning and an error on stderr and exit 2 (README: "a write that fails is a warning,
    and exit status 2 at the end"). The PNG is a write like them."""
    from fastres import bench

    ms = float(torch.rand(()) * 10 + 1)
    rows = [bench.Row("resnet18", "fp32", 1, "eager_fp32", "e", median_ms=2 * ms,
                      images_per_s=500.0 / ms, iters=2),
            bench.Row("resnet18", "fp32", 1, "fastres", "fastres", median_ms=ms,
                      images_per_s=1000.0 / ms, iters=2, rel_err=1e-6)]
    bench.fill_speedups({r.impl: r for r in rows})

    def fake_run_bench(cfg, on_update=None):
        report = bench.BenchReport(env={"device": "cpu"}, config={}, rows=rows)
        on_update(report)  # a checkpoint (no PNG), as after every group
        return report

    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    out_dir = tmp_path / "out"
    png = out_dir / "bench.png"
    if how == "plot_raises":
        reason = f"matplotlib failed {int(torch.randint(0, 10**6, ()))}"

        def broken_plot(report, path):
            raise RuntimeError(reason)

        monkeypatch.setattr(bench, "plot", broken_plot)
    else:
        reason = "Is a directory"
        (png / "inside").mkdir(parents=True)
    code, out, err = run_cli(capsys, *SMALL_BENCH, "--out", str(out_dir))
    assert code == 2, out + err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if str(png) in ln]
    assert len(lines) == 2 and all(reason in ln for ln in lines), err  # warning, then error
    assert lines[0].startswith("fastres bench: warning:"), err
    assert lines[1].startswith("fastres bench: error:"), err
    assert f"wrote {out_dir / 'bench.json'}" in out and f"wrote {png}" not in out, out
    saved = json.loads((out_dir / "bench.json").read_text())
    assert any(n.startswith("bench.png not written") for n in saved["notes"]), saved["notes"]
    assert (out_dir / "bench.md").is_file()
    left = sorted(p.name for p in out_dir.iterdir())  # no temporary file left behind
    assert left == ["bench.json", "bench.md"] + (["bench.png"] if png.is_dir() else []), left
    assert png.is_dir() == (how == "png_path_is_a_directory")


def test_gpu_driver_without_nvidia_smi_asks_libcuda(monkeypatch):
    """Without nvidia-smi the environment block still names the driver: the CUDA version
    libcuda's cuDriverGetVersion reports (the torch function read before does not exist)."""
    import ctypes
    import random
    import subprocess

    from fastres import bench

    def no_smi(*a, **k):
        raise FileNotFoundError("nvidia-smi")

    major, minor = random.randint(11, 14), random.randint(0, 9)

    class FakeLibcuda:
        def cuDriverGetVersion(self, ref):
            ref._obj.value = major * 1000 + minor * 10
            return 0

    monkeypatch.setattr(subprocess, "run", no_smi)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibcuda())
    assert bench._gpu_driver() == f"CUDA driver API {major}.{minor}"

    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert bench._gpu_driver() is None


# -- bench's gate and statistics, verify's bound, classify's batches ------------------------------


def test_bench_fastres_gate_is_max_of_design_bound_and_twice_eager(capsys, monkeypatch,
                                                                  tmp_path):
    """fp32 on the CPU, fastres off by a relative 1e-3: its tolerance is max(DESIGN.md's 1e-5,
    2 x eager fp32's own error on the same input), exactly, with eager's error measured here.
    Where that is below 1e-3 (eager's real error; eager made off by less than 5e-4) the row
    is FAILED and not timed; where twice eager's error is above 1e-3, the row passes. Near
    the bound on both sides: batch 3's error is 1.1 x its tolerance (FAILED), batch 2's
    0.9 x (passes), so a looser gate (``rel_err <= 2 * tolerance``) or a tighter one fails."""
    from fastres import bench

    refs, eagers = {}, {}
    real_ref, real_eager = bench.reference_forward, bench.eager_forward
    # eager's own error by batch size (1: the real one, ~1e-7, so the design bound rules);
    # the tolerance is 2 x it: fastres's 1e-3 is 0.9 x the tolerance at 2, 1.1 x it at 3
    eager_off = {2: 1e-3 / (2 * 0.9),   # 2 x it > 1e-3: passes
                 3: 1e-3 / (2 * 1.1)}   # 1e-5 < 2 x it < 1e-3: FAILED

    def spy_reference(tv, x, *args, **kwargs):
        out = real_ref(tv, x, *args, **kwargs)
        refs[x.shape[0]] = out.clone()
        return out

    def controlled_eager(tv, x, dtype, *args, **kwargs):
        b = x.shape[0]
        if b in eager_off:
            out = (refs[b] * (1 + eager_off[b])).to(dtype)
        else:
            out = real_eager(tv, x, dtype, *args, **kwargs)
        eagers[b] = out.clone()
        return out

    monkeypatch.setattr(bench, "reference_forward", spy_reference)
    monkeypatch.setattr(bench, "eager_forward", controlled_eager)
    original = ResNet.forward
    monkeypatch.setattr(ResNet, "forward", lambda self, x: original(self, x) * (1 + 1e-3))
    code, out, err = run_cli(capsys, *bench_argv("1", "2", "3"), *fresh_seed_args(),
                             "--out", str(tmp_path))
    assert code == 1 and "Traceback" not in err, out + err
    rows = {r["batch"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]
            if r["impl"] == "fastres"}
    assert sorted(rows) == [1, 2, 3]
    for b, row in rows.items():
        eager_err = rel_err(eagers[b], refs[b])
        assert row["tolerance"] == max(1e-5, 2 * eager_err), (b, row, eager_err)
        assert row["rel_err"] == pytest.approx(1e-3, rel=1e-3), row
    assert rows[1]["tolerance"] == 1e-5  # eager's own error is far below half of it
    assert rows[3]["tolerance"] > 1e-5   # twice eager's error, not the design bound
    for b, ratio in ((2, 0.9), (3, 1.1)):  # how close to the bound each comes
        assert rows[b]["rel_err"] / rows[b]["tolerance"] == pytest.approx(ratio, rel=2e-3), b
    for b in (1, 3):
        row = rows[b]
        assert row["status"] == "FAILED" and row["median_ms"] is None and row["iters"] == 0
        assert (f"relative error {row['rel_err']:.2e} > tolerance {row['tolerance']:.1e}: "
                "not timed") in row["note"], row
        assert f"resnet18 fp32 batch {b}: fastres FAILED the check" in out
    assert rows[2]["status"] == "ok" and rows[2]["median_ms"] > 0, rows[2]
    assert "result: FAILED" in out


def _cpu_bench_row(fn) -> str:
    """Which row of a CPU fp32 ``fastres bench`` group (no graphs, no compile) times ``fn``."""
    return ("fastres" if isinstance(fn, ResNet) else
            "eager_fp32" if isinstance(fn, torchvision.models.ResNet) else "eager_amp_cl")


def test_bench_reports_the_statistics_of_its_timed_calls(capsys, monkeypatch, tmp_path):
    """What time_calls measured (ms per call) is what the row says: median, p90 (linear
    interpolation), images/s = batch / median, speedup = baseline median / this median; and
    each implementation is timed on the same 4 distinct pre-made batches, rotated, in its
    own layout."""
    from fastres import bench

    c = float(torch.empty(()).uniform_(0.5, 20.0))
    measured = {"fastres": [5 * c, 1 * c, 3 * c, 2 * c, 4 * c],
                # an even count (the median between two) and an odd one, mean != median
                "eager_fp32": (torch.rand(6) * 50 + 1).tolist(),
                "eager_amp_cl": (torch.rand(7) ** 3 * 50 + 1).tolist()}
    given = {}

    def fake_time_calls(fn, inputs, warmup, iters, max_time, device):
        key = _cpu_bench_row(fn)
        assert key not in given, key
        given[key] = list(inputs)
        return list(measured[key])

    monkeypatch.setattr(bench, "time_calls", fake_time_calls)
    code, out, err = run_cli(capsys, *bench_argv("2"), *fresh_seed_args(), "--out", str(tmp_path))
    assert code == 0, out + err
    rows = {r["impl"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert set(given) == set(measured)
    for key, times in measured.items():
        row = rows[key]
        median = float(np.median(times))
        assert row["status"] == "ok" and row["iters"] == len(times), row
        assert row["median_ms"] == pytest.approx(median, rel=1e-12), key
        assert row["p90_ms"] == pytest.approx(float(np.percentile(times, 90)), rel=1e-12), key
        assert row["images_per_s"] == pytest.approx(2 / (median / 1e3), rel=1e-12), key
    fr = rows["fastres"]
    assert fr["median_ms"] == pytest.approx(3 * c) and fr["p90_ms"] == pytest.approx(4.6 * c)
    assert fr["images_per_s"] == pytest.approx(2 / (0.003 * c))
    for base in ("eager_fp32", "eager_amp_cl"):
        assert fr["speedup"][base] == pytest.approx(np.median(measured[base]) / (3 * c))
    # fp32: the channels-last eager baseline is the AMP+CL row's model (no autocast in fp32)
    assert "eager_cl" not in rows and fr["speedup"]["eager_cl"] == fr["speedup"]["eager_amp_cl"]
    # the inputs: 4 distinct batches, the same values for every implementation
    for key, inputs in given.items():
        assert len(inputs) == 4, key
        assert all(tuple(x.shape) == (2, 3, 64, 64) and x.dtype == torch.float32
                   for x in inputs), key
        assert len({x.data_ptr() for x in inputs}) == 4, key
        for i in range(4):
            for j in range(i + 1, 4):
                assert not torch.equal(inputs[i], inputs[j]), (key, i, j)
            assert torch.equal(inputs[i], given["eager_fp32"][i]), (key, i)
    assert all(x.is_contiguous() for x in given["eager_fp32"])
    for key in ("eager_amp_cl", "fastres"):
        assert all(x.is_contiguous(memory_format=torch.channels_last) for x in given[key])


def test_bench_speedups_are_like_for_like():
    """fastres + CUDA graphs is compared with torch.compile's reduce-overhead mode (CUDA
    graphs too), never with its default mode (the 2026-12-04 table's "x compile" at batch 1
    and 32 compared graphs with no graphs); plain fastres with the default mode; without a
    reduce-overhead row the graphs row has no compile speedup. In a bf16 group the
    channels-last eager baseline is its own row, not the AMP one."""
    from fastres import bench

    ms = {k: float(v) for k, v in zip(
        ("eager_fp32", "eager_amp_cl", "eager_cl", "compile", "compile_reduce_overhead",
         "fastres", "fastres_graphs"), torch.rand(7) * 20 + 0.5)}

    def group(keys):
        rows = {k: bench.Row("resnet50", "bf16", 1, k, k, median_ms=ms[k], rel_err=1e-3)
                for k in keys}
        bench.fill_speedups(rows)
        return rows

    rows = group(ms)
    fr, gr = rows["fastres"].speedup, rows["fastres_graphs"].speedup
    assert fr["compile"] == pytest.approx(ms["compile"] / ms["fastres"])
    assert gr["compile"] == pytest.approx(ms["compile_reduce_overhead"] / ms["fastres_graphs"])
    for base in ("eager_fp32", "eager_amp_cl", "eager_cl"):
        assert fr[base] == pytest.approx(ms[base] / ms["fastres"])
        assert gr[base] == pytest.approx(ms[base] / ms["fastres_graphs"])
    rows = group([k for k in ms if k not in ("compile_reduce_overhead", "eager_cl")])
    assert rows["fastres_graphs"].speedup["compile"] is None
    assert rows["fastres"].speedup["compile"] == pytest.approx(ms["compile"] / ms["fastres"])
    assert rows["fastres"].speedup["eager_cl"] is None  # (bf16: AMP is not that baseline)


def test_bench_compile_speedup_is_against_the_fastest_compile_without_graphs():
    """With max-autotune and freezing rows timed, plain fastres's "x compile" is against the
    fastest of the three default-mode-like rows (a baseline that erred or whose output was not
    finite is not one), the graphs row still against reduce-overhead; the summary names the
    row it compared with. The freezing row compiles with inductor's freezing option."""
    from fastres import bench

    keys = ("compile", "compile_max_autotune", "compile_freezing", "compile_reduce_overhead",
            "fastres", "fastres_graphs")
    ms = dict(zip(keys, (torch.rand(len(keys)) * 20 + 0.5).tolist()))
    fastest = min(("compile", "compile_max_autotune", "compile_freezing"), key=ms.get)

    def group(broken=()):
        rows = {k: bench.Row("resnet50", "bf16", 8, k, k, median_ms=ms[k], rel_err=1e-3,
                             status="error" if k in broken else "ok",
                             images_per_s=8e3 / ms[k]) for k in keys}
        rows["fastres"].tolerance = 1e-2
        bench.fill_speedups(rows)
        return rows

    rows = group()
    assert rows["fastres"].speedup["compile"] == pytest.approx(ms[fastest] / ms["fastres"])
    assert rows["fastres_graphs"].speedup["compile"] == pytest.approx(
        ms["compile_reduce_overhead"] / ms["fastres_graphs"])
    line = bench.summary_lines(bench.BenchReport(env={}, config={},
                                                 rows=list(rows.values())))[0]
    named = (fastest if ms["fastres"] < ms["fastres_graphs"] else "compile_reduce_overhead")
    assert f"x vs {bench.IMPLS[named].removeprefix('torch.')})" in line, line
    rest = [k for k in ("compile", "compile_max_autotune", "compile_freezing") if k != fastest]
    rows = group(broken=(fastest,))
    assert rows["fastres"].speedup["compile"] == pytest.approx(
        min(ms[k] for k in rest) / ms["fastres"])

    seen = {}

    def fake_compile(model, **kwargs):
        seen[kwargs.get("mode")] = kwargs
        return model

    cfg = bench.BenchConfig(models=["resnet18"], batch_sizes=[1], dtypes=[torch.float32],
                            device=torch.device("cpu"))
    runner = bench.Runner(cfg, None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "compile", fake_compile)
        # (max-autotune without CUDA graphs: its mode of that name turns them on)
        modes = {"compile": None, "compile_freezing": None,
                 "compile_max_autotune": "max-autotune-no-cudagraphs",
                 "compile_reduce_overhead": "reduce-overhead"}
        for key, want in modes.items():
            seen.clear()
            runner.compiled_impl(key, torch.nn.Identity(), lambda x: x)
            (mode, kwargs), = seen.items()
            assert kwargs.get("options") == ({"freezing": True} if key == "compile_freezing"
                                             else None), key
            assert mode == want, key


def test_bench_host_syncs_reports_the_calls_syncs_and_restores_the_mode(monkeypatch):
    """host_syncs runs one call under torch's sync debug mode ("warn") and returns what it
    reported (where, in the call), ignoring other warnings; the mode before is put back, also
    when the call raises. (On the CPU the mode is faked: it needs a GPU.)"""
    from fastres import bench

    state = {"mode": int(torch.randint(0, 3, ()))}
    before = state["mode"]
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: state["mode"])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode",
                        lambda m: state.update(mode={"warn": 1}.get(m, m)))
    syncs = int(torch.randint(0, 4, ()))

    def call(x):
        import warnings

        warnings.warn("unrelated")
        for _ in range(syncs if state["mode"] == 1 else 0):
            warnings.warn("called a synchronizing CUDA operation\nmore")
        return x

    got = bench.host_syncs(call, torch.zeros(1))
    assert len(got) == syncs and all(g.startswith("called a synchronizing CUDA operation at "
                                                  "test_cli.py:") for g in got), got
    assert state["mode"] == before

    def boom(x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        bench.host_syncs(boom, torch.zeros(1))
    assert state["mode"] == before


def test_bench_counts_the_plans_folded_weights():
    """"peak MiB" adds the plan's folded weights (a second copy of the parameters, made
    before the measurement started): fastres's rows left them out. Each plan tensor is
    counted once: the convolutions' and fc's weights in the dtype, the folded biases."""
    from fastres.bench import _plan_bytes

    dtype = (torch.bfloat16, torch.float16, torch.float32)[int(torch.randint(0, 3, ()))]
    m = fastres.resnet18(num_classes=int(torch.randint(2, 50, ()))).eval().to(dtype)
    assert _plan_bytes(m) == 0  # no plan before the first forward
    with torch.no_grad():
        m(torch.randn(1, 3, 32, 32, dtype=dtype))
    convs = [c for c in m.modules() if isinstance(c, torch.nn.Conv2d)]
    weights = sum(t.numel() * t.element_size() for t in [c.weight for c in convs]
                  + [m.fc.weight])
    biases = 4 * (sum(c.out_channels for c in convs) + m.fc.out_features)  # at most fp32
    assert weights < _plan_bytes(m) <= weights + biases, (_plan_bytes(m), weights, biases)
    assert _plan_bytes(torch.nn.Linear(2, 2)) == 0 and _plan_bytes(None) == 0


def test_bench_times_a_group_in_interleaved_rounds(capsys, monkeypatch, tmp_path):
    """--rounds 3: every row of the group is timed once per round, in turn (eager fp32, AMP,
    fastres; then again), each round with iters // rounds calls; the row's statistics are over
    every call, its round medians are kept, and a row whose round medians differ by more than
    10% is named in the summary."""
    from fastres import bench

    order, calls = [], {}

    def fake_time_calls(fn, inputs, warmup, iters, max_time, device):
        key = _cpu_bench_row(fn)
        order.append(key)
        assert iters == 2 and max_time == pytest.approx(6.0 / 3), (iters, max_time)
        base = {"fastres": 1.0, "eager_fp32": 2.0, "eager_amp_cl": 3.0}[key]
        # the AMP row's third round is twice as slow (a busy host), the others steady
        slow = 2.0 if key == "eager_amp_cl" and order.count(key) == 3 else 1.0
        times = [base * slow * (1 + 0.01 * float(torch.rand(()))) for _ in range(iters)]
        calls.setdefault(key, []).append(times)
        return times

    monkeypatch.setattr(bench, "time_calls", fake_time_calls)
    argv = ["bench", "-m", "resnet18", "-b", "1", "--image-size", "64", "--iters", "7",
            "--warmup", "1", "--no-progress", "--device", "cpu", "--no-cuda-graphs",
            "--rounds", "3", "--max-time", "6", *fresh_seed_args(), "--out", str(tmp_path)]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, out + err
    assert order == ["eager_fp32", "eager_amp_cl", "fastres"] * 3, order
    rows = {r["impl"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    for key, rounds in calls.items():
        pooled = [t for r in rounds for t in r]
        row = rows[key]
        assert row["iters"] == 6 and row["median_ms"] == pytest.approx(float(np.median(pooled)))
        assert row["round_medians"] == pytest.approx([float(np.median(r)) for r in rounds])
    line = next(x for x in out.splitlines() if "round medians differing by more than 10%" in x)
    assert "b1 torchvision fp32 + channels_last (3" in line, line  # (fp32: no autocast)
    assert "fastres" not in line and "eager fp32" not in line, line
    assert rows["fastres"]["speedup"]["eager_fp32"] == pytest.approx(
        rows["eager_fp32"]["median_ms"] / rows["fastres"]["median_ms"])
    code, out, err = run_cli(capsys, *argv[:-2], "--rounds", "0")
    assert code == 2 and "--rounds must be >= 1, got 0" in err, (out, err)


def _wrong_graphs(model):
    """A stand-in for ``fastres.optimize(model, cuda_graphs=True)`` whose outputs are wrong."""

    def run(x):
        return model(x) * 1.5 + 0.5

    return run


def test_bench_graphs_row_must_agree_to_be_timed(monkeypatch):
    """The fastres + CUDA graphs row goes through the same gate as the plain fastres row: a
    callable with wrong outputs is FAILED and never timed; a right one is timed. (On the CPU
    the row itself is n/a; this drives the runner's check directly, as run_bench does.)"""
    from fastres import bench
    from fastres.verify import fastres_twin, reference_forward, torchvision_model

    timed = []
    real_time_calls = bench.time_calls

    def spy(fn, *args, **kwargs):
        timed.append(fn)
        return real_time_calls(fn, *args, **kwargs)

    monkeypatch.setattr(bench, "time_calls", spy)
    cfg = bench.BenchConfig(models=["resnet18"], batch_sizes=[1], dtypes=[torch.float32],
                            device=torch.device("cpu"), image_size=64, iters=2, warmup=1,
                            seed=int(torch.randint(0, 2**31, ())))
    runner = bench.Runner(cfg, None)
    tv = torchvision_model("resnet18")
    fr = fastres_twin(tv, torch.float32)
    base = runner.base_inputs(1)
    ref = reference_forward(tv, base[0])

    def to_cl(x):
        return x.contiguous(memory_format=torch.channels_last)

    def graphs_row():
        return bench.Row("resnet18", "fp32", 1, "fastres_graphs",
                         bench.impl_label("fastres_graphs", torch.float32), tolerance=1e-5)

    wrong = bench._Impl("fastres_graphs", _wrong_graphs(fr), to_cl, fr)
    row = graphs_row()
    runner.check_and_time(row, wrong, base, ref, True)
    assert row.status == "FAILED" and row.median_ms is None and row.iters == 0, row
    assert "> tolerance" in row.note and "not timed" in row.note, row
    with torch.inference_mode():
        wrong_out = fr(base[0]) * 1.5 + 0.5
    assert row.rel_err == pytest.approx(rel_err(wrong_out, ref), rel=1e-3)
    assert timed == []

    def right(x):
        return fr(x)

    row = graphs_row()
    runner.check_and_time(row, bench._Impl("fastres_graphs", right, to_cl, fr), base, ref, True)
    assert row.status == "ok" and row.median_ms > 0 and row.rel_err <= 1e-5, row
    assert timed == [right]


@pytest.mark.cuda
def test_bench_graphs_row_with_wrong_outputs_fails_on_gpu(capsys, monkeypatch, tmp_path):
    """End to end on a GPU: fastres.optimize returning a model with wrong outputs makes the
    fastres + CUDA graphs row FAILED and untimed (exit 1); the plain fastres row is fine."""
    from fastres import bench

    monkeypatch.setattr(bench, "_fastres_optimize",
                        lambda: (lambda model, **kwargs: _wrong_graphs(model)))
    argv = ["bench", "-m", "resnet18", "-b", "2", "--image-size", "64", "--iters", "2",
            "--warmup", "1", "--no-progress", "--device", "cuda", "--dtype", "fp32",
            "--no-compile", "--no-tune", *fresh_seed_args(), "--out", str(tmp_path)]
    code, out, err = run_cli(capsys, *argv)
    assert code == 1 and "Traceback" not in err, out + err
    rows = {r["impl"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    g = rows["fastres_graphs"]
    assert g["status"] == "FAILED" and g["median_ms"] is None and "> tolerance" in g["note"], g
    assert rows["fastres"]["status"] == "ok" and rows["fastres"]["median_ms"] > 0


def _recording(fn, into: list):
    """``fn``, appending a copy of each of its outputs to ``into`` (a spy on the reference
    and eager forwards that verify compares)."""
    def spy(*args, **kwargs):
        out = fn(*args, **kwargs)
        into.append(out.clone())
        return out

    return spy


def test_verify_eager_rule_counts_failed_batches_and_uses_channels_last(capsys, monkeypatch,
                                                                       tmp_path):
    """fastres off by a relative 1e-3 on two random batches: the first passes (eager made off
    by more than 5e-4 there: the bound is 2 x eager's error), the second fails (eager's error
    tiny: the bound is fp32's 1e-5) -- failures == 1 and exit 1. The second batch is really
    given to the model channels-last (random batches alternate layouts)."""
    from fastres import verify as verify_mod

    refs, eagers, layouts = [], [], []
    eager_off = [float(torch.empty(()).uniform_(6e-4, 9e-4)),
                 float(torch.empty(()).uniform_(1e-7, 2e-6))]
    spy_reference = _recording(verify_mod.reference_forward, refs)

    def controlled_eager(tv, x, dtype, *args, **kwargs):
        out = (refs[-1] * (1 + eager_off[len(eagers)])).to(dtype)
        eagers.append(out)
        return out

    original = ResNet.forward

    def off_by_1e_3(self, x):
        layouts.append((x.is_contiguous(), x.is_contiguous(memory_format=torch.channels_last)))
        return original(self, x) * (1 + 1e-3)

    monkeypatch.setattr(verify_mod, "reference_forward", spy_reference)
    monkeypatch.setattr(verify_mod, "eager_forward", controlled_eager)
    monkeypatch.setattr(ResNet, "forward", off_by_1e_3)
    out_json = tmp_path / "v.json"
    code, out, err = run_cli(capsys, *SMALL_VERIFY, "--no-photos", *fresh_seed_args(),
                             "--json", str(out_json))
    assert code == 1, out + err
    assert layouts == [(True, False), (False, True)], layouts
    part = json.loads(out_json.read_text())["parts"][0]
    assert part["name"] == "random" and part["images"] == 4
    expected = [max(1e-5, 2 * rel_err(e, r)) for e, r in zip(eagers, refs)]
    assert part["tolerances"] == pytest.approx(expected, rel=1e-12), (part, expected)
    assert expected[0] > 1e-3 and expected[1] == 1e-5
    assert part["batch_errors"] == pytest.approx([1e-3, 1e-3], rel=1e-3)
    assert part["failures"] == 1 and part["ok"] is False, part
    assert "FAILED (1/2 batches)" in out and "verify: FAILED" in out


def test_verify_bound_is_tight_on_both_sides(capsys, monkeypatch, tmp_path):
    """A random --tol, and fastres off by 1.2 x it on one of two batches and by 0.8 x it on
    the other (in random order; eager fp32's own error is far below it): exactly one batch
    fails. Kills a looser per-batch check (``e <= 1.5 * t`` passes both; the only other
    near test was 100 x over its bound, so ``e <= 50 * t`` passed every test) and a tighter
    one (both fail)."""
    from fastres import verify as verify_mod

    tol = float(f"{float(torch.empty(()).uniform_(1e-4, 1e-3)):.3e}")
    factors = [1.2, 0.8] if bool(torch.rand(()) < 0.5) else [0.8, 1.2]
    refs, eagers = [], []
    original, calls = ResNet.forward, []

    def off_by_a_factor_of_tol(self, x):
        calls.append(x.shape[0])
        return original(self, x) * (1 + factors[len(calls) - 1] * tol)

    monkeypatch.setattr(verify_mod, "reference_forward",
                        _recording(verify_mod.reference_forward, refs))
    monkeypatch.setattr(verify_mod, "eager_forward", _recording(verify_mod.eager_forward, eagers))
    monkeypatch.setattr(ResNet, "forward", off_by_a_factor_of_tol)
    out_json = tmp_path / "v.json"
    code, out, err = run_cli(capsys, *SMALL_VERIFY, "--no-photos", "--tol", repr(tol),
                             *fresh_seed_args(), "--json", str(out_json))
    assert len(calls) == 2 and len(refs) == 2 and len(eagers) == 2, (calls, out + err)
    part = json.loads(out_json.read_text())["parts"][0]
    assert part["name"] == "random" and part["images"] == 4, part
    # the bound is --tol itself: twice eager fp32's own error is far below it
    assert max(2 * rel_err(e, r) for e, r in zip(eagers, refs)) < tol / 10
    assert part["tolerances"] == [tol, tol], (part, tol)
    assert part["batch_errors"] == pytest.approx([f * tol for f in factors], rel=1e-2), part
    assert part["failures"] == 1 and part["ok"] is False, (factors, part)
    assert code == 1, out + err
    assert "FAILED (1/2 batches)" in out and "verify: FAILED" in out, out


def test_verify_reports_top5_apart_from_top1(capsys, monkeypatch, tmp_path):
    """Each image's 5th most likely class moved to the bottom: top-1 agreement stays 100%,
    top-5 is 0%, and verify fails (exit 1: the logits are far off)."""
    original = ResNet.forward

    def fifth_to_last(self, x):
        out = original(self, x).clone()
        order = out.argsort(dim=1, descending=True)
        rows = torch.arange(out.shape[0])
        fifth, last = order[:, 4], order[:, -1]
        out[rows, fifth], out[rows, last] = out[rows, last], out[rows, fifth].clone()
        return out

    monkeypatch.setattr(ResNet, "forward", fifth_to_last)
    out_json = tmp_path / "v.json"
    code, out, err = run_cli(capsys, *SMALL_VERIFY, "--no-photos", "--batches", "1",
                             *fresh_seed_args(), "--json", str(out_json))
    assert code == 1, out + err
    part = json.loads(out_json.read_text())["parts"][0]
    assert part["top1"] == 1.0 and part["top5"] == 0.0, part
    line = [ln for ln in out.splitlines() if ln.strip().startswith("random")]
    assert len(line) == 1 and "100.0%    0.0%" in line[0], out
    assert "verify: FAILED" in out


def test_design_tolerance_for_every_dtype_and_tf32_setting():
    """DESIGN.md's bounds (verify's docstring, verify --tol's help): fp32 1e-5 with TF32
    off, 2e-3 with cuDNN's TF32 on (a GPU only: the CPU has no TF32), fp16/bf16 2e-2."""
    from fastres.verify import design_tolerance

    conv = torch.backends.cudnn.conv
    saved = conv.fp32_precision
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    got = {}
    try:
        for setting in ("tf32", "ieee"):
            conv.fp32_precision = setting
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                for device in (cpu, gpu):
                    got[(setting, dtype, device.type)] = design_tolerance(dtype, device)
    finally:
        conv.fp32_precision = saved
    want = {(s, d, dev): (2e-2 if d != torch.float32 else
                          2e-3 if (s, dev) == ("tf32", "cuda") else 1e-5)
            for s in ("tf32", "ieee")
            for d in (torch.float32, torch.float16, torch.bfloat16)
            for dev in ("cpu", "cuda")}
    assert got == want


def test_classify_batch_of_one_labels_each_image_with_its_own_prediction(tmp_path,
                                                                         r18_checkpoint):
    """With batch_size=1 every image is its own batch: each prediction carries that image's
    path and torchvision's probabilities for that image (not the first image's)."""
    from PIL import Image

    from fastres.classify import classify

    paths = []
    for i, (h, w) in enumerate(((int(torch.randint(224, 300, ())), 260),
                                (240, int(torch.randint(224, 300, ()))))):
        arr = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8)
        arr[:, : w // 2] //= 4 * (i + 1)  # two images unlike each other
        path = tmp_path / f"img{i}.png"
        Image.fromarray(arr.numpy()).save(path)
        paths.append(str(path))
    preds = classify(paths, r18_checkpoint, "resnet18", topk=3, device="cpu", batch_size=1)
    assert [p.path for p in preds] == paths

    refs = [_torchvision_probs(r18_checkpoint, path) for path in paths]
    assert (refs[0] - refs[1]).abs().max() > 1e-3  # the two images are told apart
    for pred, ref in zip(preds, refs):
        got = {idx: prob for idx, _, prob in pred.topk}
        assert list(got) == ref.topk(3).indices.tolist(), (pred, ref.topk(3))
        for idx, prob in got.items():
            assert prob == pytest.approx(ref[idx].item(), abs=1e-4)
