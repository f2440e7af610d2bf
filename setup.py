"""Build script: the Python package, plus the CUDA extension ``fastres._C`` when a toolkit is found.

Install with ``pip install --no-build-isolation -e .`` (torch must come from the environment:
the extension is compiled against the torch that is installed, never a downloaded one).

Environment variables:

- ``FASTRES_SKIP_CUDA_BUILD=1``: never build the extension (the package works without it; the
  first op that would have used it on a CUDA tensor says once that it is missing).
- ``FASTRES_FORCE_CUDA_BUILD=1``: a missing CUDA toolkit is an error instead of a skip.
- ``CUDA_HOME`` / ``CUDA_PATH``: the toolkit to use. When unset, it is found here (see
  :func:`find_cuda_home`) and set *before* ``torch.utils.cpp_extension`` is imported, because
  that module reads it once, at import.
- ``TORCH_CUDA_ARCH_LIST``: overrides the default targets (sm_80, sm_90, plus compute_90 PTX).
- ``MAX_JOBS``: parallel compile jobs for ninja (read by torch's ``BuildExtension``).

The toolkit-discovery helpers use only the standard library so the tests can import this file
(``setup()`` runs only when the file is executed as a script, which is how pip runs it).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "fastres._C"
SOURCES = ["csrc/ops.cpp", "csrc/host.cpp", "csrc/cublaslt_gemm.cpp", "csrc/kernels.cu"]

# sm_80 (A100) and sm_90 (H100) SASS, plus compute_90 PTX so newer GPUs can JIT it. No kernel
# uses Hopper-only (sm_90a) instructions, so no arch-specific target is built.
DEFAULT_GENCODE = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]


def _flag(name: str, environ=None) -> bool:
    environ = os.environ if environ is None else environ
    return environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _say(msg: str) -> None:
    print(f"fastres setup: {msg}", file=sys.stderr)


# -- CUDA toolkit discovery ---------------------------------------------------------------------

def is_cuda_home(path: str | None) -> bool:
    """True if ``path`` is a CUDA toolkit: it has an executable ``bin/nvcc`` and the runtime
    library (``libcudart.so*`` under ``lib64``, ``lib`` or ``targets/*/lib``)."""
    if not path or not os.path.isdir(path):
        return False
    nvcc = os.path.join(path, "bin", "nvcc")
    if not (os.path.isfile(nvcc) and os.access(nvcc, os.X_OK)):
        return False
    lib_dirs = [os.path.join(path, "lib64"), os.path.join(path, "lib")]
    lib_dirs += glob.glob(os.path.join(path, "targets", "*", "lib"))
    return any(glob.glob(os.path.join(d, "libcudart.so*")) for d in lib_dirs)


_SCRIPT_NVCC = re.compile(r"""(/[^\s"'`;|&${}]*?/bin/nvcc)(?![\w.-])""")
# ${VAR:-default} / ${VAR-default}: the default, the path a wrapper runs when VAR is unset
_SHELL_DEFAULT = re.compile(r"\$\{\w+:?-([^}]*)\}")


def _nvcc_script_targets(path: str) -> list[str]:
    """Absolute ``.../bin/nvcc`` paths named inside a wrapper script (e.g. ``exec /x/bin/nvcc``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64 * 1024)
    except OSError:
        return []
    if not head.startswith(b"#!"):
        return []
    text = _SHELL_DEFAULT.sub(r"\1", head.decode("utf-8", "replace"))
    return [m.group(1) for m in _SCRIPT_NVCC.finditer(text) if m.group(1) != path]


def cuda_home_candidates(environ=None, which=shutil.which) -> list[str]:
    """Where a toolkit may be, in order of preference (duplicates removed).

    From the ``nvcc`` on ``PATH``: its directory's parent, after resolving symbolic links, and,
    when it is a wrapper script, the parent of each ``.../bin/nvcc`` the script names; then the
    standard places (``/usr/local/cuda``, ``/usr/local/cuda-*`` newest first, ``/opt/cuda``).
    """
    environ = os.environ if environ is None else environ
    out: list[str] = []
    nvcc = which("nvcc", path=environ.get("PATH"))
    if nvcc:
        seen_nvcc = [nvcc, os.path.realpath(nvcc)]
        for target in _nvcc_script_targets(os.path.realpath(nvcc)):
            seen_nvcc += [target, os.path.realpath(target)]
        out += [os.path.dirname(os.path.dirname(p)) for p in seen_nvcc]
    versioned = glob.glob("/usr/local/cuda-*")

    def _version_key(p: str):
        nums = re.findall(r"\d+", os.path.basename(p))
        return [int(n) for n in nums]

    out += ["/usr/local/cuda"] + sorted(versioned, key=_version_key, reverse=True)
    out += ["/opt/cuda"]
    uniq: list[str] = []
    for p in out:
        p = os.path.normpath(p)
        if p not in uniq:
            uniq.append(p)
    return uniq


def find_cuda_home(environ=None, which=shutil.which) -> tuple[str | None, str]:
    """``(toolkit dir or None, how it was found / why none was)``.

    ``CUDA_HOME`` (or ``CUDA_PATH``) when set is the user's choice and is used only if it is a
    toolkit (:func:`is_cuda_home`); otherwise the first valid :func:`cuda_home_candidates`.
    """
    environ = os.environ if environ is None else environ
    for var in ("CUDA_HOME", "CUDA_PATH"):
        given = environ.get(var)
        if given:
            if is_cuda_home(given):
                return given, f"{var}={given}"
            return None, f"{var}={given} is not a CUDA toolkit (needs bin/nvcc and libcudart)"
    candidates = cuda_home_candidates(environ, which)
    for cand in candidates:
        if is_cuda_home(cand):
            return cand, f"found {cand} (searched: nvcc on PATH, wrapper target, standard dirs)"
    return None, "no CUDA toolkit found (looked at " + ", ".join(candidates) + ")"


def nvidia_pip_include_dirs() -> list[str]:
    """Header dirs of the ``nvidia-*`` pip packages torch depends on (``nvidia/*/include``,
    e.g. ``nvidia/cu13/include`` with cublas/cusparse headers), found through the ``nvidia``
    namespace package's ``__path__`` of the running interpreter."""
    try:
        import nvidia  # namespace package installed with torch's CUDA wheels
    except ImportError:
        return []
    dirs: list[str] = []
    for root in getattr(nvidia, "__path__", []):
        for d in sorted(glob.glob(os.path.join(root, "*", "include"))):
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
    return dirs


def find_library(cuda_home: str, stem: str) -> tuple[str, str] | None:
    """``(directory, linker flag)`` for ``lib<stem>.so`` in the toolkit or the nvidia pip
    packages; ``-l:lib<stem>.so.N`` when only the versioned file exists (pip wheels)."""
    dirs = [os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")]
    dirs += sorted(glob.glob(os.path.join(cuda_home, "targets", "*", "lib")))
    try:
        import nvidia

        for root in getattr(nvidia, "__path__", []):
            dirs += sorted(glob.glob(os.path.join(root, "*", "lib")))
    except ImportError:
        pass
    for d in dirs:
        if os.path.isfile(os.path.join(d, f"lib{stem}.so")):
            return d, f"-l{stem}"
    for d in dirs:
        versioned = sorted(glob.glob(os.path.join(d, f"lib{stem}.so.[0-9]*")), key=len)
        if versioned:
            return d, f"-l:{os.path.basename(versioned[0])}"
    return None


# -- the extension ------------------------------------------------------------------------------

def gencode_flags() -> list[str]:
    """The ``-gencode`` flags: :data:`DEFAULT_GENCODE`, or torch's flags for
    ``TORCH_CUDA_ARCH_LIST`` when it is set, written out here.

    torch adds its flags for the list itself only when no nvcc flag contains the letters
    "arch", and the ``-isystem`` include dirs of the nvidia pip packages can (a virtual
    environment under ``/research/`` or ``/archive/``): the list would be silently ignored.
    """
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not arch_list:
        return list(DEFAULT_GENCODE)
    # (a private helper of torch, the one its build calls; it reads the variable itself)
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    saved = os.environ["TORCH_CUDA_ARCH_LIST"]
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list  # (torch reads it unstripped)
    try:
        flags = _get_cuda_arch_flags()
    except IndexError:  # ("native" with no GPU visible)
        raise RuntimeError(f"TORCH_CUDA_ARCH_LIST={arch_list!r}: no GPU is visible to take "
                           "the architectures from; name them (e.g. '8.0;9.0a')") from None
    finally:
        os.environ["TORCH_CUDA_ARCH_LIST"] = saved
    if not flags:
        raise RuntimeError(f"TORCH_CUDA_ARCH_LIST={arch_list!r} gives no architecture to build "
                           "for (expected e.g. '8.0;9.0a' or '9.0+PTX')")
    _say(f"TORCH_CUDA_ARCH_LIST={arch_list!r}: " + " ".join(flags))
    return flags


def cuda_extensions() -> tuple[list, dict]:
    """``(ext_modules, cmdclass)`` for ``setup()``: empty when the build is skipped."""
    if _flag("FASTRES_SKIP_CUDA_BUILD"):
        _say("FASTRES_SKIP_CUDA_BUILD is set: installing without the CUDA extension")
        return [], {}
    force = _flag("FASTRES_FORCE_CUDA_BUILD")
    cuda_home, how = find_cuda_home()
    if cuda_home is None:
        if force:
            raise RuntimeError(f"FASTRES_FORCE_CUDA_BUILD is set but {how}")
        _say(f"{how}: installing without the CUDA extension")
        return [], {}
    _say(f"CUDA toolkit: {how}")
    # torch.utils.cpp_extension reads CUDA_HOME once, when imported.
    os.environ["CUDA_HOME"] = cuda_home
    try:
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as exc:
        if force:
            raise
        _say(f"torch is not importable ({exc}); install with --no-build-isolation. "
             "Installing without the CUDA extension")
        return [], {}

    extra_inc = nvidia_pip_include_dirs()
    # -isystem: searched after the toolkit's own -I include dir, so the toolkit's headers win
    # and the pip packages only supply what the toolkit lacks (cublas, cusparse, ...).
    isystem = [f for d in extra_inc for f in ("-isystem", d)]
    cxx = ["-O3", "-Wall", "-Wextra", "-Wno-unused-parameter"] + isystem
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo",
            "-Xcompiler", "-Wall"] + isystem
    nvcc += gencode_flags()
    library_dirs: list[str] = []
    extra_link: list[str] = []
    lt = find_library(cuda_home, "cublasLt")
    if lt is not None:
        library_dirs.append(lt[0])
        extra_link.append(lt[1])
    else:
        _say("libcublasLt not found at build time; relying on the copy torch loads")
    if extra_inc:
        _say("extra include dirs (nvidia pip packages): " + ", ".join(extra_inc))
    ext = CUDAExtension(
        name=EXT_NAME,
        sources=SOURCES,
        include_dirs=[os.path.join(HERE, "csrc")],
        library_dirs=library_dirs,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=extra_link,
        py_limited_api=False,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":
    ext_modules, cmdclass = cuda_extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
