#!/usr/bin/env bash
# Registers, spills and shared memory (static; then the dynamic sizes the host gives) of every kernel for sm_90 (sm_90a for wgmma files), without a GPU: NVRTC makes the PTX,
# the PTX assembler from the PyPI wheel nvidia-cuda-nvcc reports on it.
#   tools/ptxas_report.sh            (installs both wheels under ~/.cache/strata on first use)
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${HOME:-/tmp}/.cache/strata"
[ -e "$cache/nvrtc-13.0/nvidia/cu13/lib/libnvrtc.so.13" ] || python3 -m pip install -q --no-deps --target "$cache/nvrtc-13.0" "nvidia-cuda-nvrtc==13.0.*"
[ -e "$cache/nvcc-13.0/nvidia/cu13/bin/ptxas" ] || python3 -m pip install -q --no-deps --target "$cache/nvcc-13.0" "nvidia-cuda-nvcc==13.0.*"
export LD_LIBRARY_PATH="$cache/nvrtc-13.0/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
out=$(mktemp -d)
cargo run --release --quiet --example dump_ptx -- "$out" >/dev/null
for ptx in "$out"/*.ptx; do
    echo "== $(basename "$ptx")"
    arch=$(sed -n 's/^\.target[[:space:]]*\([a-z0-9_]*\).*/\1/p' "$ptx" | head -1)
    "$cache/nvcc-13.0/nvidia/cu13/bin/ptxas" -v -arch="${arch:-sm_90}" -o /dev/null "$ptx" 2>&1 \
        | grep -E "Compiling entry|registers|spill" | sed -e "s|^ptxas info *: ||"
done
echo "== dynamic shared memory (sized by the host, per block)"
cat "$out/dynamic_smem.txt"
rm -rf "$out"
