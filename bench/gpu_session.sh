#!/usr/bin/env bash
# Everything only a GPU can show, in a few long calls (a lent H100/H200 is held for minutes).
#
#   bash bench/gpu_session.sh install-and-test   # install, CUDA test suite, aot on the real arch
#   bash bench/gpu_session.sh bench              # prefill + decode against SDPA and flex
#   bash bench/gpu_session.sh lighter            # the same for the README's lighter search, and offloaded
#   bash bench/gpu_session.sh offload            # KV offload memory growth and decode latency
#   bash bench/gpu_session.sh generate           # a model's decode: dense, HiP, HiP in a CUDA graph
#
# The editable install builds with the image's setuptools, which must be >= 77 (PEP 639 licence
# field); for an older one, build a wheel here first (python -m build --wheel) and carry dist/.
# Each step leaves its logs and results in $OUT (default: bench/results/session) as at most a
# few files, and appends its JSON lines to bench/results/<gpu>.jsonl. Every step reinstalls the
# package first: a GPU machine may be fresh at each call. No downloads happen: the GPU image
# must already hold torch, triton and (for the model tests) transformers.
set -euo pipefail
step="${1:?usage: bash bench/gpu_session.sh install-and-test|bench|lighter|offload|generate}"
out="${OUT:-bench/results/session}"
mkdir -p "$out"
unset TRITON_INTERPRET
export TRITON_DEFAULT_FP_FUSION=1
py="${PYTHON:-python3}"

install() {
    # --no-build-isolation builds with the image's setuptools; a wheel built elsewhere
    # (python -m build --wheel, carried in dist/) needs no build backend at all
    if ! "$py" -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1; then
        echo "editable install failed (see install.log); trying dist/*.whl" >&2
        "$py" -m pip install -q --no-deps --force-reinstall dist/*.whl >>"$out/install.log" 2>&1
    fi
    "$py" -c "import torch, triton, hip_attn; print(hip_attn.__version__, torch.__version__,
triton.__version__, torch.cuda.get_device_name())" | tee -a "$out/install.log"
}

install
case "$step" in
install-and-test)
    # the whole suite on CUDA: kernels vs reference, CUDA gather, offload memory bound, models
    # (up to 10 failures: a session is rare, one failure should not hide the others)
    "$py" -m pytest -q --maxfail=10 --junitxml="$out/pytest.xml" tests 2>&1 | tail -40 >"$out/pytest.log" || true
    tail -5 "$out/pytest.log"
    arch=$("$py" -c "import torch; a, b = torch.cuda.get_device_capability(); print(a * 10 + b)")
    sms=$("$py" -c "import torch; print(torch.cuda.get_device_properties(0).multi_processor_count)")
    "$py" -m hip_attn.cli aot --quick --arch "$arch" --sms "$sms" --json "$out/aot.json" \
        >"$out/aot.log" 2>&1 || true
    ;;
bench)
    "$py" -m hip_attn.cli bench prefill --context 8k,32k,128k --plot 2>&1 | tee "$out/prefill.log" | tail -20
    "$py" -m hip_attn.cli bench decode --context 8k,128k,512k,1m --plot 2>&1 | tee "$out/decode.log" | tail -20
    ;;
lighter)
    # the defaults before session 19: one node per selected block, pooled rows, summary leaves
    q=(--beam 1 --query-pool-stride 2 --leaf-scores summary)
    "$py" -m hip_attn.cli bench prefill --context 8k,32k,128k "${q[@]}" 2>&1 | tee "$out/lighter-prefill.log" | tail -20
    "$py" -m hip_attn.cli bench decode --context 8k,128k,1m "${q[@]}" 2>&1 | tee "$out/lighter-decode.log" | tail -20
    "$py" -m hip_attn.cli bench offload --parts decode --context 128k "${q[@]}" 2>&1 | tee "$out/lighter-offload.log" | tail -20
    ;;
offload)
    "$py" -m hip_attn.cli bench offload --plot 2>&1 | tee "$out/offload.log" | tail -20
    ;;
generate)
    "$py" bench/generate_speed.py --context 8k,32k,128k --layers 4 --offload 2>&1 | tee "$out/generate.log" | tail -20
    # a left-padded batch: each sequence counted apart, in the launches of an unpadded batch
    "$py" bench/generate_speed.py --context 8k,32k --layers 4 --batch 4 --padded 2>&1 | tee "$out/generate-padded.log" | tail -20
    ;;
*)
    echo "unknown step $step" >&2
    exit 2
    ;;
esac
# results (JSON lines, plots) travel back as one archive
tar czf "$out/results.tgz" --exclude=session bench/results
