"""One benchmark case: every method measured, counted and set beside the analytic floor.

Methods (keys of a record's ``results``):

* ``hip``: :func:`hip_attention` without decode state, i.e. mask estimation + sparse attention
  (for decode: a step that refreshes the selection);
* ``hip_amortized`` (decode): ``refresh_interval`` steps through one :class:`HiPDecodeState`
  (one refresh, the rest reuse the selection), per step: what decoding costs on average;
* ``hip_graph`` (decode, CUDA): the same steps as device decode (``hip_attention(...,
  length=)``) captured once in a CUDA graph and replayed, per step: the launch overhead gone;
* ``hip_mask``: mask estimation as ``hip_attention`` runs it (pooling the queries, building the
  summary tree, the search kernel);
* ``hip_mask_kernel`` (Triton backends): the search kernel's wrapper alone, on prepared inputs;
* ``hip_sparse``: sparse attention on a fixed selection;
* ``sdpa``: dense causal attention (flash backend where it runs);
* ``flex``: compiled ``flex_attention`` with a ``BlockMask`` from the same selection.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from hip_attn.attention import (
    HiPDecodeState,
    _sparse,
    hip_attention,
    search_tree,
    selection_heads,
    summary_tree,
    uses_triton,
)
from hip_attn.bench.cases import MODEL_DTYPE, BenchCase
from hip_attn.bench.flex import FlexUnavailable, flex_call, plan_flex
from hip_attn.bench.sdpa import SdpaUnavailable, prepare_sdpa
from hip_attn.bench.timing import Timing, TimingSettings, measure
from hip_attn.bench.work import Work, dense_work, hip_work
from hip_attn.config import HiPConfig
from hip_attn.geometry import tree_blocks
from hip_attn.perf.attention_floor import AttentionFloor, Method, Phase, attention_floor
from hip_attn.perf.hardware import GPUSpec

#: The method a mode's speedup and floor ratio are quoted for.
HEADLINE = {"prefill": "hip", "decode": "hip_amortized", "mask": "hip_mask"}


@dataclass(frozen=True)
class RunOptions:
    """How to run cases.

    Attributes:
        device: where tensors live.
        methods: any of ``hip``, ``sdpa``, ``flex``.
        timing: warm-up and repetition settings.
        gpu: the GPU the analytic floor is computed for.
        gpu_note: why that GPU (when it was guessed), else ``None``.
        flex_kv_block: key tokens per flex mask block (``None``: the default).
        seed: seed of the random inputs.
    """

    device: torch.device
    methods: tuple[str, ...]
    timing: TimingSettings
    gpu: GPUSpec
    gpu_note: str | None = None
    flex_kv_block: int | None = None
    seed: int = 0


def timing_label(device: torch.device) -> str:
    """``cuda-events``, ``cpu-interpreter`` (Triton interpreter) or ``cpu-reference``."""
    if device.type == "cuda":
        return "cuda-events"
    return "cpu-interpreter" if uses_triton(device) else "cpu-reference"


def backend_label(device: torch.device) -> str:
    """Which HiP implementation runs: ``triton``, ``triton-interpreter`` or ``reference``."""
    if not uses_triton(device):
        return "reference"
    return "triton" if device.type == "cuda" else "triton-interpreter"


def make_inputs(
    case: BenchCase, device: torch.device, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``q [B, Hq, Tq, D]``, ``k, v [B, Hkv, Tk, D]`` in the case's dtype."""
    sh = case.shape
    dtype = getattr(torch, sh.dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(
        (sh.batch, sh.heads, case.queries, sh.head_dim), generator=gen, device=device, dtype=dtype
    )
    kv_shape = (sh.batch, sh.kv_heads, case.context, sh.head_dim)
    k = torch.randn(kv_shape, generator=gen, device=device, dtype=dtype)
    v = torch.randn(kv_shape, generator=gen, device=device, dtype=dtype)
    return q, k, v


def _entry(timing: Timing, work: Work | None, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = timing.to_dict()
    if work is not None:
        tflops, gbps = work.rates(timing.ms)
        data.update(flops=work.flops, bytes=work.bytes, tflops=tflops, gbps=gbps)
    data.update({k: v for k, v in extra.items() if v is not None})
    return data


def failure_entry(exc: BaseException) -> dict[str, Any]:
    """A method's result entry for the exception it raised: ``skipped`` when the GPU ran out of
    memory (a size limit, not a bug), else ``error`` (the run then exits 1)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return {"skipped": f"out of memory: {text[:300]}"}
    return {"error": f"{type(exc).__name__}: {text[:300]}"}


def _per_step(t: Timing, steps: int) -> Timing:
    """A timing of ``steps`` decode steps per run, per step."""
    wall = None if t.wall_ms is None else t.wall_ms / steps
    return replace(t, ms=t.ms / steps, p20_ms=t.p20_ms / steps, p80_ms=t.p80_ms / steps,
                   wall_ms=wall)  # fmt: skip


def _graph_steps(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: HiPConfig,
    scale: float,
    opts: Any,
    work: Work,
) -> dict[str, Any]:
    """``refresh_interval`` device-decode steps over the last keys of ``k`` (each step counts
    one more key in use, so one of them searches), captured in a CUDA graph and replayed; a
    result per step. The length is reset before each replay of the cycle (one tiny copy)."""
    if q.device.type != "cuda":
        return {"skipped": "needs CUDA: a CUDA graph replays the device-decode step"}
    steps = cfg.refresh_interval
    start = k.shape[2] - steps
    try:
        first = torch.tensor([start], dtype=torch.int32, device=q.device)
        length, state = first.clone(), HiPDecodeState()

        def step() -> None:
            length.add_(1)
            hip_attention(q, k, v, cfg, scale=scale, state=state, length=length)

        step()  # compiles the kernels and sets up the state's device buffers
        length.copy_(first)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(steps):
                step()

        def cycle() -> None:
            length.copy_(first)
            graph.replay()

        per_step = _per_step(measure(cycle, q.device, opts.timing), steps)
        return _entry(per_step, work, steps_per_run=steps, refreshes_per_run=1)
    except Exception as exc:
        return failure_entry(exc)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def select(
    q: torch.Tensor, k: torch.Tensor, case: BenchCase, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """HiP's selection for the case, as ``hip_attention`` estimates it, and the children the
    search scored per program (for counting its work)."""
    cfg = case.config
    if uses_triton(device):
        from hip_attn.triton_kernels.mask import estimate_mask_triton

        return estimate_mask_triton(
            q,
            summary_tree(k, cfg),
            case.context,
            cfg,
            selection_heads(q, k.shape[1], cfg),
            q.shape[-1] ** -0.5,
            keys=k,
            done=tree_blocks(case.context, cfg),
        )
    from hip_attn.reference import estimate_mask_reference

    indices, stats = estimate_mask_reference(q, k, cfg)
    return indices, stats.scored


def predict(case: BenchCase, gpu: GPUSpec) -> dict[str, Any] | None:
    """The analytic floor of each measured method, in milliseconds (``None`` for query counts
    the model does not cover: it knows prefill, ``Tq == Tk``, and one-token decode)."""
    phase: Phase
    if case.model_phase == "prefill":
        phase = "prefill"
    elif case.model_phase == "decode":
        phase = "decode"
    else:
        return None
    sh, cfg = case.shape, case.config
    common: dict[str, Any] = {
        "heads": sh.heads,
        "kv_heads": sh.kv_heads,
        "head_dim": sh.head_dim,
        "gpu": gpu,
        "batch": sh.batch,
        "dtype": MODEL_DTYPE[sh.dtype],
    }

    def floor(method: Method, config: HiPConfig = cfg) -> AttentionFloor:
        return attention_floor(method, phase, case.context, config=config, **common)

    def part(f: AttentionFloor, name: str) -> float | None:
        return f.parts[name].time_s * 1e3 if name in f.parts else None

    dense = floor("dense")
    hip = floor("hip")  # decode: the search amortized over refresh_interval steps
    searching = floor("hip", cfg.replace(refresh_interval=1)) if phase == "decode" else hip
    ms = {
        "sdpa": dense.time_s * 1e3,
        "hip": searching.time_s * 1e3,
        "hip_mask": part(searching, "hip_search"),
        "hip_mask_kernel": part(searching, "hip_search"),
        "hip_sparse": part(hip, "hip_attention"),
        "flex": part(hip, "hip_attention"),
    }
    if phase == "decode":
        ms["hip_amortized"] = hip.time_s * 1e3
    return {
        "gpu": gpu.name,
        "phase": phase,
        "ms": {k: v for k, v in ms.items() if v is not None},
        "bound": {"sdpa": dense.total.bound, "hip": hip.total.bound},
        "flops": {"sdpa": dense.total.flops, "hip": hip.total.flops},
        "bytes": {"sdpa": dense.total.hbm_bytes, "hip": hip.total.hbm_bytes},
        "speedup": dense.time_s / hip.time_s if hip.time_s else None,
    }


def run_case(
    case: BenchCase, opts: RunOptions, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Measure ``case`` with every method of ``opts``; returns the record's case-specific part
    (the caller adds the environment)."""
    device, cfg = opts.device, case.config
    say = log or (lambda _msg: None)
    q, k, v = make_inputs(case, device, opts.seed)
    scale = case.shape.head_dim**-0.5
    notes: list[str] = []
    results: dict[str, dict[str, Any]] = {}
    calls: dict[str, Callable[[], torch.Tensor]] = {}  # outputs compared after the timings
    if case.context <= cfg.effective_dense_threshold:
        notes.append(
            f"context <= dense_threshold ({cfg.effective_dense_threshold}): hip_attention runs "
            "dense SDPA; hip_mask and hip_sparse time the sparse path"
        )

    indices, scored = select(q, k, case, device)
    work = hip_work(case, indices, scored)
    dense = dense_work(case)

    def timed(name: str, fn: Callable[[], Any], w: Work | None, **extra: Any) -> None:
        say(f"{case.label}: {name}")
        try:
            results[name] = _entry(measure(fn, device, opts.timing), w, **extra)
        except Exception as exc:  # one method failing must not lose the others
            results[name] = failure_entry(exc)
        _free(device)

    want_attention = case.mode != "mask"
    if "hip" in opts.methods:
        if want_attention:
            hip_total = work.mask + work.sparse
            timed("hip", lambda: hip_attention(q, k, v, cfg, scale=scale), hip_total)
            if case.is_decode_shaped and case.mode == "decode":
                state = HiPDecodeState()
                steps = cfg.refresh_interval

                def decode_steps() -> None:
                    state.reset()
                    for _ in range(steps):
                        hip_attention(q, k, v, cfg, scale=scale, state=state)

                amortized = Work(
                    work.sparse.flops + work.mask.flops / steps,
                    work.sparse.bytes + work.mask.bytes / steps,
                )
                say(f"{case.label}: hip_amortized")
                try:
                    per_step = _per_step(measure(decode_steps, device, opts.timing), steps)
                    results["hip_amortized"] = _entry(
                        per_step, amortized, steps_per_run=steps, refreshes_per_run=1
                    )
                except Exception as exc:
                    results["hip_amortized"] = failure_entry(exc)
                _free(device)
                say(f"{case.label}: hip_graph")
                results["hip_graph"] = _graph_steps(q, k, v, cfg, scale, opts, amortized)
                _free(device)
        timed(
            "hip_mask",
            lambda: search_tree(q, summary_tree(k, cfg), k.shape[2], cfg, scale, k),
            work.mask,
        )
        if uses_triton(device):
            from hip_attn.triton_kernels.mask import estimate_mask_triton

            tree = summary_tree(k, cfg)
            h_sel = selection_heads(q, k.shape[1], cfg)
            done = tree_blocks(case.context, cfg)  # a complete tree; the leaves may read k
            timed(
                "hip_mask_kernel",
                lambda: estimate_mask_triton(
                    q, tree, case.context, cfg, h_sel, scale, keys=k, done=done
                ),
                work.search,
            )
            del tree
        if want_attention:
            calls["hip"] = lambda: _sparse(q, k, v, indices, cfg, scale)
            timed("hip_sparse", calls["hip"], work.sparse)

    if "sdpa" in opts.methods:
        try:
            runner = prepare_sdpa(q, k, v, scale)
            calls["sdpa"] = runner.fn
            timed("sdpa", runner.fn, dense, backend=runner.backend, note=runner.note)
        except SdpaUnavailable as exc:
            results["sdpa"] = {"skipped": str(exc)}
        except Exception as exc:
            results["sdpa"] = failure_entry(exc)
        _free(device)

    flex_info: dict[str, Any] = {}
    if "flex" in opts.methods:
        if device.type != "cuda":
            results["flex"] = {
                "skipped": "needs CUDA: flex_attention is block-sparse only when compiled for a "
                "GPU (eager flex computes every score)"
            }
        else:
            say(f"{case.label}: flex (compiles on first use)")
            try:
                b, hq, tq, d = q.shape
                plan = plan_flex(
                    indices,
                    (b, hq, tq, d),
                    case.shape.kv_heads,
                    case.context,
                    cfg,
                    opts.flex_kv_block,
                )
                fn = flex_call(plan, q, k, v, scale)
                calls["flex"] = fn
                flex_info = {
                    "kv_block": plan.kv_block,
                    "q_block": plan.q_block,
                    "folded_gqa": plan.folded,
                    "exact_mask_mod": plan.exact_mask_mod,
                    "listed_keys": plan.listed_keys,
                }
                timed("flex", fn, work.sparse, **flex_info)
            except FlexUnavailable as exc:
                results["flex"] = {"skipped": str(exc)}
            except Exception as exc:
                results["flex"] = failure_entry(exc)
            _free(device)

    accuracy = _accuracy(calls, results)
    calls.clear()
    _free(device)

    prediction = predict(case, opts.gpu)
    if prediction is not None:
        prediction["note"] = opts.gpu_note
        if device.type == "cuda":
            prediction["measured_over_floor"] = {
                name: results[name]["ms"] / floor_ms
                for name, floor_ms in prediction["ms"].items()
                if "ms" in results.get(name, {}) and floor_ms > 0
            }
        else:
            prediction["measured_over_floor"] = None
            prediction["note"] = (
                f"CPU timings are not comparable with the {opts.gpu.name} floor"
                if opts.gpu_note is None
                else opts.gpu_note
            )

    return {
        **case.to_dict(),
        "backend": backend_label(device),
        "timing": timing_label(device),
        "timing_settings": opts.timing.to_dict(),
        "results": results,
        "speedup": speedups(case, results),
        "work": work.to_dict() | {"dense": dense.to_dict()},
        "flex": flex_info or None,
        "prediction": prediction,
        "accuracy": accuracy,
        "notes": notes,
        "tuned_tiles": _tuned_tiles(case, device),
    }


def _tuned_tiles(case: BenchCase, device: torch.device) -> list[dict[str, Any]] | None:
    """The tiles the autotuner chose for this prefill case's shape and size class (its sparse
    attention: ``hip_attn.triton_kernels.attention.tuned_tiles``; empty for other modes, which
    launch one tile), ``None`` without the kernels."""
    if not uses_triton(device):
        return None
    if case.mode != "prefill":
        return []
    from hip_attn.triton_kernels.attention import size_class, tuned_tiles

    s = case.shape
    query_blocks = -(-case.queries // case.config.block_size_q)
    want = {"q_heads": s.heads, "D": s.head_dim,
            "size_class": size_class(s.batch, s.heads, query_blocks)}  # fmt: skip
    return [
        t
        for t in tuned_tiles()
        if all(t[k] == str(v) for k, v in want.items())
        and t["dtypes"].split(",")[0] == f"torch.{s.dtype}"  # q's
    ]


def _accuracy(
    calls: dict[str, Callable[[], torch.Tensor]], results: dict[str, dict[str, Any]]
) -> dict[str, float]:
    """Compare outputs once every method is timed (so no method's peak memory holds another's
    output): HiP against SDPA (relative L2; on random inputs this only shows the sparsity) and
    flex against HiP's sparse kernel on the same selection (max abs, should be round-off)."""
    timed_as = {"hip": "hip_sparse"}
    ran = {
        name: fn for name, fn in calls.items() if "ms" in results.get(timed_as.get(name, name), {})
    }
    accuracy: dict[str, float] = {}
    try:
        hip = ran["hip"]().float() if "hip" in ran else None
        if hip is not None and "sdpa" in ran:
            ref = ran["sdpa"]().float()
            accuracy["hip_vs_sdpa_rel_l2"] = float((hip - ref).norm() / ref.norm())
            del ref
        if hip is not None and "flex" in ran:
            accuracy["flex_vs_hip_max_abs"] = float((ran["flex"]().float() - hip).abs().max())
    except Exception:  # an accuracy check must not lose the timings (e.g. out of memory)
        pass
    return accuracy


def speedups(case: BenchCase, results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Ratios of medians: ``hip_vs_sdpa`` (SDPA time over the mode's headline HiP method:
    ``hip`` for prefill, ``hip_amortized`` for decode), ``hip_step_vs_sdpa`` (decode: over a
    refreshing step), ``hip_graph_vs_sdpa`` (decode: over a step replayed from a CUDA graph),
    ``sparse_vs_flex`` (flex time over HiP's sparse attention on the same
    selection) and, in mask mode, ``mask_fraction_of_sdpa``."""

    def ms(name: str) -> float | None:
        value = results.get(name, {}).get("ms")
        return float(value) if value else None

    out: dict[str, float] = {}
    sdpa, head = ms("sdpa"), ms(HEADLINE[case.mode]) or ms("hip")
    if sdpa and head:
        out["mask_fraction_of_sdpa" if case.mode == "mask" else "hip_vs_sdpa"] = (
            head / sdpa if case.mode == "mask" else sdpa / head
        )
    step, graph = ms("hip"), ms("hip_graph")
    if case.mode == "decode" and sdpa and step:
        out["hip_step_vs_sdpa"] = sdpa / step
    if case.mode == "decode" and sdpa and graph:
        out["hip_graph_vs_sdpa"] = sdpa / graph
    flex, sparse = ms("flex"), ms("hip_sparse")
    if flex and sparse:
        out["sparse_vs_flex"] = flex / sparse
    return out
