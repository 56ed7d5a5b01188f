#!/usr/bin/env bash
# Run HERE (the CPU machine), once per session, before lending work to the GPU machine through the device tool.
# Makes the two git-ignored folders the GPU commands need, since only the working tree travels (64 MiB at most):
#   .data/cifar10-jpeg.tar.gz  CIFAR-10 from ../shared/data, ~19 MB: gzip squeezes tar's 60,000 512-byte headers
#                              and the tables every small JPEG repeats (55 MB of files)
#   .whl/                      the pure-Python packages the device image lacks (omegaconf; its PyYAML is there)
# Then call the device tool with carry [".data", ".whl"]; docs/gpu.md has the exact calls.
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC=${ATTNLAB_DATA:-../shared/data}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

if [ ! -d "$SRC/cifar10-jpeg/train" ]; then
  echo "prepare: $SRC/cifar10-jpeg/train not found (set ATTNLAB_DATA to the folder holding cifar10-jpeg)" >&2
  exit 2
fi
mkdir -p .data .whl
if [ ! -s .data/cifar10-jpeg.tar.gz ]; then
  echo "prepare: packing $SRC/cifar10-jpeg -> .data/cifar10-jpeg.tar.gz"
  tar -C "$SRC" -czf .data/cifar10-jpeg.tar.gz.tmp cifar10-jpeg
  mv .data/cifar10-jpeg.tar.gz.tmp .data/cifar10-jpeg.tar.gz  # a half-written archive never looks finished
fi
OMEGACONF=$("$PY" -c "import omegaconf; print(omegaconf.__version__)" 2>/dev/null || echo 2.4.0)
if ! ls .whl/omegaconf-"$OMEGACONF"-*.whl >/dev/null 2>&1; then
  echo "prepare: downloading omegaconf $OMEGACONF (pure Python) -> .whl/"
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl "omegaconf==$OMEGACONF"
fi
# Everything that travels: tracked + untracked-not-ignored files, and the two carried folders.
tree_bytes=$(git ls-files -co --exclude-standard -z | "$PY" -c \
  "import os, sys; print(sum(os.path.getsize(f) for f in sys.stdin.read().split(chr(0)) if os.path.isfile(f)))")
carry_bytes=$(du -cb .data .whl | tail -1 | cut -f1)
total=$(( tree_bytes + carry_bytes ))
echo "prepare: working tree $(( tree_bytes / 1024 )) KiB + carried $(( carry_bytes / 1024 )) KiB = $(( total / 1048576 )) MiB (limit 64 MiB)"
if [ "$total" -gt $(( 64 * 1048576 )) ]; then
  echo "prepare: over the device tool's 64 MiB limit; remove untracked files from the checkout" >&2
  exit 1
fi
