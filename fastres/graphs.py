"""CUDA graphs for the eval-mode forward: :func:`optimize`.

``fastres.optimize(model, cuda_graphs=True, max_graphs=8)`` returns a
:class:`CUDAGraphModule` wrapping ``model``. Its eval-mode forward on CUDA input:

1. looks up a graph by *graph key*: input shape, input dtype, device, autocast state (enabled
   and dtype), inference mode, and what the kernel choice depends on (TF32 flags, the backend
   preference, ``FASTRES_TUNE`` / deterministic mode: :func:`fastres.ops._backend.choice_state`);
   an empty batch runs without a graph;
2. on first sight of a key: copies the input into a static buffer, warms up on a side stream
   (this builds the inference plan and tunes every layer — :mod:`fastres.tuning` never times
   during capture), captures ``model(static_input)`` into a ``torch.cuda.CUDAGraph`` (all of
   this module's graphs share one memory pool; replays are serialized on the caller's
   stream), then replays it;
3. on later calls: copies the input in, replays, and returns ``static_output.clone()``.

Aliasing rule: **every call returns a fresh tensor** (a copy of the graph's static output),
so a result the caller holds is never overwritten by a later call. The copy is one
``[N, num_classes]`` tensor per call.

Bound: at most ``max_graphs`` keys are captured or tried (a failed capture counts); calls with
further keys run the model without a graph (said once). Invalidation: the graphs read the
inference plan's folded weights, so they are valid exactly while the plan is
(:meth:`fastres.plan._PlanCache.valid_for`: no parameter or buffer changed, was replaced or
moved). When it is not, every graph is dropped and keys are captured again on their next call
(the bound counts from zero); so are they when the kernel choices are forgotten
(``fastres.tuning.tune_model``, a tuning reset or a new cache), and a signature whose capture failed
is tried again after either. Warm-up and capture run with autocast's weight cache off (a
cached cast would be freed under the graph). ``param.data`` edits bypass version counters, as
for the plan: call ``model.invalidate_plan()`` (or :meth:`CUDAGraphModule.reset`) after them.
The graphs and their memory are let go at once when the wrapper is moved or cast (``.cpu()``,
``.half()``: not a ``.to()`` that changes nothing) and on a train-mode forward; moving the
wrapped model itself drops its plan, and the graphs go at the wrapper's next call (or
:meth:`reset`).

Everything else runs the wrapped model unchanged: train mode, autograd recording, CPU input
(with a one-time note), ``torch.compile`` tracing, and calls made while another graph is being
captured. Threads may share a wrapper: captures and replays take turns under its lock, and a
replay on another stream than the graph's last one waits for that one to finish with the
graph's static buffers.
"""

from __future__ import annotations

import logging
import operator
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fastres import plan as _plan
from fastres import _warnings
from fastres.ops import _backend

log = logging.getLogger("fastres")

__all__ = ["CUDAGraphModule", "optimize"]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    static_input: Tensor
    static_output: Tensor
    # the stream of the last replay, and an event after its output was copied out: a replay
    # on another stream waits for it before overwriting the static input
    stream: Any = None
    done: Any = field(default_factory=lambda: torch.cuda.Event())


def optimize(model: nn.Module, cuda_graphs: bool = True, max_graphs: int = 8,
             warmup: int = 2) -> nn.Module:
    """Wrap ``model`` (a :class:`fastres.ResNet`) so its eval forward replays CUDA graphs.

    ``cuda_graphs=False`` returns ``model`` itself (the wrapped model, given a wrapper).
    ``max_graphs``: how many input signatures (shape, dtype, autocast state, ...) get a graph;
    further ones run without. ``warmup``: eager calls on a side stream before each capture.
    See the module docstring for the output aliasing rule (a fresh tensor per call) and
    invalidation.
    """
    if not isinstance(cuda_graphs, bool):  # ("False" and "no" are true)
        raise TypeError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
    inner, max_graphs, warmup = _checked(model, max_graphs, warmup)
    if not cuda_graphs:
        return inner  # (a wrapper given here is unwrapped: graphs off)
    return CUDAGraphModule(inner, max_graphs=max_graphs, warmup=warmup)


def _count(name: str, value) -> int:
    """``value`` as a Python int: any integer (a NumPy one too), not a bool or a float."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None


def _checked(model: nn.Module, max_graphs, warmup) -> tuple[nn.Module, int, int]:
    """The fastres.ResNet to wrap (``model``, or the model a wrapper holds), ``max_graphs`` and
    ``warmup`` as ints, after checking the arguments of :func:`optimize` /
    :class:`CUDAGraphModule`."""
    from fastres.models import ResNet

    inner = model.module if isinstance(model, CUDAGraphModule) else model
    if not isinstance(inner, ResNet):
        # another module has no plan to capture: a torchvision ResNet would run eagerly on
        # every call, silently, and anything else fails inside the input check
        hint = (": convert it with fastres.from_torchvision(model)"
                if type(inner).__name__ == "ResNet" else "")
        raise TypeError(f"optimize expects a fastres.ResNet, got {type(inner).__module__}."
                        f"{type(inner).__qualname__}{hint}")
    return inner, _setting("max_graphs", max_graphs), _setting("warmup", warmup)


# optimize's settings that the wrapper keeps, and the least value each may take
_SETTINGS = {"max_graphs": 0, "warmup": 1}


def _setting(name: str, value) -> int:
    value = _count(name, value)
    if value < _SETTINGS[name]:
        raise ValueError(f"{name} must be >= {_SETTINGS[name]}, got {value}")
    return value


class CUDAGraphModule(nn.Module):
    """``model`` with its eval forward captured in CUDA graphs (see :func:`optimize`).

    Its ``state_dict`` keys are the wrapped model's (no ``module.`` prefix, also inside a
    parent module, whose checkpoint loads back), and attributes not found here are looked up
    on the wrapped model, so the wrapper stands in for it. ``named_parameters()`` and
    ``named_modules()`` do carry the ``module.`` prefix, as for any wrapper module.
    """

    def __init__(self, module: nn.Module, max_graphs: int = 8, warmup: int = 2):
        super().__init__()
        self.module, self.max_graphs, self.warmup = _checked(module, max_graphs, warmup)
        self._graphs: dict[tuple, _Graph] = {}
        self._failed: set[tuple] = set()
        self._plan_cache: Any = None
        self._choices: tuple | None = None  # the kernel choices' epoch the graphs were made in
        self._pool = None
        self._said: set[str] = set()
        self._lock = threading.RLock()
        self.captures = 0  # how many graphs were captured over this wrapper's life
        # the keys without "module.": hooks, not state_dict/load_state_dict overrides, so
        # that a parent module's state_dict and load_state_dict (which walk the children
        # themselves) see the same keys
        self.register_state_dict_post_hook(_strip_module_prefix)
        self.register_load_state_dict_pre_hook(_add_module_prefix)
        self.register_load_state_dict_post_hook(_name_keys_without_prefix)

    # -- standing in for the wrapped model ----------------------------------------------------
    _OWN = frozenset({"module", "max_graphs", "warmup", "captures", "training"})

    @property
    def training(self) -> bool:
        """The wrapped model's flag (nn.Module's own flag would say ``True`` for a wrapper
        of an ``eval()`` model, and ``was = g.training; ...; g.train(was)`` would then put
        the model in training); ``train()`` / ``eval()`` on either set it."""
        module = self.__dict__.get("_modules", {}).get("module")
        return self.__dict__.get("_training", True) if module is None else module.training

    @training.setter
    def training(self, mode: bool) -> None:
        module = self.__dict__.get("_modules", {}).get("module")
        if module is None:  # (nn.Module.__init__, before the model is set)
            self.__dict__["_training"] = mode
        else:
            module.training = mode

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)

    def __setattr__(self, name: str, value) -> None:
        # ``wrapper.fc = nn.Linear(...)`` edits the wrapped model (it would otherwise land on
        # the wrapper, where the forward never looks); the wrapper's own state stays here
        module = self.__dict__.get("_modules", {}).get("module")
        if (module is not None and not name.startswith("_") and name not in self._OWN
                and hasattr(module, name)):
            setattr(module, name, value)
            return
        if name in _SETTINGS:  # (checked as optimize's arguments, also when set later)
            value = _setting(name, value)
        super().__setattr__(name, value)

    def __getstate__(self):  # deepcopy and pickling: the model, not its graphs
        state = dict(self.__dict__)
        state.update(_graphs={}, _failed=set(), _plan_cache=None, _choices=None, _pool=None)
        del state["_lock"]
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._lock = threading.RLock()

    def __prepare_scriptable__(self):  # torch.jit.script: the model, without graphs
        return self.module

    @property
    def num_graphs(self) -> int:
        """Graphs currently held."""
        return len(self._graphs)

    def reset(self) -> None:
        """Drop every graph (and the model's plan): the next calls capture again."""
        with self._lock:
            self._drop()
        if hasattr(self.module, "invalidate_plan"):
            self.module.invalidate_plan()

    def _drop(self) -> None:
        self._graphs.clear()
        self._failed.clear()
        self._plan_cache = None
        self._choices = None
        self._pool = None

    def _say_once(self, key: str, msg: str) -> None:
        if _warnings.first_time(self._said, key):
            _warnings.warn(f"fastres: {msg}")

    # -- the forward --------------------------------------------------------------------------
    def _apply(self, fn, *args, **kwargs):
        # .to(), .cpu(), .half(), ...: the wrapped model drops a plan that no longer matches
        # it (fastres.ResNet._apply); the graphs that read it go now too, with their memory
        out = super()._apply(fn, *args, **kwargs)
        with self._lock:
            self._check_valid()
        return out

    def forward(self, x: Tensor) -> Tensor:
        model = self.module
        traced = _plan.tracing()
        if model.training or traced or not isinstance(x, Tensor):
            if not traced and model.training and self._plan_cache is not None:
                with self._lock:  # training changes the weights: the graphs' memory goes now
                    self._drop()
            return model(x)
        if x.device.type != "cuda":
            self._say_once("cpu", f"CUDA graphs need CUDA input (got {x.device.type}); "
                           "running the model without graphs")
            return model(x)
        if _backend.off_current_device(x):
            with torch.cuda.device(x.device):
                return self.forward(x)
        if torch.cuda.is_current_stream_capturing():
            return model(x)  # inside someone else's capture: just be captured
        if _plan.eager_reason(model, x) is not None or x.shape[0] == 0:
            return model(x)  # train/autograd/unsupported: the model says why itself
        with self._lock:
            return self._graphed(model, x)

    def _graphed(self, model: nn.Module, x: Tensor) -> Tensor:
        if model._forward_hooks or model._forward_pre_hooks:
            # a replay runs the captured kernels, not the model's __call__: its own hooks
            # would run at warm-up and capture only, then never (and a hook keeping the output
            # would keep the graph's static output, which later replays overwrite)
            self._say_once("hooks", "the model has forward hooks or pre-hooks of its own, "
                           "which a CUDA graph's replay would skip; running it without graphs")
            return model(x)
        self._check_valid(tree_checked=True)  # (forward's eager_reason has walked the tree)
        key = self._key(x)
        entry = self._graphs.get(key)
        if entry is None:
            if key in self._failed:
                return model(x)
            # (failed signatures count: a model whose capture fails tends to fail for every
            # shape, and each attempt costs warm-up calls and a capture)
            if len(self._graphs) + len(self._failed) >= self.max_graphs:
                self._say_once("bound", f"more than max_graphs={self.max_graphs} input "
                               f"signatures; {tuple(x.shape)} {x.dtype} and further new ones "
                               "run without a CUDA graph")
                return model(x)
            entry = self._capture(key, x)
            if entry is None:
                return model(x)
        stream = torch.cuda.current_stream(x.device)
        if entry.stream is not None and entry.stream != stream:
            stream.wait_event(entry.done)  # the last replay, on another stream, is done
        entry.static_input.copy_(x)
        entry.graph.replay()
        out = entry.static_output.clone()
        entry.done.record(stream)
        entry.stream = stream
        return out

    def _key(self, x: Tensor) -> tuple:
        # a graph keeps the kernels it captured: the key holds everything the kernel choice
        # depends on (backend, TF32 flags, FASTRES_TUNE / deterministic mode, ...)
        return (tuple(x.shape), x.dtype, x.device,
                torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
                torch.is_inference_mode_enabled(), _backend.choice_state())

    def _check_valid(self, tree_checked: bool = False) -> None:
        """Drop every graph, and forget failed captures, when the plan they read is gone or
        stale, or when the kernel choices were forgotten (tuning reset, a new cache, a newly
        registered implementation): the next calls capture again. ``tree_checked``: as
        :meth:`fastres.plan._PlanCache.valid_for`'s."""
        if not self._graphs and not self._failed:
            return
        cache = self.module.__dict__.get("_plan_cache")
        if (cache is not self._plan_cache
                or (cache is not None and not cache.valid_for(self.module, tree_checked))):
            why = "model parameters changed"
        elif self._choices != _backend.choice_epoch():
            why = "kernel choices were reset"
        else:
            return
        log.info("fastres: %s; dropping %d CUDA graph(s)", why, len(self._graphs))
        self._drop()

    def _capture(self, key: tuple, x: Tensor) -> _Graph | None:
        model = self.module
        with torch.inference_mode(False), torch.no_grad():
            static_input = torch.empty_like(x)
        static_input.copy_(x)
        caller = torch.cuda.current_stream(x.device)
        # autocast's weight cache off: a cast made in warm-up or capture would be freed when
        # the caller's autocast region ends, and the graph would read freed memory (as
        # torch.cuda.make_graphed_callables requires)
        no_cast_cache = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                       enabled=torch.is_autocast_enabled("cuda"),
                                       cache_enabled=False)
        try:
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(caller)
            with torch.cuda.stream(side), no_cast_cache:
                for _ in range(self.warmup):  # builds the plan, tunes, compiles kernels
                    model(static_input)
            torch.cuda.current_stream(x.device).wait_stream(side)
            # keyed by the state the warm-up left, which the kernels captured below were
            # chosen in (the first forward of a process may register what choices read)
            key = self._key(x)
            cache = model.__dict__.get("_plan_cache")
            if cache is None or not cache.valid_for(model):
                raise RuntimeError("the model has no valid inference plan after warm-up")
            if self._graphs and cache is not self._plan_cache:
                self._drop()  # the warm-up rebuilt the plan: older graphs read stale weights
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            # on x's device: the default capture stream is made once, on whichever device was
            # current at the process's first capture
            with torch.cuda.graph(graph, pool=self._pool, stream=side), no_cast_cache:
                static_output = model(static_input)
        except Exception as exc:
            # torch.cuda.graph leaves its stream current when capture_end raises
            torch.cuda.set_stream(caller)
            now = model.__dict__.get("_plan_cache")
            if now is not self._plan_cache:
                self._drop()  # any graph held read another plan
                self._plan_cache = now  # retried when this plan is replaced
            self._choices = _backend.choice_epoch()
            self._failed.add(key)
            self._say_once(f"fail:{key}", f"CUDA graph capture failed for input "
                           f"{tuple(x.shape)} {x.dtype} ({type(exc).__name__}: {exc}); that "
                           "signature runs without a graph")
            return None
        self._plan_cache = cache
        self._choices = _backend.choice_epoch()
        entry = _Graph(graph, static_input, static_output)
        self._graphs[key] = entry
        self.captures += 1
        log.info("fastres: captured a CUDA graph for %s %s (%d held)", tuple(x.shape),
                 x.dtype, len(self._graphs))
        return entry


def _strip_module_prefix(module: CUDAGraphModule, state_dict, prefix: str, local_metadata) -> None:
    """State-dict post hook: ``prefix + "module.k"`` -> ``prefix + "k"`` (order kept)."""
    inner = prefix + "module."
    items = list(state_dict.items())
    state_dict.clear()
    for k, v in items:
        state_dict[prefix + k[len(inner):] if k.startswith(inner) else k] = v
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:  # the model's versions (BatchNorm's) under the names they load from
        for k in [k for k in meta if k == inner[:-1] or k.startswith(inner)]:
            meta[prefix + k[len(inner):] if k != inner[:-1] else prefix[:-1]] = meta.pop(k)


def _add_module_prefix(module: CUDAGraphModule, state_dict, prefix: str, local_metadata,
                       strict, missing_keys, unexpected_keys, error_msgs) -> None:
    """Load pre hook: keys for the wrapped model get ``module.`` back; keys of modules
    attached to the wrapper itself stay."""
    module.__dict__["_load_prefix"] = prefix
    own = {name for name in module._modules if name != "module"}
    for k in [k for k in state_dict if k.startswith(prefix)]:
        rest = k[len(prefix):]
        if rest.split(".", 1)[0] not in own:
            state_dict[prefix + "module." + rest] = state_dict.pop(k)


def _name_keys_without_prefix(module: CUDAGraphModule, incompatible_keys) -> None:
    """Load post hook: missing and unexpected keys named as the state dict names them."""
    inner = module.__dict__.pop("_load_prefix", "") + "module."
    for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
        keys[:] = [k.replace(inner, inner[:-len("module.")], 1) if k.startswith(inner) else k
                   for k in keys]
