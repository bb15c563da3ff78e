#!/usr/bin/env bash
# The one prepared GPU-machine run: kernel tests on the GPU at real sizes, our benchmarks and
# PyTorch's in the same run as one table, the wgmma path, whole training steps against the CPU,
# compute-sanitizer (memcheck, racecheck, initcheck) on a small run. The GPU machine has no Rust:
# build here first, then carry .gpu/:
#
#   scripts/gpu_check.sh --prepare          # here: builds the binaries into .gpu/
#   scripts/gpu_check.sh                    # there: runs everything (each section prints its start time)
#
# The device session's minutes are few (15 in all, one call of ~10 minutes). First every kernel
# variant is compiled on all cores at once (PTX and machine code, into the disk cache the later
# processes load from). Then sections run most valuable first (correctness at real sizes, the
# issue targets' table with each training step's profile, memcheck and racecheck: the issue's
# run, which it wants under 6 minutes; then the variants the table's unmeasured changes
# replaced, wgmma, the training steps, the comparisons, initcheck), each
# under its own time limit and all under one deadline (STRATA_GPU_DEADLINE seconds, default 540),
# so a slow section costs its own result, not the ones after it, and the script always ends with
# its summary. Its logs come back packed in one archive,
# $OUT/gpu-logs.tgz. The second H200 run (2026-11-27) took the whole 550 s.
#
# When its kernel tests, device-step tests and the demo on cuda agree with the CPU, set
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

# Only a few files come back from the machine: the logs are written to a folder of their own and
# packed into one archive under $OUT when the script ends, however it ends.
results=${OUT:-/tmp/strata-gpu}
out=/tmp/strata-gpu-logs
rm -rf "$out" && mkdir -p "$out" "$results"
trap 'tar -czf "$results/gpu-logs.tgz" -C "$out" . 2>/dev/null' EXIT
# compute-sanitizer lives beside nvcc, which need not be on the PATH.
export PATH="$PATH:/usr/local/cuda/bin"
deadline=${STRATA_GPU_DEADLINE:-540}
# NVRTC: the toolkit's, or the PyPI wheel's that PyTorch ships with.
nvrtc=$(ls /usr/local/cuda/lib64/libnvrtc.so.13 2>/dev/null || find / -name 'libnvrtc.so.13' -not -path '*/proc/*' 2>/dev/null | head -1)
export LD_LIBRARY_PATH="$(dirname "$nvrtc"):${LD_LIBRARY_PATH:-}"
# Outside $OUT: ~40 MB of PTX is not worth bringing back.
export STRATA_KERNEL_CACHE=/tmp/strata-kernel-cache
echo "== commit $(cat .gpu/commit), $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader), nvrtc $nvrtc"
status=0
skipped=""

# `section LIMIT TITLE`: prints the title with the time so far and sets $limit, the seconds the
# section may take: LIMIT, or what is left before the deadline. Returns 1 (skip the section)
# when under 15 s are left.
section() {
    local left=$((deadline - SECONDS))
    if [ "$left" -lt 15 ]; then
        echo "== [${SECONDS}s] SKIPPED (deadline): $2"
        skipped="$skipped
  $2"
        return 1
    fi
    limit=$(($1 < left ? $1 : left))
    echo "== [${SECONDS}s] (limit ${limit}s) $2"
}
# `limited CMD...`: CMD under the section's limit; a time-out is reported and fails the run.
limited() {
    timeout --kill-after=5 "$limit" "$@"
    local rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "!! timed out after ${limit}s: $*"
        status=1
    fi
    return "$rc"
}

# `summary LOG`: a test log's result lines, the verdicts of its tests that failed or took 10 s or
# more, and the failures' panic messages; for a run cut off before its result line, the last lines it printed.
summary() {
    if ! grep -q "^test result" "$1"; then
        echo "(no result line: cut off?) last lines:"
        tail -5 "$1"
    fi
    grep -E "^test result|^verdict: .*(FAILED|\([0-9]{2,}s\))" "$1" | tail -30
    grep -A4 "panicked at" "$1" | grep -vE '^ +[0-9]+: |^ +at |^stack backtrace:|^note: .*backtrace' | head -60
}

# `each_test BIN LOG [FILTER...]`: BIN's tests (those the FILTERs select), each in a process of
# its own, so that a kernel fault, which poisons its process's CUDA context, costs its own test
# only, and each under its own cap (STRATA_TEST_CAP seconds, default 60, or what is left of the
# section), so that one slow or hung test cannot starve the rest. --nocapture: a test cut off
# still leaves what it printed (the HConv tests print each case as it finishes). LOG gets every
# test's output and verdict line with its time, and one result line at the end, for `summary`.
each_test() {
    local bin=$1 log=$2 t ok=0 failed=0 started section_limit=$limit
    shift 2
    local end=$((SECONDS + section_limit))
    : > "$log"
    # The HConv backward test (thousands of frames at real sizes, both paths' CPU references) last.
    local tests
    tests=$("$bin" --list --format terse "$@" 2>/dev/null | sed -n 's/: test$//p')
    for t in $(grep -v hconv_backward <<< "$tests"; grep hconv_backward <<< "$tests"); do
        limit=$((end - SECONDS))
        [ "$limit" -gt "${STRATA_TEST_CAP:-60}" ] && limit=${STRATA_TEST_CAP:-60}
        started=$SECONDS
        if [ "$limit" -lt 3 ]; then
            echo "test $t ... FAILED (not run: the section's time is up)" > "$log.one"
        else
            limited "$bin" --exact "$t" --test-threads 1 --nocapture > "$log.one" 2>&1
        fi
        sed -e 's/^test result:/  (one process) result:/' "$log.one" >> "$log"
        if grep -q "^test result: ok. 1 passed" "$log.one"; then
            ok=$((ok + 1))
            echo "verdict: $t ok ($((SECONDS - started))s)" >> "$log"
        else
            failed=$((failed + 1))
            grep -q "^test result:\|(not run: " "$log.one" || echo "(no result line: cut off after ${limit}s, or crashed)" >> "$log"
            echo "verdict: $t FAILED ($((SECONDS - started))s)" >> "$log"
        fi
    done
    rm -f "$log.one"
    limit=$section_limit
    echo "test result: $ok passed; $failed failed (each test in a process of its own)" >> "$log"
    [ "$failed" -eq 0 ]
}

# `sanitize TOOL`: compute-sanitizer TOOL over the kernel tests at small sizes, both tensor-core
# paths, the HConv backward test apart (it took the whole 60 s under memcheck and racecheck in the
# second H200 run, cutting off the tests after it; the last section runs it).
sanitize() {
    if section 60 "compute-sanitizer $1 (small sizes)"; then
        STRATA_TEST_CUDA=1 STRATA_TEST_SMALL=1 STRATA_TEST_WGMMA=1 limited compute-sanitizer --tool "$1" --error-exitcode 3 \
            .gpu/kernels_test --test-threads 1 emulator_collectives tensor_core warpgroup ldmatrix layer_sum hconv ctc cast_row_norm cls_attention packed_self mlsuperb_head lstm_step multi_tensor \
            --skip hconv_backward > "$out/sanitizer-$1.log" 2>&1 || status=1
        tail -4 "$out/sanitizer-$1.log"
    fi
}

# The emulator half of the tests ran in CI already: the GPU's minutes go to the GPU.
export STRATA_TEST_EMULATOR=0
if section 60 "NVRTC: every kernel variant the runs below launch, compiled on all cores into the cache"; then
    limited .gpu/gpu_bench precompile 2>&1 | tee "$out/precompile.log" || status=1
fi
if section 150 "kernel tests on the GPU at real sizes (mma.sync paths)"; then
    STRATA_TEST_CUDA=1 each_test .gpu/kernels_test "$out/tests.log" || status=1
    summary "$out/tests.log"
fi
# STRATA_PROFILE=1: after each training step's timed runs, one more step with every launch timed
# (its kernels' GPU time against the timed median) and the host's side of it: where the ~5 ms
# that steps spent beyond their kernels in H200 run 2 go. The first thing to read in this run, so
# it comes with the table rather than in a section of its own that the deadline may cut.
if section 120 "benchmarks: strata and PyTorch in the same run (with each training step's profile)"; then
    STRATA_PROFILE=1 limited .gpu/gpu_bench > "$out/ours.jsonl" 2> "$out/ours.err" || { status=1; tail -5 "$out/ours.err"; }
    limited python3 tools/gpu_bench_torch.py > "$out/torch.jsonl" 2> "$out/torch.err" || { status=1; tail -5 "$out/torch.err"; }
    python3 tools/gpu_table.py "$out/ours.jsonl" "$out/torch.jsonl" | tee "$out/table.txt"
    grep -A8 "^profile" "$out/ours.err"
    grep -E "^profile|^  (host time|host side|memory pool)" "$out/ours.err"
fi
# The sanitizers the issue asks for: with the kernel tests and the table, the run the issue
# wants under 6 minutes, so they come before every optional section.
sanitize memcheck
sanitize racecheck
echo "== [${SECONDS}s] the issue's parts are done (kernel tests, the table, memcheck, racecheck); optional sections follow"
# The variants the last changes replaced, read against the table above (each restores one
# change: the pipeline depth, the norm's staging, the WS backward's frame split).
if section 60 "the previous variants of the unmeasured changes (RESULTS.md), against the table above"; then
    STRATA_HV_STAGES=2 limited .gpu/gpu_bench hconv 2>/dev/null | sed 's/"name": "/"name": "stages2 /' | tee "$out/variants.jsonl"
    STRATA_LAYER_SUM_UNSTAGED=1 limited .gpu/gpu_bench ws 2>/dev/null | grep norm_fwd | sed 's/"name": "/"name": "unstaged /' | tee -a "$out/variants.jsonl"
    STRATA_LAYER_SUM_FRAMES=8 limited .gpu/gpu_bench ws 2>/dev/null | grep bwd | sed 's/"name": "/"name": "8frames /' | tee -a "$out/variants.jsonl"
fi
# A process of its own: a faulting wgmma (a wrong descriptor) poisons the CUDA context.
if section 90 "wgmma on the GPU: the wrapper's self-test, then HConv forward and backward on wgmma"; then
    STRATA_TEST_CUDA=1 STRATA_TEST_WGMMA=only each_test .gpu/kernels_test "$out/tests-wgmma.log" warpgroup hconv || status=1
    summary "$out/tests-wgmma.log"
fi
if section 60 "the device tape on the GPU vs the CPU tape (multi-use values, parameter sinks, stack gradients)"; then
    STRATA_TEST_CUDA=1 each_test .gpu/device_tape_test "$out/tests-tape.log" || status=1
    summary "$out/tests-tape.log"
fi
if section 120 "whole training steps on the GPU vs the CPU path (HConv 20 steps; every interface x head; the ML-SUPERB and ASR heads)"; then
    STRATA_TEST_CUDA=1 each_test .gpu/device_step_test "$out/tests-step.log" || status=1
    grep -E " step [ 0-9]+:|worst.* rel" "$out/tests-step.log" | tail -30
    summary "$out/tests-step.log"
fi
if section 60 "HConv and the training steps on the wgmma kernels (STRATA_TENSOR_CORES=wgmma), for comparison"; then
    { STRATA_TENSOR_CORES=wgmma limited .gpu/gpu_bench hconv; STRATA_TENSOR_CORES=wgmma limited .gpu/gpu_bench step; } 2> "$out/wgmma.err" > "$out/wgmma.jsonl" || status=1
    python3 tools/gpu_table.py "$out/wgmma.jsonl" "$out/torch.jsonl" | tee "$out/table-wgmma.txt"
fi
if section 60 "strata demo on the GPU and on the CPU (same corpus, same init)"; then
    limited .gpu/strata demo --device cuda > "$out/demo-cuda.log" 2>&1 || status=1
    limited .gpu/strata demo --device cpu > "$out/demo-cpu.log" 2>&1 || status=1
    grep -hE "training on|step  *1000|^WS|^HConv " "$out/demo-cuda.log" "$out/demo-cpu.log" | tee "$out/demo.txt"
fi
sanitize initcheck
# The HConv backward test under memcheck, apart (see `sanitize`).
if section 90 "compute-sanitizer memcheck on the HConv backward test (small sizes, both tensor-core paths)"; then
    STRATA_TEST_CUDA=1 STRATA_TEST_SMALL=1 STRATA_TEST_WGMMA=1 limited compute-sanitizer --tool memcheck --error-exitcode 3 \
        .gpu/kernels_test --test-threads 1 --nocapture hconv_backward > "$out/sanitizer-hconv-backward.log" 2>&1 || status=1
    grep -E ": [0-9.]+ s$" "$out/sanitizer-hconv-backward.log" | tail -3
    tail -4 "$out/sanitizer-hconv-backward.log"
fi
if section 30 "HConv without -D specialization (STRATA_NO_SPECIALIZE=1), for comparison"; then
    STRATA_NO_SPECIALIZE=1 limited .gpu/gpu_bench hconv 2>/dev/null | tee "$out/hconv-unspecialized.jsonl"
fi
if section 30 "the WS weight-gradient backward with the warp-per-layer kernel (STRATA_LAYER_SUM_BWD=warp), for comparison"; then
    STRATA_LAYER_SUM_BWD=warp limited .gpu/gpu_bench ws 2>/dev/null | grep bwd_dw | tee "$out/ws-warp-backward.jsonl"
fi
[ -n "$skipped" ] && echo "== sections skipped at the deadline:$skipped"
echo "== finished in ${SECONDS}s, status $status"
exit $status
