"""Building ``fastres._C``: toolkit discovery, the no-toolkit install, and the missing-extension
message. Fast (a pure-Python wheel build into a temp dir, no compilation)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastres import _ext

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_py():
    """setup.py imported as a module (``setup()`` runs only as ``__main__``)."""
    spec = importlib.util.spec_from_file_location("fastres_setup_under_test", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_toolkit(root: Path, cudart: bool = True) -> Path:
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho fake nvcc\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IXUSR)
    if cudart:
        (root / "lib64").mkdir()
        (root / "lib64" / "libcudart.so.13").write_bytes(b"")
    return root


def _which_in(path_dirs):
    def which(cmd, path=None):
        return shutil.which(cmd, path=os.pathsep.join(str(p) for p in path_dirs))
    return which


def test_extension_loads_when_built():
    built = list((ROOT / "fastres").glob("_C*.so"))
    if not built:
        pytest.skip("fastres._C is not built in this checkout")
    assert _ext.available(), _ext.error()
    import torch

    for op in _ext.OPS:
        assert hasattr(torch.ops.fastres_C, op)


def test_is_cuda_home_needs_nvcc_and_cudart(setup_py, tmp_path):
    assert setup_py.is_cuda_home(str(_fake_toolkit(tmp_path / "ok")))
    assert not setup_py.is_cuda_home(str(_fake_toolkit(tmp_path / "no_rt", cudart=False)))
    (tmp_path / "empty").mkdir()
    assert not setup_py.is_cuda_home(str(tmp_path / "empty"))
    assert not setup_py.is_cuda_home(str(tmp_path / "missing"))
    assert not setup_py.is_cuda_home(None)


def test_wrapper_script_on_path_resolves_to_real_toolkit(setup_py, tmp_path):
    real = _fake_toolkit(tmp_path / "opt" / "cuda-13.0")
    wrap_bin = tmp_path / "wrap" / "bin"
    wrap_bin.mkdir(parents=True)
    wrapper = wrap_bin / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {real}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    env = {"PATH": str(wrap_bin)}
    home, how = setup_py.find_cuda_home(env, which=_which_in([wrap_bin]))
    assert home == str(real), how
    # the wrapper's own parent is no toolkit (no libcudart) and comes first in the candidates
    cands = setup_py.cuda_home_candidates(env, which=_which_in([wrap_bin]))
    assert cands.index(str(tmp_path / "wrap")) < cands.index(str(real))


@pytest.mark.parametrize("line", ['exec "${{CUDA_ROOT:-{real}}}/bin/nvcc" "$@"',
                                  'exec ${{CUDA_ROOT-{real}}}/bin/nvcc "$@"',
                                  'CUDA_ROOT=${{CUDA_ROOT:-{real}}}; exec "{real}/bin/nvcc" "$@"'],
                         ids=["quoted", "unquoted", "assigned"])
def test_wrapper_script_with_a_shell_default_resolves(setup_py, tmp_path, line):
    """A wrapper that names its toolkit as ``${VAR:-/path}`` finds /path (the brace was taken
    into the path: ``/path}/bin/nvcc``); a ``${VAR}`` alone names nothing."""
    real = _fake_toolkit(tmp_path / "opt" / "cuda-12.4")
    wrap_bin = tmp_path / "wrap" / "bin"
    wrap_bin.mkdir(parents=True)
    wrapper = wrap_bin / "nvcc"
    wrapper.write_text("#!/bin/sh\n" + line.format(real=real) + "\n")
    wrapper.chmod(0o755)
    assert setup_py._nvcc_script_targets(str(wrapper)) == [f"{real}/bin/nvcc"]
    home, how = setup_py.find_cuda_home({"PATH": str(wrap_bin)}, which=_which_in([wrap_bin]))
    assert home == str(real), how
    wrapper.write_text('#!/bin/sh\nexec "${CUDA_ROOT}/bin/nvcc" "$@"\n')
    assert setup_py._nvcc_script_targets(str(wrapper)) == []


def test_symlinked_nvcc_resolves(setup_py, tmp_path):
    real = _fake_toolkit(tmp_path / "toolkit")
    link_bin = tmp_path / "links"
    link_bin.mkdir()
    (link_bin / "nvcc").symlink_to(real / "bin" / "nvcc")
    home, _ = setup_py.find_cuda_home({"PATH": str(link_bin)}, which=_which_in([link_bin]))
    assert home == str(real)


def test_cuda_home_env_is_respected_or_rejected(setup_py, tmp_path):
    real = _fake_toolkit(tmp_path / "tk")
    assert setup_py.find_cuda_home({"CUDA_HOME": str(real)})[0] == str(real)
    (tmp_path / "empty").mkdir()
    home, why = setup_py.find_cuda_home({"CUDA_HOME": str(tmp_path / "empty")})
    assert home is None and "not a CUDA toolkit" in why


def test_no_toolkit_skips_and_force_fails(setup_py, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "empty"))
    monkeypatch.delenv("FASTRES_SKIP_CUDA_BUILD", raising=False)
    monkeypatch.delenv("FASTRES_FORCE_CUDA_BUILD", raising=False)
    assert setup_py.cuda_extensions() == ([], {})
    monkeypatch.setenv("FASTRES_FORCE_CUDA_BUILD", "1")
    with pytest.raises(RuntimeError, match="not a CUDA toolkit"):
        setup_py.cuda_extensions()
    monkeypatch.setenv("FASTRES_SKIP_CUDA_BUILD", "1")  # skip wins over force
    assert setup_py.cuda_extensions() == ([], {})


def test_nvidia_pip_include_dirs_exist(setup_py, tmp_path, monkeypatch):
    for d in setup_py.nvidia_pip_include_dirs():
        assert os.path.isdir(d) and d.endswith("include")
    # (the loop above checks nothing where no nvidia-* package is installed, or if the
    # function found nothing): a fake ``nvidia`` namespace over two roots, where the headers
    # of each package must be found once, and a package without headers is left out
    import types

    roots = [tmp_path / "a" / "nvidia", tmp_path / "b" / "nvidia"]
    for pkg in (roots[0] / "cu13" / "include", roots[0] / "cudnn" / "include",
                roots[1] / "nccl" / "include", roots[1] / "cublas" / "lib"):
        pkg.mkdir(parents=True)
    (roots[1] / "stray").mkdir()
    (roots[1] / "stray" / "include").write_text("a file, not a header directory")
    fake = types.ModuleType("nvidia")
    fake.__path__ = [str(r) for r in roots]
    monkeypatch.setitem(sys.modules, "nvidia", fake)
    found = setup_py.nvidia_pip_include_dirs()
    assert sorted(found) == sorted(str(d) for d in (roots[0] / "cu13" / "include",
                                                    roots[0] / "cudnn" / "include",
                                                    roots[1] / "nccl" / "include"))
    assert len(found) == len(set(found))


@pytest.mark.parametrize("arch_list", [None, "8.0;9.0a", "8.0 9.0a"])
def test_arch_list_reaches_nvcc_whatever_the_include_dirs(setup_py, tmp_path, monkeypatch,
                                                          arch_list):
    """``TORCH_CUDA_ARCH_LIST`` becomes explicit -gencode flags, also when an include dir of
    the nvidia pip packages has "arch" in its path (``/research/``): torch then adds no flags
    of its own, and the list was silently ignored. Unset: the default targets."""
    from torch.utils import cpp_extension

    made = {}
    monkeypatch.setattr(cpp_extension, "CUDAExtension", lambda **kw: made.update(kw) or kw)
    monkeypatch.setattr(setup_py, "nvidia_pip_include_dirs",
                        lambda: [str(tmp_path / "research" / "venv" / "include")])
    monkeypatch.setenv("CUDA_HOME", str(_fake_toolkit(tmp_path / "cuda")))
    for var in ("FASTRES_SKIP_CUDA_BUILD", "FASTRES_FORCE_CUDA_BUILD", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(var, raising=False)
    if arch_list is not None:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    exts, _ = setup_py.cuda_extensions()
    assert len(exts) == 1
    nvcc = made["extra_compile_args"]["nvcc"]
    assert any("research" in f for f in nvcc)  # (the case: a flag with "arch" in it)
    assert cpp_extension._get_cuda_arch_flags(nvcc) == []  # so torch adds nothing: ours count
    gencode = [f for f in nvcc if f.startswith("-gencode")]
    if arch_list is None:
        assert gencode == setup_py.DEFAULT_GENCODE
    else:
        assert sorted(gencode) == ["-gencode=arch=compute_80,code=sm_80",
                                   "-gencode=arch=compute_90a,code=sm_90a"]
    assert os.environ.get("TORCH_CUDA_ARCH_LIST") == arch_list  # (put back as it was)


def test_a_bad_arch_list_is_refused(setup_py, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "4.2")
    with pytest.raises(ValueError, match=r"Unknown CUDA arch \(4\.2\)"):
        setup_py.gencode_flags()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "4.2"


# The snippet run in a fresh interpreter: the package imports and works without _C, and the
# first op that would have used CUDA says once that it runs without the extension.
_CHECK_MISSING = textwrap.dedent("""
    import warnings, torch
    import fastres
    from fastres import _ext
    from fastres.ops import _backend
    from fastres.ops.preprocess import preprocess
    assert not _ext.available(), "extension unexpectedly loaded"
    assert _ext.error()
    img = torch.randint(0, 256, (1, 4, 5, 3), dtype=torch.uint8)
    assert preprocess(img).shape == (1, 3, 4, 5)          # works on the CPU reference
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):  # a CUDA call would have used the extension (device only is asked)
            impl = _backend.choose("preprocess", torch.device("cuda"), img, "NHWC",
                                   [0.5] * 3, [0.5] * 3, torch.float32)
            assert impl.backend == "torch"
    msgs = [str(w.message) for w in caught if "extension" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert "fused stem" in msgs[0] and "instead" in msgs[0], msgs  # which ops, and what runs
    print("MSG:", msgs[0])
""")


def _env_for_subprocess(**extra):
    env = dict(os.environ)
    env["FASTRES_BACKEND"] = "auto"
    env.update(extra)
    return env


def test_disabled_extension_says_once():
    """Runtime side of a missing extension, simulated with FASTRES_DISABLE_EXTENSION."""
    r = subprocess.run([sys.executable, "-c", _CHECK_MISSING], cwd=ROOT, capture_output=True,
                       check=False,
                       text=True, timeout=120,
                       env=_env_for_subprocess(FASTRES_DISABLE_EXTENSION="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "MSG:" in r.stdout and "FASTRES_DISABLE_EXTENSION" in r.stdout


@pytest.mark.parametrize("value", ["false", "No", " off "])
def test_disable_extension_off_values_keep_it(value):
    """FASTRES_DISABLE_EXTENSION is read as setup.py reads its switches: ``false``, ``no`` and
    ``off`` leave the extension enabled (they disabled it). Where the extension is not built,
    the reason it does not load must not be the variable."""
    from fastres import _ext

    built = _ext.available()
    code = "from fastres import _ext; print('AVAILABLE', _ext.available(), _ext.error())"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, check=False,
                       env=_env_for_subprocess(FASTRES_DISABLE_EXTENSION=value))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "disabled by FASTRES_DISABLE_EXTENSION" not in r.stdout, r.stdout
    if built:
        assert "AVAILABLE True" in r.stdout, r.stdout


def test_install_without_toolkit(tmp_path):
    """``pip install`` with FASTRES_SKIP_CUDA_BUILD=1 from a clean copy of the sources (no
    compiled files) gives a package that imports, works, and says once it lacks _C."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "fastres", src / "fastres",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    target = tmp_path / "site"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
         "--no-index", "--quiet", "--target", str(target), str(src)],
        capture_output=True, check=False, text=True, timeout=240,
        env=_env_for_subprocess(FASTRES_SKIP_CUDA_BUILD="1", PIP_DISABLE_PIP_VERSION_CHECK="1"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert not list(target.glob("fastres/_C*.so"))
    # every module and subpackage (fastres/ops, fastres/kernels, ...) is installed, and the
    # ``fastres`` console script is declared
    def modules(root: Path) -> set[str]:
        return {p.relative_to(root).as_posix() for p in (root / "fastres").rglob("*.py")
                if "__pycache__" not in p.parts}
    assert modules(target) == modules(ROOT)
    (entry_points,) = target.glob("fastres-*.dist-info/entry_points.txt")
    assert re.search(r"^fastres = fastres\.cli:main$", entry_points.read_text(), re.M)
    # An editable install of this checkout puts a finder on sys.meta_path that would win over
    # PYTHONPATH: drop it, and check the temp install is what gets imported.
    prelude = textwrap.dedent(f"""
        import sys
        sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        import fastres
        assert fastres.__file__.startswith({str(target)!r}), fastres.__file__
    """)
    r = subprocess.run([sys.executable, "-c", prelude + _CHECK_MISSING], cwd=tmp_path,
                       capture_output=True, check=False, text=True, timeout=120,
                       env=_env_for_subprocess(PYTHONPATH=str(target)))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "fastres._C is not available" in r.stdout
    # the command line runs from the installed copy (``python -m fastres``, as the script does)
    cli = prelude + textwrap.dedent("""
        import runpy
        for argv in (["--help"], ["bench", "--help"], ["--version"]):
            sys.argv = ["fastres", *argv]
            try:
                runpy.run_module("fastres", run_name="__main__", alter_sys=True)
            except SystemExit as exc:
                assert exc.code in (0, None), (argv, exc.code)
            else:
                raise AssertionError(f"{argv}: no exit")
    """)
    r = subprocess.run([sys.executable, "-c", cli], cwd=tmp_path, capture_output=True,
                       check=False, text=True, timeout=120,
                       env=_env_for_subprocess(PYTHONPATH=str(target)))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "usage: fastres bench" in r.stdout, r.stdout
    assert re.search(r"^fastres \d+\.\d+", r.stdout, re.M), r.stdout  # --version


def _sdist_files(tmp_path: Path, **env) -> set[str]:
    """The sdist's file list (relative paths), as setuptools computes it for ``sdist``, without
    building the tarball or writing into the checkout (``egg_info -e`` puts SOURCES.txt in
    ``tmp_path``)."""
    r = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "-e", str(tmp_path)],
                       cwd=ROOT, capture_output=True, check=False, text=True, timeout=240,
                       env=_env_for_subprocess(**env))
    assert r.returncode == 0, r.stdout + r.stderr
    (sources,) = tmp_path.glob("*.egg-info/SOURCES.txt")
    return set(sources.read_text().split())


def test_sdist_has_what_the_build_needs(tmp_path):
    """The sdist builds the extension and the package: every csrc/ file (the ``#include "..."``
    headers too, which setuptools does not find by itself, and csrc/ at all when the sdist is
    made without torch or with FASTRES_SKIP_CUDA_BUILD=1, the case checked here), every module
    of the package, the files setup.py and pyproject.toml read, and no compiled leftovers."""
    files = _sdist_files(tmp_path, FASTRES_SKIP_CUDA_BUILD="1")
    want = {"setup.py", "pyproject.toml", "README.md", "MANIFEST.in"}
    spec = importlib.util.spec_from_file_location("fastres_setup_sources", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    want |= set(mod.SOURCES)
    for src in (ROOT / "csrc").iterdir():
        if src.suffix in (".cu", ".cuh", ".cpp", ".h", ".hpp"):
            want.add(f"csrc/{src.name}")
            for inc in re.findall(r'^\s*#\s*include\s+"([^"]+)"', src.read_text(), re.M):
                if (ROOT / "csrc" / inc).exists():
                    want.add(f"csrc/{inc}")
    want |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "fastres").rglob("*.py")
             if "__pycache__" not in p.parts}
    want |= {p.name for p in ROOT.glob("LICEN[CS]E*")}
    assert not want - files, sorted(want - files)
    assert not [f for f in files if f.endswith((".so", ".pyc", ".o"))], sorted(files)
    # the tests and benchmarks come along, so an unpacked sdist can be checked
    assert "tests/conftest.py" in files and "benchmarks/gpu_check.sh" in files
