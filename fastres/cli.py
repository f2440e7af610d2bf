"""The ``fastres`` command line (``fastres ...`` or ``python -m fastres ...``).

Subcommands: ``bench`` (fastres vs torchvision / torch.compile, outputs checked first),
``verify`` (side-by-side correctness on random batches and real photographs), ``classify``
(top-k ImageNet classes of image files with a local checkpoint).

The CLI is thin: the work is in :mod:`fastres.bench`, :mod:`fastres.verify` and
:mod:`fastres.classify`. Exit status: 0 success; 1 a check failed (outputs disagree); 2 a
usage error (bad option, missing or unreadable file, wrong checkpoint), reported on stderr in
one ``fastres <cmd>: error: ...`` line without a traceback (after the usage lines, for an
option argparse itself refuses).

Adding a subcommand: write ``add_arguments(parser)`` and ``run(args) -> int`` and call
:func:`register_command` -- here, next to the built-in ones, or from a module listed in
``PLUGIN_MODULES`` that defines ``register_cli(register_command)`` (imported when present,
so an optional part of fastres can add its command without editing this file).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fastres.classify import DTYPES, UserError

PROG = "fastres"
# Optional modules that may add subcommands (each defines register_cli(register_command)).
PLUGIN_MODULES = ("fastres.tuning",)
WEIGHTS_HELP = ("a local torchvision checkpoint (torch.save or safetensors), or the name of "
                "torchvision's weights (IMAGENET1K_V2, DEFAULT) read from torchvision's cache; "
                "nothing is downloaded")


@dataclass
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None


COMMANDS: dict[str, Command] = {}


def register_command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                     run: Callable[[argparse.Namespace], int],
                     description: str | None = None) -> None:
    """Add (or replace) subcommand ``name``; ``run(args)`` returns the exit status."""
    COMMANDS[name] = Command(name, help, add_arguments, run, description)


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports errors as ``fastres <cmd>: error: ...`` with exit status 2."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _model_list(values: Sequence[str]) -> list[str]:
    from fastres.models import MODEL_NAMES

    names = [v.strip() for value in values for v in value.split(",") if v.strip()]
    if not names:
        raise UserError(f"no model given; expected one of {', '.join(MODEL_NAMES)}")
    for n in names:
        if n not in MODEL_NAMES:
            raise UserError(f"unknown model {n!r}; expected one of {', '.join(MODEL_NAMES)}")
    return list(dict.fromkeys(names))


def _int_list(values: Sequence[str], what: str) -> list[int]:
    out = []
    for value in values:
        for v in str(value).split(","):
            if not v.strip():
                continue
            try:
                n = int(v)
            except ValueError:
                raise UserError(f"{what} must be integers, got {v!r}") from None
            if n < 1:
                raise UserError(f"{what} must be >= 1, got {n}")
            out.append(n)
    return list(dict.fromkeys(out))


def _dtype_list(values: Sequence[str]) -> list:
    from fastres.classify import parse_dtype

    names = [v for value in values for v in value.split(",") if v.strip()]
    if not names:
        raise UserError("no dtype given; expected fp32, fp16 or bf16")
    return list(dict.fromkeys(parse_dtype(n) for n in names))


_MAX_SEED = 2**53  # torch.manual_seed takes < 2**64; bench derives seed * 1000 + batch


def _check_seed(seed: int) -> int:
    if not 0 <= seed < _MAX_SEED:
        raise UserError(f"--seed must be in [0, 2**53), got {seed}")
    return seed


def _writable_dir(path: str, what: str) -> str:
    """Make ``path`` a directory (or check it is one) before any work is done."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{what} {path!r} cannot be used as a directory ({exc.strerror})") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"{what} {path!r} is not writable")
    return path


def _writable_file(path: str, what: str) -> str:
    """Check that ``path`` can be written (its directory exists) before any work is done.

    The file is really opened for appending (``os.access`` says yes to root everywhere, also
    on read-only file systems and in /proc); a file this creates is removed again.
    """
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UserError(f"{what} {path!r} cannot be written (is its directory there and "
                        "writable?)")
    existed = os.path.lexists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        raise UserError(f"{what} {path!r} cannot be written ({exc.strerror})") from None
    if not existed:
        with contextlib.suppress(OSError):
            os.remove(path)
    return path


def _check_weights(path: str | None, model: str | None = None) -> None:
    """``--weights`` must be a checkpoint file, or the name of torchvision weights
    (``IMAGENET1K_V2``) whose file torchvision keeps; a missing one is refused before any
    work, with fastres's hint for such a name."""
    from fastres.models import torchvision_weights_file

    if path is None or os.path.isfile(path) or torchvision_weights_file(path, model):
        return
    if os.path.isdir(path):
        raise UserError(f"weights file {path!r} is a directory, expected a checkpoint file")
    from fastres.classify import in_cli_words, load_checkpoint

    try:
        load_checkpoint(path, model)
    except UserError as exc:
        raise UserError(in_cli_words(str(exc))) from None
    raise UserError(f"weights file {path!r} does not exist")  # pragma: no cover


def _check_fits_every_model(path: str, models: list[str]) -> None:
    """One checkpoint file for several models must fit each of them: refused before any
    work (it was found out only when that model's turn came, after the others ran)."""
    import torch

    from fastres.classify import describe_mismatch, in_cli_words, load_checkpoint
    from fastres.models import get_model

    sd = load_checkpoint(path)
    for name in models:
        try:
            # (shapes and keys only: nothing is allocated, and the copy into meta tensors,
            # which torch warns is a no-op, is not wanted)
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                get_model(name, weights=sd)
        except (ValueError, RuntimeError):
            raise UserError(in_cli_words(describe_mismatch(name, sd, repr(path)))) from None


def _check_number(value: float | None, what: str, minimum: float = 0.0,
                  strict: bool = False) -> None:
    """A float option that must be a number ``>= minimum`` (``> minimum`` when ``strict``)."""
    if value is None:
        return
    if value != value or (value <= minimum if strict else value < minimum):
        raise UserError(f"{what} must be {'>' if strict else '>='} {minimum:g}, got {value}")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="auto (CUDA if there is a GPU, else CPU), cpu, cuda or cuda:N "
                        "(default: auto)")


# -- bench -------------------------------------------------------------------------------------


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    from fastres.bench import CPU_DEFAULTS, GPU_DEFAULTS

    def d(key):
        return f"GPU: {GPU_DEFAULTS[key]}, CPU: {CPU_DEFAULTS[key]}"

    p.add_argument("-m", "--model", "--models", dest="models", action="append", metavar="NAME",
                   type=str.lower,
                   help=f"model(s), any case, repeat or comma-separate (default: {d('models')})")
    # (extend: a repeated -b or --dtype adds to the list, as a repeated -m does)
    p.add_argument("-b", "--batch-size", "--batch-sizes", dest="batch_sizes", nargs="+",
                   action="extend", metavar="N",
                   help=f"batch sizes, repeat to add (default: {d('batch_sizes')})")
    p.add_argument("--dtype", "--dtypes", dest="dtypes", nargs="+", action="extend",
                   metavar="DTYPE", help=f"fp32, fp16, bf16 (default: {d('dtypes')})")
    p.add_argument("--image-size", type=int, help=f"input height = width (default: "
                   f"{GPU_DEFAULTS['image_size']})")
    p.add_argument("--iters", type=int, help=f"timed calls per measurement ({d('iters')})")
    p.add_argument("--warmup", type=int, help=f"untimed calls first ({d('warmup')})")
    p.add_argument("--max-time", type=float,
                   help=f"seconds per measurement before stopping early, at least 5 calls "
                        f"timed ({d('max_time')})")
    p.add_argument("--rounds", type=int,
                   help=f"split the timed calls into this many rounds, every implementation "
                        f"of a group timed once per round in turn ({d('rounds')})")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="time torch.compile (default: on with a GPU, off on the CPU)")
    p.add_argument("--max-autotune", action="store_true",
                   help="also time torch.compile(mode='max-autotune-no-cudagraphs') (slow to "
                        "compile; without CUDA graphs, a baseline of plain fastres)")
    p.add_argument("--compile-freezing", action="store_true",
                   help="also time torch.compile with inductor's freezing option (BatchNorm "
                        "folded into constant weights, as fastres folds it); fastres's 'x "
                        "compile' is against the fastest compile row without CUDA graphs")
    p.add_argument("--compile-reduce-overhead", action="store_true",
                   help="also time torch.compile(mode='reduce-overhead') (CUDA graphs: the "
                        "baseline of fastres + CUDA graphs, whose 'x compile' is '-' without "
                        "it)")
    p.add_argument("--compile-models", action="append", metavar="NAME", type=str.lower,
                   help="only these models (any case, repeat or comma-separate) get the "
                        "compile baseline (default: all; turns --compile on unless "
                        "--no-compile is given)")
    p.add_argument("--compile-budget", type=float, metavar="SECONDS",
                   help="stop compiling new shapes after this many seconds of compiling")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="time fastres.optimize(model, cuda_graphs=True) too (default: on)")
    p.add_argument("--tune", action=argparse.BooleanOptionalAction, default=True,
                   help="run fastres.tuning.tune_model before timing on a GPU (default: on)")
    p.add_argument("--weights", metavar="FILE",
                   help=WEIGHTS_HELP + " (default: random weights with realistic BatchNorm "
                        "statistics); with several models, every model loads the file, or "
                        "its own weights of that name")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="skip (not time) the groups that would start after this many seconds")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads (default: torch's, fewer if other processes keep cores "
                        "busy)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--out", metavar="DIR", help="write bench.json, bench.md, bench.png there")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_device(p)


def _bench_run(args: argparse.Namespace) -> int:
    from fastres.bench import (
        CPU_DEFAULTS,
        GPU_DEFAULTS,
        BenchConfig,
        format_table,
        run_bench,
        write_outputs,
    )
    from fastres.classify import parse_device

    device = parse_device(args.device)
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS

    def pick(name):
        value = getattr(args, name)
        return defaults[name] if value is None else value

    models = _model_list(args.models) if args.models else list(defaults["models"])
    batch_sizes = (_int_list(args.batch_sizes, "batch sizes") if args.batch_sizes
                   else list(defaults["batch_sizes"]))
    dtypes = _dtype_list(args.dtypes if args.dtypes else defaults["dtypes"])
    compile_models = _model_list(args.compile_models) if args.compile_models else None
    for name in models:  # (a torchvision weights name is a file per model)
        _check_weights(args.weights, name)
    if len(models) > 1 and args.weights is not None and os.path.isfile(args.weights):
        _check_fits_every_model(args.weights, models)
    _check_number(args.max_time, "--max-time", strict=True)
    _check_number(args.compile_budget, "--compile-budget")
    _check_number(args.time_budget, "--time-budget")
    _check_seed(args.seed)
    if args.out is not None:  # ("" is no directory: it was ignored, nothing written)
        if not args.out.strip():
            raise UserError("--out must name a directory, got an empty string")
        _writable_dir(args.out, "--out")
    cfg = BenchConfig(
        models=models, batch_sizes=batch_sizes, dtypes=dtypes, device=device,
        image_size=pick("image_size"), iters=pick("iters"), warmup=pick("warmup"),
        max_time=pick("max_time"), rounds=pick("rounds"), compile=pick("compile"),
        max_autotune=args.max_autotune,
        compile_freezing=args.compile_freezing,
        compile_reduce_overhead=args.compile_reduce_overhead,
        compile_models=compile_models, compile_budget=args.compile_budget,
        cuda_graphs=args.cuda_graphs, tune=args.tune, weights=args.weights,
        time_budget=args.time_budget, seed=args.seed, progress=not args.no_progress,
        threads=args.threads, command=_command_line(),
    )
    if ((cfg.max_autotune or cfg.compile_freezing or cfg.compile_reduce_overhead
         or compile_models)
            and args.compile is None):
        cfg.compile = True  # asking for compile rows asks for compile (also on the CPU)
    out_dir = args.out

    def checkpoint(report):
        if out_dir:
            write_outputs(report, out_dir, png=False)

    # `timeout` (the GPU check's stage caps) sends SIGTERM: stop like Ctrl-C, so the rows
    # measured so far are written (bench.json, bench.md, bench.png) before the process ends
    with _sigterm_as_keyboard_interrupt():
        report = run_bench(cfg, on_update=checkpoint)
    written = write_outputs(report, out_dir) if out_dir else []
    print(format_table(report))
    for path in written:
        print(f"wrote {path}")
    if report.interrupted:
        print(f"{PROG} bench: interrupted; the results above are partial", file=sys.stderr)
        return 130
    if not report.ok:
        return 1
    if out_dir and report.output_error:  # the run was fine, but --out did not get it
        print(f"{PROG} bench: error: {report.output_error}", file=sys.stderr)
        return 2
    if not report.checked:  # (a gate on bench must not pass having compared nothing)
        print(f"{PROG} bench: error: no fastres output was compared with torchvision (every "
              "group skipped: see the table)", file=sys.stderr)
        return 1
    return 0


_ARGV: list[str] = []  # the arguments main() parsed, for reports


def _command_line() -> str:
    """The command as given (``fastres bench ...``), for the report."""
    import shlex

    return " ".join(shlex.quote(a) for a in [PROG, *_ARGV])


@contextlib.contextmanager
def _sigterm_as_keyboard_interrupt():
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- verify ------------------------------------------------------------------------------------


def _verify_arguments(p: argparse.ArgumentParser) -> None:
    from fastres.models import MODEL_NAMES

    p.add_argument("-m", "--model", default="resnet50", metavar="NAME", type=str.lower,
                   help=f"one of {', '.join(MODEL_NAMES)}, any case (default: resnet50)")
    p.add_argument("--dtype", default="fp32", type=str.lower,
                   help=f"{', '.join(DTYPES)} (default: fp32)")
    p.add_argument("-b", "--batch-size", type=int, default=8, help="default: 8")
    p.add_argument("--batches", type=int, default=8,
                   help="random batches to compare (default: 8)")
    p.add_argument("--image-size", type=int, default=224,
                   help="random batches' height = width (default: 224; photos are always 224)")
    p.add_argument("--weights", metavar="FILE",
                   help=WEIGHTS_HELP + " (default: random weights with realistic BatchNorm "
                        "statistics)")
    p.add_argument("--no-photos", action="store_true",
                   help="skip scikit-image's sample photographs")
    p.add_argument("--tol", type=float, metavar="REL",
                   help="the base bound on relative error (default: fp32 1e-5, TF32 2e-3, "
                        "fp16/bf16 2e-2); a batch passes below max(REL, 2 x eager PyTorch's "
                        "own error in the same dtype): never tighter than twice eager's error")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    _add_device(p)


def _verify_run(args: argparse.Namespace) -> int:
    import json

    from fastres.bench import _finite
    from fastres.classify import parse_device, parse_dtype
    from fastres.verify import out_of_memory, short_error, verify

    _model_list([args.model])
    dtype = parse_dtype(args.dtype)
    device = parse_device(args.device)
    _check_weights(args.weights, args.model)
    if args.image_size < 32:
        raise UserError(f"--image-size must be at least 32, got {args.image_size}")
    _check_seed(args.seed)
    if args.tol is not None and not 0 < args.tol < math.inf:
        raise UserError(f"--tol must be > 0 and finite, got {args.tol}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.batch_size * 3 * args.image_size ** 2 > 2**62:  # (torch's sizes are int64)
        raise UserError(f"--batch-size {args.batch_size} at --image-size {args.image_size} "
                        "is more input than a tensor can hold")
    if args.batches < 0:
        raise UserError(f"--batches must be >= 0, got {args.batches}")
    if args.batches == 0 and args.no_photos:
        raise UserError("nothing to compare: --batches 0 and --no-photos")
    if args.json is not None:  # ("" is no file: it was ignored, nothing written)
        if not args.json.strip():
            raise UserError("--json must name a file, got an empty string")
        _writable_file(args.json, "--json")
    try:
        result = verify(args.model, dtype, batch_size=args.batch_size, batches=args.batches,
                        image_size=args.image_size, device=device, weights=args.weights,
                        photos=not args.no_photos, seed=args.seed, tolerance=args.tol,
                        progress=sys.stderr.isatty())
    except (MemoryError, RuntimeError) as exc:
        if not out_of_memory(exc):
            raise
        raise UserError(f"out of memory on {device} for --batch-size {args.batch_size} at "
                        f"--image-size {args.image_size} ({short_error(exc, 120)}): choose "
                        "smaller ones") from None
    print(result.format())
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(_finite(result.to_json()), f, indent=1, default=str, allow_nan=False)
        except OSError as exc:
            raise UserError(f"--json {args.json!r} could not be written ({exc.strerror}); "
                            "the results are above") from None
    return 0 if result.ok else 1


# -- classify ----------------------------------------------------------------------------------


def _classify_arguments(p: argparse.ArgumentParser) -> None:
    from fastres.models import MODEL_NAMES

    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any PIL format)")
    p.add_argument("--weights", required=True, metavar="FILE",
                   help="--model's weights: " + WEIGHTS_HELP)
    p.add_argument("-m", "--model", default="resnet50", metavar="NAME", type=str.lower,
                   help=f"one of {', '.join(MODEL_NAMES)}, any case (default: resnet50)")
    p.add_argument("-k", "--topk", type=int, default=5,
                   help="classes per image (default: 5; more than the model has lists them all)")
    p.add_argument("--dtype", default="fp32", type=str.lower,
                   help=f"{', '.join(DTYPES)} (default: fp32)")
    _add_device(p)


def _classify_run(args: argparse.Namespace) -> int:
    from fastres.classify import classify, format_predictions, parse_device, parse_dtype

    _model_list([args.model])
    dtype = parse_dtype(args.dtype)
    device = parse_device(args.device)
    _check_weights(args.weights, args.model)
    preds = classify(args.images, args.weights, args.model, args.topk, device, dtype)
    print(format_predictions(preds))
    return 0


register_command(
    "bench", "time fastres against torchvision eager, AMP + channels_last and torch.compile",
    _bench_arguments, _bench_run,
    description="Check that fastres agrees with torchvision on the same input, then time it "
                "against eager fp32, eager AMP + channels_last and torch.compile (same run, "
                "same inputs). Without a GPU: ResNet-50 on the CPU, about a minute. Exit 1 if "
                "any fastres output disagrees (those rows are FAILED and not timed), or if "
                "no fastres output was compared (every group skipped).")
register_command(
    "verify", "compare fastres with torchvision on random batches and real photographs",
    _verify_arguments, _verify_run,
    description="Run fastres and torchvision side by side; print max/mean relative error and "
                "top-1/top-5 agreement. Exit 1 if a batch's relative error is above max(base "
                "bound, 2 x eager PyTorch's own error in that dtype); see --tol.")
register_command(
    "classify", "top-k ImageNet classes of image files with a local checkpoint",
    _classify_arguments, _classify_run,
    description="Classify images with a torchvision checkpoint (resize 256, center crop 224, "
                "ImageNet normalization), printing class names and probabilities.")


def _load_plugins() -> None:
    for name in PLUGIN_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        except Exception as exc:  # a broken optional part must not break the other commands
            print(f"{PROG}: warning: {name} failed to import ({type(exc).__name__}: {exc}); "
                  "its subcommands are unavailable", file=sys.stderr)
            continue
        hook = getattr(module, "register_cli", None)
        if callable(hook):
            hook(register_command)


def build_parser() -> argparse.ArgumentParser:
    import fastres

    _load_plugins()
    parser = _ArgumentParser(prog=PROG, description="fastres: a drop-in, faster torchvision "
                             "ResNet. Run a subcommand with --help for its options.")
    parser.add_argument("--version", action="version", version=f"fastres {fastres.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_ArgumentParser)
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description or cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_command=cmd)
    return parser


def _check_environment() -> None:
    """A ``FASTRES_BACKEND`` that names no backend, or a ``FASTRES_COMPILE_THREADS`` that is
    not a positive integer, is a usage error of every command (each runs models), said before
    anything runs: not a traceback from the first forward (the second is read by the tuner's
    first compile, on a GPU only)."""
    from fastres.ops._backend import get_backend

    try:
        get_backend()
    except ValueError as exc:
        raise UserError(str(exc)) from None
    # (blank is unset, as compile_threads reads it; checked first so that a command which
    # does not set it does not import the kernels' module, and Triton with it, to find out)
    if os.environ.get("FASTRES_COMPILE_THREADS", "").strip():
        from fastres.kernels._direct import compile_threads

        try:
            compile_threads()
        except ValueError as exc:
            raise UserError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastres`` console script; returns the exit status."""
    parser = build_parser()
    _ARGV[:] = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors: argparse's status (0 or 2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    cmd: Command | None = getattr(args, "_command", None)
    if cmd is None:
        parser.print_help()
        return 2
    try:
        _check_environment()
        return int(cmd.run(args) or 0)
    except UserError as exc:
        print(f"{PROG} {cmd.name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {cmd.name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
