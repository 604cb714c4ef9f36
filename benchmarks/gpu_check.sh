#!/usr/bin/env bash
# The device check: everything a short GPU slot should tell us, in one command of <= 10 minutes.
#
#   benchmarks/gpu_check.sh [--smoke] [--wheels DIR] OUTDIR
#
# Stages, in order, each with its own time limit and elapsed time, each logged to OUTDIR/<stage>.log
# (and all of them to OUTDIR/check.log); a stage that fails or runs out of time never stops the
# next one, and the exit code is non-zero when any stage failed:
#   install  pip install --no-build-isolation --no-deps -e . (no network needed; builds unimm._C
#            with nvcc, UNIMM_BUILD_CUDA=1), after the anchors' wheels of --wheels DIR if given
#            (pip install --no-index --no-deps --target, put on PYTHONPATH)
#   info     unimm info
#   tests    pytest -m gpu: the fast GPU tier (<= 4 minutes from a cold Triton cache)
#   bench    unimm bench --quick, with the time that is left (--budget-s)
# OUTDIR then holds the logs, stages.json (each stage's exit code and seconds), gpu-tests.xml,
# bench/ (each family's JSON, summary-*.json, PERFORMANCE.md, logs/) and bundle.tar.gz of all of it.
#
# --smoke runs the same stages on a CPU (CI does, in under 3 minutes): the install goes to a
# scratch folder without the CUDA build (the environment that runs the other stages is untouched),
# pytest -m gpu collects and skips, and the bench stage is unimm bench --smoke.
#
# Environment: PYTHON (default python3), UNIMM_CHECK_BUDGET_S (the whole check, default 570).
set -uo pipefail

usage() { echo "usage: $0 [--smoke] [--wheels DIR] OUTDIR" >&2; exit 2; }
SMOKE=0
WHEELS=""
OUTDIR=""
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --wheels) [ $# -ge 2 ] || usage; WHEELS="$2"; shift ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        -*) usage ;;
        *) [ -z "$OUTDIR" ] || usage; OUTDIR="$1" ;;
    esac
    shift
done
[ -n "$OUTDIR" ] || usage

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
PYTHON="${PYTHON:-python3}"
BUDGET="${UNIMM_CHECK_BUDGET_S:-570}"
START=$(date +%s)
STAGES=()
FAILED=0
: > "$OUTDIR/check.log"

say() { echo "$*" | tee -a "$OUTDIR/check.log"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# stage NAME LIMIT_S COMMAND...: runs COMMAND under `timeout`, never longer than the budget left
stage() {
    local name="$1" limit="$2"; shift 2
    local remaining; remaining=$(left)
    if [ "$limit" -gt "$remaining" ]; then limit=$remaining; fi
    if [ "$limit" -le 0 ]; then
        say "== $name: not run, the check's budget of ${BUDGET} s is spent"
        STAGES+=("{\"stage\": \"$name\", \"rc\": null, \"seconds\": 0, \"limit_s\": 0}")
        FAILED=1
        return
    fi
    say "== $name (limit ${limit} s): $*"
    local t0 rc; t0=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" > >(tee "$OUTDIR/$name.log" >> "$OUTDIR/check.log") 2>&1
    rc=$?
    wait  # the tee of the process substitution
    local seconds=$(( $(date +%s) - t0 ))
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        say "== $name: STOPPED at its limit of ${limit} s"
    fi
    say "== $name: exit code $rc in ${seconds} s"
    STAGES+=("{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $seconds, \"limit_s\": $limit}")
    [ "$rc" -eq 0 ] || FAILED=1
}

install_checkout() {
    if [ -n "$WHEELS" ]; then
        local site="$OUTDIR/.anchors"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            "$WHEELS"/*.whl || return $?
        echo "anchors from $WHEELS installed in $site"
    fi
    if [ "$SMOKE" = 1 ]; then
        local scratch; scratch="$(mktemp -d)"
        UNIMM_BUILD_CUDA=0 "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index --target "$scratch" . \
            && "$PYTHON" -c "import sys; sys.path.insert(0, '$scratch'); import unimm, unimm.bench.suite; print('installed', unimm.__version__, 'into', '$scratch')"
        local rc=$?
        rm -rf "$scratch"
        return $rc
    fi
    UNIMM_BUILD_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
}

export -f install_checkout  # `timeout` runs it in a child bash
export SMOKE WHEELS OUTDIR PYTHON
say "unimm device check ($([ "$SMOKE" = 1 ] && echo smoke || echo gpu)) of $(git rev-parse --short HEAD 2>/dev/null || echo '?') into $OUTDIR, budget ${BUDGET} s"
stage install 240 bash -c install_checkout
if [ -n "$WHEELS" ]; then export PYTHONPATH="$OUTDIR/.anchors${PYTHONPATH:+:$PYTHONPATH}"; fi
stage info 60 "$PYTHON" -m unimm info
stage tests 270 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider --durations=20 --junitxml="$OUTDIR/gpu-tests.xml"
if [ "$SMOKE" = 1 ]; then
    stage bench 240 "$PYTHON" -m unimm bench --smoke --out "$OUTDIR/bench"
else
    # the bench stops itself (family by family) 20 s before the stage's own limit
    BENCH_LIMIT=$(( $(left) - 5 ))
    BENCH_BUDGET=$(( BENCH_LIMIT > 40 ? BENCH_LIMIT - 20 : 20 ))
    stage bench "$BENCH_LIMIT" "$PYTHON" -m unimm bench --quick --out "$OUTDIR/bench" --budget-s "$BENCH_BUDGET"
fi

{
    echo "["
    for i in "${!STAGES[@]}"; do
        [ "$i" -gt 0 ] && echo ","
        printf '  %s' "${STAGES[$i]}"
    done
    echo ""
    echo "]"
} > "$OUTDIR/stages.json"
say "== done in $(( $(date +%s) - START )) s; stages: $(tr -d '\n' < "$OUTDIR/stages.json")"
rm -rf "$OUTDIR/.anchors"
BUNDLE="$(mktemp)"
tar czf "$BUNDLE" -C "$OUTDIR" --exclude=./bundle.tar.gz . && mv "$BUNDLE" "$OUTDIR/bundle.tar.gz"
exit $FAILED
