"""Test setup shared by every test file.

Without a GPU, Triton kernels run under the interpreter: ``TRITON_INTERPRET=1`` must be set
before ``triton`` is first imported, so it is set here, at collection time. On such a machine
the default backend for the model tests is the plain-torch reference (interpreted Triton on a
whole ResNet would take hours); Triton tests ask for ``use_backend("triton")`` explicitly. On
a GPU machine nothing is overridden: the model tests then run the fast path.
"""

import os
import zlib

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("FASTRES_BACKEND", "torch")

import pytest  # noqa: E402

# The property tests' hypothesis is in the test extra (`pip install -e ".[test]"`).
from hypothesis import settings  # noqa: E402

# Hypothesis's own "ci" profile (loaded when a CI variable such as CI=true is set) derandomizes:
# every run would draw the same examples. Ours draws new ones each run, from the run's salt
# (FASTRES_TEST_SEED, see pytest_configure), and keeps no example database.
settings.register_profile("fastres", derandomize=False, database=None, deadline=None,
                          print_blob=True)
settings.load_profile("fastres")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)  # before hypothesis's plugin reads its seed option
def pytest_configure(config):
    # one salt per run, drawn here (before pytest-xdist starts its workers, which inherit it)
    os.environ.setdefault("FASTRES_TEST_SEED", str(torch.seed() % (2**31)))
    if getattr(config.option, "hypothesis_seed", "") is None:
        # the property tests' examples follow the salt too (--hypothesis-seed overrides it)
        config.option.hypothesis_seed = os.environ["FASTRES_TEST_SEED"]
    if not HAS_CUDA:  # every Triton test would fail the same obscure way: say why, once
        from fastres.ops._backend import interpreter_problem

        problem = interpreter_problem()
        if problem is not None:
            pytest.exit(f"fastres tests need Triton's interpreter here, and {problem}",
                        returncode=pytest.ExitCode.USAGE_ERROR)


def pytest_terminal_summary(terminalreporter):
    # printed under -q too (a report header is not), next to the failures it would repeat
    terminalreporter.write_line(
        f"fastres test seed: FASTRES_TEST_SEED={os.environ['FASTRES_TEST_SEED']} "
        "(set it to draw the same inputs again)")


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """A fresh seed per test: the run's salt (``FASTRES_TEST_SEED``, new each run unless set,
    printed at the end of the run) mixed with a stable hash of the test's id, so inputs differ
    from run to run and a failing run can be repeated exactly."""
    salt = int(os.environ["FASTRES_TEST_SEED"])
    torch.manual_seed((zlib.crc32(request.node.nodeid.encode()) ^ salt) % (2**31))
    yield


def fresh_seed_args() -> list[str]:
    """``--seed N`` for a command line (fastres's CLI, the benchmark scripts), N drawn from the
    test's seed: fresh weights and inputs every run."""
    return ["--seed", str(int(torch.randint(0, 2**31, ())))]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (NaN if either has a NaN where the other has not)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(out64.shape)} != reference {tuple(ref64.shape)}")
    if not torch.equal(torch.isnan(out64), torch.isnan(ref64)):
        return float("nan")
    mask = ~torch.isnan(ref64)
    num = torch.linalg.vector_norm((out64 - ref64)[mask])
    den = torch.linalg.vector_norm(ref64[mask]).clamp_min(1e-30)
    return float(num / den)


def assert_close_rel(out, ref, tol: float, what: str = "output") -> None:
    """Assert relative error ``<= tol``; on failure say where the worst element is."""
    err = rel_err(out, ref)
    margins = os.environ.get("FASTRES_MARGIN_LOG")
    if margins and tol > 0:  # how close each check came to its bound (err/tol): thin margins
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
        with open(margins, "a", encoding="utf-8") as f:
            f.write(f"{err / tol:.3f}\t{err:.3e}\t{tol:.3e}\t{test}\t{what}\n")
    if not (err <= tol):
        diff = (out.detach().double().cpu() - ref.detach().double().cpu()).abs()
        diff = torch.nan_to_num(diff, nan=float("inf"))
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{what}: relative error {err:.3e} > {tol:.1e}; worst at index {idx}: "
            f"got {out[idx].item()!r}, expected {ref[idx].item()!r}"
        )


def in_layout(t: torch.Tensor, how: str, gen: torch.Generator | None = None) -> torch.Tensor:
    """``t``'s values (a 4-D tensor) in the memory layout ``how``, on ``t``'s device:

    - ``"contig"``: dense in its logical (NCHW) order; ``"cl"``: channels-last;
    - ``"strided"``, ``"strided_cl"``: every dimension strided by 2 at an offset of 1 element, in
      the logical resp. channels-last order; the gaps hold NaN (random bytes from ``gen`` for
      uint8), so a read outside the view shows;
    - ``"strided_w"``: only the last dimension strided by 2 (every other element of a
      twice-as-wide buffer, from its first element); the gaps are uninitialized;
    - ``"expand"``: a stride-0 batch, every image ``t``'s first (zeros for an empty batch), as
      from ``x[:1].expand``.
    """
    if how == "contig":
        return t.contiguous()
    if how == "cl":
        return t.contiguous(memory_format=torch.channels_last)
    if how == "expand":
        first = t[:1] if t.shape[0] else torch.zeros((1, *t.shape[1:]), dtype=t.dtype,
                                                      device=t.device)
        return first.expand(t.shape)
    if how == "strided_w":
        wide = torch.empty(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype, device=t.device)
        view = wide[..., ::2]
        view.copy_(t)
        return view
    if how not in ("strided", "strided_cl"):
        raise ValueError(f"in_layout: unknown layout {how!r}")
    perm = (0, 1, 2, 3) if how == "strided" else (0, 2, 3, 1)
    shape = [2 * t.shape[d] + 1 for d in perm]
    if t.dtype == torch.uint8:  # drawn on the CPU (``gen`` is a CPU generator), then moved
        big = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).to(t.device)
    else:
        big = torch.full(shape, float("nan"), dtype=t.dtype, device=t.device)
    inv = sorted(range(4), key=perm.__getitem__)
    view = big.permute(inv)[1::2, 1::2, 1::2, 1::2]
    view.copy_(t)
    assert view.shape == t.shape
    return view


def pytest_runtest_logreport(report):
    """Progress records for runs under a wall-clock cap (the GPU check), which may be cut short
    before pytest writes its junit XML:

    - ``FASTRES_FAILURE_LOG=FILE``: each failure appended as it happens (node id, phase,
      duration, the last lines of the report);
    - ``FASTRES_RESULT_LOG=FILE``: one tab-separated line per test phase (node id, phase,
      outcome, seconds), for finding where the time goes.
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return  # under xdist the controller writes (it also sees workers that crashed)
    results = os.environ.get("FASTRES_RESULT_LOG")
    if results and (report.when == "call" or not report.passed):
        with open(results, "a", encoding="utf-8") as f:
            f.write(f"{report.nodeid}\t{report.when}\t{report.outcome}\t{report.duration:.2f}\n")
    path = os.environ.get("FASTRES_FAILURE_LOG")
    if not path or not report.failed:
        return
    lines = str(report.longrepr).splitlines()
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"=== {report.nodeid} ({report.when}, {report.duration:.1f} s)\n")
        f.write("\n".join(lines[-40:]) + "\n\n")


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts the calls that reach each Triton launcher (``conv``, ``pool``, ``head``)."""
    import fastres.kernels.triton_impls as impls

    counts = {"conv": 0, "pool": 0, "head": 0}

    def wrap(name, key):
        real = getattr(impls, name)

        def counting(*args, **kwargs):
            counts[key] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(impls, name, counting)

    wrap("conv_bias_act_triton", "conv")
    wrap("max_pool2d_triton", "pool")
    wrap("avgpool_linear_triton", "head")
    return counts
