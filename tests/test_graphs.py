"""``fastres.optimize(model, cuda_graphs=True)``: CUDA graph capture and replay.

GPU tests (``cuda`` marker): replay equals the plain forward, new signatures are captured,
the bound, the aliasing rule (every call returns a fresh tensor), and invalidation when the
weights change. The CPU test checks the fallback (the wrapper just runs the model).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from _models import assert_resnet18_is_torchvisions
from conftest import assert_close_rel

import fastres
from fastres.graphs import CUDAGraphModule

HAS_CUDA = torch.cuda.is_available()


def small_model(device="cpu"):
    from _models import realistic_bn

    # (no fixed seed: conftest seeds each test from the run's FASTRES_TEST_SEED)
    m = fastres.resnet18(num_classes=10).to(device)
    return realistic_bn(m, size=32, device=device)


# -- CPU: the fallback -------------------------------------------------------------------------

def test_cpu_fallback_runs_the_model_with_one_note():
    m = small_model()
    g = fastres.optimize(m, cuda_graphs=True, max_graphs=4)
    assert isinstance(g, CUDAGraphModule) and g.module is m
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
        with pytest.warns(RuntimeWarning, match="CUDA graphs need CUDA input"):
            y = g(x)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            y2 = g(x)
        assert not [w for w in seen if "CUDA graphs" in str(w.message)], "said once"
    assert torch.equal(y, ref) and torch.equal(y2, ref)
    assert g.num_graphs == 0


class _StandInReplay:
    """A captured graph's stand-in on the CPU: a replay runs the model from the entry's
    static input into its static output, as a replay overwrites the captured output."""

    def __init__(self, model, entry):
        self.model, self.entry = model, entry

    def replay(self):
        self.entry.static_output.copy_(self.model(self.entry.static_input))


class _StandInEvent:
    def record(self, stream=None):
        pass


def _stand_in_graphs(monkeypatch, m) -> list:
    """Capture, replay and stream stood in for on the CPU, for the wrapper's replay path
    (``CUDAGraphModule._graphed``); returns the list the captured entries go to."""
    from fastres import graphs

    entries = []

    def capture(self, key, x):
        with torch.no_grad():
            entry = graphs._Graph(None, x.clone(), m(x), done=_StandInEvent())
        entry.graph = _StandInReplay(m, entry)
        self._graphs[key] = entry
        entries.append(entry)
        return entry

    monkeypatch.setattr(CUDAGraphModule, "_capture", capture)
    monkeypatch.setattr(CUDAGraphModule, "_check_valid", lambda self, tree_checked=False: None)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "stream")
    return entries


def test_hooks_on_the_model_itself_run_without_graphs_cpu_stand_in(monkeypatch):
    """A replay runs the captured kernels, not the model's ``__call__``: a forward hook (or
    pre-hook) on the wrapped model itself ran at warm-up and capture, then never, so its
    edit of the output was lost on every later call. With such hooks the wrapper runs the
    model without graphs (said once) and the hooks run on every call."""
    m = small_model().eval()
    g = fastres.optimize(m, cuda_graphs=True)
    entries = _stand_in_graphs(monkeypatch, m)
    x = torch.randn(int(torch.randint(1, 4, ())), 3, 32, 32)
    with torch.no_grad():
        plain = m(x)
        g._graphed(m, x)  # captured before the hooks exist
        assert len(entries) == 1
        seen = []
        pre = m.register_forward_pre_hook(lambda mod, args: seen.append("pre"))
        post = m.register_forward_hook(lambda mod, args, out: torch.softmax(out, 1))
        with pytest.warns(RuntimeWarning, match="hooks or pre-hooks of its own"):
            y1 = g._graphed(m, x)
        y2 = g._graphed(m, x)
        assert seen == ["pre", "pre"] and len(entries) == 1
        for y in (y1, y2):
            assert_close_rel(y, torch.softmax(plain, 1), 1e-6)
        pre.remove()
        post.remove()
        assert_close_rel(g._graphed(m, x), plain, 1e-6)  # no hooks: the graph again
        assert len(entries) == 1


def test_wrapper_training_flag_is_the_models():
    """``optimize(model.eval())``'s wrapper said ``training == True`` (nn.Module's own flag),
    so ``was = g.training; g.eval(); ...; g.train(was)`` put the model in training: every
    later inference ran train-mode BatchNorm (updating its statistics). The flag is the
    wrapped model's, whichever of the two is switched."""
    m = small_model().eval()
    g = fastres.optimize(m, cuda_graphs=True)
    assert g.training is False
    was = g.training
    g.eval()
    g.train(was)
    assert m.training is False and not any(mod.training for mod in m.modules())
    g.train()
    assert m.training is True and g.training is True
    m.eval()
    assert g.training is False
    import copy

    assert copy.deepcopy(g).training is False


def test_replays_return_results_of_their_own_cpu_stand_in(monkeypatch):
    """The graphs' output rule without a GPU (the GPU test is
    ``test_outputs_are_never_overwritten_by_later_calls``): the wrapper's replay path with the
    capture, the replay and the stream stood in for on the CPU. Each call returns a tensor of
    its own, which the next replay does not overwrite and the caller may modify. (Mutant:
    returning the static output itself, which every CPU test passed.)"""
    m = small_model().eval()
    g = fastres.optimize(m, cuda_graphs=True)
    entries = _stand_in_graphs(monkeypatch, m)
    x1, x2 = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y1 = g._graphed(m, x1)
        keep = y1.clone()
        y2 = g._graphed(m, x2)
        assert len(entries) == 1 and g.num_graphs == 1, "one signature, one capture"
        assert torch.equal(y1, keep), "the second replay overwrote the first result"
        static = entries[0].static_output.data_ptr()
        assert static not in (y1.data_ptr(), y2.data_ptr()) and y1.data_ptr() != y2.data_ptr()
        assert_close_rel(y1, m(x1), 1e-6)
        assert_close_rel(y2, m(x2), 1e-6)
        y2.add_(1.0)  # the caller may modify its result: the next replay is unaffected
        assert_close_rel(g._graphed(m, x2), m(x2), 1e-6)
        assert torch.equal(y1, keep)


def test_wrapper_stands_in_for_the_model():
    m = small_model()
    g = fastres.optimize(m)
    assert g.fc is m.fc and g.conv1 is m.conv1
    assert list(g.state_dict()) == list(m.state_dict())
    g.load_state_dict(m.state_dict())
    g.train()
    assert m.training
    x = torch.randn(2, 3, 32, 32)
    assert g(x).shape == (2, 10)  # train mode: the model's eager forward
    g.eval()
    assert not m.training
    assert fastres.optimize(m, cuda_graphs=False) is m
    assert fastres.optimize(g).module is m  # no wrapper around a wrapper


def test_setting_attributes_edits_the_wrapped_model():
    """``g.fc = ...`` replaces the model's ``fc`` (it used to land on the wrapper, silently
    ignored by the forward and by ``state_dict``)."""
    m = small_model()
    g = fastres.optimize(m)
    g.fc = torch.nn.Linear(512, 7)
    assert m.fc is g.fc and "fc" not in g._modules
    assert g.state_dict()["fc.weight"].shape == (7, 512)
    g.max_graphs = 3  # the wrapper's own settings stay on the wrapper
    assert g.max_graphs == 3 and not hasattr(m, "max_graphs")
    with torch.no_grad():
        assert g.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_wrapper_copies_without_its_graphs():
    import copy
    import pickle
    import threading

    m = small_model()
    g = fastres.optimize(m)
    g._graphs[("a signature",)] = threading.Lock()  # stands in for a CUDAGraph: not copyable
    g._failed.add(("another",))
    for dup in (copy.deepcopy(g), pickle.loads(pickle.dumps(g))):
        assert isinstance(dup, CUDAGraphModule) and dup.module is not m
        assert dup.num_graphs == 0 and not dup._failed
        assert list(dup.state_dict()) == list(m.state_dict())
    assert g.num_graphs == 1  # the original keeps its graphs


def test_graph_key_separates_pinned_and_tuned(monkeypatch):
    """A graph replays the kernels it captured: one captured with measured choices must not
    serve a pinned (``FASTRES_TUNE=0`` / deterministic) call, nor the reverse."""
    g = fastres.optimize(small_model())
    x = torch.randn(1, 3, 32, 32)
    monkeypatch.delenv("FASTRES_TUNE", raising=False)
    tuned = g._key(x)
    monkeypatch.setenv("FASTRES_TUNE", "0")
    assert g._key(x) != tuned
    monkeypatch.delenv("FASTRES_TUNE")
    assert g._key(x) == tuned
    with monkeypatch.context() as mp:
        mp.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
        assert g._key(x) != tuned


def test_a_first_tuned_call_leaves_the_graph_key_as_it_was(monkeypatch):
    """A process's first tuned call registers the tuner's configuration providers. A graph
    key read before it must already be the one read after it: one that changed made the
    wrapper capture its first signature twice (seen on an H200, whatever test came first).
    (CPU: that first call again, with the providers' registry emptied.)"""
    from fastres import tuning
    from fastres.ops import _backend

    monkeypatch.setattr(_backend, "_optional_loaded", False)
    monkeypatch.setattr(_backend, "_CONFIGS", {})
    monkeypatch.setattr(_backend, "_generation", _backend._generation)  # (put back after)
    monkeypatch.setattr(tuning, "_providers_done", False)
    g = fastres.optimize(small_model())
    x = torch.randn(1, 3, 32, 32)
    key = g._key(x)
    impls = _backend.implementations("conv_bias_act")
    w, b = torch.randn(8, 3, 3, 3), torch.randn(8)
    found = tuning.candidates("conv_bias_act", x.device, "auto", impls,
                              (x, w, b, (1, 1), (1, 1), (1, 1), 1), {})
    assert found
    assert _backend.config_provider("conv_bias_act", "triton") is not None
    assert g._key(x) == key


def test_optimize_rejects_bad_arguments():
    m = small_model()
    with pytest.raises(ValueError, match="max_graphs"):
        fastres.optimize(m, max_graphs=-1)
    with pytest.raises(ValueError, match="warmup"):
        fastres.optimize(m, warmup=0)
    with pytest.raises(TypeError, match="fastres.ResNet, got builtins.str"):
        fastres.optimize("resnet18")
    # a torchvision ResNet has no plan: it would have run eagerly on every call, silently
    with pytest.raises(TypeError, match="from_torchvision"):
        fastres.optimize(torchvision.models.resnet18())
    with pytest.raises(TypeError, match="fastres.ResNet"):
        fastres.optimize(torch.nn.Conv2d(3, 8, 3))
    with pytest.raises(TypeError, match="max_graphs must be an int, got None"):
        fastres.optimize(m, max_graphs=None)
    with pytest.raises(TypeError, match="max_graphs must be an int, got 2.0"):
        fastres.optimize(m, max_graphs=2.0)
    with pytest.raises(TypeError, match="warmup must be an int, got True"):
        fastres.optimize(m, warmup=True)
    # any integer type is an int (a count read from a config or a NumPy array)
    import numpy
    g = fastres.optimize(m, max_graphs=numpy.int64(3), warmup=numpy.int32(2))
    assert (g.max_graphs, g.warmup) == (3, 2) and type(g.max_graphs) is int
    # set later, the same checks (None was taken, and failed at the next CUDA call)
    with pytest.raises(TypeError, match="max_graphs must be an int, got None"):
        g.max_graphs = None
    with pytest.raises(ValueError, match="warmup must be >= 1, got 0"):
        g.warmup = 0
    g.max_graphs = numpy.int16(5)
    assert g.max_graphs == 5 and type(g.max_graphs) is int and g.warmup == 2
    with pytest.raises(TypeError, match="cuda_graphs must be True or False, got 'False'"):
        fastres.optimize(m, cuda_graphs="False")  # (a true string: it returned a graph wrapper)


def test_state_dict_inside_a_parent_module_round_trips():
    """A parent's ``state_dict``/``load_state_dict`` walk the children themselves: the
    wrapper's keys must have no ``module.`` there either (the parent's own checkpoint did not
    load back, and with ``strict=False`` loaded nothing into the backbone)."""
    g = fastres.optimize(small_model())
    parent = torch.nn.Sequential(g, torch.nn.Softmax(1))
    sd = parent.state_dict()
    assert list(sd) == ["0." + k for k in g.module.state_dict()]
    other = torch.nn.Sequential(fastres.optimize(small_model()), torch.nn.Softmax(1))
    assert not torch.equal(other[0].fc.weight, g.fc.weight)
    other.load_state_dict(sd)
    for k, v in other.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(other.eval()(x), parent.eval()(x))
    # errors name the keys as the state dict does; a DataParallel-style "module." checkpoint
    # is refused as by the plain model
    with pytest.raises(RuntimeError) as err:
        other.load_state_dict({k: v for k, v in sd.items() if k != "0.fc.bias"})
    assert '"0.fc.bias"' in str(err.value) and "module." not in str(err.value)
    dp = {"module." + k: v for k, v in g.module.state_dict().items()}
    with pytest.raises(RuntimeError, match='Unexpected key.*"module.conv1.weight"'):
        g.load_state_dict(dp)
    with pytest.raises(RuntimeError, match='Unexpected key.*"module.conv1.weight"'):
        g.module.load_state_dict(dp)


def test_modules_attached_to_the_wrapper_are_saved():
    g = fastres.optimize(small_model())
    g.extra = torch.nn.Linear(10, 5)  # (the model has no "extra": it stays on the wrapper)
    assert "extra" in g._modules
    sd = g.state_dict()
    assert torch.equal(sd["extra.weight"], g.extra.weight)
    g2 = fastres.optimize(small_model())
    g2.extra = torch.nn.Linear(10, 5)
    g2.load_state_dict(sd)
    assert torch.equal(g2.extra.weight, g.extra.weight)
    assert torch.equal(g2.fc.weight, g.fc.weight)


def test_graphs_off_and_direct_construction():
    m = small_model()
    g = fastres.optimize(m)
    assert fastres.optimize(g, cuda_graphs=False) is m  # graphs off: the model, not the wrapper
    assert CUDAGraphModule(g).module is m
    with pytest.raises(ValueError, match="max_graphs must be >= 0, got -5"):
        CUDAGraphModule(m, max_graphs=-5)
    with pytest.raises(TypeError, match="from_torchvision"):
        CUDAGraphModule(torchvision.models.resnet18())


def test_jit_script_scripts_the_model():
    m = small_model().eval()
    scripted = torch.jit.script(fastres.optimize(m))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close_rel(scripted(x), m(x), 1e-5, "scripted wrapper (eager, unfolded BN)")


def test_failed_signatures_and_graphs_are_retried_after_invalidation():
    """A failed capture is tried again once the plan it was made with is replaced, even when
    no graph is held; any graph is dropped when the kernel choices are forgotten."""
    from fastres.ops import _backend

    m = small_model().eval()
    g = fastres.optimize(m)
    with torch.no_grad():
        m(torch.randn(1, 3, 32, 32))  # builds the plan
    plan = m.__dict__["_plan_cache"]
    g._failed.add(("a signature",))
    g._plan_cache, g._choices = plan, _backend.choice_epoch()
    g._check_valid()
    assert g._failed, "nothing changed: a failed signature stays failed"
    with torch.no_grad():
        m.fc.weight.mul_(2.0)
    g._check_valid()
    assert not g._failed and g._plan_cache is None

    g._graphs[("captured",)] = object()
    g._plan_cache, g._choices = plan, _backend.choice_epoch()
    with torch.no_grad():
        m(torch.randn(1, 3, 32, 32))
    g._plan_cache = m.__dict__["_plan_cache"]
    g._check_valid()
    assert g.num_graphs == 1
    _backend.invalidate_choices()
    g._check_valid()
    assert g.num_graphs == 0


@pytest.mark.parametrize("how", ["cast", "train"])
def test_casting_or_training_drops_the_graphs(how):
    """``wrapper.half()`` / ``.cpu()`` or a train-mode forward kept the graphs (their memory
    pool) and the plan they read until the next eval call; a ``.to()`` that changes nothing
    keeps them. (CPU: a stand-in entry where a GPU would hold a captured graph.)"""
    from fastres.ops import _backend

    m = small_model().eval()
    g = fastres.optimize(m)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        g(x)  # (CPU: the model's own forward, which builds the plan)
    g._graphs[("captured",)] = object()
    g._plan_cache, g._choices = m.__dict__["_plan_cache"], _backend.choice_epoch()
    g.to(torch.float32)
    assert g.num_graphs == 1, "a .to() that changed nothing dropped the graphs"
    if how == "cast":
        g.double()
    else:
        g.train()
        g(x)
    assert g.num_graphs == 0 and g._plan_cache is None
    assert m.__dict__["_plan_cache"] is None


def test_failed_captures_count_toward_the_bound(monkeypatch):
    """Every new signature of a model whose capture fails was tried again (warm-up calls and a
    capture each, and a remembered signature and warning each, without bound); failed tries
    now count toward ``max_graphs``. (CPU: a stand-in capture that fails.)"""
    m = small_model().eval()
    g = fastres.optimize(m, max_graphs=3)
    tried = []

    def failing_capture(key, x):  # (as _capture's failure path leaves the wrapper)
        from fastres.ops import _backend

        tried.append(key)
        m(x)  # (the warm-up, which builds the plan)
        g._plan_cache, g._choices = m.__dict__["_plan_cache"], _backend.choice_epoch()
        g._failed.add(key)
        return None

    monkeypatch.setattr(g, "_capture", failing_capture)
    with torch.no_grad(), warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        for size in range(32, 48):
            x = torch.randn(1, 3, size, size)
            assert_close_rel(g._graphed(m, x), m(x), 0.0, f"size {size}")
    assert len(tried) == 3 and len(g._failed) == 3


# -- GPU -----------------------------------------------------------------------------------

def cuda_twin():
    m = small_model("cuda")
    return m, fastres.optimize(m, cuda_graphs=True, max_graphs=3)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replay_equals_plain_forward(dtype):
    m, g = cuda_twin()
    m.to(dtype)
    with torch.no_grad():
        for _ in range(3):  # capture, then replays with fresh inputs
            x = torch.randn(2, 3, 64, 64, device="cuda", dtype=dtype)
            y = g(x)
            assert_close_rel(y, m(x), 1e-5, "graph replay")
            assert_resnet18_is_torchvisions(y, m, x, f"graph replay ({dtype})", dtype)
    assert g.num_graphs == 1 and g.captures == 1


@pytest.mark.cuda
def test_empty_batch_runs_without_a_graph():
    m, g = cuda_twin()
    with torch.no_grad():
        y = g(torch.randn(0, 3, 64, 64, device="cuda"))
    assert y.shape == (0, 10) and g.num_graphs == 0 and not g._failed


@pytest.mark.cuda
def test_new_signatures_are_captured_and_autocast_is_part_of_the_key():
    m, g = cuda_twin()
    with torch.no_grad():
        for shape in [(1, 3, 64, 64), (2, 3, 64, 64), (1, 3, 64, 64)]:
            x = torch.randn(*shape, device="cuda")
            assert_close_rel(g(x), m(x), 1e-5)
        assert g.num_graphs == 2
        with torch.autocast("cuda", dtype=torch.bfloat16):
            x = torch.randn(1, 3, 64, 64, device="cuda")
            y = g(x)
            assert y.dtype == torch.bfloat16
            assert_close_rel(y, m(x), 1e-5)
    assert g.num_graphs == 3 and g.captures == 3


@pytest.mark.cuda
def test_bound_then_no_graph_said_once():
    m = small_model("cuda")
    g = fastres.optimize(m, max_graphs=2)
    with torch.no_grad():
        for n in (1, 2):
            g(torch.randn(n, 3, 64, 64, device="cuda"))
        x = torch.randn(3, 3, 64, 64, device="cuda")
        with pytest.warns(RuntimeWarning, match="max_graphs=2"):
            y = g(x)
        assert_close_rel(y, m(x), 1e-5)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            g(torch.randn(4, 3, 64, 64, device="cuda"))
        assert not [w for w in seen if "max_graphs" in str(w.message)], "said once"
    assert g.num_graphs == 2


@pytest.mark.cuda
def test_outputs_are_never_overwritten_by_later_calls():
    m, g = cuda_twin()
    with torch.no_grad():
        x1, x2 = (torch.randn(2, 3, 64, 64, device="cuda") for _ in range(2))
        y1 = g(x1)
        keep = y1.clone()
        y2 = g(x2)
        assert torch.equal(y1, keep), "a later replay overwrote a returned result"
        y3 = g(x1)
        assert y1.data_ptr() != y2.data_ptr() != y3.data_ptr()
        assert_close_rel(y2, m(x2), 1e-5)
        y2.add_(1.0)  # the caller may modify its result; the next replay is unaffected
        assert_close_rel(g(x2), m(x2), 1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("how", ["inplace", "load_state_dict", "optimizer"])
def test_weight_change_recaptures(how):
    m, g = cuda_twin()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.no_grad():
        before = g(x)
    if how == "inplace":
        with torch.no_grad():
            m.layer2[0].conv1.weight.mul_(1.5)
            m.layer3[1].bn2.running_var.mul_(2.0)
    elif how == "load_state_dict":
        sd = {k: (v * 0.9 if v.is_floating_point() else v) for k, v in m.state_dict().items()}
        m.load_state_dict(sd)
    else:
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        m.train()
        m(torch.randn(2, 3, 64, 64, device="cuda")).square().mean().backward()
        opt.step()
        m.eval()
    with torch.no_grad():
        after = g(x)
        ref = m(x)
    assert_close_rel(after, ref, 1e-5, "after the weight change")
    assert (after - before).abs().max() > 1e-3
    assert g.captures == 2 and g.num_graphs == 1


@pytest.mark.cuda
def test_threads_on_their_own_streams_share_a_wrapper():
    """Threads calling one wrapper, each on its own stream, each get the plain forward of
    their own input: replays take turns and wait for the other stream's use of the static
    buffers."""
    import threading

    m, g = cuda_twin()
    errors, results = [], {}

    def work(i):
        try:
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream), torch.no_grad():
                xs = [torch.randn(2, 3, 64, 64, device="cuda") for _ in range(8)]
                outs = [g(x) for x in xs]
                refs = [m(x) for x in xs]
            stream.synchronize()
            results[i] = list(zip(outs, refs))
        except Exception as e:  # (reported below)
            errors.append(f"{type(e).__name__}: {e}")

    with torch.no_grad():
        g(torch.randn(2, 3, 64, 64, device="cuda"))  # captured before the threads start
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(results) == 4
    for pairs in results.values():
        for out, ref in pairs:
            assert_close_rel(out, ref, 1e-5, "a thread's graph replay")
    assert g.captures == 1


@pytest.mark.cuda
def test_grad_and_train_mode_bypass_graphs():
    _, g = cuda_twin()
    x = torch.randn(2, 3, 64, 64, device="cuda", requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the model says once that it runs eagerly
        y = g(x)  # eval + autograd recording: the model's eager path
    y.sum().backward()
    assert x.grad is not None and g.num_graphs == 0
    g.train()
    g(torch.randn(2, 3, 64, 64, device="cuda"))
    assert g.num_graphs == 0


@pytest.mark.cuda
def test_moving_the_wrapper_off_the_gpu_frees_its_memory():
    """``wrapper.cpu()`` after captures freed neither the graphs' pool nor the plan's folded
    weights (nor the old parameters, which the plan references) until the next call."""
    import gc

    m, g = cuda_twin()
    with torch.no_grad():
        g(torch.randn(8, 3, 64, 64, device="cuda"))
    assert g.num_graphs == 1
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    g.cpu()
    gc.collect()
    torch.cuda.synchronize()
    assert g.num_graphs == 0 and m.__dict__["_plan_cache"] is None
    # the weights moved off, and the plan's folded copy of them freed (workspaces and other
    # allocations the process keeps may stay)
    weights = sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))
    freed = before - torch.cuda.memory_allocated()
    assert freed >= 1.5 * weights, (before, freed, weights)


@pytest.mark.cuda
@pytest.mark.slow  # (wall times: not under the GPU check's parallel test workers)
def test_graphs_make_batch1_faster_or_equal():
    """Not a benchmark: a sanity check that replay is not slower than the plain forward."""
    m = small_model("cuda").to(torch.bfloat16)
    g = fastres.optimize(m)
    x = torch.randn(1, 3, 224, 224, device="cuda", dtype=torch.bfloat16)

    def median_ms(fn, n=30):
        times = []
        for _ in range(n):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn(x)
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        return sorted(times)[n // 2]

    with torch.no_grad():
        for _ in range(3):
            g(x), m(x)
        plain, graphed = median_ms(m), median_ms(g)
    print(f"resnet18 bf16 batch 1: plain {plain:.3f} ms, graphed {graphed:.3f} ms")
    assert graphed <= plain * 1.1
