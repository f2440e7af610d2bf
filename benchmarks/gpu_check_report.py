"""The GPU check's own reports (used by ``benchmarks/gpu_check.sh``; runs on any machine).

    python benchmarks/gpu_check_report.py env ENV_JSON
    python benchmarks/gpu_check_report.py summary OUTDIR DETAILS ELAPSED_S BUDGET_S COMMAND
    python benchmarks/gpu_check_report.py failures DETAILS

``env``: what the results depend on -- GPU, driver, CUDA, cuDNN, Python and package versions,
the extension's build targets, the code's commit and source digest -- printed and written to
ENV_JSON. It imports torch; it never fails (a fact it cannot read is ``null``).

``summary``: ``summary.md`` on stdout, from what the stages left in DETAILS (``env.json``,
``stages.tsv``, ``commands.tsv``, ``tests.xml``, ``test_failures.log``, ``test_margins.tsv``,
``extension.txt``, ``bench/bench.json``, ``latency/bench_latency.json``,
``kernels/conv_layers.json``, ``kernel_benchmarks.json``). Standard library only, so it is cheap
enough to run after every stage; a missing or broken input is one line saying so, never an
error. The header is what ``benchmarks/RESULTS.md`` asks each section to name: GPU, driver,
versions, date, commit and the commands.

``failures``: the failures recorded in DETAILS, one line each, and exit status 1 when there is
any: a failed or erroring test (``tests.xml``, or ``test_failures.log`` when pytest was stopped
before writing it), a ``FAILED`` fastres row of ``bench/bench.json`` or of the latency JSON, a
``FAILED``/``ERROR`` layer of ``kernels/conv_layers.json``, or one of those files unreadable.
``gpu_check.sh`` calls it so that a stage stopped at its cap still fails the check when what it
kept holds a failure.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

PACKAGES = ("torch", "torchvision", "triton", "numpy", "pytest", "pytest-benchmark",
            "pytest-xdist", "pytest-timeout", "matplotlib", "scikit-image", "tqdm", "pillow")


# -- env ---------------------------------------------------------------------------------------


def _run(cmd: list[str], timeout: float = 20) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def collect_env() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    env: dict = {"date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "python": sys.version.split()[0], "packages": {}}
    for p in PACKAGES:
        try:
            env["packages"][p] = version(p)
        except PackageNotFoundError:
            env["packages"][p] = None
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                "--format=csv,noheader"])
    env["nvidia_smi"] = smi
    env["driver"] = smi.splitlines()[0].split(",")[1].strip() if smi else None
    nvcc = _run(["nvcc", "--version"])
    env["nvcc"] = nvcc.splitlines()[-1] if nvcc else None
    env["torch_cuda_arch_list"] = os.environ.get("TORCH_CUDA_ARCH_LIST")
    try:
        import torch

        env["torch_cuda"] = torch.version.cuda
        env["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(),
                       capability=f"{props.major}.{props.minor}",
                       sm_count=props.multi_processor_count,
                       memory_gib=round(props.total_memory / 2**30, 1),
                       cudnn=torch.backends.cudnn.version())
    except Exception as exc:  # noqa: BLE001 - a broken torch is a finding, not a crash
        env["torch_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return env


def main_env(path: str) -> int:
    env = collect_env()
    with open(path, "w") as f:
        json.dump(env, f, indent=1)
    for k, v in env.items():
        print(f"{k}: {v}")
    return 0


# -- summary -----------------------------------------------------------------------------------


def _load_json(path: str):
    try:
        with open(path) as f:
            return json.load(f), None
    except FileNotFoundError:
        return None, "not run"
    except Exception as exc:  # noqa: BLE001
        return None, f"unreadable ({type(exc).__name__})"


def _num(v, spec: str) -> str:
    if v is None or isinstance(v, str) or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def _err(v) -> str:
    """A relative error: ``nan``/``inf`` shown as such (an output that was NaN), not as ``-``."""
    return "-" if v is None or isinstance(v, str) else format(v, ".1e")


def _cell(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def header(d: str, elapsed: str, budget: str, command: str) -> list[str]:
    env, _ = _load_json(os.path.join(d, "env.json"))
    env = env or {}
    pk = env.get("packages", {})
    date = env.get("date_utc") or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out = [f"# fastres GPU check, {date}", ""]
    out.append(f"- command: `{command}` ({elapsed} s of a {budget} s budget)")
    commit = os.environ.get("GPU_CHECK_COMMIT_RESOLVED") or "unknown"
    out.append(f"- code: commit {commit}, source digest "
               f"{os.environ.get('GPU_CHECK_DIGEST', '?')} (`bash benchmarks/gpu_check.sh "
               "--digest` on a checkout prints its digest)")
    if env.get("gpu"):
        count = f", x{env['gpu_count']}" if (env.get("gpu_count") or 1) > 1 else ""
        out.append(f"- GPU: {env['gpu']} ({env.get('sm_count')} SMs, {env.get('memory_gib')} "
                   f"GiB, sm {env.get('capability')}{count}), "
                   f"driver {env.get('driver')}, CUDA {env.get('torch_cuda')} (torch), cuDNN "
                   f"{env.get('cudnn')}, nvcc: {env.get('nvcc') or 'not found'}, "
                   f"TORCH_CUDA_ARCH_LIST={env.get('torch_cuda_arch_list')}")
    elif env:
        out.append(f"- GPU: none seen by torch (cuda available: {env.get('cuda_available')}; "
                   f"nvidia-smi: {env.get('nvidia_smi')}) {env.get('torch_error', '')}".rstrip())
    else:
        out.append("- GPU / versions: env stage not run (see the bench's own header below)")
    if pk:
        out.append(f"- Python {env.get('python')}, torch {pk.get('torch')}, torchvision "
                   f"{pk.get('torchvision')}, Triton {pk.get('triton')}, numpy {pk.get('numpy')}; "
                   + ", ".join(f"{p} {pk.get(p) or 'MISSING'}" for p in
                               ("pytest", "pytest-benchmark", "pytest-xdist", "pytest-timeout",
                                "matplotlib")))
    try:
        with open(os.path.join(d, "extension.txt")) as f:
            out.append(f"- fastres._C: {f.read().strip()[:300]}")
    except OSError:
        pass
    return out


def stages(d: str) -> list[str]:
    out = ["", "| stage | status | seconds | log |", "|---|---|---:|---|"]
    try:
        with open(os.path.join(d, "stages.tsv")) as f:
            for line in f.read().splitlines()[1:]:
                out.append("| " + " | ".join(_cell(c) for c in line.split("\t")) + " |")
    except OSError as exc:
        out.append(f"| (no stages.tsv: {exc.strerror}) | | | |")
    try:
        with open(os.path.join(d, "commands.tsv")) as f:
            cmds = [line.rstrip("\n").split("\t", 1) for line in f if "\t" in line]
    except OSError:
        cmds = []
    keep = ("conv_layers", "pytest_benchmarks", "latency", "fastres_bench")
    if any(name in keep for name, _ in cmds):
        out += ["", "Commands (run from the repository root):"]
        out += [f"- {name}: `{cmd[:400]}`" for name, cmd in cmds if name in keep]
    return out


def _suites(root) -> list:
    """The ``<testsuite>`` elements of a junit XML tree (pytest writes one under
    ``<testsuites>``)."""
    return [root] if root.tag == "testsuite" else list(root)


def _junit_problems(suites) -> list[tuple[str, str]]:
    """``(classname::name, first line of its message)`` of every ``<failure>`` and ``<error>``
    in ``suites``, in file order."""
    out = []
    for s in suites:
        for case in s.iter("testcase"):
            for b in list(case.findall("failure")) + list(case.findall("error")):
                msg = (b.get("message") or "").splitlines()[:1]
                out.append((f"{case.get('classname')}::{case.get('name')}",
                            msg[0] if msg else ""))
    return out


def _logged_failures(d: str) -> list[str]:
    """The tests ``test_failures.log`` names (written as they fail: there even when pytest
    was stopped before its junit XML); none when there is no log."""
    try:
        with open(os.path.join(d, "test_failures.log")) as f:
            return [line[4:].rstrip() for line in f if line.startswith("=== ")]
    except OSError:
        return []


def tests(d: str) -> list[str]:
    out = [""]
    try:
        root = ET.parse(os.path.join(d, "tests.xml")).getroot()
    except FileNotFoundError:
        if not os.path.exists(os.path.join(d, "test_results.tsv")):
            return []  # the tests stage did not run
        root = None
    except Exception as exc:  # noqa: BLE001 - a run cut off mid-write
        out.append(f"tests: junit XML unreadable ({type(exc).__name__})")
        root = None
    if root is not None:
        suites = _suites(root)
        n = {k: sum(int(s.get(k, 0)) for s in suites)
             for k in ("tests", "failures", "errors", "skipped")}
        t = sum(float(s.get("time", 0)) for s in suites)
        out.append(f"tests: {n['tests']} run, {n['failures']} failed, {n['errors']} errors, "
                   f"{n['skipped']} skipped ({t:.0f} s)")
        problems = _junit_problems(suites)
        out += [f"- {name}: {msg}"[:240] for name, msg in problems[:25]]
        if len(problems) > 25:
            out.append(f"- ... and {len(problems) - 25} more (details/tests.xml in all.tar.gz)")
    else:
        out.append("tests: no junit results; failures recorded so far:")
        out += [f"- {n}"[:240] for n in _logged_failures(d)[:25]] or ["- none"]
    try:  # how close the accuracy checks came to their bounds (err / bound)
        with open(os.path.join(d, "test_margins.tsv")) as f:
            checks = [line.rstrip("\n").split("\t") for line in f if line.count("\t") >= 4]

        def ratio(c):
            try:
                return float(c[0])
            except ValueError:
                return math.inf

        over = [c for c in checks if not ratio(c) <= 1]
        out.append(f"\naccuracy checks: {len(checks)}, {len(over)} over their bound (failures, "
                   "or a test that expects one); closest to their bound:")
        for c in sorted((c for c in checks if ratio(c) <= 1), key=lambda c: -ratio(c))[:5]:
            out.append(f"- {ratio(c):.2f} (err {c[1]}, bound {c[2]}): {c[3]} {c[4]}"[:240])
    except OSError:
        pass
    return out


def bench(d: str) -> list[str]:
    rep, why = _load_json(os.path.join(d, "bench", "bench.json"))
    if rep is None:
        return [] if why == "not run" else ["", f"fastres bench: no results ({why})"]
    env = rep.get("env", {})
    out = ["", f"## fastres bench ({rep.get('elapsed_s')} s)", "",
           f"{env.get('gpu', env.get('device'))}, driver {env.get('driver')}, CUDA "
           f"{env.get('cuda')}, cuDNN {env.get('cudnn')}; torch {env.get('torch')}, torchvision "
           f"{env.get('torchvision')}, triton {env.get('triton')}, fastres {env.get('fastres')}"
           + (f" at {env['fastres_commit']}" if env.get("fastres_commit") else "")
           + f" (extension {'loaded' if env.get('fastres_extension') else 'NOT loaded'}); "
           f"{env.get('date')}. Outputs "
           + ("agree" if rep.get("ok") else "DISAGREE (FAILED rows, not timed)")
           + ("; INTERRUPTED (partial)" if rep.get("interrupted") else "") + ".",
           f"Command: `{env.get('command') or (rep.get('config') or {}).get('command')}`", ""]
    groups: dict = {}
    for r in rep.get("rows", []):
        groups.setdefault((r["model"], r["dtype"], r["batch"]), {})[r["impl"]] = r

    def ips(r):
        if not r:
            return "n/a"
        return _num(r.get("images_per_s"), ".0f") if r.get("status") == "ok" else r.get("status")

    out += ["| model | dtype | batch | fastres img/s | + graphs | eager fp32 | AMP+CL | eager CL "
            "| compile | compile frz | compile r-o | fastres ms (host) | best ms (p90) "
            "| best peak MiB | best x fp32 | x AMP+CL | x eager CL | x compile | rel err "
            "| status |",
            "|---|---|---:|" + "---:|" * 16 + "---|"]
    for (model, dtype, batch), rows in groups.items():
        fr, gr = rows.get("fastres", {}), rows.get("fastres_graphs", {})
        cands = [r for r in (fr, gr) if r.get("status") == "ok" and r.get("images_per_s")]
        best = max(cands, key=lambda r: r["images_per_s"]) if cands else {}
        sp = best.get("speedup") or {}
        status = fr.get("status", "-")
        if status not in ("ok", "-") and fr.get("note"):
            status += ": " + fr["note"]
        out.append(
            f"| {model} | {dtype} | {batch} | {ips(fr)} | {ips(gr)} | "
            f"{ips(rows.get('eager_fp32'))} | {ips(rows.get('eager_amp_cl'))} | "
            f"{ips(rows.get('eager_cl'))} | {ips(rows.get('compile'))} | "
            f"{ips(rows.get('compile_freezing'))} | {ips(rows.get('compile_reduce_overhead'))} | "
            f"{_num(fr.get('median_ms'), '.2f')} ({_num(fr.get('host_ms'), '.2f')}) | "
            f"{_num(best.get('median_ms'), '.2f')} ({_num(best.get('p90_ms'), '.2f')}) | "
            f"{_num(best.get('peak_mib'), '.0f')} | {_num(sp.get('eager_fp32'), '.2f')} | "
            f"{_num(sp.get('eager_amp_cl'), '.2f')} | {_num(sp.get('eager_cl'), '.2f')} | "
            f"{_num(sp.get('compile'), '.2f')} | "
            f"{_err(fr.get('rel_err'))} | {_cell(status)[:90]} |")
    out += ["", "\"best\": the faster of fastres and fastres + CUDA graphs. \"eager CL\": "
            "torchvision cast to the dtype, channels-last input. \"compile frz\": torch.compile "
            "with inductor's freezing (BatchNorm folded into the constant weights). \"x "
            "compile\" is like for like: fastres against the fastest torch.compile row without "
            "CUDA graphs (default mode, freezing), fastres + CUDA graphs against its "
            "reduce-overhead mode "
            "(\"compile r-o\"). cuDNN benchmark mode: "
            + {True: "on", False: "off"}.get(env.get("cudnn_benchmark"), "not recorded") + "."]
    out += [f"- note: {_cell(n)[:240]}" for n in rep.get("notes", [])[:12]]
    return out


def latency(d: str) -> list[str]:
    rep, why = _load_json(os.path.join(d, "latency", "bench_latency.json"))
    if rep is None:
        return [] if why == "not run" else ["", f"batch-1 latency: no results ({why})"]
    args = rep.get("args", {})
    out = ["", f"## {args.get('model', 'resnet50')} batch-1 latency"
           + (" (INTERRUPTED: partial)" if rep.get("interrupted") else ""), "",
           "| dtype | implementation | median ms | p10 | p90 | x eager | x best eager "
           "| x best compile r-o | rel err | status |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rep.get("rows", []):
        status = r.get("status", "-")
        if r.get("error"):
            status += ": " + r["error"]
        out.append(f"| {r.get('dtype')} | {r.get('impl')} | {_num(r.get('median_ms'), '.3f')} | "
                   f"{_num(r.get('p10_ms'), '.3f')} | {_num(r.get('p90_ms'), '.3f')} | "
                   f"{_num(r.get('speedup_vs_eager'), '.2f')} | "
                   f"{_num(r.get('speedup_vs_best_eager'), '.2f')} | "
                   f"{_num(r.get('speedup_vs_compile_reduce_overhead'), '.2f')} | "
                   f"{_err(r.get('rel_err'))} | {_cell(status)[:120]} |")
    return out


def conv_layers(d: str) -> list[str]:
    rep, why = _load_json(os.path.join(d, "kernels", "conv_layers.json"))
    if rep is None:
        return [] if why == "not run" else ["", f"conv layers: no results ({why})"]
    rows, meta = rep.get("rows", []), rep.get("meta", {})
    n_layers = len({r.get("layer") for r in rows}) or len(meta.get("layers", []))
    out = ["", f"## {meta.get('arch', 'resnet50')} convolutions vs cuDNN (Triton kernel alone; "
           "sums over the model's layers, each distinct shape weighted by its count)"
           + (" (INTERRUPTED: partial)" if meta.get("interrupted") else ""), "",
           "| dtype | batch | shapes | fastres ms | TFLOP/s | cuDNN conv ms | cuDNN fused ms "
           "| x fused | x conv | failed/errors |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    combos = list(dict.fromkeys((r.get("dtype"), r.get("batch")) for r in rows))
    for dt, bs in combos:
        sel = [r for r in rows if r.get("dtype") == dt and r.get("batch") == bs]
        ok = [r for r in sel if r.get("status") == "ok"]
        bad = [r for r in sel if str(r.get("status", "")).startswith(("FAILED", "ERROR"))]
        if ok:
            ours = sum(r["fastres_ms"] * r["count"] for r in ok)
            conv = sum(r["cudnn_conv_ms"] * r["count"] for r in ok)
            fused = sum(r["cudnn_fused_ms"] * r["count"] for r in ok)
            flops = sum(r["fastres_tflops"] * r["fastres_ms"] * r["count"] for r in ok)
            cells = (f"{ours:.3f} | {flops / ours:.0f} | {conv:.3f} | {fused:.3f} | "
                     f"{fused / ours:.2f} | {conv / ours:.2f}")
        else:
            cells = "- | - | - | - | - | -"
        note = ", ".join(f"{r.get('layer')}: {r.get('status')}" for r in bad[:3])
        out.append(f"| {dt} | {bs} | {len(ok)} of {n_layers} | {cells} | "
                   f"{len(bad)}{(' (' + _cell(note)[:150] + ')') if note else ''} |")
    return out


def kernel_benchmarks(d: str) -> list[str]:
    rep, why = _load_json(os.path.join(d, "kernel_benchmarks.json"))
    if rep is None:
        return [] if why == "not run" else ["", f"kernel benchmarks: no results ({why})"]
    table: dict = {}
    impls: list[str] = []
    for b in rep.get("benchmarks", []):
        info = b.get("extra_info", {})
        op = info.get("op") or f"conv {info.get('layer', b.get('name'))}"
        shape = info.get("shape", "")
        if "batch" in info:  # (a conv layer's shape leaves the batch out)
            shape = f"batch {info['batch']}, {shape}"
        key = (op, shape, str(info.get("dtype", "")).replace("torch.", ""))
        impl = info.get("impl", "?")
        if impl not in impls:
            impls.append(impl)
        med = (b.get("stats") or {}).get("median")
        table.setdefault(key, {})[impl] = med * 1e3 if isinstance(med, (int, float)) else None
    if not table:
        return ["", "kernel benchmarks: the JSON holds no benchmarks (all skipped?)"]
    out = ["", "## kernel benchmarks (pytest-benchmark, median ms per call incl. a synchronize)",
           "", "| op | shape | dtype | " + " | ".join(impls) + " |",
           "|---|---|---|" + "---:|" * len(impls)]
    for (op, shape, dt), by in table.items():
        out.append(f"| {_cell(op)} | {_cell(shape)} | {dt} | "
                   + " | ".join(_num(by.get(i), ".4f") for i in impls) + " |")
    return out


def main_summary(outdir: str, d: str, elapsed: str, budget: str, command: str) -> int:
    parts = (header(d, elapsed, budget, command) + stages(d) + tests(d) + bench(d) + latency(d)
             + conv_layers(d) + kernel_benchmarks(d))
    print("\n".join(parts))
    return 0


def recorded_failures(d: str) -> list[str]:
    """What failed, from the results the stages left in ``d`` (see ``failures`` above)."""
    out = []
    try:
        root = ET.parse(os.path.join(d, "tests.xml")).getroot()
        # (one line per test: a test with a failure and a teardown error is one test)
        out += [f"test {name}"
                for name in dict.fromkeys(name for name, _ in _junit_problems(_suites(root)))]
    except FileNotFoundError:
        pass
    except Exception as exc:  # noqa: BLE001 - a run cut off mid-write
        out.append(f"tests.xml unreadable ({type(exc).__name__})")
    if not out:  # pytest stopped before its junit XML: what the tests logged as they failed
        out += [f"test {name}" for name in _logged_failures(d)]
    for name, path, bad in (
            ("bench", ("bench", "bench.json"), lambda r: r.get("status") == "FAILED"),
            ("latency", ("latency", "bench_latency.json"),
             lambda r: r.get("status") in ("FAILED", "ERROR")
             and str(r.get("impl", "")).startswith("fastres")),
            ("conv_layers", ("kernels", "conv_layers.json"),
             lambda r: str(r.get("status", "")).startswith(("FAILED", "ERROR")))):
        rep, why = _load_json(os.path.join(d, *path))
        if rep is None:
            if why != "not run":
                out.append(f"{name}: {os.path.join(*path)} {why}")
            continue
        for r in rep.get("rows", []) if isinstance(rep, dict) else []:
            if bad(r):
                where = " ".join(str(r[k]) for k in ("model", "layer", "dtype", "batch", "impl")
                                 if k in r)
                out.append(f"{name} {where}: {r.get('status')}"[:240])
    return out


def main_failures(d: str) -> int:
    found = recorded_failures(d)
    for line in found:
        print(f"recorded failure: {line}")
    return 1 if found else 0


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "env":
        return main_env(argv[1])
    if len(argv) >= 2 and argv[0] == "failures":
        return main_failures(argv[1])
    if len(argv) >= 6 and argv[0] == "summary":
        return main_summary(*argv[1:6])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
