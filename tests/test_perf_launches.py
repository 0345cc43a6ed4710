"""The launch counts of ``LAUNCH_PROFILES["today"]`` recounted from the code (and the host
syncs of a decode step, none): every PyTorch op
that launches a kernel (not a view, not an allocation, not on an empty tensor) and every Triton
launch of one ``hip_attention`` call on a GPU-shaped problem (Llama-3.1-8B heads, bf16, the
default ``HiPConfig``, an H100's 132 SMs for the launch shape). The Triton kernels are counted,
not run, so this takes a second on the CPU."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from hip_attn.perf.estimator import LAUNCH_PROFILES  # noqa: E402

STALE = (
    "hip_attention's launches changed: update LAUNCH_PROFILES['today'] (hip_attn/perf/estimator.py)"
    " and docs/roofline.md 'Latency floors'"
)
_ALLOCATIONS = {"aten.empty", "aten.empty_like", "aten.empty_strided"}
#: Ops whose result the host must wait for on a GPU (a device-to-host read).
_SYNCS = {"aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.equal"}


class _Kernels(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.syncs = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.syncs += str(func.overloadpacket) in _SYNCS
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, tuple | list) else [out]
        launches = not func.is_view and str(func.overloadpacket) not in _ALLOCATIONS
        if launches and any(isinstance(o, torch.Tensor) and o.numel() for o in outs):
            self.count += 1
        return out


class _Launch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` counts and returns."""

    def __init__(self, counter: _Kernels) -> None:
        self.counter = counter

    def __getitem__(self, grid: Any) -> Any:
        def launch(*args: Any, **kwargs: Any) -> None:
            self.counter.count += 1

        return launch


@pytest.fixture
def counter(monkeypatch: pytest.MonkeyPatch) -> _Kernels:
    import hip_attn.attention as attention
    import hip_attn.triton_kernels.attention as sparse
    import hip_attn.triton_kernels.mask as mask
    import hip_attn.triton_kernels.tree as tree

    counter = _Kernels()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(attention, "uses_triton", lambda device: True)
    monkeypatch.setattr(attention, "_multiprocessors", lambda device: 132)
    monkeypatch.setattr(mask, "_hip_mask_kernel", _Launch(counter))
    monkeypatch.setattr(sparse, "_sparse_attention_kernel", _Launch(counter))
    monkeypatch.setattr(sparse, "_merge_splits_kernel", _Launch(counter))
    monkeypatch.setattr(tree, "_extend_tree_kernel", _Launch(counter))
    return counter


def _qkv(tq: int, tk: int, heads: int, kv_heads: int) -> tuple[Any, Any, Any]:
    def rand(h: int, t: int) -> Any:
        return torch.randn(1, h, t, 128, dtype=torch.bfloat16)

    return rand(heads, tq), rand(kv_heads, tk), rand(kv_heads, tk)


def test_decode_launches(counter: _Kernels) -> None:
    from hip_attn.attention import HiPDecodeState, hip_attention

    today = LAUNCH_PROFILES["today"]
    q, k, v = _qkv(1, 4106, 32, 8)
    state = HiPDecodeState()
    # as in generation: the prefill builds the summary tree the decode steps extend, and each
    # step appends one token; the first step completes a block and grows the tree's allocation
    # (amortized: a quarter more room), the refresh 8 steps later completes the next block in
    # place, the steady state counted here
    prompt, _, _ = _qkv(128, 4095, 32, 8)
    hip_attention(prompt, k[:, :, :4095], v[:, :, :4095], state=state)
    counts = []
    for keys in range(4096, 4107):
        counter.count = 0
        with counter:
            hip_attention(q, k[:, :, :keys], v[:, :, :keys], state=state)
        counts.append(counter.count)
    assert counter.syncs == 0  # no step reads the device from the host
    assert state.refreshes == 2  # at 4096 and 4104 keys
    steady = [counts[4104 - 4096], *counts[4105 - 4096 :], *counts[1 : 4104 - 4096]]
    expected = [today.hip_decode_refresh] + [today.hip_decode_reuse] * 9
    assert steady == expected, f"{STALE}: decode launches {counts}"


def test_prefill_launches(counter: _Kernels) -> None:
    from hip_attn.attention import hip_attention

    q, k, v = _qkv(2048, 2048, 2, 1)
    with counter:
        hip_attention(q, k, v)
    assert counter.count == LAUNCH_PROFILES["today"].hip_prefill, f"{STALE}: {counter.count}"
