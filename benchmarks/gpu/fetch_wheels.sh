#!/usr/bin/env bash
# Download the wheels the GPU image lacks for the benchmark's peers, to carry beside the repository.
#
#   benchmarks/gpu/fetch_wheels.sh [DIR]      (default: .whl, relative to the repository root)
#
# The GPU image (Python 3.12, x86_64, no network) has torch 2.11, triton 3.6, transformers 5.17,
# accelerate, pandas, pyarrow, psutil, xxhash, fsspec, huggingface-hub, jinja2, pyyaml, rich, numpy; not
# trl, liger-kernel, cut-cross-entropy, datasets, dill or multiprocess. What each peer imports there:
#   liger              liger_kernel.chunked_loss -> torch, triton
#   cce, cce_exact     cut_cross_entropy -> torch, triton
#   trl                trl.kernels.chunked_logprob -> torch, transformers, packaging; its backward imports
#                      trl.trainer.utils -> accelerate, datasets (-> dill, multiprocess, xxhash, pyarrow,
#                      pandas, fsspec, huggingface-hub), pandas, numpy, rich
# so the carried set is the three peers plus datasets, dill and multiprocess; torch, triton, transformers and
# accelerate are never carried. One version of each (two of one package stop pip's install there).
#
# There, before the harness:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
DIR="${1:-.whl}"
PY="${PYTHON:-python3}"

WHEELS=(
    trl==1.16.0
    liger-kernel==0.8.5
    cut-cross-entropy==25.1.1
    datasets==5.2.0        # trl's kernel backward imports trl.trainer.utils, which imports datasets
    dill==0.4.1            # datasets: dill<0.4.2
    multiprocess==0.70.19  # datasets: multiprocess<0.70.20
)

# Keep the folder out of git when it is inside the repository (a fresh clone has no exclude entry).
case "$DIR" in
    /*) ;;
    *)  if [ -d .git/info ] && ! grep -qxF "/${DIR%/}/" .git/info/exclude 2>/dev/null; then
            echo "/${DIR%/}/" >> .git/info/exclude
        fi ;;
esac
mkdir -p "$DIR"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$tmp" "${WHEELS[@]}"

# One version of each: drop any other wheel of the same distribution already in DIR.
for w in "$tmp"/*.whl; do
    name="$(basename "$w" | cut -d- -f1)"
    find "$DIR" -maxdepth 1 -iname "${name}-*.whl" -delete
    mv "$w" "$DIR"/
done

echo "wheels in $DIR:"
ls -1 "$DIR"/*.whl | sed 's|.*/|  |'
bytes="$(cat "$DIR"/*.whl | wc -c)"
echo "total: $(( (bytes + 1048575) / 1048576 )) MiB ($bytes bytes; the device call carries at most 64 MiB)"
if [ "$bytes" -gt $(( 48 * 1048576 )) ]; then
    echo "warning: over 48 MiB of wheels leaves little room for the repository in a 64 MiB carry" >&2
fi
