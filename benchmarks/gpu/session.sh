#!/usr/bin/env bash
# Run ON the GPU machine (device tool), from the repository root, after benchmarks/gpu/prepare.sh ran here and
# with carry [".data", ".whl"]. The whole lent slot is ONE call (about 15 minutes of device time in all, start-up
# included; at most 10 minutes a command), so name the `slot` phase, everything at once on the one GPU (no phase named is an error):
#
#   BUDGET_S=500 bash benchmarks/gpu/session.sh slot            # the prepared command (docs/gpu.md)
#   DRY_RUN=1 bash benchmarks/gpu/session.sh slot               # print the plan and check every cell's config
#
#   slot        concurrently: lane "check" (nvidia-smi, versions, the CUDA tests, a 50-step engine run on CUDA)
#               then "throughput" (benchmarks/train_throughput.py --device cuda); and one lane per matrix in
#               $SLOT_MATRICES ("name:workers ...", default "cifar10_resnet20_converged:3 ssia_screen:2"), each
#               `attnlab bench --workers K --budget` so that no cell starts that would not end by BUDGET_S
#               (estimated from that matrix's finished GPU cells; with none yet, cells start until the budget
#               is spent and a cell still running at BUDGET_S is stopped and lost with the machine)
# The single phases stay for a warm machine and for debugging:
#   check | throughput | matrix ($MATRIX, stopped at $BUDGET_S) | latency ($MATRIX's missing latency entries)
#   stream      the streaming pipeline alone on the GPU (benchmarks/gpu/stream_lane.py): a generated folder of 224 px
#               JPEGs, ResNet-50 trained for ~300 steps through data.pipeline=stream, timed against the loader alone
#               and the training step alone -> stream_train.json says which one is the bottleneck. Run it before
#               `slot` (`session.sh stream slot`), never beside it: a shared GPU would blur the answer.
#               $STREAM_ARGS is passed on (e.g. "--epochs 10 --workers 12"; the tests add a tiny CPU size).
#
# What comes back is $OUT (the device tool's folder; default gpu_out/ when run elsewhere): JSON files and logs, to
# be copied into results/ here (docs/gpu.md). Bench results live in $STATE/results/ (git-ignored), seeded from the
# committed results/<matrix>/ files, so cells finished in an earlier slot are never run again.
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$SECONDS
OUT=${OUT:-gpu_out}
MATRIX=${MATRIX:-cifar10_resnet18}                         # its name; the file's "name:" must match
MATRIX_FILE=${MATRIX_FILE:-benchmarks/matrices/$MATRIX.yaml}
STATE=${STATE:-.gpu}                                       # git-ignored: wheels' install, data, bench results
BUDGET_S=${BUDGET_S:-500}
# The converged evidence matrix's pending cells come first: on the CPU each takes ~1.7 h.
SLOT_MATRICES=${SLOT_MATRICES:-"cifar10_resnet20_converged:3 ssia_screen:2"}
SLOT_DEVICE=${SLOT_DEVICE:-cuda}                           # tests run the slot on the CPU
SLOT_CHECK=${SLOT_CHECK:-1}                                # 0: no check/throughput lane (tests on the CPU)
DRY_RUN=${DRY_RUN:-0}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}  # .venv here; python3 on the device
mkdir -p "$OUT" "$STATE/results"
export PYTHONUNBUFFERED=1
log() { echo "[session $(( SECONDS - START ))s] $*"; }
for phase in "$@"; do  # every phase name is checked before any work starts
  case $phase in slot|check|throughput|matrix|latency|stream) ;;
    *) echo "session: unknown phase '$phase' (slot, check, throughput, matrix, latency, stream)" >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "session: name the phases to run: slot, or check, throughput, matrix, latency, stream" >&2; exit 2; }
# A lane is "name:workers" (benchmarks/matrices/<name>.yaml) or "path/to/<name>.yaml:workers".
lane_file() { case ${1%%:*} in *.yaml) echo "${1%%:*}" ;; *) echo "benchmarks/matrices/${1%%:*}.yaml" ;; esac; }
lane_name() { basename "$(lane_file "$1")" .yaml; }
slot_names() { for spec in $SLOT_MATRICES; do lane_name "$spec"; done; }
MATRICES_USED="$MATRIX"
for phase in "$@"; do [ "$phase" = slot ] && MATRICES_USED="$(slot_names)"; done

# Packages the device image lacks (omegaconf), from the carried wheels; the repository itself via PYTHONPATH.
if ! "$PY" -c "import omegaconf" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "session: omegaconf is missing and .whl/ has no wheels: run benchmarks/gpu/prepare.sh and carry .whl" >&2
    exit 2
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$STATE/site" .whl/*.whl \
    || exit 2
  export PYTHONPATH=$(cd "$STATE/site" && pwd)${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# CIFAR-10, unpacked once per machine into a git-ignored folder (about 10 s).
if [ -z "${ATTNLAB_DATA:-}" ]; then
  export ATTNLAB_DATA=$(mkdir -p "$STATE/data" && cd "$STATE/data" && pwd)
  if [ ! -d "$ATTNLAB_DATA/cifar10-jpeg/train" ]; then
    if [ ! -s .data/cifar10-jpeg.tar.gz ]; then
      echo "session: no CIFAR-10: run benchmarks/gpu/prepare.sh here and carry .data" >&2
      exit 2
    fi
    rm -rf "$STATE/unpacking" && mkdir -p "$STATE/unpacking" && tar -xzf .data/cifar10-jpeg.tar.gz -C "$STATE/unpacking" \
      && rm -rf "$ATTNLAB_DATA/cifar10-jpeg" && mv "$STATE/unpacking/cifar10-jpeg" "$ATTNLAB_DATA/" || exit 2  # whole or absent
    log "unpacked CIFAR-10 into $ATTNLAB_DATA"
  fi
fi

# Seed the bench results from the committed ones (a fresh machine), never over newer ones (a warm machine).
for m in $MATRICES_USED; do
  for f in runs.jsonl latency.json; do
    if [ -f "results/$m/$f" ] && [ ! -f "$STATE/results/$m/$f" ]; then
      mkdir -p "$STATE/results/$m" && cp "results/$m/$f" "$STATE/results/$m/$f"
    fi
  done
done

run_check() {
  local st=0
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/check.log"
  "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$OUT/check.log"
  "$PY" -m pytest -q -x -k cuda -p no:cacheprovider tests 2>&1 | tail -5 | tee -a "$OUT/check.log" || st=1
  # The fast path end to end (resident data, GPU augmentation, bf16, channels_last, compile): 50 steps.
  "$PY" -m attnlab train --config configs/cifar10_resnet18.yaml device=cuda train.epochs=1 train.warmup_epochs=0 \
    debug.max_steps_per_epoch=50 name=smoke out_dir="$STATE/runs/check" 2>&1 | tail -6 | tee -a "$OUT/check.log" \
    || st=1
  return $st
}

run_throughput() {
  log "train throughput (engine vs reference loop)"
  "$PY" benchmarks/train_throughput.py --device cuda --out "$OUT/train_throughput_gpu.json" --note "${1:-}" \
    2>&1 | tee "$OUT/throughput.log"
}

run_stream() {
  local left=$(( BUDGET_S - (SECONDS - START) ))
  if [ "$left" -lt 120 ]; then log "stream: only ${left}s left of BUDGET_S=$BUDGET_S, skipped"; return 0; fi
  log "stream lane (loader alone, step alone, engine) for at most ${left}s"
  # shellcheck disable=SC2086  # STREAM_ARGS is a list of options
  timeout --signal=TERM "$left" "$PY" benchmarks/gpu/stream_lane.py --device "${STREAM_DEVICE:-cuda}" \
    --folder "$STATE/stream_folder" --out "$OUT/stream_train.json" ${STREAM_ARGS:-} 2>&1 | tee "$OUT/stream.log"
  return "${PIPESTATUS[0]}"
}

# Everything at once within BUDGET_S: the check lane and one bench lane per matrix, all on the one GPU.
run_slot() {
  local left=$(( BUDGET_S - (SECONDS - START) )) pids=() names=() st=0
  if [ "$left" -lt 60 ]; then log "slot: only ${left}s left of BUDGET_S=$BUDGET_S, nothing started"; return 0; fi
  local dry=""; [ "$DRY_RUN" = 1 ] && dry="--dry-run"
  log "slot: ${left}s; lanes: $([ "$SLOT_CHECK" = 1 ] && echo 'check+throughput ')$SLOT_MATRICES; device $SLOT_DEVICE"
  if [ "$SLOT_CHECK" = 1 ] && [ "$DRY_RUN" != 1 ]; then
    ( run_check; run_throughput "measured while the slot's matrix lanes shared the GPU: a lower bound" ) > "$OUT/slot_check.log" 2>&1 &
    pids+=($!); names+=(check)
  fi
  for spec in $SLOT_MATRICES; do
    local name file workers=${spec##*:}
    name=$(lane_name "$spec"); file=$(lane_file "$spec")
    [ "$workers" = "$spec" ] && workers=1
    # Cells must end 20 s before the deadline, which leaves time to copy the results out.
    timeout --signal=TERM "$left" "$PY" -m attnlab bench --matrix "$file" $dry \
      --workers "$workers" --budget "$(( left - 20 ))s" --device "$SLOT_DEVICE" --no-latency \
      --results-root "$STATE/results" --runs-root "$STATE/runs" > "$OUT/slot_$name.log" 2>&1 &
    pids+=($!); names+=("$name")
  done
  for k in "${!pids[@]}"; do
    wait "${pids[$k]}"; local rc=$?
    log "slot lane ${names[$k]}: exit $rc"
    # 124: a cell was still running at the deadline (it is lost with the machine); the finished ones are kept.
    if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ]; then st=1; fi
  done
  [ "$DRY_RUN" = 1 ] && cat "$OUT"/slot_*.log
  return $st
}

status=0
for phase in "$@"; do
  case $phase in
    slot) run_slot || status=1 ;;
    check) run_check || status=1 ;;
    throughput) run_throughput || status=1 ;;
    stream) run_stream || status=1 ;;
    matrix)
      left=$(( BUDGET_S - (SECONDS - START) ))
      if [ "$left" -lt 60 ]; then log "matrix: only ${left}s left of BUDGET_S=$BUDGET_S, skipped"; continue; fi
      log "matrix $MATRIX for at most ${left}s"
      timeout --signal=TERM "$left" "$PY" -m attnlab bench --matrix "$MATRIX_FILE" --no-latency \
        --results-root "$STATE/results" --runs-root "$STATE/runs" 2>&1 | tee "$OUT/matrix.log"
      rc=${PIPESTATUS[0]}
      if [ "$rc" -eq 124 ]; then log "matrix: stopped at the budget; the next call resumes it"
      elif [ "$rc" -ne 0 ]; then status=1; fi
      ;;
    latency)
      log "latency of the $MATRIX models"
      "$PY" -m attnlab bench --matrix "$MATRIX_FILE" --latency-only --results-root "$STATE/results" \
        2>&1 | tee "$OUT/latency.log" || status=1
      ;;
  esac
done
for m in $MATRICES_USED; do
  for f in runs.jsonl latency.json; do
    [ -f "$STATE/results/$m/$f" ] && cp "$STATE/results/$m/$f" "$OUT/${m}_$f"
  done
done
log "done (status $status); files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
