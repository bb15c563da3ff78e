#!/usr/bin/env bash
# The one prepared GPU-machine run: kernel tests on the GPU at real sizes, compute-sanitizer
# (memcheck, racecheck) on a small run, then our benchmarks and PyTorch's in the same run, as one
# table. The GPU machine has no Rust: build here first, then carry .gpu/:
#
#   scripts/gpu_check.sh --prepare          # here: builds the binaries into .gpu/
#   scripts/gpu_check.sh                    # there: runs everything (each section prints its start time)
#
# When its device-step tests and the demo on cuda agree with the CPU, set
# strata::train::device_step::VERIFIED_ON_GPU so that `--device auto` uses the GPU. When the wgmma
# self-test and the wgmma HConv test pass (kernel tests) and its table beats mma.sync's, set
# strata::ops::device::WGMMA_VERIFIED_ON_GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    set -e
    cargo build --release --example gpu_bench --bin strata
    exe() {
        cargo test --release --test "$1" --no-run --message-format=json 2>/dev/null \
            | python3 -c 'import json,sys; [print(m["executable"]) for m in map(json.loads, sys.stdin) if "/deps/'"$1"'-" in (m.get("executable") or "")]'
    }
    kernels=$(exe kernels)
    step=$(exe device_step)
    tape=$(exe device_tape)
    rm -rf .gpu && mkdir -p .gpu
    cp target/release/examples/gpu_bench .gpu/
    cp $kernels .gpu/kernels_test
    cp $step .gpu/device_step_test
    cp $tape .gpu/device_tape_test
    cp target/release/strata .gpu/strata
    strip --strip-debug .gpu/gpu_bench .gpu/kernels_test .gpu/device_step_test .gpu/device_tape_test .gpu/strata
    git rev-parse --short HEAD > .gpu/commit
    ls -la .gpu
    exit 0
fi

out=${OUT:-/tmp/strata-gpu}
mkdir -p "$out"
# NVRTC: the toolkit's, or the PyPI wheel's that PyTorch ships with.
nvrtc=$(ls /usr/local/cuda/lib64/libnvrtc.so.13 2>/dev/null || find / -name 'libnvrtc.so.13' -not -path '*/proc/*' 2>/dev/null | head -1)
export LD_LIBRARY_PATH="$(dirname "$nvrtc"):${LD_LIBRARY_PATH:-}"
export STRATA_KERNEL_CACHE="$out/kernel-cache"
echo "== commit $(cat .gpu/commit), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader), nvrtc $nvrtc"
status=0

# The emulator half of the tests ran in CI already: the GPU's minutes go to the GPU.
export STRATA_TEST_EMULATOR=0
echo "== [${SECONDS}s] kernel tests on the GPU (mma.sync paths)"
STRATA_TEST_CUDA=1 .gpu/kernels_test --test-threads 1 2>&1 | tee "$out/tests.log" || status=1
# A process of its own: a faulting wgmma (a wrong descriptor) poisons the CUDA context.
echo "== [${SECONDS}s] wgmma on the GPU: the wrapper's self-test, then HConv forward and backward on wgmma"
STRATA_TEST_CUDA=1 STRATA_TEST_WGMMA=only .gpu/kernels_test --test-threads 1 warpgroup hconv 2>&1 | tee -a "$out/tests.log" | grep -E "^test |panicked|wgmma|Wgmma|test result" || status=1
echo "== [${SECONDS}s] the device tape on the GPU vs the CPU tape (multi-use values, parameter sinks, stack gradients)"
STRATA_TEST_CUDA=1 .gpu/device_tape_test 2>&1 | tail -3 | tee -a "$out/tests.log" || status=1
echo "== [${SECONDS}s] whole training steps on the GPU vs the CPU path (HConv 20 steps; every interface x head)"
STRATA_TEST_CUDA=1 .gpu/device_step_test --nocapture 2>&1 | grep -E "step|worst|test result|panicked" | tail -40 | tee -a "$out/tests.log" || status=1
echo "== [${SECONDS}s] strata demo on the GPU and on the CPU (same corpus, same init)"
.gpu/strata demo --device cuda 2>&1 | grep -E "training on|step  *1000|^WS|^HConv " | tee "$out/demo.txt" || status=1
.gpu/strata demo --device cpu 2>&1 | grep -E "training on|step  *1000|^WS|^HConv " | tee -a "$out/demo.txt" || status=1

echo "== [${SECONDS}s] compute-sanitizer memcheck / racecheck (small sizes)"
for tool in memcheck racecheck initcheck; do
    STRATA_TEST_CUDA=1 STRATA_TEST_SMALL=1 STRATA_TEST_WGMMA=1 compute-sanitizer --tool $tool --error-exitcode 3 \
        .gpu/kernels_test --test-threads 1 emulator_collectives tensor_core warpgroup ldmatrix layer_sum hconv ctc cast_row_norm cls_attention multi_tensor 2>&1 | tail -4 | tee -a "$out/sanitizer.log" || status=1
done

echo "== [${SECONDS}s] benchmarks: strata and PyTorch in the same run"
.gpu/gpu_bench > "$out/ours.jsonl" || status=1
python3 tools/gpu_bench_torch.py > "$out/torch.jsonl" || status=1
python3 tools/gpu_table.py "$out/ours.jsonl" "$out/torch.jsonl" | tee "$out/table.txt"
echo "== [${SECONDS}s] HConv without -D specialization (STRATA_NO_SPECIALIZE=1), for comparison"
STRATA_NO_SPECIALIZE=1 .gpu/gpu_bench hconv 2>/dev/null | tee "$out/hconv-unspecialized.jsonl"
echo "== [${SECONDS}s] HConv and the training steps on the wgmma kernels (STRATA_TENSOR_CORES=wgmma), for comparison"
{ STRATA_TENSOR_CORES=wgmma .gpu/gpu_bench hconv; STRATA_TENSOR_CORES=wgmma .gpu/gpu_bench step; } 2>/dev/null > "$out/wgmma.jsonl" || status=1
python3 tools/gpu_table.py "$out/wgmma.jsonl" "$out/torch.jsonl" | tee "$out/table-wgmma.txt"
echo "== [${SECONDS}s] the WS weight-gradient backward with the warp-per-layer kernel (STRATA_LAYER_SUM_BWD=warp), for comparison"
STRATA_LAYER_SUM_BWD=warp .gpu/gpu_bench ws 2>/dev/null | grep bwd_dw | tee "$out/ws-warp-backward.jsonl"
echo "== finished in ${SECONDS}s, status $status"
exit $status
