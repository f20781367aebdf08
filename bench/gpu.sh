#!/usr/bin/env bash
# The CUDA kernels on a lent GPU in one `device` call: correctness (tests/cuda_ops.rs,
# every kernel against its CPU twin), compute-sanitizer (memcheck, racecheck), and
# microbenchmarks against the memory floors of KERNELS.md, written to
# bench/results/<date>-<gpu>.json under $OUT, with the model-level benchmark (the LM
# steps at the real shapes, tests/cuda_model.rs) under its key "model".
#
# 1) On the development machine (no GPU needed), build what travels:
#        bench/gpu.sh build
#    It builds with the CI's nvcc (or $NVCC) and MASSV_CUDA_ARCHS=sm_90 (H100 / H200
#    only) in target/gpu/: the release test binaries of tests/cuda_ops.rs,
#    tests/cuda_model.rs, tests/cuda_projector.rs and tests/cuda_graph_emu.rs and the
#    massv binary, strips them
#    and packs them as .gpu/bin.tar.xz (ignored by git; xz makes 34 MB of binaries
#    about a third of that) with the commit id, and downloads the compute-sanitizer
#    wheel (nvidia-cuda-sanitizer-api, ~14 MB) there. It prints the total size: what
#    travels must stay under 64 MiB.
# 2) Device calls (tracked files travel by themselves; .gpu is ignored, so carry it). A
#    session's device time is 15 minutes, the machine's start included, so the plan is
#    one full call, then at once (the machine stays warm for 30 s) one call for the steps
#    the first had no time for, which its last lines name:
#        run(command="bench/gpu.sh run", carry=[".gpu"], timeout_s=600)
#        run(command="MASSV_GPU_BUDGET_S=<left> bench/gpu.sh run <steps>", carry=[".gpu"])
#    The JSON comes back as files_at/bench/results/<date>-<gpu>.json, the logs as
#    files_at/logs.tar.gz (at most 8 files come back). Copy the JSON into bench/results/
#    and commit it.
#
# On the GPU machine (`bench/gpu.sh run`, the default) it:
#   - puts the folders of libcuda and libcublas on LD_LIBRARY_PATH (cuBLAS may exist there
#     only inside PyTorch's nvidia-cublas wheel: found with find / -name 'libcublas.so*');
#   - checks that the binaries start (glibc of the build machine vs this one);
#   - runs the CUDA tests with MASSV_REQUIRE_CUDA=1 (no GPU = failure, not a skip);
#   - runs the benchmark (the ignored test bench_kernels), the model benchmark (the
#     ignored test bench_model: synth checkpoints of the 7B target's LM, MASSV_BENCH_LAYERS
#     of its layers, default 4, and of the 0.5B drafter; decode, verify, tree, TTFT), the
#     image side (the ignored test bench_vision in tests/cuda_projector.rs: the 7B vision
#     tower on a 448×448 image and the MASSV projector; under "vision" in the JSON),
#     `massv generate --device cuda` on the fixture VL target with its MASSV drafter
#     (every model on the device; the CPU's answer beside it) and `massv demo --device
#     cuda` (the shapes world end to end on the device: its table and demo.json);
#   - runs compute-sanitizer --tool memcheck on all CUDA tests and --tool racecheck on
#     the kernels with shared memory, each under a time limit.
# Every step's log is in $OUT/logs.tar.gz; the exit status is non-zero if any step failed.
# The step limits (tests 200 s, model tests 200 s, projector tests 120 s, graph tests
# 60 s, bench 150 s,
# model bench 240 s, vision bench 120 s, massv 60 + 60 s, demo 90 s, memcheck 120 + 150 +
# 60 s, racecheck 90 s) are caps for a hang, not estimates (nothing has been timed on a
# GPU yet); each is also cut to what is left of the call's budget of 570 s
# (MASSV_GPU_BUDGET_S), and a step with under 30 s left is not started (and counts as
# failed). Steps run in the order above, correctness first; the summary's last line
# names the step groups to pass to the next call (each call's JSON holds its own steps'
# keys: merge them into one results file).
set -uo pipefail
cd "$(dirname "$0")/.."

mode="${1:-run}"
gpu_dir=.gpu
test_bins="cuda_ops cuda_model cuda_projector cuda_graph_emu"

build() {
    set -e
    local nvcc="${NVCC:-$HOME/.cache/massv-ci/lib/python3.11/site-packages/nvidia/cu13/bin/nvcc}"
    [ -x "$nvcc" ] || { echo "nvcc not found at $nvcc (set NVCC, or run .ci/run once)"; exit 1; }
    export NVCC="$nvcc" MASSV_CUDA_ARCHS=sm_90 MASSV_REQUIRE_KERNELS=1 CARGO_TARGET_DIR=target/gpu
    mkdir -p "$gpu_dir"
    local test_bin name
    for name in $test_bins; do
        test_bin=$(cargo test --release --test "$name" --no-run --message-format=json-render-diagnostics \
            | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$name")
        [ -n "$test_bin" ] || { echo "no $name test binary built"; exit 1; }
        cp "$test_bin" "$gpu_dir/$name"
    done
    cargo build --release --bin massv
    cp target/gpu/release/massv "$gpu_dir/massv"
    (cd "$gpu_dir" && strip $test_bins massv)
    git rev-parse --short HEAD > "$gpu_dir/COMMIT" 2>/dev/null || echo unknown > "$gpu_dir/COMMIT"
    git diff --quiet HEAD 2>/dev/null || sed -i 's/$/-dirty/' "$gpu_dir/COMMIT"
    if ! ls "$gpu_dir"/nvidia_cuda_sanitizer_api-*.whl >/dev/null 2>&1; then
        local pip="$HOME/.cache/massv-ci/bin/pip"
        [ -x "$pip" ] || pip=pip3
        "$pip" download --no-deps --quiet -d "$gpu_dir" "nvidia-cuda-sanitizer-api==13.0.*" \
            || echo "warning: no compute-sanitizer wheel (the GPU run will skip the sanitizers)"
    fi
    echo "glibc symbols the binaries need (the GPU machine's glibc must be at least this):"
    objdump -T "$gpu_dir/cuda_ops" "$gpu_dir/massv" 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n 1
    rm -f "$gpu_dir/bin.tar.xz"
    (cd "$gpu_dir" && tar -cJf bin.tar.xz $test_bins massv && rm -f $test_bins massv)
    du -ch "$gpu_dir"/* | tail -n 1
    local bytes
    # The 64 MiB limit covers what travels together: the tracked tree and the carry.
    local tree
    tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | awk '/\ttotal$/ {s += $1} END {print s + 0}')
    bytes=$(( $(du -cb "$gpu_dir"/* | tail -n 1 | cut -f1) + tree ))
    echo "with the tracked tree ($tree bytes): $bytes bytes travel"
    if [ "$bytes" -gt $((64 * 1024 * 1024)) ]; then
        echo "error: .gpu and the tracked tree hold $bytes bytes, over the 64 MiB the device takes"
        exit 1
    fi
    echo "ready: run(command=\"bench/gpu.sh run\", carry=[\".gpu\"], timeout_s=600), then at once the groups its last line names"
}

run() {
    # Steps to run (default all): tests bench model massv sanitize.
    local steps=("$@")
    [ ${#steps[@]} -gt 0 ] || steps=(tests bench model massv sanitize)
    want() { [[ " ${steps[*]} " == *" $1 "* ]]; }
    local out="${OUT:-$PWD/gpu-out}"
    # The test binaries were built elsewhere: read the fixtures of this copy of the tree.
    export MASSV_REPO_ROOT="$PWD"
    local logs="$out/logs"
    mkdir -p "$logs" "$out/bench/results"
    local failed=() not_started=() group=
    local budget="${MASSV_GPU_BUDGET_S:-570}" # seconds of the whole call ($SECONDS counts them)
    step() { # step NAME TIMEOUT CMD...: runs CMD with a time limit, logs it, records a failure
        local name="$1" limit="$2"
        shift 2
        local left=$((budget - SECONDS))
        if [ "$left" -lt 30 ]; then
            echo "== $name: not started, $left s left of the call's $budget s (name it in a call of its own)"
            failed+=("$name (not started: no time left)")
            [ -z "$group" ] || [[ " ${not_started[*]} " == *" $group "* ]] || not_started+=("$group")
            return 1
        fi
        [ "$limit" -le "$left" ] || limit=$left
        echo "== $name (limit $limit s)"
        local t0=$SECONDS
        timeout --signal=INT --kill-after=10 "$limit" "$@" > "$logs/$name.log" 2>&1
        local rc=$?
        tail -n 40 "$logs/$name.log"
        echo "-- $name: exit $rc after $((SECONDS - t0)) s"
        [ $rc -eq 0 ] || failed+=("$name (exit $rc)")
        return $rc
    }

    # merge_json RESULTS KEY PART: PART's JSON under KEY in RESULTS (created if absent);
    # nothing when PART was not written.
    merge_json() {
        [ -f "$3" ] || return 0
        python3 - "$1" "$2" "$3" <<'PY'
import json, os, sys
path, key, part = sys.argv[1:4]
doc = json.load(open(path)) if os.path.exists(path) else {}
doc[key] = json.load(open(part))
with open(path, "w") as f:
    json.dump(doc, f, indent=2)
PY
    }

    for f in bin.tar.xz COMMIT; do
        [ -e "$gpu_dir/$f" ] || { echo "error: $gpu_dir/$f missing: run bench/gpu.sh build and carry .gpu"; exit 1; }
    done
    # Unpacked beside the archive (tar, or Python's tarfile where tar lacks xz).
    tar -xJf "$gpu_dir/bin.tar.xz" -C "$gpu_dir" 2>/dev/null \
        || python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
            "$gpu_dir/bin.tar.xz" "$gpu_dir" \
        || { echo "error: cannot unpack $gpu_dir/bin.tar.xz"; exit 1; }
    local commit
    commit=$(cat "$gpu_dir/COMMIT")

    echo "== machine"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 | tee "$logs/nvidia-smi.log"
    ldd --version 2>&1 | head -n 1
    # Libraries: libcuda from the driver, cuBLAS wherever it is (prefer .so.13). A bounded
    # walk finds both: first the usual places (the CUDA toolkit, Python's site-packages,
    # where PyTorch's nvidia-cublas wheel lives), the whole file system only if cuBLAS is
    # not there; what it found is kept in /tmp for the next call on the same machine.
    local found cuda_lib cublas libdirs="" cache=/tmp/massv-gpu-libs.txt
    local pattern=(\( -name 'libcuda.so.1' -o -name 'libcublas.so*' \) -print)
    if [ -s "$cache" ] && xargs -a "$cache" ls >/dev/null 2>&1; then
        found=$(cat "$cache")
    else
        local roots=(/usr/local /usr/lib /usr/lib64 /opt)
        roots+=($(python3 -c 'import site, sys; print(" ".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null))
        found=$(timeout 60 find "${roots[@]}" "${pattern[@]}" 2>/dev/null)
        grep -q 'libcublas\.so' <<< "$found" \
            || found=$(timeout 90 find / \( -path /proc -o -path /sys -o -path /dev \) -prune -o "${pattern[@]}" 2>/dev/null)
        [ -z "$found" ] || printf '%s\n' "$found" > "$cache"
    fi
    cuda_lib=$( (ldconfig -p 2>/dev/null | grep -o '/[^ ]*libcuda\.so\.1$'; grep 'libcuda\.so\.1$' <<< "$found") | head -n 1)
    cublas=$(grep -m1 'libcublas\.so\.13' <<< "$found" || grep -m1 'libcublas\.so' <<< "$found" || true)
    [ -n "$cuda_lib" ] && libdirs="$(dirname "$cuda_lib")"
    if [ -n "$cublas" ]; then
        libdirs="${libdirs:+$libdirs:}$(dirname "$cublas")"
    else
        echo "warning: no libcublas.so* on this machine: the GEMM test will fail"
    fi
    export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "libcuda: ${cuda_lib:-not found}; cuBLAS: ${cublas:-not found}"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

    (cd "$gpu_dir" && chmod +x $test_bins massv)
    step binaries-start 60 "$gpu_dir/cuda_ops" --list || { echo "the binaries do not start here (see above)"; }

    export MASSV_REQUIRE_CUDA=1 RUST_BACKTRACE=1
    group=tests
    want tests && step tests 200 "$gpu_dir/cuda_ops" --test-threads=1
    # The LM on the device vs the CPU model (synth checkpoints), and the engine on CUDA.
    want tests && step tests-model 200 "$gpu_dir/cuda_model" --test-threads=1
    # The MASSV projector on the device vs the CPU projector.
    want tests && step tests-projector 120 "$gpu_dir/cuda_projector" --test-threads=1
    # CUDA graphs through raw cudarc (the driver's capture rules the emulator copies).
    want tests && step tests-graph 60 "$gpu_dir/cuda_graph_emu" --test-threads=1

    local date_ gpu_name json
    date_=$(date -u +%F)
    gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 \
        | tr '[:upper:]' '[:lower:]' | sed 's/nvidia //; s/[^a-z0-9]\+/-/g; s/^-//; s/-$//')
    json="$out/bench/results/$date_-${gpu_name:-gpu}.json"
    group=bench
    want bench && MASSV_BENCH_JSON="$json" MASSV_BENCH_DATE="$date_" MASSV_COMMIT="$commit" \
        step bench 150 "$gpu_dir/cuda_ops" --ignored bench_kernels --nocapture --test-threads=1
    # The model level: its JSON (written outside $OUT, whose files are counted) goes into
    # the results JSON under "model" (a results JSON of its own if bench wrote none).
    group=model
    if want model; then
        local model_json="${TMPDIR:-/tmp}/massv-bench-model.json"
        rm -f "$model_json"
        MASSV_BENCH_JSON="$model_json" MASSV_BENCH_DATE="$date_" MASSV_COMMIT="$commit" \
            step bench-model 240 "$gpu_dir/cuda_model" --ignored bench_model --nocapture --test-threads=1
        merge_json "$json" model "$model_json" || failed+=("bench-model (merging its JSON)")
        # The image side: the 7B vision tower + merger and the MASSV projector (448×448).
        local vision_json="${TMPDIR:-/tmp}/massv-bench-vision.json"
        rm -f "$vision_json"
        MASSV_BENCH_JSON="$vision_json" MASSV_BENCH_DATE="$date_" MASSV_COMMIT="$commit" \
            step bench-vision 120 "$gpu_dir/cuda_projector" --ignored bench_vision --nocapture --test-threads=1
        merge_json "$json" vision "$vision_json" || failed+=("bench-vision (merging its JSON)")
    fi

    # The CLI on the device: the fixture VL target, its vision tower, MASSV projector and
    # drafter all on the device (head dims 16), beside the CPU's answer; then the shapes
    # world end to end (`massv demo`: its table, and demo.json in the logs).
    group=massv
    if want massv; then
        local args=(generate --target tests/fixtures/qwen2_5_vl-tiny-hub --draft tests/fixtures/drafter-tiny-massv
            --image tests/fixtures/images/nonsquare_150x100.png --prompt "Describe the image."
            --max-new-tokens 24 --json)
        step massv-cuda 60 "$gpu_dir/massv" "${args[@]}" --device cuda
        step massv-cpu 60 "$gpu_dir/massv" "${args[@]}" --device cpu
        step demo 90 "$gpu_dir/massv" demo --assets assets --device cuda --out "$logs/demo"
    fi

    # compute-sanitizer from the carried wheel (or one installed here).
    local san=""
    if command -v compute-sanitizer >/dev/null; then
        san=$(command -v compute-sanitizer)
    elif ls "$gpu_dir"/nvidia_cuda_sanitizer_api-*.whl >/dev/null 2>&1; then
        local sdir="${TMPDIR:-/tmp}/massv-sanitizer"
        python3 -m zipfile -e "$(ls "$gpu_dir"/nvidia_cuda_sanitizer_api-*.whl | head -n 1)" "$sdir" >/dev/null 2>&1 \
            || unzip -q -o "$(ls "$gpu_dir"/nvidia_cuda_sanitizer_api-*.whl | head -n 1)" -d "$sdir"
        san="$sdir/nvidia/cu13/bin/compute-sanitizer"
        chmod +x "$san" 2>/dev/null
        export LD_LIBRARY_PATH="$sdir/nvidia/cu13/lib:$LD_LIBRARY_PATH"
    fi
    group=sanitize
    if ! want sanitize; then
        :
    elif [ -n "$san" ] && [ -x "$san" ]; then
        # (Not the split-K stress test: 2400 launches at the 7B shapes; the sweeps run
        # the same kernels under memcheck.)
        step memcheck 120 "$san" --tool memcheck --error-exitcode 1 --leak-check no \
            "$gpu_dir/cuda_ops" --test-threads=1 --skip split_k_merges
        # racecheck: the kernels that share memory between threads.
        step racecheck 90 "$san" --tool racecheck --error-exitcode 1 \
            "$gpu_dir/cuda_ops" --test-threads=1 attention_decode attention_prefill_at attention_verify attention_varlen \
            argmax probabilities top_k sample_is_exact sample_without_replacement draw_counts verify_sampled_exact verify_sampled_corners \
            rmsnorm kv_append rope_kv_append gemv
        # memcheck on the model level: the device rejection sampling (chains and trees),
        # one VL target pass with its vision tower, the drafter's chains replayed as CUDA
        # graphs (their kernels trust a cache length read on the device), and the
        # projector, which drive the
        # kernels through the runtime's own buffers (the full model tests take too long
        # under memcheck).
        step memcheck-model 150 "$san" --tool memcheck --error-exitcode 1 --leak-check no \
            "$gpu_dir/cuda_model" --test-threads=1 device_rejection_sampling device_tree_rejection_sampling \
            vision_tower_on_the_device_matches_the_cpu chain_graphs
        step memcheck-projector 60 "$san" --tool memcheck --error-exitcode 1 --leak-check no \
            "$gpu_dir/cuda_projector" --test-threads=1 fixture_projector
    else
        echo "== compute-sanitizer: not found (no wheel carried, none installed): sanitizers NOT run"
        failed+=("sanitizers not run")
    fi

    echo
    # At most 8 files come back from $OUT: the logs travel as one archive.
    tar czf "$out/logs.tar.gz" -C "$out" logs && rm -rf "$logs"
    echo "== summary (commit $commit)"
    tar xzOf "$out/logs.tar.gz" logs/tests.log 2>/dev/null | grep -h "^test result" || true
    [ -f "$json" ] && echo "benchmark: $json" || echo "benchmark: no JSON written"
    [ -f "$json" ] && grep -q '"model"' "$json" && echo "model benchmark: under \"model\" in it"
    [ -f "$json" ] && grep -q '"vision"' "$json" && echo "vision benchmark: under \"vision\" in it"
    if [ ${#failed[@]} -gt 0 ]; then
        printf 'FAILED: %s\n' "${failed[@]}"
        [ ${#not_started[@]} -eq 0 ] || echo "not started (run next): bench/gpu.sh run ${not_started[*]}"
        exit 1
    fi
    echo "all steps passed"
}

case "$mode" in
    build) build ;;
    run)
        shift || true
        run "$@"
        ;;
    *)
        echo "usage: bench/gpu.sh build | bench/gpu.sh [run [tests] [bench] [model] [massv] [sanitize]]"
        exit 2
        ;;
esac
