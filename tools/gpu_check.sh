#!/usr/bin/env bash
# The one prepared GPU check (docs/gpu.md): build the extension for the local GPU, run the CUDA
# tests, time the project's trainer on synthetic batches made on the GPU (fp16, bf16; beside a
# bare loop; tracking off/on/SI every step) and through FFCV's GPU pipeline (FFCV from the carried
# gpu_bundle/), time the library's ResNet-50 step with tracking off/on/SI and accumulate against
# x.sum(), and write $OUT/gpu_check.json + $OUT/gpu_check.md. Run from anywhere; it works in the
# repo root. The whole check stops within GPU_CHECK_TOTAL seconds (300): a stage gets its own
# limit or what is left of the total, whichever is less.
#
#   tools/gpu_check.sh [--dry-run] [--only STAGE[,STAGE...]]
#
#   --dry-run   the same stages on the CPU at tiny sizes, every GPU hidden (CUDA_VISIBLE_DEVICES=""),
#               so a stray CUDA call fails it; nothing is compiled (tests/test_gpu_check.py runs it)
#   --only      a subset of: build,tests,trainer,ffcv,train,ops (the probe and the report always run)
#
# Environment: PYTHON (default python3: the GPU machine's own, no venv), OUT (default
# ./gpu_check_out in the repo root), GPU_CHECK_LIMIT_{ENV,BUILD,TESTS,TRAIN,OPS} (seconds),
# CUDA_HOME and TORCH_CUDA_ARCH_LIST (found/detected when unset).
# Exit: 0 correct (speed targets are verdicts in the report), 1 a correctness check failed,
# 2 it cannot start (bad argument, no python, no GPU in real mode: one line), 3 a benchmark failed.
set -u

usage="usage: tools/gpu_check.sh [--dry-run] [--only build,tests,trainer,ffcv,train,ops]"
DRY=0
STAGES=build,tests,trainer,ffcv,train,ops  # in this order: the total's time goes to the first
ONLY=$STAGES
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) [ $# -ge 2 ] || { echo "gpu_check: --only needs a list of stages; $usage" >&2; exit 2; }
            ONLY=$2; shift ;;
    --only=*) ONLY=${1#--only=} ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) echo "gpu_check: unknown argument '$1'; $usage" >&2; exit 2 ;;
  esac
  shift
done
for s in ${ONLY//,/ }; do
  case ",$STAGES," in *",$s,"*) ;;
    *) echo "gpu_check: unknown stage '$s' in --only; choose from $STAGES" >&2; exit 2 ;;
  esac
done

PYTHON=${PYTHON:-python3}
command -v "$PYTHON" >/dev/null 2>&1 || { echo "gpu_check: no interpreter '$PYTHON'; set PYTHON to the python that has torch" >&2; exit 2; }
command -v timeout >/dev/null 2>&1 || { echo "gpu_check: needs coreutils' timeout for the stage time limits" >&2; exit 2; }
# Resolve OUT against the caller's directory before moving to the repo root.
OUT=$(realpath -m "${OUT:-$(dirname "$0")/../gpu_check_out}")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2

# Limits: each stage's own (a hang in one still leaves the others), and the total: the check ends
# within GPU_CHECK_TOTAL seconds (300, so that a run and a rerun fit the device's 15 minutes with
# the machine's start), REPORT_RESERVE of it kept for the report.
L_ENV=${GPU_CHECK_LIMIT_ENV:-30}
L_BUILD=${GPU_CHECK_LIMIT_BUILD:-150}
L_TESTS=${GPU_CHECK_LIMIT_TESTS:-90}
L_TRAINER=${GPU_CHECK_LIMIT_TRAINER:-120}
L_FFCV=${GPU_CHECK_LIMIT_FFCV:-120}
L_TRAIN=${GPU_CHECK_LIMIT_TRAIN:-120}
L_OPS=${GPU_CHECK_LIMIT_OPS:-60}
TOTAL=${GPU_CHECK_TOTAL:-300}
REPORT_RESERVE=20
# The dry run guards no device budget and runs on a 2-core CPU that may be shared: its limits are
# four times as long, so load on that machine cannot fail it.
if [ "$DRY" = 1 ]; then
  for v in L_BUILD L_TESTS L_TRAINER L_FFCV L_TRAIN L_OPS TOTAL; do declare "$v=$(( ${!v} * 4 ))"; done
fi
T0=$(date +%s)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
# An install maps the top-level pipelines/ to selectivity.pipelines (setup.py), and the trainer
# imports it; the GPU machine runs the checkout uninstalled: a link does the same, for this run.
LINK=
if [ ! -e selectivity/pipelines ] && ! "$PYTHON" -c "import selectivity.pipelines" >/dev/null 2>&1; then
  ln -s ../pipelines selectivity/pipelines && LINK=selectivity/pipelines
fi
trap 'rm -rf "$WORK"; [ -z "$LINK" ] || rm -f "$LINK"' EXIT
ARGS=(--work "$WORK" --out "$OUT")
if [ "$DRY" = 1 ]; then
  ARGS+=(--dry-run)
  export CUDA_VISIBLE_DEVICES=""
fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

# The probe first, before anything is built or written: no GPU means one line and exit 2.
timeout -k 5 "$L_ENV" "$PYTHON" -m selectivity.gpucheck.stages env "${ARGS[@]}" --limit "$L_ENV" >"$WORK/env.log" 2>&1
rc=$?
if [ $rc -ne 0 ]; then
  if [ -s "$WORK/fatal" ]; then head -n 1 "$WORK/fatal" >&2
  else echo "gpu_check: $PYTHON could not run the environment probe (exit $rc): $(tail -n 1 "$WORK/env.log")" >&2
  fi
  exit 2
fi
mkdir -p "$OUT" || exit 2
rm -f "$OUT/gpu_check.json" "$OUT/gpu_check.md" "$OUT/junit.xml"  # no stale results from an earlier run
LOG=$OUT/gpu_check.log
{ echo "== env"; cat "$WORK/env.log"; } >"$LOG"
echo "gpu_check: $([ "$DRY" = 1 ] && echo "DRY RUN, CPU" || echo "real run") with $PYTHON; log: $LOG"

stage() {  # name limit: one stage under its own limit; the report reads NAME.rc and NAME.sec
  local name=$1 limit=$2 start rc left run=()
  start=$(date +%s)
  left=$(( TOTAL - REPORT_RESERVE - (start - T0) ))
  if [ "$left" -lt 10 ]; then  # reported as a stage out of time (exit 124), not as left out
    echo 124 >"$WORK/$name.rc"; echo 0 >"$WORK/$name.sec"
    echo "gpu_check: $name: not run, the check's ${TOTAL} s are spent"; return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  # FFCV on the GPU machine comes from the carried bundle, its paths set for this stage alone;
  # the dry run uses the environment's own FFCV (and checks the bundle with a Python 3.12).
  [ "$name" = ffcv ] && [ "$DRY" = 0 ] && [ -x gpu_bundle/run ] && run=(gpu_bundle/run)
  echo "== $name (limit ${limit}s)" >>"$LOG"
  timeout -k 10 "$limit" "${run[@]}" "$PYTHON" -m selectivity.gpucheck.stages "$name" "${ARGS[@]}" --limit "$limit" >>"$LOG" 2>&1
  rc=$?
  echo "$rc" >"$WORK/$name.rc"
  echo $(( $(date +%s) - start )) >"$WORK/$name.sec"
  case $rc in 0) what=ok ;; 124|137) what="TIMED OUT" ;; *) what="failed (exit $rc)" ;; esac
  echo "gpu_check: $name: $what ($(cat "$WORK/$name.sec") s)"
}
for s in ${STAGES//,/ }; do
  case ",$ONLY," in *",$s,"*)
    limit_var=L_${s^^}
    stage "$s" "${!limit_var}" ;;
  esac
done

echo "== report" >>"$LOG"
timeout -k 5 20 "$PYTHON" -m selectivity.gpucheck.stages report "${ARGS[@]}" --limit 20 >>"$LOG" 2>&1
rc=$?
if [ -f "$OUT/gpu_check.md" ]; then cat "$OUT/gpu_check.md"
else
  # $WORK goes with this shell: keep the stages' raw records in the log, which comes back.
  for f in "$WORK"/*.json; do echo "== raw record $(basename "$f")"; cat "$f"; echo; done >>"$LOG"
  echo "gpu_check: the report failed (exit $rc); the stages' raw records are at the end of $LOG"
fi
[ $rc -eq 2 ] && rc=1  # 2 means "could not start"; a broken report is a failed check
exit $rc
