"""Property-based tests (hypothesis) of the public API and the Triton kernels.

* The kernels (interpreted on the CPU) equal the PyTorch reference over drawn shapes, dtypes,
  head dims, GQA ratios, batch sizes, ``Tq <= Tk`` and configurations: ``estimate_mask``
  exactly, the sparse attention within a tolerance per dtype. Selections are only compared
  kernel against reference and checked for structure (sorted, distinct, inside the candidate
  region, every candidate when the budget covers them), never pinned to particular blocks.
* Every bad input raises ``ValueError``/``TypeError`` naming the argument, before any kernel.
* The Triton path refuses inputs that ask for gradients (``NotImplementedError``).

Examples are replayed identically on every run by the "ci" profile (tests/conftest.py);
``HYPOTHESIS_PROFILE=explore`` draws fresh ones. Kernel examples are kept to a few programs
each: the interpreter costs about a tenth of a second per program.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from test_kernels import TOL, run_attention

import hip_attn.attention as attention
from hip_attn import HiPConfig, estimate_mask, hip_attention
from hip_attn.geometry import first_candidate_block, query_blocks, selection_config
from hip_attn.reference import (
    dense_attention_reference,
    estimate_mask_reference,
    hip_attention_reference,
)
from hip_attn.triton_kernels.tiles import Tile
from hip_attn.validation import MAX_HEAD_DIM, MIN_HEAD_DIM, SUPPORTED_DTYPES

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: the rand_qkv fixture only hands out a stateless maker, so sharing it across examples is safe
FIXTURE_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
#: programs per kernel launch at most (grid size): what keeps the interpreter affordable
MAX_PROGRAMS = 8


# --------------------------------------------------------------------------- strategies


@dataclasses.dataclass(frozen=True)
class Case:
    """One kernel example: a valid configuration and input shapes."""

    cfg: HiPConfig
    b: int
    hq: int
    hkv: int
    tq: int
    tk: int
    d: int
    dtype: torch.dtype
    coarse: bool  # values on a grid of quarters: exact scores, many ties
    seed: int

    def qkv(self, rand_qkv):
        # kernel examples compare the kernels with the reference: they must not fall back to it
        assert attention.uses_triton(torch.device(DEVICE))
        q, k, v = rand_qkv(
            self.b, self.hq, self.hkv, self.tq, self.tk, self.d, device=DEVICE, seed=self.seed
        )
        if self.coarse:
            q, k, v = ((x * 2).round().clamp(-4, 4) / 4 for x in (q, k, v))
        return q.to(self.dtype), k.to(self.dtype), v.to(self.dtype)

    @property
    def h_sel(self) -> int:
        return self.hkv if self.cfg.head_sharing == "kv_group" else self.hq

    def record(self) -> None:
        """Note the example for a failure report; count what it exercises (shown by
        ``--hypothesis-show-statistics``)."""
        note(repr(self))
        geo = query_blocks(self.tq, self.tk, self.cfg)
        searched = bool((geo.n_candidates > self.cfg.blocks_per_query_block).any())
        event("tree search ran" if searched else "every candidate selected")
        event(f"{self.dtype}, GQA {self.hq // self.hkv}, {self.cfg.head_sharing}")


FIELDS = {f.name for f in dataclasses.fields(HiPConfig)}


@st.composite
def configs(draw) -> HiPConfig:
    """Valid configurations small enough for interpreted kernels; always sparse."""
    bk = draw(st.sampled_from([1, 2, 4, 8, 16, 32]))
    bq = draw(st.sampled_from([16, 32, 64]))
    return HiPConfig(
        k=bk * draw(st.integers(1, 8)),
        block_size_q=bq,
        block_size_k=bk,
        query_pool_stride=draw(st.sampled_from([s for s in (1, 2, 4, 8, 16, 32, 64) if s <= bq])),
        sink_tokens=bk * draw(st.integers(0, 3)),
        window=bq + draw(st.integers(0, 48)),
        head_sharing=draw(st.sampled_from(["kv_group", "head"])),
        beam=draw(st.integers(1, 4)),
        refresh_interval=1,
        dense_threshold=0,
    )


@st.composite
def kernel_cases(draw, dtypes=SUPPORTED_DTYPES) -> Case:
    cfg = draw(configs())
    b = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.integers(1, 4))  # GQA ratios 1..4
    n_qb = draw(st.integers(1, max(1, MAX_PROGRAMS // (b * hq))))
    tq = draw(st.integers((n_qb - 1) * cfg.block_size_q + 1, n_qb * cfg.block_size_q))
    mode = draw(st.sampled_from(["prefill", "search", "search", "few", "any"]))
    g, bk = cfg.blocks_per_query_block, cfg.block_size_k
    if mode == "prefill":
        tk = tq
    elif mode in ("search", "few"):  # the first query block has c candidate blocks, > G or not
        c = draw(st.integers(g + 1, 3 * g + 3) if mode == "search" else st.integers(0, g))
        tk = tq + cfg.window + cfg.sink_tokens + c * bk + draw(st.integers(0, bk - 1))
    else:  # chunked prefill or decode anywhere, the window often reaching back to the sinks
        tk = tq + draw(st.integers(1, 300))
    return Case(
        cfg=cfg,
        b=b,
        hq=hq,
        hkv=hkv,
        tq=tq,
        tk=tk,
        d=draw(st.sampled_from([16, 32, 64, 128])),
        dtype=draw(st.sampled_from(dtypes)),
        coarse=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def assert_selection_structure(idx: torch.Tensor, case: Case) -> None:
    """Shape and dtype, then per row: ``min(N, G)`` blocks, ascending (so distinct), inside
    the candidate region ``[first, first + N)``, ``-1`` padding after them. With ``N <= G``
    that is every candidate: the budget covering the context selects all of it."""
    cfg = case.cfg
    geo = query_blocks(case.tq, case.tk, cfg)
    n = geo.n_candidates
    g = selection_config(case.tq, case.tk, cfg).blocks_per_query_block  # <= G: no wider
    assert g == min(cfg.blocks_per_query_block, max(1, int(n.max())))  # than the candidates
    assert idx.dtype == torch.int32
    assert tuple(idx.shape) == (case.b, case.h_sel, n.numel(), g)
    idx = idx.cpu().long()
    valid = idx >= 0
    count = valid.sum(-1)
    assert torch.equal(count, n.clamp(max=g).expand_as(count))
    assert torch.equal(valid, torch.arange(g) < count[..., None])  # padding only at the end
    assert torch.all(idx[valid == 0] == -1)
    assert torch.all((idx[..., 1:] > idx[..., :-1]) | ~valid[..., 1:])
    first = first_candidate_block(cfg)
    inside = (idx >= first) & (idx < (first + n)[:, None])
    assert torch.all(inside | ~valid)


# ------------------------------------------------------------------- kernels vs reference


@settings(max_examples=45, suppress_health_check=FIXTURE_OK)
@given(case=kernel_cases())
def test_estimate_mask_kernel_equals_reference(rand_qkv, case):
    case.record()
    q, k, _ = case.qkv(rand_qkv)
    idx = estimate_mask(q, k, case.cfg)  # the Triton search (interpreted on the CPU)
    ref, _ = estimate_mask_reference(q, k, case.cfg)
    assert_selection_structure(idx, case)
    assert_selection_structure(ref, case)
    # exact for every dtype: both score 16-bit inputs with exact products in fp32
    torch.testing.assert_close(idx.cpu(), ref.cpu(), atol=0, rtol=0)


@st.composite
def launches(draw, case: Case) -> dict[str, object]:
    """A launch shape the kernel supports: packed heads share a selection (prefill tiles
    included), any keys per tile, splits."""
    per_sel = case.hq // case.h_sel
    heads = draw(st.sampled_from([h for h in range(1, per_sel + 1) if per_sel % h == 0]))
    return {
        "tile": Tile(heads, draw(st.sampled_from([16, 32, 64, 128]))),
        "num_splits": draw(st.integers(1, 3)),
    }


def random_selection(case: Case, gen: torch.Generator) -> torch.Tensor:
    """A valid selection not made by the search: ``min(N, G)`` random candidate blocks per row,
    ascending, ``-1`` padded (the attention kernel must not care how it was chosen)."""
    geo = query_blocks(case.tq, case.tk, case.cfg)
    g, first = case.cfg.blocks_per_query_block, first_candidate_block(case.cfg)
    idx = torch.full((case.b, case.h_sel, geo.n_candidates.numel(), g), -1, dtype=torch.int32)
    for j, n in enumerate(geo.n_candidates.tolist()):
        for row in idx[:, :, j].reshape(-1, g):
            chosen = torch.randperm(n, generator=gen)[: min(n, g)].sort().values + first
            row[: chosen.numel()] = chosen
    return idx.to(DEVICE)


@settings(max_examples=40, suppress_health_check=FIXTURE_OK)
@given(
    data=st.data(),
    case=kernel_cases(),
    searched=st.booleans(),
)
def test_sparse_attention_kernel_equals_reference(rand_qkv, data, case, searched):
    case.record()
    launch = data.draw(launches(case), label="launch")
    q, k, v = case.qkv(rand_qkv)
    if searched:
        idx, _ = estimate_mask_reference(q, k, case.cfg)
    else:
        idx = random_selection(case, torch.Generator().manual_seed(case.seed))
    out = torch.full_like(q, float("nan"))  # poison: the kernel must write every row
    run_attention(q, k, v, idx, case.cfg, out=out, **launch)
    assert not out.isnan().any()
    expected = hip_attention_reference(q, k, v, case.cfg, indices=idx)
    tol = TOL[case.dtype]
    torch.testing.assert_close(out.float().cpu(), expected.float().cpu(), atol=tol, rtol=tol)


@settings(max_examples=20, suppress_health_check=FIXTURE_OK)
@given(
    case=kernel_cases(),
    scale=st.none() | st.floats(0.01, 1.0),
)
def test_hip_attention_equals_reference(rand_qkv, case, scale):
    """The public call end to end (validation, search, launch shape, attention)."""
    case.record()
    q, k, v = case.qkv(rand_qkv)
    out = hip_attention(q, k, v, case.cfg, scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype and out.isfinite().all()
    expected = hip_attention_reference(q, k, v, case.cfg, scale=scale)
    tol = TOL[case.dtype]
    torch.testing.assert_close(out.float().cpu(), expected.float().cpu(), atol=tol, rtol=tol)


@settings(max_examples=12, suppress_health_check=FIXTURE_OK)
@given(case=kernel_cases(dtypes=(torch.float32,)))
def test_budget_covering_the_context_equals_dense(rand_qkv, case):
    cfg = case.cfg.replace(k=case.cfg.block_size_k * (case.tk // case.cfg.block_size_k + 1))
    case.record()
    q, k, v = case.qkv(rand_qkv)
    out = hip_attention(q, k, v, cfg)
    torch.testing.assert_close(
        out.cpu(), dense_attention_reference(q, k, v).cpu(), atol=1e-5, rtol=1e-5
    )


@settings(max_examples=6, suppress_health_check=FIXTURE_OK)
@given(case=kernel_cases(dtypes=(torch.float32,)).filter(lambda c: c.b == 2))
def test_selection_does_not_depend_on_the_batch_split(rand_qkv, case):
    case.record()
    q, k, _ = case.qkv(rand_qkv)
    whole = estimate_mask(q, k, case.cfg)
    for i in range(2):
        alone = estimate_mask(q[i : i + 1], k[i : i + 1], case.cfg)
        torch.testing.assert_close(alone, whole[i : i + 1], atol=0, rtol=0)


# ------------------------------------------------------------------------ bad inputs


@st.composite
def valid_shapes(draw):
    """``(q shape, kv shape)`` of a valid call, any size (meta tensors allocate nothing)."""
    hkv = draw(st.integers(1, 8))
    tk = draw(st.integers(1, 1 << 20))
    return (
        (
            draw(st.integers(0, 4)),  # an empty batch is valid: SDPA returns an empty output
            hkv * draw(st.integers(1, 8)),
            draw(st.integers(1, tk)),
            2 * draw(st.integers(MIN_HEAD_DIM // 2, MAX_HEAD_DIM // 2)),  # even
        ),
        (hkv, tk),
    )


def meta(shape, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def make_qkv(shapes, dtype=torch.float32):
    (b, hq, tq, d), (hkv, tk) = shapes
    return meta((b, hq, tq, d), dtype), meta((b, hkv, tk, d), dtype), meta((b, hkv, tk, d), dtype)


@settings(max_examples=150)
@given(shapes=valid_shapes(), dtype=st.sampled_from(SUPPORTED_DTYPES))
def test_valid_inputs_pass_validation(shapes, dtype):
    """No false alarms: every valid shape and dtype gets past the checks (a meta tensor then
    fails in the attention itself, never with a message about an argument)."""
    from hip_attn.validation import check_qkv

    q, k, v = make_qkv(shapes, dtype)
    check_qkv(q, k, v)
    check_qkv(q, k)


NAMES = ("q", "k", "v")
DEFECTS = (
    "rank", "batch", "head_dim", "v_shape", "gqa", "no_heads", "tokens", "mixed_dtype",
    "bad_dtype", "dim_range", "not_tensor", "stride",
)  # fmt: skip
UNSUPPORTED_DTYPES = (
    torch.float64, torch.int32, torch.int64, torch.int8, torch.uint8, torch.bool,
    torch.complex64, torch.float8_e4m3fn,
)  # fmt: skip


@st.composite
def bad_inputs(draw):
    """A valid call with one thing wrong: ``(args, exception, pattern, k_only)``. ``pattern``
    must name the argument; ``k_only`` says whether ``estimate_mask(q, k)`` sees the defect."""
    shapes = draw(valid_shapes())
    dtype = draw(st.sampled_from(SUPPORTED_DTYPES))
    args = list(make_qkv(shapes, dtype))
    (b, hq, tq, d), (hkv, tk) = shapes
    kind = draw(st.sampled_from(DEFECTS))
    which = draw(st.sampled_from(NAMES))
    if kind == "rank":
        ndim = draw(st.integers(0, 6).filter(lambda n: n != 4))
        args[NAMES.index(which)] = meta(draw(st.lists(st.integers(1, 4), min_size=ndim,
                                                      max_size=ndim)), dtype)  # fmt: skip
        return args, ValueError, rf"^{which} must have 4 dimensions", which
    if kind in ("batch", "head_dim"):
        which = draw(st.sampled_from(("k", "v")))
        x = args[NAMES.index(which)]
        shape = list(x.shape)
        if kind == "batch":
            shape[0] = draw(st.integers(0, 5).filter(lambda n: n != b))
        else:
            shape[3] = draw(st.integers(MIN_HEAD_DIM, MAX_HEAD_DIM).filter(lambda n: n != d))
        args[NAMES.index(which)] = meta(shape, dtype)
        what = "batch size" if kind == "batch" else "head_dim"
        return args, ValueError, rf"^{which} must have the {what} of q", which
    if kind == "v_shape":
        heads = draw(st.integers(1, 8))
        tokens = draw(st.integers(1, 1 << 20))
        if (heads, tokens) == (hkv, tk):
            tokens = tk + 1
        args[2] = meta((b, heads, tokens, d), dtype)
        return args, ValueError, r"^v must have the heads and tokens of k", "v"
    if kind == "gqa":
        new_hkv = draw(st.integers(2, 9).filter(lambda h: hq % h))
        args[1], args[2] = meta((b, new_hkv, tk, d), dtype), meta((b, new_hkv, tk, d), dtype)
        return args, ValueError, r"^q heads \(\d+\) must be a multiple of k heads", "k"
    if kind == "no_heads":
        zero_q = draw(st.booleans())
        args[0] = meta((b, 0 if zero_q else hq, tq, d), dtype)
        if not zero_q:
            args[1], args[2] = meta((b, 0, tk, d), dtype), meta((b, 0, tk, d), dtype)
        return args, ValueError, r"^q and k must have at least one head", "k"
    if kind == "tokens":
        if draw(st.booleans()):
            args[0] = meta((b, hq, 0, d), dtype)
            return args, ValueError, r"^q and k must hold at least one token", "q"
        args[0] = meta((b, hq, tk + draw(st.integers(1, 100)), d), dtype)
        return args, ValueError, r"^q has more tokens \(\d+\) than k", "q"
    if kind == "mixed_dtype":
        which = draw(st.sampled_from(("k", "v")))
        other = draw(st.sampled_from([t for t in SUPPORTED_DTYPES if t != dtype]))
        args[NAMES.index(which)] = args[NAMES.index(which)].to(other)
        return args, TypeError, rf"^{which} must have the dtype of q", which
    if kind == "bad_dtype":
        bad = draw(st.sampled_from(UNSUPPORTED_DTYPES))
        args = [
            x.to(bad) if n == which or draw(st.booleans()) else x
            for n, x in zip(NAMES, args, strict=True)
        ]
        first_bad = next(n for n, x in zip(NAMES, args, strict=True) if x.dtype == bad)
        return args, TypeError, rf"^{first_bad} must be float16, bfloat16 or float32", first_bad
    if kind == "dim_range":
        bad_d = draw(
            st.integers(1, MIN_HEAD_DIM - 1)
            | st.integers(MAX_HEAD_DIM + 1, 1024)
            | st.integers(MIN_HEAD_DIM // 2, MAX_HEAD_DIM // 2 - 1).map(lambda h: 2 * h + 1)
        )
        args = list(make_qkv(((b, hq, tq, bad_d), (hkv, tk)), dtype))
        pattern = r"^head_dim must be even and in \[16, 256\] \(the last dimension of q"
        return args, ValueError, pattern, "q"
    if kind == "not_tensor":
        x = args[NAMES.index(which)]
        args[NAMES.index(which)] = draw(
            st.none()
            | st.integers()
            | st.floats()
            | st.text(max_size=5)
            | st.just(np.zeros((1, 1, 1, 16), dtype=np.float32))
            | st.just(x.shape)
            | st.just([[[[0.0] * 16]]])
        )
        return args, TypeError, rf"^{which} must be a torch.Tensor, got", which
    assert kind == "stride"
    x = args[NAMES.index(which)]
    strided = meta((*x.shape[:3], 2 * x.shape[3]), dtype)[..., ::2]  # same shape, stride 2 on D
    args[NAMES.index(which)] = strided if draw(st.booleans()) else x.transpose(2, 3)
    return args, ValueError, rf"^{which} must have a unit stride", which


@settings(max_examples=300)
@given(bad=bad_inputs())
def test_bad_inputs_raise_naming_the_argument(bad):
    args, exc, pattern, culprit = bad
    note(f"{[getattr(x, 'shape', x) for x in args]}, {[getattr(x, 'dtype', '') for x in args]}")
    with pytest.raises(exc, match=pattern) as info:
        hip_attention(*args, HiPConfig())
    assert re.search(rf"\b{culprit}\b", str(info.value))
    if culprit != "v":
        with pytest.raises(exc, match=pattern):
            estimate_mask(args[0], args[1], HiPConfig())


def test_missing_values_are_named():
    q, k, _ = make_qkv(((1, 2, 4, 16), (1, 8)))
    with pytest.raises(TypeError, match="^v must be a torch.Tensor, got NoneType"):
        hip_attention(q, k, None)  # type: ignore[arg-type]


@settings(max_examples=80)
@given(
    scale=st.floats(max_value=0.0)
    | st.sampled_from([math.nan, math.inf, -math.inf, 10**400])  # an int no float can hold
    | st.integers(max_value=0)
)
def test_bad_scale_values_raise_value_error(scale):
    q, k, v = make_qkv(((1, 2, 4, 16), (1, 8)))
    with pytest.raises(ValueError, match="^scale must be a positive finite number"):
        hip_attention(q, k, v, scale=scale)


@settings(max_examples=40)
@given(
    scale=st.booleans()
    | st.text(max_size=4)
    | st.complex_numbers()
    | st.just(torch.tensor(0.5))
    | st.lists(st.floats(0.1, 1.0), max_size=2)
)
def test_bad_scale_types_raise_type_error(scale):
    q, k, v = make_qkv(((1, 2, 4, 16), (1, 8)))
    with pytest.raises(TypeError, match="^scale must be a float"):
        hip_attention(q, k, v, scale=scale)


@settings(max_examples=20, suppress_health_check=FIXTURE_OK)
@given(scale=st.floats(1e-3, 10.0) | st.integers(1, 4), numpy=st.booleans())
def test_any_real_positive_scale_is_accepted(rand_qkv, scale, numpy):
    q, k, v = rand_qkv(1, 2, 1, 4, 8, 16)  # dense: no kernel needed
    expected = dense_attention_reference(q, k, v, scale=float(scale))
    given_scale = np.float32(scale) if numpy else scale
    out = hip_attention(q, k, v, scale=given_scale)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


#: the fields annotated ``int``: each must refuse anything else (bools included)
INT_FIELDS = tuple(f.name for f in dataclasses.fields(HiPConfig) if f.type in (int, "int"))


def _not_pow2(lo: int) -> st.SearchStrategy[int]:
    return st.integers(max_value=lo - 1) | st.integers(lo, 1 << 12).filter(lambda n: n & (n - 1))


#: per field, values that are ints but out of range, for the defaults of the other fields
#: (k=512, block_size_q=64, block_size_k=8, window=256)
BAD_VALUES: dict[str, st.SearchStrategy[object]] = {
    "k": st.integers(max_value=0) | st.integers(1, 4096).filter(lambda n: n % 8),
    "block_size_q": _not_pow2(16),
    "block_size_k": _not_pow2(1),
    "query_pool_stride": _not_pow2(1) | st.sampled_from([128, 256, 1024]),
    "sink_tokens": st.integers(max_value=-1) | st.integers(0, 4096).filter(lambda n: n % 8),
    "window": st.integers(max_value=63),
    "beam": st.integers(max_value=0),
    "refresh_interval": st.integers(max_value=0) | st.integers(257, 1 << 20),
    "head_sharing": st.text(max_size=10).filter(lambda s: s not in ("kv_group", "head")),
    "dense_threshold": st.integers(max_value=-1) | st.integers(min_value=2**31),
    "dense_layers": st.lists(st.integers(max_value=-1) | st.text() | st.floats(), min_size=1),
}


@st.composite
def bad_config_fields(draw):
    field = draw(st.sampled_from(sorted(FIELDS & set(BAD_VALUES))))
    if field in INT_FIELDS and draw(st.booleans()):
        value = draw(st.floats() | st.text(max_size=3) | st.booleans() | st.none())
        return field, value, TypeError
    if field == "dense_threshold" and draw(st.booleans()):  # None is valid there
        value = draw(st.floats(allow_nan=True) | st.text(max_size=3) | st.booleans())
        return field, value, TypeError
    value = draw(BAD_VALUES[field])
    if field == "dense_layers":  # one bad entry among good ones
        value = tuple(draw(st.lists(st.integers(0, 64), max_size=3))) + tuple(value)
    return field, value, ValueError


@settings(max_examples=200)
@given(bad=bad_config_fields())
def test_bad_config_fields_raise_naming_the_field(bad):
    field, value, exc = bad
    with pytest.raises(exc, match=rf"^HiPConfig\.{field} "):
        HiPConfig(**{field: value})


# ----------------------------------------------------------------- inference-only kernels


@settings(max_examples=20)
@given(needs_grad=st.lists(st.booleans(), min_size=3, max_size=3).filter(any))
def test_triton_path_refuses_inputs_that_require_grad(needs_grad):
    def no_launch(*args, **kwargs):  # the error must come before any kernel
        raise AssertionError("a kernel ran")

    q, k, v = (torch.randn(1, 2, 4, 16).requires_grad_(g) for g in needs_grad)
    culprit = NAMES[needs_grad.index(True)]
    cfg = HiPConfig(k=8, block_size_q=16, window=16, dense_threshold=0)
    assert attention.uses_triton(q.device)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention, "select_blocks", no_launch)
        with pytest.raises(NotImplementedError, match=rf"^{culprit} requires grad.*inference-only"):
            hip_attention(q, k, v, cfg)


def test_grad_free_calls_run_the_kernels_on_inputs_that_require_grad(rand_qkv):
    q, k, v = (x.requires_grad_() for x in rand_qkv(1, 2, 1, 20, 120, 16))
    cfg = HiPConfig(k=16, block_size_q=16, window=16, sink_tokens=8, dense_threshold=0)
    expected = hip_attention_reference(q.detach(), k.detach(), v.detach(), cfg)
    for guard in (torch.no_grad, torch.inference_mode):
        with guard():
            out = hip_attention(q, k, v, cfg)
        assert not out.requires_grad
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_dense_path_and_reference_fallback_keep_autograd(rand_qkv, monkeypatch):
    q, k, v = (x.requires_grad_() for x in rand_qkv(1, 2, 1, 20, 120, 16))
    cfg = HiPConfig(k=16, block_size_q=16, window=16, sink_tokens=8, dense_threshold=0)
    dense = hip_attention(q, k, v, cfg.replace(dense_threshold=120))  # SDPA: differentiable
    (grad_dense,) = torch.autograd.grad(dense.sum(), q)
    (grad_expected,) = torch.autograd.grad(dense_attention_reference(q, k, v).sum(), q)
    torch.testing.assert_close(grad_dense, grad_expected, atol=1e-5, rtol=1e-5)

    monkeypatch.setattr(attention, "uses_triton", lambda device: False)  # no kernels at all
    out = hip_attention(q, k, v, cfg)
    (grad_ref,) = torch.autograd.grad(out.sum(), v)
    (grad_expected,) = torch.autograd.grad(hip_attention_reference(q, k, v, cfg).sum(), v)
    assert grad_ref.abs().sum() > 0
    torch.testing.assert_close(grad_ref, grad_expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "field,value",
    [("dense_threshold", True), ("dense_layers", (True,)), ("dense_layers", 3)],
    ids=["threshold_bool", "layers_bool", "layers_not_iterable"],
)
def test_config_field_gaps(field, value):
    """A bool is not an int for ``dense_threshold`` nor inside ``dense_layers``; a non-iterable
    ``dense_layers`` is named."""
    with pytest.raises((TypeError, ValueError), match=rf"^HiPConfig\.{field} "):
        HiPConfig(**{field: value})


def test_reference_attends_a_query_block_ending_inside_the_sinks(rand_qkv):
    """A query block ending before ``sink_tokens`` (here keys 0..15 with 24 sinks) sees only
    the sinks up to itself: dense attention, in the kernel and in the reference."""
    q, k, v = rand_qkv(1, 1, 1, 20, 20, 16)
    cfg = HiPConfig(k=8, block_size_q=16, sink_tokens=24, window=16, dense_threshold=0)
    dense = dense_attention_reference(q, k, v)
    torch.testing.assert_close(hip_attention(q, k, v, cfg), dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hip_attention_reference(q, k, v, cfg), dense)
