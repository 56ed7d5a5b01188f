#!/usr/bin/env bash
# Run ON the GPU machine (device tool), from the repository root, after benchmarks/gpu/prepare.sh ran here and
# with carry [".data", ".whl"]. One call does the phases named, in order, within the device's 10-minute limit:
#
#   bash benchmarks/gpu/session.sh [check] [throughput] [matrix] [latency]
#
#   check       nvidia-smi, versions, the CUDA tests (tests/ -k cuda) and a 50-step engine run on CUDA
#   throughput  benchmarks/train_throughput.py --device cuda -> $OUT/train_throughput_gpu.json
#   matrix      attnlab bench on $MATRIX (default cifar10_resnet18), stopped at $BUDGET_S seconds since this
#               script started; finished cells are skipped, a cell cut short restarts from its last epoch
#               checkpoint while the machine stays warm ($STATE/runs is git-ignored, so it survives calls)
#   latency     the matrix's missing latency.json entries (GPU and this machine's CPU)
#
# What comes back is $OUT (the device tool's folder; default gpu_out/ when run elsewhere): the JSON files and logs,
# to be copied into results/ here (docs/gpu.md). Bench results live in $STATE/results/, which is git-ignored, so the
# tree copy of the next call does not overwrite them; they start from the committed results/<matrix>/ files.
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$SECONDS
OUT=${OUT:-gpu_out}
MATRIX=${MATRIX:-cifar10_resnet18}                         # its name; the file's "name:" must match
MATRIX_FILE=${MATRIX_FILE:-benchmarks/matrices/$MATRIX.yaml}
STATE=${STATE:-.gpu}                                       # git-ignored: wheels' install, data, bench results
BUDGET_S=${BUDGET_S:-500}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$STATE/results"
export PYTHONUNBUFFERED=1
log() { echo "[session $(( SECONDS - START ))s] $*"; }
for phase in "$@"; do  # every phase name is checked before any work starts
  case $phase in check|throughput|matrix|latency) ;;
    *) echo "session: unknown phase '$phase' (check, throughput, matrix, latency)" >&2; exit 2 ;;
  esac
done
[ $# -gt 0 ] || { echo "session: name the phases to run: check, throughput, matrix, latency" >&2; exit 2; }

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
for f in runs.jsonl latency.json; do
  if [ -f "results/$MATRIX/$f" ] && [ ! -f "$STATE/results/$MATRIX/$f" ]; then
    mkdir -p "$STATE/results/$MATRIX" && cp "results/$MATRIX/$f" "$STATE/results/$MATRIX/$f"
  fi
done

status=0
for phase in "$@"; do
  case $phase in
    check)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/check.log"
      "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$OUT/check.log"
      "$PY" -m pytest -q -x -k cuda -p no:cacheprovider tests 2>&1 | tail -5 | tee -a "$OUT/check.log" || status=1
      # The fast path end to end (resident data, GPU augmentation, bf16, channels_last, compile): 50 steps.
      "$PY" -m attnlab train --config configs/cifar10_resnet18.yaml device=cuda train.epochs=1 train.warmup_epochs=0 \
        debug.max_steps_per_epoch=50 name=smoke out_dir="$STATE/runs/check" 2>&1 | tail -6 | tee -a "$OUT/check.log" \
        || status=1
      ;;
    throughput)
      log "train throughput (engine vs reference loop)"
      "$PY" benchmarks/train_throughput.py --device cuda --out "$OUT/train_throughput_gpu.json" \
        2>&1 | tee "$OUT/throughput.log" || status=1
      ;;
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
for f in runs.jsonl latency.json; do
  [ -f "$STATE/results/$MATRIX/$f" ] && cp "$STATE/results/$MATRIX/$f" "$OUT/${MATRIX}_$f"
done
log "done (status $status); files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
