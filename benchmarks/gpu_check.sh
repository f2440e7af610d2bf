#!/usr/bin/env bash
# The whole GPU check, for a machine with a GPU and no network:
#
#   bash benchmarks/gpu_check.sh OUTDIR                            # every stage, one call
#   GPU_CHECK_STAGES=part1 bash benchmarks/gpu_check.sh OUTDIR     # two calls of ~8 minutes
#   GPU_CHECK_STAGES=part2 bash benchmarks/gpu_check.sh OUTDIR     #   (when the time allows)
#   GPU_CHECK_STAGES=one bash benchmarks/gpu_check.sh OUTDIR       # one call: tests + bench
#   bash benchmarks/gpu_check.sh --digest                          # this checkout's digest
#
# Stages (GPU_CHECK_STAGES: names in any order, run in this order; "all" = every stage,
# "part1" = env build tests conv_layers pytest_benchmarks, "part2" = env build latency
# fastres_bench, "one" = env build tests fastres_bench (the GPU tests and the end-to-end
# figures, for a session whose device time allows one cold call: a 15-minute budget pays for
# the machine's start and one ~9-minute call); "build" is skipped when fastres._C loads and
# was built from these sources, so keep it in every call: a machine that went cold between
# calls has no extension):
#   env                the GPU, driver, CUDA, cuDNN, package versions -> details/env.json
#   build              pip install --no-build-isolation --no-deps --no-index -e . (never downloads),
#                      then checks that fastres._C loads
#   tests              the GPU tests (`-m "cuda and not slow"`; GPU_CHECK_TESTS="tests -m cuda"
#                      for the slow ones too, GPU_CHECK_TESTS="tests" for the whole suite),
#                      pytest-xdist workers, junit XML, failures and accuracy margins as they happen
#   conv_layers        every ResNet-50 convolution, Triton kernel vs cuDNN, batch 256/32/1,
#                      bf16/fp16, TFLOP/s and ratios (benchmarks/conv_layers.py)
#   pytest_benchmarks  pytest-benchmark quick set (conv layers, CUDA-extension ops vs Triton
#                      and eager)
#   latency            ResNet-50 batch-1 latency, fastres with/without CUDA graphs vs eager and
#                      torch.compile(mode="reduce-overhead"), with and without inductor's
#                      freezing (benchmarks/bench_latency.py)
#   fastres_bench      `python3 -m fastres bench`: resnet50, resnet101, resnet18 x batch 1, 32,
#                      256 x bf16, fp16, outputs checked first; compile baselines (default,
#                      freezing, reduce-overhead) for resnet50
#                      (resnet101 before resnet18: its layers are resnet50's, already tuned)
#
# Time: everything ends within GPU_CHECK_BUDGET_S (default 520 s) plus at most 15 s, under
# the 9 minutes a device call should take (its hard limit is 10). Each stage runs under
# `timeout` with cap = min(its nominal cap, time left - the minimum of every selected stage
# after it), so one slow stage cannot starve the others; the last stage gets the rest. On its
# cap a stage gets SIGTERM and keeps what it measured (each benchmark writes its results as it
# goes, and stops like Ctrl-C: pytest still writes its junit XML / benchmark JSON), then SIGKILL
# 15 s later. A stage that fails or times out never stops the stages after it.
#   stage              nominal cap (override)               minimum kept for it
#   env                 30 s                                  10 s
#   build              180 s                                  60 s (when it will run)
#   tests              200 s (GPU_CHECK_TESTS_S)              90 s
#   conv_layers        150 s (GPU_CHECK_CONV_S)               45 s
#   pytest_benchmarks   90 s (GPU_CHECK_PYBENCH_S)            45 s
#   latency            150 s (GPU_CHECK_LATENCY_S)            60 s
#   fastres_bench      the rest (GPU_CHECK_BENCH_S)          120 s; its own --time-budget
#                      stops starting groups 45 s before its cap
# Estimated on an H100 with cold caches (a Triton compile of one kernel configuration for sm_90
# takes 0.5-1.4 s of one CPU core; ResNet-50 has 38 distinct compiles per dtype over batch
# 1/32/256, resnet18 adds 11, resnet101 none; a torch.compile of ResNet-50 ~30-45 s per shape):
#   part1: checks 10 + env 5 + build 60-90 + tests <= 200 + conv_layers ~105 (76 compiles,
#          144 rows) + pytest_benchmarks ~50 = ~450 s
#   part2: checks 10 + env 5 + build 0 (warm) or 60-90 (cold) + latency ~110 (two compiles,
#          tuning at batch 1) + fastres_bench the rest, 300-390 s (tuning ~120 s, up to 300 s
#          of torch.compile (--compile-budget: resnet50's three compile rows per group, bf16
#          first), ~60 s timed; the groups its --time-budget leaves out, likely resnet101's
#          and resnet18's in one call, are listed as skipped: GPU_CHECK_BENCH_ARGS trades)
# A machine stays warm 30 s after a call: start part2 at once to keep the build and caches.
#
# Output: OUTDIR holds at most 8 files, the device tool's limit: summary.md (printed LAST, also
# rewritten after every stage), all.tar.gz (every log and result, rewritten after every stage),
# gpu_check.log, bench.json, bench.md, bench.png, conv_layers.md, bench_latency.md. The details
# are kept in a temporary folder (GPU_CHECK_KEEP=1 moves them to OUTDIR/details at the end);
# they include fastres's tuning cache files (details/tuning: each layer's candidate times).
# GPU_CHECK_COMMIT names the commit in the summary when the machine has no .git.
#
# Exit status: 0 when every stage ran (or stopped at its cap, keeping what it measured), 1 when
# a stage failed or a stage stopped at its cap kept a failure (a failed test, a fastres row
# that disagreed with eager: see summary.md), 2 for a usage error, 3 when torch sees no CUDA
# GPU: then only the env stage runs (GPU_CHECK_ALLOW_CPU=1 runs every stage on the CPU: a dry
# run).

set -u -o pipefail

PY=${PYTHON:-python3}
# OUTDIR and a PYTHON given as a relative path are relative to where the script is run
CALLER_DIR=$PWD
case $PY in
    /*) ;;
    */*) PY="$CALLER_DIR/$PY" ;;
esac
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2

source_digest() {
    # What the results were measured on: every source file the GPU machine runs (tracked or
    # not), independent of git; the same command on a checkout gives the same digest.
    find fastres csrc benchmarks tests setup.py pyproject.toml -type f \
        \( -name '*.py' -o -name '*.cu' -o -name '*.cpp' -o -name '*.h' -o -name '*.sh' \
           -o -name '*.toml' \) -not -path '*/__pycache__/*' 2>/dev/null \
        | LC_ALL=C sort | xargs sha256sum 2>/dev/null | sha256sum | cut -c1-16
}

case "${1:-}" in
    --digest) source_digest; exit 0 ;;
    -h|--help) sed -n '2,/^set -u/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    "") echo "usage: bash benchmarks/gpu_check.sh OUTDIR   (--help for the stages)" >&2; exit 2 ;;
esac

ALL_STAGES="env build tests conv_layers pytest_benchmarks latency fastres_bench"
SELECTED=""
STAGES_ARG=${GPU_CHECK_STAGES:-all}
for s in ${STAGES_ARG//,/ }; do
    case $s in
        all) SELECTED="$SELECTED $ALL_STAGES" ;;
        part1) SELECTED="$SELECTED env build tests conv_layers pytest_benchmarks" ;;
        part2) SELECTED="$SELECTED env build latency fastres_bench" ;;
        one) SELECTED="$SELECTED env build tests fastres_bench" ;;
        env|build|tests|conv_layers|pytest_benchmarks|latency|fastres_bench) SELECTED="$SELECTED $s" ;;
        *) echo "gpu_check.sh: unknown stage '$s' in GPU_CHECK_STAGES (stages: $ALL_STAGES," \
                "or all, part1, part2, one)" >&2; exit 2 ;;
    esac
done

case $1 in
    /*) OUTDIR_ARG=$1 ;;
    *) OUTDIR_ARG="$CALLER_DIR/$1" ;;
esac
mkdir -p "$OUTDIR_ARG" || exit 2
OUTDIR=$(cd "$OUTDIR_ARG" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastres_gpu_check.XXXXXX") || exit 2
D="$WORK/details"
mkdir -p "$D"
# results of an earlier run in the same folder must not pass for this run's
TOP_FILES="summary.md all.tar.gz gpu_check.log bench.json bench.md bench.png conv_layers.md bench_latency.md"
for f in $TOP_FILES; do rm -f "$OUTDIR/$f"; done
rm -rf "$OUTDIR/details"

export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-520}
DEADLINE=$((START + BUDGET))
STAGES="$D/stages.tsv"
printf 'stage\tstatus\tseconds\tlog\n' > "$STAGES"
: > "$D/commands.tsv"
# the command as given: every GPU_CHECK_* setting and the variables the stages read
INVOCATION=""
for v in $(compgen -v GPU_CHECK_) PYTHON MAX_JOBS FASTRES_TUNE FASTRES_BACKEND \
         FASTRES_FORCE_CUDA_BUILD TORCH_CUDA_ARCH_LIST; do
    case $v in GPU_CHECK_DIGEST|GPU_CHECK_COMMIT_RESOLVED) continue ;; esac  # (set below)
    [ -n "${!v:-}" ] && INVOCATION="$INVOCATION$v=\"${!v}\" "
done
INVOCATION="${INVOCATION}bash benchmarks/gpu_check.sh $1"
export GPU_CHECK_DIGEST
GPU_CHECK_DIGEST=$(source_digest)
git_commit() {  # the checkout's commit (+dirty when tracked files differ), or "unknown (...)"
    local head
    head=$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null) \
        || { echo "unknown (no git checkout here: set GPU_CHECK_COMMIT)"; return; }
    git -C "$REPO" diff --quiet HEAD 2>/dev/null && echo "$head" || echo "$head+dirty"
}
export GPU_CHECK_COMMIT_RESOLVED=${GPU_CHECK_COMMIT:-$(git_commit)}

exec > >(tee -a "$OUTDIR/gpu_check.log") 2>&1
TEE_PID=$!

now() { date +%s; }
remaining() { echo $((DEADLINE - $(now))); }
selected() { case " $SELECTED " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# Does the extension need building? Decided once, up front, so the time kept for the build
# is known (a warm machine keeps the build: skip it when fastres._C loads and was built from
# the same setup.py and csrc/, a checksum stamp under build/, which git ignores).
BUILD_STAMP=build/.fastres_ext_sources.sha256
SRC_SUM=$(cat setup.py csrc/* 2>/dev/null | sha256sum | cut -d' ' -f1)
EXT_LOADS=0
timeout 120 "$PY" -c "import sys; from fastres import _ext; sys.exit(0 if _ext.available() else 1)" \
    >/dev/null 2>&1 && EXT_LOADS=1
NEED_BUILD=0
if [ "${GPU_CHECK_REBUILD:-0}" = 1 ] || [ "$EXT_LOADS" = 0 ] \
        || [ "$(cat "$BUILD_STAMP" 2>/dev/null)" != "$SRC_SUM" ]; then
    NEED_BUILD=1
fi
if ! selected build && [ "$EXT_LOADS" = 0 ] && [ "${GPU_CHECK_AUTO_BUILD:-1}" = 1 ] && {
        selected tests || selected conv_layers || selected pytest_benchmarks \
        || selected latency || selected fastres_bench; }; then
    echo "note: fastres._C does not load here: the build stage is added (GPU_CHECK_AUTO_BUILD=0: not)"
    SELECTED="build $SELECTED"
fi
WANT=""
for s in $ALL_STAGES; do selected "$s" && WANT="$WANT $s"; done

nominal_of() {
    case $1 in
        env) echo 30 ;;
        build) echo 180 ;;
        tests) echo "${GPU_CHECK_TESTS_S:-200}" ;;
        conv_layers) echo "${GPU_CHECK_CONV_S:-150}" ;;
        pytest_benchmarks) echo "${GPU_CHECK_PYBENCH_S:-90}" ;;
        latency) echo "${GPU_CHECK_LATENCY_S:-150}" ;;
        fastres_bench) echo "${GPU_CHECK_BENCH_S:-100000}" ;;
    esac
}
min_of() {
    case $1 in
        env) echo 10 ;;
        build) [ "$NEED_BUILD" = 1 ] && echo 60 || echo 0 ;;
        tests) echo 90 ;;
        conv_layers|pytest_benchmarks) echo 45 ;;
        latency) echo 60 ;;
        fastres_bench) echo 120 ;;
    esac
}
# reserve_after NAME: the time kept for the selected stages after NAME, and for the summary
reserve_after() {
    local r=10 after=0 s
    for s in $WANT; do
        [ "$after" = 1 ] && r=$((r + $(min_of "$s")))
        [ "$s" = "$1" ] && after=1
    done
    echo "$r"
}
# stage_cap NAME: how long NAME may run now
stage_cap() {
    local nominal left
    nominal=$(nominal_of "$1")
    left=$(( $(remaining) - $(reserve_after "$1") ))
    echo $(( nominal < left ? nominal : left ))
}

# fastres's tuning cache (fastres.tuning.cache_dir()): its records hold every candidate's time
# for each layer tuned in this run's stages, brought back under details/tuning
if [ -n "${FASTRES_CACHE_DIR:-}" ]; then TUNE_DIR=$FASTRES_CACHE_DIR
elif [ -n "${XDG_CACHE_HOME:-}" ]; then TUNE_DIR=$XDG_CACHE_HOME/fastres
else TUNE_DIR=${HOME:-/nonexistent}/.cache/fastres
fi

summarize() {
    timeout 60 "$PY" benchmarks/gpu_check_report.py summary "$OUTDIR" "$D" \
        "$(( $(now) - START ))" "$BUDGET" "$INVOCATION" > "$WORK/summary.md" \
        2> "$D/summary.err" && cp -f "$WORK/summary.md" "$OUTDIR/summary.md"
}
bundle() {
    # Everything under details/ plus the top-level results, as one file for the trip back;
    # rewritten after every stage, so a run cut off by the device's limit still brings it back.
    if compgen -G "$TUNE_DIR/tuning-*.json" > /dev/null; then
        mkdir -p "$D/tuning" && cp -f "$TUNE_DIR"/tuning-*.json "$D/tuning/" 2>/dev/null
    fi
    summarize
    local top
    top=$(cd "$OUTDIR" && ls summary.md bench.json bench.md bench.png gpu_check.log \
        conv_layers.md bench_latency.md 2>/dev/null)
    # shellcheck disable=SC2086  # $top: plain file names, no spaces
    # (built beside the details, then copied: OUTDIR never holds a 9th, half-written file)
    tar -czf "$WORK/all.tar.gz" -C "$WORK" details -C "$OUTDIR" $top 2>/dev/null \
        && cp -f "$WORK/all.tar.gz" "$OUTDIR/all.tar.gz"
}

# run_stage NAME CAP LOG CMD...: run CMD under `timeout CAP`, record its status.
run_stage() {
    local name=$1 cap=$2 log=$3
    shift 3
    if [ "$cap" -lt 10 ]; then
        printf '%s\tskipped (no time left)\t0\t-\n' "$name" >> "$STAGES"
        echo "=== $name: skipped, no time left"
        bundle
        return 0
    fi
    local shown="$*"
    printf '%s\t%s\n' "$name" "${shown//$WORK\//}" >> "$D/commands.tsv"  # details/... paths
    echo "=== $name (cap ${cap}s, $(( $(now) - START ))s elapsed): $*"
    local t0 rc status
    t0=$(now)
    timeout -k 15 "$cap" "$@" > "$log" 2>&1 < /dev/null
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="TIMEOUT after ${cap}s" ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(now) - t0 ))" "details/${log#"$D"/}" >> "$STAGES"
    echo "=== $name: $status in $(( $(now) - t0 ))s (log: details/${log#"$D"/})"
    tail -n 5 "$log" | cut -c1-300 | sed 's/^/    /'
    bundle
    return 0
}
skip_stage() {  # skip_stage NAME WHY
    printf '%s\tskipped (%s)\t0\t-\n' "$1" "$2" >> "$STAGES"
    echo "=== $1: skipped ($2)"
}

# pytest: SIGTERM from `timeout` stops it like Ctrl-C (see benchmarks/plugins), so the junit XML
# and the benchmark JSON are still written; without pytest-benchmark, pyproject's addopts
# (--benchmark-disable) would make every pytest call a usage error.
PYTEST_PLUGIN_PATH="$REPO/benchmarks/plugins${PYTHONPATH:+:$PYTHONPATH}"
HAVE_PYBENCH=0
"$PY" -c "import pytest_benchmark" 2>/dev/null && HAVE_PYBENCH=1
PYTEST_ADDOPTS_FIX=()
[ "$HAVE_PYBENCH" = 0 ] && PYTEST_ADDOPTS_FIX=(-o "addopts=-ra")

# --- env --------------------------------------------------------------------------------------
if selected env; then
    run_stage env "$(stage_cap env)" "$D/env.log" \
        "$PY" benchmarks/gpu_check_report.py env "$D/env.json"
fi

# --- no GPU: stop here -------------------------------------------------------------------------
# (every later stage would run on the CPU or time out, and spend the whole budget for nothing;
# GPU_CHECK_ALLOW_CPU=1 runs them anyway: the CPU dry runs of the tests)
if [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ] && ! timeout 120 "$PY" -c \
        "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)" >/dev/null 2>&1; then
    printf 'gpu\tFAILED (torch sees no CUDA GPU: nothing else ran)\t0\t-\n' >> "$STAGES"
    echo "gpu_check.sh: torch sees no CUDA GPU here (torch.cuda.is_available() is False);" \
         "stopping (GPU_CHECK_ALLOW_CPU=1 runs the stages anyway)"
    bundle
    cat "$OUTDIR/summary.md"
    exec >&- 2>&-
    wait "$TEE_PID" 2>/dev/null
    rm -rf "$WORK"
    exit 3
fi

# --- build the extension ----------------------------------------------------------------------
if selected build && [ "$NEED_BUILD" = 1 ]; then
    if "$PY" -m pip --version >/dev/null 2>&1; then
        BUILD_CMD=("$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .)
    else  # no pip in this environment: build in place
        BUILD_CMD=("$PY" setup.py build_ext --inplace)
    fi
    run_stage build "$(stage_cap build)" "$D/build.log" env MAX_JOBS="${MAX_JOBS:-16}" \
        FASTRES_FORCE_CUDA_BUILD="${FASTRES_FORCE_CUDA_BUILD:-1}" "${BUILD_CMD[@]}"
    if [ "$(tail -n 1 "$STAGES" | cut -f2)" = ok ]; then
        mkdir -p build && echo "$SRC_SUM" > "$BUILD_STAMP"
    fi
elif selected build; then
    skip_stage build "fastres._C loads and was built from these sources"
fi
timeout 120 "$PY" -c "
from fastres import _ext
print('loads' if _ext.available() else 'does NOT load: ' + str(_ext.error()))" \
    > "$D/extension.txt" 2>&1 || echo "does NOT load (the check failed)" >> "$D/extension.txt"
echo "fastres._C $(head -c 300 "$D/extension.txt")"

# --- GPU tests --------------------------------------------------------------------------------
# FASTRES_TUNE=0 pins one configuration per layer for the suite (tests of tuning set their own
# mode): tuning every layer of ten architectures would compile every candidate kernel. Workers
# in parallel (pytest-xdist, when installed) since Triton compiles are CPU-bound.
if selected tests; then
    XDIST=()
    "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n "${GPU_CHECK_WORKERS:-14}")
    PYTEST_TIMEOUT=()
    "$PY" -c "import pytest_timeout" 2>/dev/null \
        && PYTEST_TIMEOUT=(--timeout "${GPU_CHECK_TEST_TIMEOUT:-240}")
    if [ -n "${GPU_CHECK_TESTS:-}" ]; then
        # shellcheck disable=SC2206  # GPU_CHECK_TESTS is a list of pytest arguments on purpose
        TEST_ARGS=(${GPU_CHECK_TESTS})
    else  # (the slow ones, which tune whole models, do not fit the stage's cap)
        TEST_ARGS=(tests -m "cuda and not slow")
    fi
    run_stage tests "$(stage_cap tests)" "$D/tests.log" \
        env FASTRES_TUNE=0 FASTRES_FAILURE_LOG="$D/test_failures.log" \
        FASTRES_MARGIN_LOG="$D/test_margins.tsv" FASTRES_RESULT_LOG="$D/test_results.tsv" \
        PYTHONPATH="$PYTEST_PLUGIN_PATH" \
        "$PY" -m pytest "${TEST_ARGS[@]}" -q -p no:cacheprovider \
        -p gpu_check_sigterm "${PYTEST_ADDOPTS_FIX[@]}" "${XDIST[@]}" "${PYTEST_TIMEOUT[@]}" \
        -rfE --junitxml="$D/tests.xml"
fi

# --- kernel benchmarks ------------------------------------------------------------------------
if selected conv_layers; then
    CAP=$(stage_cap conv_layers)
    mkdir -p "$D/kernels"
    # batch 256 first: the per-layer target is at batch 256 bf16, and a run stopped by its
    # cap keeps what it measured first
    run_stage conv_layers "$CAP" "$D/conv_layers.log" \
        "$PY" benchmarks/conv_layers.py --out "$D/kernels" --batch 256 32 1 \
        --time-budget $(( CAP - 15 ))
    cp -f "$D/kernels/conv_layers.md" "$OUTDIR/conv_layers.md" 2>/dev/null
fi
if selected pytest_benchmarks && [ "$HAVE_PYBENCH" = 0 ]; then
    skip_stage pytest_benchmarks "pytest-benchmark is not installed"
elif selected pytest_benchmarks; then
    # "not slow" keeps to the quick kernel benchmarks; GPU_CHECK_BENCH_K narrows with -k.
    run_stage pytest_benchmarks "$(stage_cap pytest_benchmarks)" "$D/pytest_benchmarks.log" \
        env PYTHONPATH="$PYTEST_PLUGIN_PATH" \
        "$PY" -m pytest benchmarks -q -p no:cacheprovider -p gpu_check_sigterm -m "not slow" \
        ${GPU_CHECK_BENCH_K:+-k "$GPU_CHECK_BENCH_K"} \
        --benchmark-enable --benchmark-json="$D/kernel_benchmarks.json" \
        --benchmark-max-time=0.2 --benchmark-min-rounds=3 --benchmark-warmup=on
fi

if selected latency; then
    mkdir -p "$D/latency"
    # shellcheck disable=SC2086  # GPU_CHECK_LATENCY_ARGS is a list of options on purpose
    run_stage latency "$(stage_cap latency)" "$D/latency.log" \
        "$PY" benchmarks/bench_latency.py --out "$D/latency" ${GPU_CHECK_LATENCY_ARGS:---dtypes bf16}
    cp -f "$D/latency/bench_latency.md" "$OUTDIR/bench_latency.md" 2>/dev/null
fi

# --- end to end: fastres bench ----------------------------------------------------------------
if selected fastres_bench; then
    CAP=$(stage_cap fastres_bench)
    # the bench checks its budget between groups; a group (or a model's tuning, or one
    # torch.compile) can take ~45 s, so it stops starting new ones that long before its cap
    SLACK=$(( CAP / 3 < 45 ? CAP / 3 : 45 ))
    BENCH_BUDGET=$(( CAP - SLACK ))
    # GPU_CHECK_BENCH_ARGS replaces the model/batch/dtype/timing options (e.g. for a dry run).
    BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:-"--device cuda -m resnet50,resnet101,resnet18 -b 1 32 256 \
--dtype bf16 fp16 --iters 30 --warmup 5 --max-time 2 --compile-models resnet50 --compile-freezing \
--compile-reduce-overhead --compile-budget 300"}
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of options on purpose
    run_stage fastres_bench "$CAP" "$D/bench.log" \
        "$PY" -m fastres bench $BENCH_ARGS \
        --time-budget "$BENCH_BUDGET" --no-progress --out "$D/bench"
    for f in bench.json bench.md bench.png; do
        [ -f "$D/bench/$f" ] && cp -f "$D/bench/$f" "$OUTDIR/$f"
    done
fi

# --- summary (printed last) -------------------------------------------------------------------
bundle
SIZE=$(stat -c %s "$OUTDIR/all.tar.gz" 2>/dev/null || echo 0)
if [ "$SIZE" -gt $((15 * 1024 * 1024)) ]; then
    # Over the files-back limit: keep logs, junit and bench results, drop the kernel data.
    tar -czf "$OUTDIR/all.tar.gz" -C "$WORK" --exclude=details/kernels \
        --exclude=details/kernel_benchmarks.json details -C "$OUTDIR" summary.md 2>/dev/null
    echo "note: all.tar.gz was over 15 MiB; kernel benchmark data left out" >> "$OUTDIR/summary.md"
fi
# 1 when a stage failed (its results may still be partly there); a stage stopped at its cap
# keeps what it measured and is not a failure, unless what it kept holds one (a failed test, a
# fastres row that disagreed with eager: gpu_check_report.py failures)
RC=0
cut -f2 "$STAGES" | grep -q '^FAILED' && RC=1
timeout 60 "$PY" benchmarks/gpu_check_report.py failures "$D" || RC=1
if [ "${GPU_CHECK_KEEP:-0}" = 1 ]; then
    mv "$D" "$OUTDIR/details" && echo "details kept in $OUTDIR/details"
fi
rm -rf "$WORK"

echo
echo "=================================== SUMMARY ==================================="
cat "$OUTDIR/summary.md"
echo "(all results: $OUTDIR/all.tar.gz; total $(( $(now) - START )) s)"
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit "$RC"
