"""CPU checks of ``fastres.optimize(..., cuda_graphs=True)``'s bookkeeping and of the
``fastres`` command line's argument handling, written from mutants that test_graphs.py and
test_cli.py let through."""

from __future__ import annotations

import warnings

import pytest
import torch

import fastres
from fastres import cli
from fastres.graphs import CUDAGraphModule


def small_model():
    # (conftest seeds each test from the run's FASTRES_TEST_SEED: fresh inputs per run)
    return fastres.resnet18(num_classes=10).eval()


def rand_size():
    return int(torch.randint(32, 48, ()).item())


# -- graphs ------------------------------------------------------------------------------------

def test_graph_key_separates_shape_dtype_autocast_and_inference_mode(monkeypatch):
    """A graph replays one input signature: shape, dtype, autocast state and inference mode
    each need their own graph (a float64 call served by a float32 graph, an autocast call by a
    full-precision one, or an inference-mode call by a graph captured outside it, is wrong)."""
    g = fastres.optimize(small_model())
    n, s = int(torch.randint(1, 5, ()).item()), rand_size()
    x = torch.randn(n, 3, s, s)
    base = g._key(x)
    assert g._key(torch.randn(n, 3, s, s)) == base  # same signature, other values
    assert g._key(x.double()) != base
    assert g._key(torch.randn(n + 1, 3, s, s)) != base
    with torch.inference_mode():
        assert g._key(x) != base
    with monkeypatch.context() as mp:
        mp.setattr(torch, "is_autocast_enabled", lambda *a: True)
        assert g._key(x) != base
    assert g._key(x) == base


def _failing_capture(g, m, tried):
    from fastres.ops import _backend

    def capture(key, x):  # (as _capture's failure path leaves the wrapper)
        tried.append(key)
        m(x)
        g._plan_cache, g._choices = m.__dict__["_plan_cache"], _backend.choice_epoch()
        g._failed.add(key)
        return None

    return capture


def test_a_failed_signature_is_not_captured_again(monkeypatch):
    """Once a signature's capture failed, later calls with it run eagerly without another
    warm-up and capture attempt (until the plan or the kernel choices change)."""
    m = small_model()
    g = fastres.optimize(m, max_graphs=4)
    tried = []
    monkeypatch.setattr(g, "_capture", _failing_capture(g, m, tried))
    s = rand_size()
    x = torch.randn(2, 3, s, s)
    with torch.no_grad():
        ref = m(x)
        for _ in range(3):
            assert torch.equal(g._graphed(m, x), ref)
    assert len(tried) == 1, f"a failed signature was captured {len(tried)} times"


def test_max_graphs_zero_and_warmup_one_are_allowed(monkeypatch):
    """``max_graphs >= 0`` and ``warmup >= 1`` as documented: 0 graphs means every call runs
    without one (said once), never attempting a capture."""
    m = small_model()
    g = fastres.optimize(m, max_graphs=0, warmup=1)
    assert (g.max_graphs, g.warmup) == (0, 1)
    assert CUDAGraphModule(m, max_graphs=0, warmup=1).max_graphs == 0

    def no_capture(key, x):
        raise AssertionError("max_graphs=0 attempted a capture")

    monkeypatch.setattr(g, "_capture", no_capture)
    s = rand_size()
    x = torch.randn(1, 3, s, s)
    with torch.no_grad():
        ref = m(x)
        with pytest.warns(RuntimeWarning, match="max_graphs=0"):
            assert torch.equal(g._graphed(m, x), ref)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            g._graphed(m, torch.randn(2, 3, s, s))
    assert not [w for w in seen if "max_graphs" in str(w.message)], "said once"


def test_reset_drops_graphs_failures_and_the_models_plan():
    m = small_model()
    g = fastres.optimize(m)
    s = rand_size()
    with torch.no_grad():
        m(torch.randn(1, 3, s, s))  # builds the plan
    assert m.__dict__.get("_plan_cache") is not None
    g._graphs[("captured",)] = object()
    g._failed.add(("failed",))
    g._plan_cache = m.__dict__["_plan_cache"]
    g.reset()
    assert g.num_graphs == 0 and not g._failed and g._plan_cache is None
    assert m.__dict__.get("_plan_cache") is None, "reset() kept the model's plan"


def test_train_and_eval_set_the_wrappers_own_mode_too():
    """``training`` is the wrapper's own attribute as well as the model's: ``g.eval()`` /
    ``g.train()`` show on both (it was forwarded to the model only, so ``g.training`` stayed
    True after ``g.eval()``)."""
    m = small_model()
    g = fastres.optimize(m)
    for mode in (False, True, False):
        g.train(mode)
        assert g.training is mode and m.training is mode
        assert all(mod.training is mode for mod in g.modules())


# -- CLI ---------------------------------------------------------------------------------------

BENCH = ["bench", "--image-size", "64", "--iters", "1", "--warmup", "1", "--no-progress",
         "--device", "cpu"]


@pytest.fixture
def fake_bench(monkeypatch):
    """``run_bench`` replaced: the configs the CLI built, nothing timed (the report has one
    fastres row compared with torchvision: a report that compared nothing makes bench exit
    1)."""
    from fastres import bench

    seen = []

    def fake_run_bench(cfg, on_update=None):
        seen.append(cfg)
        row = bench.Row("resnet18", "fp32", 1, "fastres", "fastres", rel_err=1e-6)
        return bench.BenchReport(env={"device": "cpu"}, config={}, rows=[row])

    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    return seen


def test_bench_repeated_values_are_measured_once(capsys, fake_bench):
    """``-m resnet18,ResNet18 -b 2,2 -b 2 --dtype fp32 --dtype fp32``: each once (a repeated
    value was timed again, and its rows doubled)."""
    code = cli.main([*BENCH, "-m", "resnet18,ResNet18", "-m", " resnet18 ", "-b", "2,2", "-b",
                     "2", "1", "--dtype", "fp32,fp32", "--dtype", "fp32"])
    capsys.readouterr()
    assert code == 0
    (cfg,) = fake_bench
    assert cfg.models == ["resnet18"]
    assert cfg.batch_sizes == [2, 1]
    assert cfg.dtypes == [torch.float32]


def test_seed_bound_is_exclusive(capsys, fake_bench):
    code = cli.main([*BENCH, "-m", "resnet18", "-b", "1", "--seed", str(2**53)])
    err = capsys.readouterr().err
    assert code == 2 and "--seed must be in [0, 2**53), got 9007199254740992" in err
    assert not fake_bench
    code = cli.main([*BENCH, "-m", "resnet18", "-b", "1", "--seed", str(2**53 - 1)])
    capsys.readouterr()
    assert code == 0 and fake_bench[0].seed == 2**53 - 1


def test_verify_image_size_below_32_is_a_usage_error(capsys, monkeypatch):
    from fastres import verify as verify_mod

    def no_verify(*a, **k):
        raise AssertionError("verify ran with a bad --image-size")

    monkeypatch.setattr(verify_mod, "verify", no_verify)
    size = int(torch.randint(1, 32, ()).item())
    code = cli.main(["verify", "-m", "resnet18", "--no-photos", "--device", "cpu",
                     "--image-size", str(size)])
    err = capsys.readouterr().err
    assert code == 2 and f"--image-size must be at least 32, got {size}" in err, err
    assert "Traceback" not in err


def test_keyboard_interrupt_in_a_command_exits_130(capsys, monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))

    def run(args):
        raise KeyboardInterrupt

    cli.register_command("interrupt-demo", "a demo", lambda p: None, run)
    code = cli.main(["interrupt-demo"])
    err = capsys.readouterr().err
    assert code == 130 and "fastres interrupt-demo: interrupted" in err


def test_verify_json_check_keeps_an_existing_file(capsys, monkeypatch, tmp_path):
    """The up-front ``--json`` writability check opens the file for appending: an existing
    file is left in place (and unchanged until results are written); a file it created is
    removed again."""
    from fastres import verify as verify_mod

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(verify_mod, "verify", stop)
    existing = tmp_path / "old.json"
    content = f"{torch.rand(()).item()!r}"
    existing.write_text(content)
    with pytest.raises(Stop):
        cli.main(["verify", "-m", "resnet18", "--no-photos", "--device", "cpu",
                  "--image-size", "32", "--json", str(existing)])
    assert existing.exists() and existing.read_text() == content
    new = tmp_path / "new.json"
    with pytest.raises(Stop):
        cli.main(["verify", "-m", "resnet18", "--no-photos", "--device", "cpu",
                  "--image-size", "32", "--json", str(new)])
    assert not new.exists()
    capsys.readouterr()


def test_a_plugin_that_fails_to_import_leaves_the_other_commands(capsys, monkeypatch):
    """A plugin module whose import raises something other than ImportError is said once as
    a warning; the other commands still work."""
    import sys

    name = "fastres_test_broken_plugin"

    class Loader:
        @staticmethod
        def find_spec(fullname, path=None, target=None):
            if fullname != name:
                return None
            import importlib.machinery

            return importlib.machinery.ModuleSpec(fullname, Loader)

        @staticmethod
        def create_module(spec):
            return None

        @staticmethod
        def exec_module(module):
            raise ValueError("broken on purpose")

    monkeypatch.setattr(sys, "meta_path", [Loader, *sys.meta_path])
    monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(cli, "PLUGIN_MODULES", (name,))
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))
    code = cli.main(["verify", "--help"])
    out, err = capsys.readouterr()
    assert code == 0 and "--device" in out
    assert f"fastres: warning: {name} failed to import (ValueError: broken on purpose)" in err
