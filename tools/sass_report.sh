#!/usr/bin/env bash
# Instructions per K step of HConv's tensor-core kernels (HuBERT-Base's two convs, -D specialized
# as the GPU runs them), from their machine code, without a GPU: NVRTC makes the PTX, ptxas the
# sm_90 / sm_90a machine code, cuobjdump + nvdisasm (PyPI wheels, installed under ~/.cache/strata
# on first use) the listing, tools/sass_loops.py the count. A warp scheduler issues one instruction a
# cycle: what a K step spends beside its MMAs (address math, predicates, the pipeline's
# bookkeeping) competes with the MMAs for it.
#   tools/sass_report.sh [KERNEL-SUBSTRING ...]     (default: the vectorized and wgmma kernels)
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${HOME:-/tmp}/.cache/strata"
[ -e "$cache/nvrtc-13.0/nvidia/cu13/lib/libnvrtc.so.13" ] || python3 -m pip install -q --no-deps --target "$cache/nvrtc-13.0" "nvidia-cuda-nvrtc==13.0.*"
[ -e "$cache/nvcc-13.0/nvidia/cu13/bin/ptxas" ] || python3 -m pip install -q --no-deps --target "$cache/nvcc-13.0" "nvidia-cuda-nvcc==13.0.*"
# The oldest cu13 releases of these two on PyPI (13.0's were not published there).
[ -e "$cache/sass-13.2/nvidia/cu13/bin/cuobjdump" ] || python3 -m pip install -q --no-deps --target "$cache/sass-13.2" \
    "nvidia-cuda-cuobjdump==13.2.86" "nvidia-cuda-nvdisasm==13.2.86"
export LD_LIBRARY_PATH="$cache/nvrtc-13.0/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
export PATH="$cache/sass-13.2/nvidia/cu13/bin:$PATH"
[ $# -gt 0 ] || set -- _vec _wgmma
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cargo run --release --quiet --example dump_ptx -- "$out" >/dev/null
for ptx in "$out"/hconv-base-conv*.ptx; do
    arch=$(sed -n 's/^\.target[[:space:]]*\([a-z0-9_]*\).*/\1/p' "$ptx" | head -1)
    "$cache/nvcc-13.0/nvidia/cu13/bin/ptxas" -arch="$arch" -o "$out/k.cubin" "$ptx"
    cuobjdump -sass "$out/k.cubin" > "$out/k.sass"
    echo "== $(basename "$ptx" .ptx)"
    python3 tools/sass_loops.py "$out/k.sass" "$@"
done
