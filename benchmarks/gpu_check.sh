#!/usr/bin/env bash
# The whole GPU check in one command, for a machine with a GPU and no network:
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# 1. build the CUDA extension in place (pip install -e ., no build isolation, no deps)
# 2. the GPU tests (`-m cuda`: the tests that need a GPU; CI runs the rest on every commit),
#    14 pytest-xdist workers, junit XML + log + failures recorded as they happen.
#    GPU_CHECK_TESTS="tests" runs the whole suite on the GPU (about 5 minutes of its own).
# 3. kernel benchmarks (benchmarks/conv_layers.py, pytest-benchmark files in benchmarks/)
# 4. `python3 -m fastres bench`: resnet18/50/101 x batch 1, 32, 256 x bf16, fp16, outputs
#    checked against torchvision before anything is timed; compile baseline for resnet50 only
# then OUTDIR/summary.md (printed LAST), OUTDIR/all.tar.gz (everything), and the bench's
# JSON / Markdown / PNG beside them.
#
# Time budget: the whole script must finish within 9 minutes on an H100 (the device tool
# allows 10 per command). Stages are capped with `timeout`, and each stage's cap shrinks so the
# stages after it keep their minimum; a stage that fails or times out never stops later stages.
#   stage            nominal cap   kept back for the stages after it
#   env                    30 s      480 s
#   build                 150 s      300 s   (skipped when fastres._C imports, same sources)
#   tests                 200 s      200 s   (GPU_CHECK_TESTS_S)
#   conv_layers.py         60 s      150 s   (GPU_CHECK_CONV_S; its --time-budget 15 s less)
#   pytest benchmarks      35 s      120 s
#   latency                60 s       90 s   (GPU_CHECK_LATENCY_S)
#   fastres bench    the rest (<= 220 s); its own --time-budget ends it 40 s early, so
#                    it writes its results itself instead of being killed. Inside it: 30 timed
#                    calls (at most 2 s) per measurement, 5 warm-up calls, torch.compile
#                    only for resnet50 and at most ~70 s of compiling (about 3 shapes).
#   summary + tar         ~10 s
#   total deadline        530 s (GPU_CHECK_BUDGET_S overrides), 10 s under 9 minutes.
#
# The device tool brings back at most 8 files (<= 16 MiB each, <= 2 folders deep), so OUTDIR
# ends with: summary.md, all.tar.gz, bench.json, bench.md, bench.png, gpu_check.log. Details
# live in OUTDIR/details (re-tarred after every stage, so a run cut short still leaves an
# all.tar.gz) and are removed once all.tar.gz is final (GPU_CHECK_KEEP=1 keeps them).

set -u -o pipefail

if [ $# -lt 1 ]; then
    echo "usage: bash benchmarks/gpu_check.sh OUTDIR" >&2
    exit 2
fi
PY=${PYTHON:-python3}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$1"
OUTDIR=$(cd "$1" && pwd)
D="$OUTDIR/details"
mkdir -p "$D"
cd "$REPO" || exit 2

START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_BUDGET_S:-530}))
STAGES="$D/stages.tsv"
printf 'stage\tstatus\tseconds\tlog\n' > "$STAGES"

exec > >(tee -a "$OUTDIR/gpu_check.log") 2>&1

now() { date +%s; }
# GPU_CHECK_STAGES selects stages (default: all), e.g. "env build tests conv_layers" for one
# device call and "env build latency fastres_bench" for the next: a device call is capped at
# 10 minutes, and a warm machine keeps the build and Triton's compile cache between calls.
STAGE_LIST=" ${GPU_CHECK_STAGES:-env build tests conv_layers pytest_benchmarks latency fastres_bench} "
want() { case "$STAGE_LIST" in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
remaining() { echo $((DEADLINE - $(now))); }

bundle() {
    # Everything under details/ plus the top-level results, as one file for the trip back.
    tar -czf "$OUTDIR/all.tar.gz.tmp" -C "$OUTDIR" details \
        $(cd "$OUTDIR" && ls summary.md bench.json bench.md bench.png gpu_check.log 2>/dev/null) \
        2>/dev/null && mv -f "$OUTDIR/all.tar.gz.tmp" "$OUTDIR/all.tar.gz"
}

# run_stage NAME NOMINAL_S RESERVE_S LOG CMD...: run CMD under timeout, record its status.
# RESERVE_S is the time kept back for the stages after this one.
run_stage() {
    local name=$1 nominal=$2 reserve=$3 log=$4
    shift 4
    local left=$(( $(remaining) - reserve ))
    local cap=$(( nominal < left ? nominal : left ))
    if [ "$cap" -lt 10 ]; then
        printf '%s\tskipped (no time left)\t0\t-\n' "$name" >> "$STAGES"
        echo "=== $name: skipped, no time left"
        return 0
    fi
    echo "=== $name (cap ${cap}s): $*"
    local t0 rc status
    t0=$(now)
    timeout -k 10 "$cap" "$@" > "$log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="TIMEOUT after ${cap}s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(now) - t0 ))" "${log#"$OUTDIR"/}" >> "$STAGES"
    echo "=== $name: $status in $(( $(now) - t0 ))s (log: $log)"
    tail -n 5 "$log" | sed 's/^/    /'
    bundle
    return 0
}

# --- 0. environment ---------------------------------------------------------------------------
want env && run_stage env 30 480 "$D/env.log" bash -c "
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    $PY -c 'import sys, torch; print(\"python\", sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no GPU\")'
    $PY -c 'import triton; print(\"triton\", triton.__version__)' || true
    $PY -c 'import torchvision; print(\"torchvision\", torchvision.__version__)' || true
    for p in numpy pytest pytest-xdist matplotlib scikit-image; do
        $PY -c \"from importlib.metadata import version; print('\$p', version('\$p'))\" 2>/dev/null || echo \"\$p not installed\"
    done
    which nvcc && nvcc --version || echo 'nvcc not on PATH'
    git -C '$REPO' log --oneline -1 || true
"

# --- 1. build the extension -------------------------------------------------------------------
# A warm machine already holds the build: skip it when fastres._C imports and was built from
# the same setup.py and csrc/ (a checksum stamp under build/, which git ignores; an extension
# left from older sources is rebuilt). GPU_CHECK_REBUILD=1 forces the build.
BUILD_STAMP=build/.fastres_ext_sources.sha256
SRC_SUM=$(cat setup.py csrc/* 2>/dev/null | sha256sum | cut -d' ' -f1)
if want build && { [ "${GPU_CHECK_REBUILD:-0}" = 1 ] \
        || [ "$(cat "$BUILD_STAMP" 2>/dev/null)" != "$SRC_SUM" ] \
        || ! "$PY" -c "import fastres._C" 2>/dev/null; }; then
    run_stage build 150 300 "$D/build.log" \
        env MAX_JOBS=16 "$PY" -m pip install --no-build-isolation --no-deps -v -e .
    if [ "$(tail -n 1 "$STAGES" | cut -f2)" = ok ]; then
        mkdir -p build && echo "$SRC_SUM" > "$BUILD_STAMP"
    fi
elif want build; then
    printf 'build\tskipped (already built from these sources)\t0\t-\n' >> "$STAGES"
    echo "=== build: skipped, fastres._C is built from these sources"
fi

# --- 2. tests (cuda-marked ones run: a GPU is present) ----------------------------------------
# FASTRES_TUNE=0 pins one configuration per layer for the suite (tests of tuning set their own
# mode): tuning every layer of ten architectures would compile every candidate kernel. Workers
# in parallel (pytest-xdist, when installed) since Triton compiles are CPU-bound.
XDIST=""
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n ${GPU_CHECK_WORKERS:-14}"
PYTEST_TIMEOUT=""
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_TIMEOUT="--timeout ${GPU_CHECK_TEST_TIMEOUT:-240}"
# shellcheck disable=SC2086
want tests && run_stage tests "${GPU_CHECK_TESTS_S:-200}" 200 "$D/tests.log" \
    env FASTRES_TUNE=0 FASTRES_FAILURE_LOG="$D/test_failures.log" \
    FASTRES_MARGIN_LOG="$D/test_margins.tsv" \
    FASTRES_RESULT_LOG="$D/test_results.tsv" "$PY" -m pytest ${GPU_CHECK_TESTS:-tests -m cuda} -q -p no:cacheprovider \
    $XDIST $PYTEST_TIMEOUT -rfE --junitxml="$D/tests.xml"

# --- 3. kernel benchmarks ---------------------------------------------------------------------
if want conv_layers && [ -f benchmarks/conv_layers.py ]; then
    mkdir -p "$D/kernels"
    run_stage conv_layers "${GPU_CHECK_CONV_S:-60}" 150 "$D/conv_layers.log" \
        "$PY" benchmarks/conv_layers.py --out "$D/kernels" \
        --time-budget $(( ${GPU_CHECK_CONV_S:-60} - 15 ))
    cp -f "$D/kernels/conv_layers.md" "$OUTDIR/conv_layers.md" 2>/dev/null
elif want conv_layers; then
    printf 'conv_layers\tskipped (benchmarks/conv_layers.py not present)\t0\t-\n' >> "$STAGES"
fi
if want pytest_benchmarks && ls benchmarks/test_*.py >/dev/null 2>&1; then
    # "not slow" keeps to the quick kernel benchmarks; GPU_CHECK_BENCH_K narrows with -k.
    run_stage pytest_benchmarks 35 120 "$D/pytest_benchmarks.log" \
        "$PY" -m pytest benchmarks -q -p no:cacheprovider -m "not slow" \
        ${GPU_CHECK_BENCH_K:+-k "$GPU_CHECK_BENCH_K"} \
        --benchmark-enable --benchmark-json="$D/kernel_benchmarks.json" \
        --benchmark-max-time=0.2 --benchmark-min-rounds=3 --benchmark-warmup=on
elif want pytest_benchmarks; then
    printf 'pytest_benchmarks\tskipped (no benchmarks/test_*.py)\t0\t-\n' >> "$STAGES"
fi

if want latency && [ -f benchmarks/bench_latency.py ]; then
    mkdir -p "$D/latency"
    run_stage latency "${GPU_CHECK_LATENCY_S:-60}" 90 "$D/latency.log" \
        "$PY" benchmarks/bench_latency.py --out "$D/latency"
    cp -f "$D/latency/bench_latency.md" "$OUTDIR/bench_latency.md" 2>/dev/null
fi

# --- 4. end-to-end: fastres bench --------------------------------------------------------------
if want fastres_bench; then
BENCH_CAP=$(( $(remaining) - 10 ))
[ "$BENCH_CAP" -gt 220 ] && BENCH_CAP=220
BENCH_BUDGET=$(( BENCH_CAP - 40 ))
[ "$BENCH_BUDGET" -lt 20 ] && BENCH_BUDGET=20
# GPU_CHECK_BENCH_ARGS replaces the model/batch/dtype/timing options (e.g. for a dry run).
BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:-"-m resnet18,resnet50,resnet101 -b 1 32 256 --dtype bf16 fp16 \
    --iters 30 --warmup 5 --max-time 2 --compile-models resnet50 --compile-budget 70"}
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options on purpose
run_stage fastres_bench "$BENCH_CAP" 10 "$D/bench.log" \
    "$PY" -m fastres bench $BENCH_ARGS \
    --time-budget "$BENCH_BUDGET" --no-progress --out "$D/bench"

for f in bench.json bench.md bench.png; do
    [ -f "$D/bench/$f" ] && cp -f "$D/bench/$f" "$OUTDIR/$f"
done
fi

# --- summary (printed last) --------------------------------------------------------------------
"$PY" - "$OUTDIR" "$(( $(now) - START ))" > "$OUTDIR/summary.md" 2> "$D/summary.err" <<'PYEOF'
import json, os, sys
import xml.etree.ElementTree as ET

out, elapsed = sys.argv[1], sys.argv[2]
d = os.path.join(out, "details")
print(f"# fastres GPU check ({elapsed} s)\n")
print("| stage | status | seconds | log |\n|---|---|---:|---|")
try:
    with open(os.path.join(d, "stages.tsv")) as f:
        for line in f.read().splitlines()[1:]:
            print("| " + " | ".join(line.split("\t")) + " |")
except OSError as exc:
    print(f"| (no stages.tsv: {exc}) | | | |")
try:
    root = ET.parse(os.path.join(d, "tests.xml")).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    n = {k: sum(int(s.get(k, 0)) for s in suites)
         for k in ("tests", "failures", "errors", "skipped")}
    t = sum(float(s.get("time", 0)) for s in suites)
    print(f"\ntests: {n['tests']} run, {n['failures']} failed, {n['errors']} errors, "
          f"{n['skipped']} skipped ({t:.0f} s)")
    for s in suites:
        for case in s.iter("testcase"):
            for bad in list(case.findall("failure")) + list(case.findall("error")):
                msg = (bad.get("message") or "").splitlines()[:1]
                print(f"- {case.get('classname')}::{case.get('name')}: {msg[0] if msg else ''}"[:300])
except Exception as exc:
    print(f"\ntests: no junit results ({type(exc).__name__}); failures recorded so far:")
    try:
        with open(os.path.join(d, "test_failures.log")) as f:
            for line in f:
                if line.startswith("=== "):
                    print("- " + line[4:].rstrip()[:300])
    except OSError:
        print("- none")
try:  # how close the accuracy checks came to their bounds (err / bound)
    with open(os.path.join(d, "test_margins.tsv")) as f:
        checks = [line.rstrip("\n").split("\t") for line in f if line.count("\t") >= 4]
    over = [c for c in checks if float(c[0]) > 1]
    print(f"\naccuracy checks: {len(checks)}, {len(over)} over their bound (failures, or a "
          "test that expects one); closest to their bound:")
    for c in sorted((c for c in checks if float(c[0]) <= 1), key=lambda c: -float(c[0]))[:5]:
        print(f"- {float(c[0]):.2f} (err {c[1]}, bound {c[2]}): {c[3]} {c[4]}"[:300])
except OSError:
    pass
try:
    with open(os.path.join(out, "bench.json")) as f:
        rep = json.load(f)
except Exception as exc:
    print(f"\nfastres bench: no results ({type(exc).__name__})")
    sys.exit(0)
env = rep.get("env", {})
print(f"\nfastres bench on {env.get('gpu', env.get('device'))}, driver {env.get('driver')}, "
      f"torch {env.get('torch')}, triton {env.get('triton')}, fastres {env.get('fastres')} "
      f"(extension {'built' if env.get('fastres_extension') else 'NOT built'}); outputs "
      f"{'agree' if rep.get('ok') else 'DISAGREE (FAILED rows)'}\n")
groups = {}
for r in rep.get("rows", []):
    groups.setdefault((r["model"], r["dtype"], r["batch"]), {})[r["impl"]] = r

def f(v, spec):
    return "-" if v in (None, "") or isinstance(v, str) else format(v, spec)

print("| model | dtype | batch | fastres img/s | + graphs img/s | eager fp32 | AMP+CL | "
      "compile | best x fp32 | best x AMP | best x compile | rel err | status |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
for (model, dtype, batch), rows in groups.items():
    fr, gr = rows.get("fastres", {}), rows.get("fastres_graphs", {})
    cands = [r for r in (fr, gr) if r.get("status") == "ok"]
    best = max(cands, key=lambda r: r.get("images_per_s") or 0) if cands else {}
    sp = best.get("speedup", {}) if best else {}
    ips = lambda r: f(r.get("images_per_s"), ".0f") if r.get("status") == "ok" else r.get("status", "-")
    status = fr.get("status", "-")
    if fr.get("status") not in ("ok", None):
        status += f": {fr.get('note', '')}"[:80]
    print(f"| {model} | {dtype} | {batch} | {ips(fr)} | {ips(gr)} | "
          f"{ips(rows.get('eager_fp32', {}))} | {ips(rows.get('eager_amp_cl', {}))} | "
          f"{ips(rows.get('compile', {})) if 'compile' in rows else 'n/a'} | "
          f"{f(sp.get('eager_fp32'), '.2f')} | {f(sp.get('eager_amp_cl'), '.2f')} | "
          f"{f(sp.get('compile'), '.2f')} | {f(fr.get('rel_err'), '.1e')} | {status} |")
for note in rep.get("notes", []):
    print(f"- note: {note}")
PYEOF

bundle
SIZE=$(stat -c %s "$OUTDIR/all.tar.gz" 2>/dev/null || echo 0)
if [ "$SIZE" -gt $((15 * 1024 * 1024)) ]; then
    # Over the files-back limit: keep logs, junit and bench results, drop the kernel data.
    tar -czf "$OUTDIR/all.tar.gz" -C "$OUTDIR" --exclude=details/kernels \
        --exclude=details/kernel_benchmarks.json details summary.md 2>/dev/null
    echo "note: all.tar.gz was over 15 MiB; kernel benchmark data left out" >> "$OUTDIR/summary.md"
fi
if [ -s "$OUTDIR/all.tar.gz" ] && [ "${GPU_CHECK_KEEP:-0}" != 1 ]; then
    rm -rf "$D"
fi

echo
echo "=================================== SUMMARY ==================================="
cat "$OUTDIR/summary.md"
echo "(all results: $OUTDIR/all.tar.gz; total $(( $(now) - START )) s)"
