"""What one benchmark case is, and the default shapes. Torch-free.

A case is a mode (``prefill``, ``decode`` or ``mask``), a context length (keys ``Tk``), the
number of queries (``Tq``: the whole prompt for prefill, one token for decode), attention shapes,
a dtype and a :class:`HiPConfig`. On a GPU the defaults are Llama-3.1-8B attention (32 query
heads, 8 KV heads, head dim 128, bf16, ``HiPConfig()``); on the CPU they are tiny, so that the
Triton interpreter proves the harness end to end in seconds.

The ``offload`` mode is not a list of cases of one kind: :class:`OffloadPlan` holds what it
runs (a memory comparison at two or more contexts, decode steps at others) and the offloaded
layer's settings, with defaults per device kind in :data:`GPU_OFFLOAD` and :data:`CPU_OFFLOAD`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from hip_attn.config import HiPConfig
from hip_attn.perf.units import short_tokens

Mode = Literal["prefill", "decode", "mask"]
MODES: tuple[Mode, ...] = ("prefill", "decode", "mask")
DTYPES = ("bfloat16", "float16", "float32")
#: torch dtype name -> the analytic model's dtype key.
MODEL_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
METHODS = ("hip", "sdpa", "flex")


@dataclass(frozen=True)
class Shape:
    """Attention shapes of a case (SDPA layout: q ``[B, Hq, Tq, D]``, k/v ``[B, Hkv, Tk, D]``).

    Attributes:
        batch: sequences ``B``.
        heads: query heads ``Hq``.
        kv_heads: key/value heads ``Hkv`` (``Hq % Hkv == 0``).
        head_dim: ``D``.
        dtype: ``"bfloat16"``, ``"float16"`` or ``"float32"``.
    """

    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str

    def __post_init__(self) -> None:
        for name in ("batch", "heads", "kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.heads % self.kv_heads:
            raise ValueError(
                f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})"
            )
        if not 16 <= self.head_dim <= 256:
            raise ValueError(f"head_dim must be in [16, 256], got {self.head_dim}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    @property
    def element_bytes(self) -> int:
        return 4 if self.dtype == "float32" else 2


@dataclass(frozen=True)
class BenchCase:
    """One measurement: ``queries`` queries at the last positions of ``context`` keys.

    Attributes:
        mode: ``"prefill"``, ``"decode"`` or ``"mask"`` (mask estimation only).
        context: keys ``Tk``.
        queries: queries ``Tq`` (``<= context``).
        shape: attention shapes and dtype.
        config: the HiP configuration.
    """

    mode: Mode
    context: int
    queries: int
    shape: Shape
    config: HiPConfig

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 1 <= self.queries <= self.context:
            raise ValueError(f"queries must be in [1, context={self.context}], got {self.queries}")

    @property
    def label(self) -> str:
        """``"prefill 128k"``, ``"decode 1m"``, ``"mask 32k (q=1)"``."""
        text = f"{self.mode} {short_tokens(self.context)}"
        default_q = 1 if self.mode == "decode" else self.context
        return text if self.queries == default_q else f"{text} (q={self.queries})"

    @property
    def is_decode_shaped(self) -> bool:
        """Every query fits in one query block (HiP's decode kernel path)."""
        return self.queries <= self.config.block_size_q

    @property
    def model_phase(self) -> str | None:
        """The analytic model's phase for this case: ``"prefill"`` (``Tq == Tk``),
        ``"decode"`` (``Tq == 1``), or ``None`` (chunks, which the model does not cover)."""
        if self.queries == self.context:
            return "prefill"
        if self.queries == 1:
            return "decode"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "context": self.context,
            "queries": self.queries,
            "shape": asdict(self.shape),
            "config": self.config.to_dict(),
        }


@dataclass(frozen=True)
class Defaults:
    """Default sizes of one device kind (``--help`` prints both)."""

    contexts: dict[str, str]
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    config: HiPConfig


GPU_DEFAULTS = Defaults(
    contexts={"prefill": "8k,32k,128k", "decode": "8k,32k,128k,512k,1m", "mask": "8k,32k,128k"},
    batch=1,
    heads=32,
    kv_heads=8,
    head_dim=128,
    dtype="bfloat16",
    config=HiPConfig(),
)

CPU_DEFAULTS = Defaults(
    contexts={"prefill": "512", "decode": "512,1k", "mask": "512"},
    batch=1,
    heads=2,
    kv_heads=1,
    head_dim=64,
    dtype="float32",
    config=HiPConfig(k=64, block_size_q=32, block_size_k=8, sink_tokens=16, window=64),
)


def defaults_for(device_type: str) -> Defaults:
    """``GPU_DEFAULTS`` for ``"cuda"``, ``CPU_DEFAULTS`` otherwise."""
    return GPU_DEFAULTS if device_type == "cuda" else CPU_DEFAULTS


def default_queries(mode: Mode, context: int) -> int:
    """Decode: one token; prefill and mask: the whole prompt."""
    return 1 if mode == "decode" else context


# ---- the offload mode --------------------------------------------------------------------------

OFFLOAD_PARTS = ("memory", "decode")
GATHERS = ("auto", "cuda", "torch")


@dataclass(frozen=True)
class OffloadDefaults:
    """Default sizes of ``hip-attn bench offload`` on one device kind."""

    memory_contexts: str
    decode_contexts: str
    cache_blocks: int
    max_chunk: int
    host_chunk_tokens: int
    steps: int
    warmup_steps: int


GPU_OFFLOAD = OffloadDefaults(
    memory_contexts="64k,512k",
    decode_contexts="128k,512k,1m",
    cache_blocks=2048,
    max_chunk=4096,
    host_chunk_tokens=8192,
    steps=1024,
    warmup_steps=32,
)

CPU_OFFLOAD = OffloadDefaults(
    memory_contexts="1k,4k",
    decode_contexts="1k,2k",
    cache_blocks=64,
    max_chunk=256,
    host_chunk_tokens=1024,
    steps=16,
    warmup_steps=2,
)


def offload_defaults_for(device_type: str) -> OffloadDefaults:
    """``GPU_OFFLOAD`` for ``"cuda"``, ``CPU_OFFLOAD`` otherwise."""
    return GPU_OFFLOAD if device_type == "cuda" else CPU_OFFLOAD


@dataclass(frozen=True)
class OffloadPlan:
    """What ``hip-attn bench offload`` runs.

    Attributes:
        shape: attention shapes and dtype (one layer).
        config: the HiP configuration.
        memory_contexts: contexts of the memory part (growth: first to last), or empty.
        decode_contexts: contexts of the decode part (one record each), or empty.
        cache_blocks, max_chunk, host_chunk_tokens, gather: the ``OffloadedKV`` settings.
        steps: timed decode steps per decode context (after ``warmup_steps`` untimed ones).
        baseline: also time the same steps with K/V resident on the device.
    """

    shape: Shape
    config: HiPConfig
    memory_contexts: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    cache_blocks: int
    max_chunk: int
    host_chunk_tokens: int
    gather: str = "auto"
    steps: int = 16
    warmup_steps: int = 2
    baseline: bool = True

    def __post_init__(self) -> None:
        cfg, sh = self.config, self.shape
        if not self.memory_contexts and not self.decode_contexts:
            raise ValueError("nothing to run: no memory contexts and no decode contexts")
        if len(self.memory_contexts) == 1:
            raise ValueError("the memory part compares two or more contexts, got one")
        if self.max_chunk < 1 or self.max_chunk % cfg.block_size_q:
            raise ValueError(
                f"--max-chunk must be a positive multiple of block_size_q={cfg.block_size_q}, "
                f"got {self.max_chunk}"
            )
        if self.host_chunk_tokens < 1 or self.host_chunk_tokens % cfg.block_size_k:
            raise ValueError(
                f"--host-chunk-tokens must be a positive multiple of block_size_k="
                f"{cfg.block_size_k}, got {self.host_chunk_tokens}"
            )
        per_call, why = cfg.offload_cache_blocks(sh.heads // sh.kv_heads)
        if self.cache_blocks < per_call:
            raise ValueError(
                f"--cache-blocks {self.cache_blocks} cannot hold what one decode step needs at "
                f"once ({per_call} blocks per KV head: {why})"
            )
        if self.gather not in GATHERS:
            raise ValueError(f"gather must be one of {', '.join(GATHERS)}, got {self.gather!r}")
        if self.steps < 1 or self.warmup_steps < 0:
            raise ValueError("steps must be >= 1 and warmup steps >= 0")
        smallest = min((*self.memory_contexts, *self.decode_contexts))
        if smallest < 1:
            raise ValueError(f"contexts must be positive, got {smallest}")

    @property
    def decode_steps_total(self) -> int:
        """Decode steps run per decode context (warm-up and timed)."""
        return self.warmup_steps + self.steps

    def settings(self) -> dict[str, Any]:
        """The offloaded layer's settings, for a record."""
        return {
            "cache_blocks": self.cache_blocks,
            "max_chunk": self.max_chunk,
            "host_chunk_tokens": self.host_chunk_tokens,
            "gather_requested": self.gather,
        }
