"""hip_attn.patch under transformers' tensor parallelism: two gloo processes on the CPU.

``torchrun --nproc-per-node 2 -m hip_attn.tp_check`` loads a tiny random Llama with
``tp_plan="auto"`` (each rank: 4 of 8 query heads, 2 of 4 KV heads) and generates with a sparse
HiP budget; its greedy tokens must be exactly those of this process running the same HiP config
on the whole model. The workers inherit this process's environment, so both sides run the same
path: the Triton kernels in the interpreter under ``TRITON_INTERPRET=1`` (what conftest sets
without CUDA), asserted from the workers' report.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is unavailable", allow_module_level=True)

from hip_attn import tp_check  # noqa: E402
from hip_attn.attention import uses_triton  # noqa: E402
from hip_attn.patches import decode_states, unpatch  # noqa: E402
from hip_attn.patches.compat import output_cache  # noqa: E402

PROMPT, NEW = 140, 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tp_check.save_tiny(str(path))
    return path


@pytest.fixture(scope="module")
def single_process(checkpoint):
    """Greedy tokens of the whole model in this process: ``single_process(offload)``, each
    computed once per worker when a test first asks (pytest-xdist deals the two tests to
    different workers, each of which would otherwise run both)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    ids = tp_check.prompt(PROMPT, model.config.vocab_size)
    dense = tp_check.greedy(model, ids, NEW).sequences[0, PROMPT:].tolist()
    tokens: dict[bool, list[int]] = {}

    def of(offload: bool) -> list[int]:
        if offload not in tokens:
            with torch.no_grad():
                tp_check.patch_for_check(model, offload=offload)
                out = tp_check.greedy(model, ids, NEW)
                unpatch(model)
            states = decode_states(output_cache(out))
            assert states and all(s.refreshes > 0 for s in states.values())
            tokens[offload] = out.sequences[0, PROMPT:].tolist()
            # the budget does not cover the prompt: the selection matters
            assert tokens[offload] != dense
        return tokens[offload]

    return of


def run_tp(checkpoint, tmp_path, offload):
    out = tmp_path / "report.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "hip_attn.tp_check", "--model", str(checkpoint), "--out", str(out),
        "--prompt-tokens", str(PROMPT), "--new-tokens", str(NEW),
    ] + (["--offload"] if offload else [])  # fmt: skip
    # the ranks run on the CPU with gloo, as this process does: on a GPU machine transformers
    # would otherwise pick NCCL and one device per rank
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("offload", [False, True], ids=["device-kv", "offload"])
def test_two_ranks_generate_the_single_process_tokens(
    checkpoint, single_process, tmp_path, offload
):
    report = run_tp(checkpoint, tmp_path, offload)
    assert report["world_size"] == 2 and report["ok"]
    assert report["model_heads"] == [8, 4]
    want = single_process(offload)
    assert report["tokens"] == want
    kernels = "triton" if uses_triton(torch.device("cpu")) else "reference"
    # per rank: 2 layers x (K, V) x 2 KV heads x head dim 16 x fp32 per token; the host copy
    # is allocated in chunks of host_chunk_tokens, the device cache holds every token but the last
    held = tp_check.OFFLOAD_OPTIONS["host_chunk_tokens"] if offload else PROMPT + NEW - 1
    key = "host_kv_bytes" if offload else "device_kv_bytes"
    for rank in report["ranks"]:
        assert rank["tokens"] == want
        assert rank["kernels"] == kernels
        # each rank attends over its own half of the heads, and holds only those KV heads
        assert rank["attention_heads"] == [[4, 2]] and rank["kv_heads"] == [2]
        assert set(rank["refreshes"]) == {"0", "1"} and min(rank["refreshes"].values()) > 0
        assert rank[key] == 2 * 2 * 2 * 16 * 4 * held
