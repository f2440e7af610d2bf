"""``fastres tune``: measure and cache every layer's implementation choice ahead of time.

::

    fastres tune resnet50 --batch 1 32 --dtype bf16
    fastres tune resnet50 --batch 1 8 32 --dtype fp16 bf16 --image-size 224

The weights do not matter to the choices (only shapes, dtypes and layouts do), so the model is
built with random weights unless ``--weights`` is given. Choices go to the tuning cache
(``$FASTRES_CACHE_DIR`` or ``--cache-dir``; see :mod:`fastres.tuning`), where every later
process on the same GPU and versions finds them.

The work is :func:`tune_main`; :func:`add_arguments` / :func:`run` are its argparse front end,
registered with the ``fastres`` CLI by :func:`fastres.tuning.register_cli` (the CLI's plugin
hook).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable

import torch

__all__ = ["add_arguments", "run", "tune_main"]

DTYPE_CHOICES = ("fp32", "fp16", "bf16", "float32", "float16", "bfloat16", "float", "half")
HELP = "time every layer's implementations for a model and cache the fastest (ahead of time)"
DESCRIPTION = (
    "Measure which implementation and kernel configuration is fastest for every layer of "
    "MODEL at the given batch sizes and dtypes, and store the choices in the tuning cache, so "
    "that later processes on this GPU start with no tuning at all.")


class TuneUsageError(ValueError):
    """A bad argument (exit status 2)."""


def parse_batches(values: Iterable) -> list[int]:
    """``["1", "32"]``, ``["1,32"]`` or ints -> sorted unique positive ints (default [1],
    for no values; values with no number in them, ``--batch ,``, are an error)."""
    out: list[int] = []
    values = list(values)
    for v in values:
        for part in str(v).replace(",", " ").split():
            try:
                out.append(int(part))
            except ValueError:
                raise TuneUsageError(f"batch sizes are integers, got {part!r}") from None
    if not out and values:
        given = " ".join(map(repr, map(str, values)))
        raise TuneUsageError(f"no batch size given (--batch {given}); expected integers >= 1")
    if not out:
        out = [1]
    if min(out) < 1:
        raise TuneUsageError(f"batch sizes must be >= 1, got {out}")
    return sorted(set(out))


def check_cache_dir(path: str | os.PathLike, what: str) -> None:
    """``path`` must be a directory, or one that can be made (nothing is made here): a file
    in the way is a :class:`TuneUsageError` before anything is tuned."""
    from fastres import tuning

    try:
        p = tuning.expand_user(path, what)
    except OSError as exc:
        raise TuneUsageError(str(exc)) from None
    try:
        probe = tuning.nearest_existing(p)
        if probe.exists() and not probe.is_dir():
            where = "" if probe == p else f" cannot be made: {str(probe)!r}"
            raise TuneUsageError(f"{what} {str(p)!r}{where} is a file, expected a directory")
        if probe.is_dir() and not os.access(probe, os.W_OK | os.X_OK):
            raise TuneUsageError(f"{what} {str(p)!r} cannot be used: {str(probe)!r} is not "
                                 "writable")
    except OSError as exc:  # (a folder we may not look into)
        raise TuneUsageError(f"{what} {str(p)!r} cannot be used ({exc.strerror})") from None


def tune_main(model: str, batches: Iterable = (1,), dtypes: Iterable[str] = ("bf16",),
              image_size: int = 224, device: str = "cuda", num_classes: int = 1000,
              weights: str | None = None, cache_dir: str | None = None,
              progress: bool | None = None, echo: Callable[[str], None] = print) -> int:
    """Build ``model`` on ``device`` and :func:`fastres.tuning.tune_model` it for every
    dtype and batch size; print one line per dtype and the cache file. Returns 0, or 1 when
    choices could not be written to the cache file (said on stderr); raises
    :class:`TuneUsageError` for bad arguments."""
    from fastres import tuning
    from fastres._env import environ
    from fastres.models import MODEL_NAMES, get_model
    from fastres.ops import _backend

    if model not in MODEL_NAMES:
        raise TuneUsageError(f"unknown model {model!r}; expected one of "
                             f"{', '.join(MODEL_NAMES)}")
    batch_list = parse_batches(batches)
    if image_size < 32:
        raise TuneUsageError(f"image size must be >= 32, got {image_size}")
    dtype_list = list(dict.fromkeys(dtypes)) or ["bf16"]
    if num_classes < 1:
        raise TuneUsageError(f"--num-classes must be >= 1, got {num_classes}")
    if cache_dir is not None:
        if not str(cache_dir).strip():  # ("" would check "." and then write the default)
            raise TuneUsageError("--cache-dir must name a directory, got an empty string")
        check_cache_dir(cache_dir, "--cache-dir")
    else:
        from_env = tuning.dir_variable("FASTRES_CACHE_DIR") is not None
        try:
            default = tuning.cache_dir()
        except OSError as exc:  # no home directory, or a ~user that names none
            raise TuneUsageError(str(exc)) from None
        check_cache_dir(default, "FASTRES_CACHE_DIR" if from_env
                        else "the tuning cache directory")
    from fastres.classify import UserError, in_cli_words, load_checkpoint, parse_device
    from fastres.verify import out_of_memory

    try:
        pinned = tuning.mode() == "pinned"
    except ValueError as exc:  # FASTRES_TUNE set to something else (an error on any machine)
        raise TuneUsageError(str(exc)) from None
    try:
        parsed = [tuning.parse_dtype(d) for d in dtype_list]
        if str(device).strip().lower().startswith("cuda") and not torch.cuda.is_available():
            echo("fastres tune: no CUDA device here; nothing to tune (CPU runs the reference "
                 "implementation, which needs no tuning).")
            return 0
        dev = parse_device(device)
        state = load_checkpoint(weights, model) if weights else None
    except (ValueError, RuntimeError, UserError) as exc:
        raise TuneUsageError(in_cli_words(str(exc))) from None
    if pinned:
        echo("fastres tune: FASTRES_TUNE=0 or deterministic mode is on: choices are pinned, "
             "nothing to tune.")
        return 0
    try:
        net = (get_model(model, weights=state) if state is not None
               else get_model(model, num_classes=num_classes))
    except (ValueError, RuntimeError) as exc:
        if state is None:
            raise TuneUsageError(str(exc)) from exc
        from fastres.classify import describe_mismatch

        msg = describe_mismatch(model, state, repr(weights))
        raise TuneUsageError(msg.replace("pass --model ", "give MODEL as ")) from exc
    if dev.type not in _backend._TUNED_DEVICE_TYPES:
        echo(f"fastres tune: {dev.type} calls are not tuned (fastres times implementations "
             "on CUDA GPUs; other devices run a fixed choice): nothing to tune.")
        return 0
    net = net.to(dev).eval()
    # --cache-dir for this command only: FASTRES_CACHE_DIR is put back afterwards (an
    # in-process call must not move every later process-wide cache lookup)
    with environ("FASTRES_CACHE_DIR", None if cache_dir is None else str(cache_dir)):
        for name, dtype in zip(dtype_list, parsed):
            try:
                res = tuning.tune_model(net, batch_list, dtype, image_size,
                                        progress=progress)
            except Exception as exc:
                if not out_of_memory(exc):
                    raise
                raise TuneUsageError(
                    f"out of memory on {dev} tuning {model} {name} at batch "
                    f"{', '.join(map(str, batch_list))}, {image_size}px (the layers tuned "
                    "before it are saved); try a smaller --batch or --image-size") from None
            echo(f"{model} {name} batch {', '.join(map(str, batch_list))} at {image_size}px: "
                 f"tuned {res['tuned']} layer(s), {res['disk_hits']} already cached, "
                 f"{res['timed']} candidate(s) timed in {res['seconds']:.1f} s")
            if res["unsaved"]:  # (the command's point is the file: saying "cache: ..." and
                # exiting 0 told a build step that every later process would start tuned)
                print(f"fastres tune: error: {res['unsaved']} choice(s) could not be written "
                      f"to {res['cache']} ({res['write_error']}); later processes will tune "
                      "them again", file=sys.stderr)
                return 1
        echo(f"cache: {tuning.cache_path(dev)}")
    return 0


# -- argparse (the fastres CLI) ------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=str.lower, help="architecture, any case, e.g. resnet50")
    # (repeated options add up, as bench's do; the defaults are filled in by run: argparse's
    # "extend" would add to a default list)
    p.add_argument("--batch", "-b", nargs="+", action="extend", metavar="N",
                   help="batch size(s): '--batch 1 32', '--batch 1,32' or '-b 1 -b 32' "
                        "(default 1)")
    p.add_argument("--dtype", "-d", nargs="+", action="extend", choices=DTYPE_CHOICES,
                   type=str.lower,
                   help="compute dtype(s) (default bf16; fp16/bf16 run under autocast)")
    p.add_argument("--image-size", type=int, default=224, help="input height/width (224)")
    p.add_argument("--device", default="cuda", help="device to tune on (cuda)")
    p.add_argument("--num-classes", type=int, default=1000,
                   help="classifier width; the head is tuned too (1000)")
    p.add_argument("--weights", default=None,
                   help="optional checkpoint (only its num_classes matters for tuning)")
    p.add_argument("--cache-dir", default=None,
                   help="tuning cache directory (default $FASTRES_CACHE_DIR, else "
                        "$XDG_CACHE_HOME/fastres, else ~/.cache/fastres)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")


def run(args: argparse.Namespace) -> int:
    try:
        return tune_main(args.model, args.batch or ["1"], args.dtype or ["bf16"],
                         args.image_size, args.device,
                         args.num_classes, args.weights, args.cache_dir, args.progress)
    except TuneUsageError as exc:
        try:
            from fastres.classify import UserError
        except ImportError:  # pragma: no cover
            raise SystemExit(f"fastres tune: error: {exc}") from None
        raise UserError(str(exc)) from None
