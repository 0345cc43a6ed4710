"""Public entry points: :func:`hip_attention`, :func:`estimate_mask` and the decode state.

Dispatch: CUDA tensors, or any tensors under ``TRITON_INTERPRET=1``, run the Triton kernels;
otherwise the PyTorch reference runs (slow, exact, said once in the log).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from hip_attn.config import HiPConfig
from hip_attn.geometry import (
    blocks_after,
    extend_summaries,
    extends_in_place,
    first_candidate_block,
    most_candidates,
    selection_config,
    tree_blocks,
    with_room,
)
from hip_attn.interpreter import interpreting
from hip_attn.reference import hip_attention_reference, search_reference
from hip_attn.triton_kernels.tiles import Tile, prefill_tiles
from hip_attn.validation import (
    check_config,
    check_device_length,
    check_inference_only,
    check_qkv,
    check_scale,
    read_device_lengths,
)

if TYPE_CHECKING:
    from hip_attn.triton_kernels.attention import KVSegments

logger = logging.getLogger("hip_attn")

#: Keys per tile of a decode launch of the attention kernel.
BLOCK_N = 64
#: Rows of a decode tile when query heads of a group are packed together.
MAX_PACKED_ROWS = 64


#: Oldest Triton whose interpreter runs the kernels (3.6's cannot loop to a bound it loaded).
MIN_INTERPRETER_TRITON = (3, 8)


@functools.cache
def _triton_version() -> tuple[int, int] | None:
    try:
        import triton
    except ImportError:
        return None
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


@functools.cache
def _warn_reference(device_type: str, why: str) -> None:
    logger.warning("hip_attn: running the PyTorch reference on %s (slow). %s", device_type, why)


def uses_triton(device: torch.device) -> bool:
    """Whether tensors on ``device`` go through the Triton kernels (else the reference)."""
    version = _triton_version()
    if version is None:
        _warn_reference(device.type, "Triton is not installed.")
        return False
    if device.type == "cuda":
        return True
    if not interpreting():
        _warn_reference(
            device.type,
            "The Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 to interpret them "
            "on the CPU.",
        )
        return False
    if version < MIN_INTERPRETER_TRITON:
        _warn_reference(
            device.type,
            f"Triton {version[0]}.{version[1]}'s interpreter cannot run the kernels; "
            f"{MIN_INTERPRETER_TRITON[0]}.{MIN_INTERPRETER_TRITON[1]} or newer can.",
        )
        return False
    return True


def summary_tree(
    k: torch.Tensor,
    config: HiPConfig,
    tree: torch.Tensor | None = None,
    done: int = 0,
    *,
    min_capacity: int = 0,
    kernels: bool | None = None,
) -> torch.Tensor:
    """:func:`~hip_attn.geometry.node_summaries`, built by the tree kernel when the kernels run
    (two launches and the allocation, instead of a few PyTorch ops per key row and level);
    ``kernels`` as in :func:`extended_tree`."""
    keys, done = blocks_after(k, config, tree, done)
    return extended_tree(tree, keys, done, config, min_capacity=min_capacity, kernels=kernels)


def extended_tree(
    tree: torch.Tensor | None,
    keys: torch.Tensor,
    done: int,
    config: HiPConfig,
    *,
    min_capacity: int = 0,
    kernels: bool | None = None,
) -> torch.Tensor:
    """:func:`~hip_attn.geometry.extend_summaries`, by the tree kernel when ``kernels`` (by
    default, when the kernels run on ``keys``' device and ``keys`` has unit stride last;
    ``hip-attn aot`` records the kernel's launches on the meta device, where they do not)."""
    if kernels is None:
        kernels = uses_triton(keys.device) and keys.stride(-1) == 1
    if not kernels:
        return extend_summaries(tree, keys, done, config, min_capacity=min_capacity)
    from hip_attn.triton_kernels.tree import append_tree_triton

    tree = with_room(tree, keys, done, config, min_capacity=min_capacity)
    append_tree_triton(tree, keys, done, config)
    return tree


class SummaryTree(NamedTuple):
    """A summary tree (:func:`~hip_attn.geometry.node_summaries`) as the search gets it.

    Attributes:
        tree: the ``[B, Hkv, rows, summary_width(D)]`` tree.
        keys: ``None`` when the tree is complete; else the keys it summarizes, of which only
            the blocks before ``done`` are in it yet: the search's launch summarizes the rest in
            place beside the search, or a launch before it
            (:func:`~hip_attn.triton_kernels.mask.extends_beside`).
        done: see ``keys``.
    """

    tree: torch.Tensor
    keys: torch.Tensor | None = None
    done: int = 0


class _DeviceDecode(NamedTuple):
    """What a device decode step reads and updates in device memory (see
    :func:`~hip_attn.triton_kernels.mask.decode_search_triton`)."""

    key: tuple[object, ...]  # the key buffer and configuration it was set up for
    tree: torch.Tensor  # the summary tree, with room for every block of the buffer
    done: torch.Tensor  # int32 [B, Hkv]: blocks summarized per row
    anchor: torch.Tensor  # int32, one per count of keys: the keys before the first device step
    indices: torch.Tensor  # the selection, written in place on the steps that search
    scratch: dict[str, torch.Tensor]  # the kernels' scratch: a step allocates only its output


class HiPDecodeState:
    """The selection one attention layer reuses between decode steps.

    Pass the same object to every :func:`hip_attention` call of one layer. A call with at most
    ``block_size_q`` queries (decode) reuses the selection while the queries served since it
    was estimated, this call's included, number at most ``refresh_interval``; otherwise it
    estimates afresh. With one token per step that is a refresh every ``refresh_interval``
    steps; a short prefill chunk of more than ``refresh_interval`` tokens always re-estimates.
    A longer call (a prefill chunk of more than ``block_size_q`` queries) estimates afresh and
    clears the state.

    The state also keeps the search's summary tree
    (:func:`~hip_attn.geometry.node_summaries`) and extends it by the blocks completed since the
    last estimate, so a decode refresh does not re-read the whole cache; it therefore belongs to
    one layer of one sequence batch whose keys only grow.

    Device decode (``hip_attention(..., length=)``, one token per step over K/V buffers) keeps
    the refresh rule, the tree's progress and the selection in device memory instead: its
    first call sets them up from the state's history (continuing its selection and refresh
    phase), the steps after it only launch kernels, and ``refreshes`` stops counting; the next
    host-driven call takes ``tokens_since_refresh`` back from the device rule's phase. With a
    count per sequence (a left-padded batch) the histories are those of the sequences' own
    states (:meth:`sequence`), which host-driven calls on one sequence use; a host-driven call
    on this state after such steps starts afresh.

    Attributes:
        indices: the selection in use, ``[B, H_sel, 1, G]``, or ``None``.
        tokens_since_refresh: queries served by ``indices`` so far.
        refreshes: how many times the selection was estimated for decode.
    """

    def __init__(self) -> None:
        self.indices: torch.Tensor | None = None
        self.tokens_since_refresh = 0
        self.refreshes = 0
        self._tree: torch.Tensor | None = None
        self._tree_blocks = 0
        self._keys = 0  # keys of the last call
        self._device: _DeviceDecode | None = None
        self._device_current = False  # no host-driven call since the device buffers were set
        self._anchor = 0  # the device refresh rule's phase, as set up (see _device_anchor)
        self._length: torch.Tensor | None = None  # the device steps' key count (the caller's)
        self._per_sequence = False  # the device steps count each sequence's keys apart
        self._sequences: dict[int, HiPDecodeState] = {}  # see sequence()
        self._scratch: dict[str, torch.Tensor] = {}  # the host-driven steps' kernel scratch

    def reset(self) -> None:
        self.indices = None
        self.tokens_since_refresh = 0
        self._tree, self._tree_blocks, self._keys = None, 0, 0
        self._device_current = False
        self._sequences.clear()

    def leave_device(self, keys_before: int, config: HiPConfig) -> None:
        """Note a host-driven call (a prefill, a host decode step, a dense one) after
        ``keys_before`` keys: the host counters take over from the device steps (computed from
        the device rule's phase; one read of the device's key count tells whether the cache
        was rolled back behind them), and the next device step sets its buffers up again from
        the state's history."""
        if self._device_current and self._per_sequence:
            self.reset()
        elif self._device_current:
            self._resume_host_counts(keys_before, config)
        self._device_current = False

    def _resume_host_counts(self, keys_before: int, config: HiPConfig) -> None:
        """``tokens_since_refresh`` and the key count as the host rule would have them after
        device steps up to ``keys_before`` keys (the steps do not count on the host). The
        device steps may have gone further and the cache been rolled back since: one read of
        the last device step's ``length`` tells, and the selection, made after the rollback
        point from keys that may have changed, is dropped; the tree is then trusted only up to
        that point (:meth:`follow`). A ``length`` the caller rewound itself hides that; a
        selection reaching past the candidates of a query at ``keys_before`` is dropped too."""
        device_keys = keys_before if self._length is None else int(self._length)
        since = keys_before - self._anchor - 1  # the last device step's, see refresh_due
        end = first_candidate_block(config) + most_candidates(1, keys_before + 1, config)
        stale = keys_before < device_keys or (
            self.indices is not None and int(self.indices.max()) >= end
        )
        if keys_before <= config.effective_dense_threshold or stale:  # dense on the host
            self.indices, self.tokens_since_refresh = None, 0
        elif since >= 0 and self.indices is not None:
            self.tokens_since_refresh = since % config.refresh_interval + 1
        self._keys = max(self._keys, keys_before, device_keys)

    def device_buffers(
        self, k: torch.Tensor, length: torch.Tensor, config: HiPConfig, h_sel: int
    ) -> _DeviceDecode:
        """The device-resident state of a device decode over the key buffer ``k``. The first
        device step after a host-driven call (or ever) sets it up from the keys in use: it
        reads ``length`` once and fills the buffers, in place when they exist for this key
        buffer (a CUDA graph captured before keeps its addresses); the steps after it return
        it as is. The first step after a setup searches, as the first decode step after a
        prefill does, then every ``refresh_interval`` steps. With a count per sequence the
        history is each sequence's state's (:meth:`sequence`), and a host-driven call on any
        of them sets the next device step up again."""
        key = (k.data_ptr(), tuple(k.shape), k.stride(), length.numel(), h_sel, config)
        dev = self._device
        # a per-sequence setup made every sequence's state; a host call on one unsets its flag
        sequences = self._sequences.values() if self._per_sequence else ()
        if (dev is not None and dev.key == key and self._device_current
                and all(s._device_current for s in sequences)):  # fmt: skip
            return dev
        per_sequence = length.numel() > 1
        states = [self.sequence(s) for s in range(length.numel())] if per_sequence else [self]
        counts = read_device_lengths(length, k.shape[2])
        if length is self._length:  # it counts the new buffers' keys now, not the old steps'
            for state in (self, *states):
                state._length = None
        for state, n in zip(states, counts, strict=True):
            state.leave_device(n - 1, config)  # other buffers without a host call: counts first
            state.follow(1, n, config)  # a rollback or a new sequence: nothing to continue
        capacity = tree_blocks(k.shape[2], config)
        if per_sequence:  # each sequence's tree, of its own keys
            tree = torch.cat([
                summary_tree(k[s : s + 1, :, :n], config, min_capacity=capacity)
                for s, n in enumerate(counts)
            ])  # fmt: skip
        else:
            tree = summary_tree(k[:, :, : counts[0]], config, min_capacity=capacity)
        b, hkv = k.shape[:2]
        g = config.blocks_per_query_block
        if dev is None or dev.key != key:
            dev = self._device = _DeviceDecode(
                key,
                tree,
                torch.empty((b, hkv), dtype=torch.int32, device=k.device),
                torch.empty(len(counts), dtype=torch.int32, device=k.device),
                torch.empty((b, h_sel, 1, g), dtype=torch.int32, device=k.device),
                {},
            )
        else:
            dev.tree.copy_(tree)
        # the selections in use, which may be views of dev.indices
        held = [None if s.indices is None else s.indices.clone() for s in states]
        done = [tree_blocks(n, config) for n in counts]
        dev.done.copy_(torch.tensor(done, dtype=torch.int32).view(-1, 1).expand(b, hkv))
        dev.indices.fill_(-1)
        rows = [dev.indices[s : s + 1] for s in range(b)] if per_sequence else [dev.indices]
        lengths = [length[s : s + 1] for s in range(b)] if per_sequence else [length]
        for state, n, kept, row, count in zip(states, counts, held, rows, lengths, strict=True):
            state._anchor = state._device_anchor(n, k.shape[2], config, kept, row)
            state.indices, state._device_current, state._length = row, True, count
        dev.anchor.copy_(torch.tensor([s._anchor for s in states], dtype=torch.int32))
        self.indices, self._device_current, self._length = dev.indices, True, length
        self._per_sequence = per_sequence
        self._note_device_step(per_sequence)
        return dev

    def sequence(self, b: int) -> HiPDecodeState:
        """The state of sequence ``b`` of this state's batch, for calls that run the batch
        sequence by sequence (a padded batch, each sequence over its own keys: the patched
        models' host path, the reference's device decode). A device decode with a count per
        sequence continues these states' histories, and they continue its."""
        if not isinstance(b, int) or isinstance(b, bool):
            raise TypeError(f"b must be an int (a sequence index), got {type(b).__name__}")
        if b < 0:
            raise ValueError(f"b must be a sequence index >= 0, got {b}")
        state = self._sequences.get(b)
        if state is None:
            state = self._sequences[b] = HiPDecodeState()
        return state

    def _note_device_step(self, per_sequence: bool) -> None:
        """A device step (``hip_attention(..., length=)``), by the kernels' setup or the
        reference: under one count the sequences' states are past; with a count per sequence
        a host-driven call on this state afterwards starts afresh (see leave_device)."""
        if per_sequence:
            self._device_current = self._per_sequence = True
        else:
            self._sequences.clear()

    @property
    def sequences(self) -> dict[int, HiPDecodeState]:
        """The states :meth:`sequence` made so far, by sequence."""
        return dict(self._sequences)

    def _device_anchor(
        self,
        n: int,
        capacity: int,
        config: HiPConfig,
        held: torch.Tensor | None,
        indices: torch.Tensor,
    ) -> int:
        """The device refresh rule's phase (see ``refresh_due``) for a first device step over
        ``n`` keys that continues this state's host history, so that the device refreshes
        exactly when the host rule would: at or below ``dense_threshold`` keys (the host runs
        dense) every step until the first step past it; with a selection ``held`` in use for
        ``tokens_since_refresh`` queries (copied into ``indices``) when that reaches
        ``refresh_interval``; without one at once."""
        threshold = config.effective_dense_threshold
        if n <= threshold:
            return min(threshold, capacity)  # every step: no step has more keys than that
        if held is None or self.tokens_since_refresh < 1:
            return n - 1
        if tuple(held.shape[:3]) != tuple(indices.shape[:3]) or held.shape[3] > indices.shape[3]:
            return n - 1
        indices[..., : held.shape[3]] = held
        return n - 1 - min(self.tokens_since_refresh, config.refresh_interval)

    def follow(self, tq: int, tk: int, config: HiPConfig) -> None:
        """Note a call of ``tq`` new queries over ``tk`` keys. Keys before ``tk - tq`` are the
        ones earlier calls saw; fewer than the last call had means the cache was rolled back
        (``DynamicCache.crop`` in assisted decoding): the selection is stale and the tree is
        trusted only up to that prefix."""
        if tk - tq < self._keys:
            self.indices, self.tokens_since_refresh = None, 0
            self._tree_blocks = min(self._tree_blocks, tree_blocks(tk - tq, config))
        self._keys = tk

    def summaries(self, k: torch.Tensor, config: HiPConfig) -> SummaryTree:
        """The summary tree of ``k``, from the one kept since the last call. When its
        allocation holds the new blocks and the kernels run (a decode refresh), the blocks
        completed since are left for the search to summarize in place (in its own launch where
        :func:`~hip_attn.triton_kernels.mask.extends_beside`, else in a launch before it);
        otherwise it is rebuilt or grown
        (:func:`~hip_attn.geometry.node_summaries`)."""
        blocks = tree_blocks(k.shape[2], config)
        tree, done = self._tree, self._tree_blocks
        self._tree_blocks = blocks
        if (
            tree is not None
            and done > 0
            and extends_in_place(tree, k, done, config)
            and uses_triton(k.device)
        ):
            return SummaryTree(tree, k, done)
        room = blocks + blocks // 4  # a fresh tree's first decode refresh extends in place
        self._tree = summary_tree(k, config, tree, done, min_capacity=room)
        return SummaryTree(self._tree)

    def __repr__(self) -> str:
        shape = None if self.indices is None else tuple(self.indices.shape)
        return (
            f"HiPDecodeState(indices={shape}, tokens_since_refresh={self.tokens_since_refresh}, "
            f"refreshes={self.refreshes})"
        )


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    length: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact causal attention through SDPA, queries at the last ``Tq`` key positions (with
    ``length``, an integer device tensor of one element or one per sequence: of the first
    ``length`` keys of the buffers ``k``, ``v``; the mask is built on the device, so the shapes
    do not depend on it. One query over a ring buffer that wrapped passes a ``length`` beyond
    the buffers: it reads all of them)."""
    tq, tk = q.shape[2], k.shape[2]
    mask = None
    if length is not None:  # [B or 1, 1, Tq, Tk]
        qpos = torch.arange(tq, device=q.device)[:, None] + (length.view(-1, 1, 1, 1) - tq)
        mask = torch.arange(tk, device=q.device) <= qpos
    elif tq != tk and tq > 1:
        qpos = torch.arange(tk - tq, tk, device=q.device)[:, None]
        mask = torch.arange(tk, device=q.device)[None, :] <= qpos
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=mask is None and tq == tk and tq > 1,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )


def selection_heads(q: torch.Tensor, kv_heads: int, config: HiPConfig) -> int:
    """The heads ``q`` selects for: one per KV head (``kv_group``) or per query head."""
    return kv_heads if config.head_sharing == "kv_group" else q.shape[1]


def search_tree(
    q: torch.Tensor,
    tree: torch.Tensor | SummaryTree,
    tk: int,
    config: HiPConfig,
    scale: float,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """The selection of ``q`` over ``tk`` keys from their summary tree ``tree``
    (:func:`~hip_attn.geometry.node_summaries`, or a :class:`SummaryTree` still to extend) and,
    with ``leaf_scores="keys"``, the keys ``keys`` it summarizes (the last level reads the
    candidate blocks'): all the search reads, on or off the GPU.

    The selection is at most as wide as the context has candidates
    (:func:`~hip_attn.geometry.selection_config`)."""
    summary = tree if isinstance(tree, SummaryTree) else SummaryTree(tree)
    config = selection_config(q.shape[2], tk, config)
    if not uses_triton(q.device):
        if summary.keys is not None:  # HiPDecodeState leaves none to the reference
            raise ValueError("the PyTorch reference searches complete summary trees only")
        return search_reference(q, summary.tree, tk, config, scale, keys=keys)[0]
    from hip_attn.triton_kernels.mask import estimate_mask_triton

    if summary.keys is None and config.leaf_scores == "keys":  # a complete tree
        summary = SummaryTree(summary.tree, keys, tree_blocks(tk, config))
    indices, _ = estimate_mask_triton(
        q,
        summary.tree,
        tk,
        config,
        selection_heads(q, summary.tree.shape[1], config),
        scale,
        keys=summary.keys,
        done=summary.done,
    )
    return indices


def select_blocks(
    q: torch.Tensor,
    search: Callable[[], torch.Tensor],
    tk: int,
    config: HiPConfig,
    state: HiPDecodeState | None,
    kv_heads: int,
) -> torch.Tensor:
    """The selection for this call: estimated afresh by ``search()`` (called only then; e.g.
    :func:`search_tree` over the summaries), or reused from ``state`` between decode refreshes
    (see :class:`HiPDecodeState`)."""
    if state is None:
        return search()
    if q.shape[2] > config.block_size_q:
        state.reset()
        state.follow(q.shape[2], tk, config)
        return search()
    h_sel = selection_heads(q, kv_heads, config)
    expected = (q.shape[0], h_sel, 1)  # the width follows the context (see search_tree)
    if state.indices is not None and tuple(state.indices.shape[:3]) != expected:
        raise ValueError(
            f"state holds a selection for (batch, selection heads, query blocks) "
            f"{tuple(state.indices.shape[:3])} but this call needs {expected}; use one "
            "HiPDecodeState per layer and sequence batch"
        )
    state.follow(q.shape[2], tk, config)
    tq = q.shape[2]
    if state.indices is None or state.tokens_since_refresh + tq > config.refresh_interval:
        state.indices = search()
        state.tokens_since_refresh = 0
        state.refreshes += 1
    state.tokens_since_refresh += tq
    return state.indices


def estimate_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    config: HiPConfig | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """The key blocks each query block attends besides its sinks and window.

    Args:
        q: queries ``[B, Hq, Tq, D]`` at absolute positions ``Tk - Tq .. Tk - 1``.
        k: keys ``[B, Hkv, Tk, D]``.
        config: the HiP configuration (defaults to ``HiPConfig()``).
        scale: the softmax scale of the attention the selection serves (``D ** -0.5`` by
            default): the search ranks blocks by estimated attention probabilities.

    Returns:
        int32 ``[B, H_sel, ceil(Tq / block_size_q), W]`` with ``W = k // block_size_k``, or the
        most candidate blocks any query block has when that is fewer: key block indices
        (block ``b`` holds keys ``[b * block_size_k, (b + 1) * block_size_k)``), ascending per
        row, ``-1`` padding where fewer blocks were candidates. ``H_sel`` is ``Hkv`` with
        ``head_sharing="kv_group"`` and ``Hq`` with ``"head"``.
    """
    config = check_config(config)
    check_qkv(q, k)
    scale = check_scale(scale, q.shape[-1])
    return search_tree(q, summary_tree(k, config), k.shape[2], config, scale, k)


def _multiprocessors(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def launch_shape(
    batch: int, q_heads: int, sel_heads: int, tq: int, config: HiPConfig, sms: int | None
) -> tuple[tuple[Tile, ...], int]:
    """``(tiles, num_splits)`` of the sparse attention launch. A prefill (several query blocks)
    offers the autotuner the tiles of :func:`~hip_attn.triton_kernels.tiles.prefill_tiles`. A
    decode call (one query block) launches one tile, the same at every step: it packs the query
    heads of a selection (up to ``MAX_PACKED_ROWS`` rows) and, on a GPU with ``sms``
    multiprocessors, splits each program's key range so the launch has about two programs per
    SM."""
    per_sel = q_heads // sel_heads
    if tq > config.block_size_q:
        return prefill_tiles(per_sel, config.block_size_q), 1
    heads = per_sel if per_sel * tq <= MAX_PACKED_ROWS else 1
    if sms is None:
        return (Tile(heads, BLOCK_N),), 1
    tiles = -(-(config.sink_tokens + config.k + config.window + tq) // BLOCK_N)
    programs = batch * q_heads // heads
    return (Tile(heads, BLOCK_N),), max(1, min(tiles // 2, -(-2 * sms // programs)))


def _sparse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    config: HiPConfig,
    scale: float,
    scratch: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    if not uses_triton(q.device):
        return hip_attention_reference(q, k, v, config, scale=scale, indices=indices)
    from hip_attn.triton_kernels.attention import KVSegments

    return launch_sparse(q, KVSegments.full(k, v), k.shape[2], indices, config, scale, scratch)


def launch_sparse(
    q: torch.Tensor,
    kv: KVSegments,
    tk: int | torch.Tensor,
    indices: torch.Tensor,
    config: HiPConfig,
    scale: float,
    scratch: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The sparse attention kernel with the launch shape for this call (:func:`launch_shape`):
    a prefill's tile autotuned, a decode's query heads of a selection sharing a tile and its
    key range split (the split partials and arrival counters kept in ``scratch`` when given)."""
    from hip_attn.triton_kernels.attention import sparse_attention_triton

    b, hq, tq, _ = q.shape
    tiles, splits = launch_shape(b, hq, indices.shape[1], tq, config, _multiprocessors(q.device))
    return sparse_attention_triton(
        q, kv, tk, indices, config, scale, num_splits=splits, tile=tiles, scratch=scratch
    )


def hip_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    config: HiPConfig | None = None,
    *,
    scale: float | None = None,
    state: HiPDecodeState | None = None,
    length: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention over sinks + the hierarchically selected key blocks + a window.

    Args:
        q: queries ``[B, Hq, Tq, D]`` (float16, bfloat16 or float32); query ``i`` sits at
            absolute position ``Tk - Tq + i``.
        k, v: keys and values ``[B, Hkv, Tk, D]``, ``Hq % Hkv == 0`` (GQA without repeating).
        config: the HiP configuration (defaults to ``HiPConfig()``).
        scale: softmax scale, ``D ** -0.5`` by default.
        state: a :class:`HiPDecodeState` to reuse the selection across decode steps of one
            layer; without it every call estimates its own selection.
        length: device decode (with ``state``, one query token): ``k`` and ``v`` are buffers
            ``[B, Hkv, capacity, D]`` whose first ``length`` keys (an int32 tensor on their
            device, the new token's key included) are in use: of one element, every row's; of
            shape ``[B]``, contiguous (a left-padded batch, each sequence's keys moved to the
            front of its row), ``length[b]`` of row ``b``, each sequence attending its own keys
            in the same launches (its sinks, blocks and window counted from its first key; the
            history each continues is ``state.sequence(b)``'s). The kernels
            read it from device memory, refresh on the device and launch the same way at every
            step, without a host sync: the step can be captured in a CUDA graph and replayed
            (warm up one step first: the first call on a state sets up its device buffers and
            takes over the state's refresh schedule, so the steps refresh when host-driven
            ones would). It always runs the sparse kernels: at or below ``dense_threshold``
            keys it re-estimates every step, which equals dense attention where the budget
            covers the context (the derived threshold); without the Triton kernels it reads
            ``length`` and runs the host-driven path. ``length`` must be in
            ``[1, capacity]``: checked where it is read on the host (the setup step and the
            host-driven path), not on the steps that never read it; from one device step to
            the next it grows by one (at most ``window``: the search reads the summaries the
            steps before wrote while its launch summarizes the blocks after them). A
            host-driven call after device steps reads it once more, as the last device step's
            count, to notice a cache rolled back behind those steps: advance it only for a
            device step.

    Returns:
        ``[B, Hq, Tq, D]`` in the dtype of ``q``. At or below ``config.dense_threshold`` keys
        this is exact dense attention (device decode: see ``length``; with an explicit
        threshold above ``sink_tokens + k + window`` it is sparse there).

    Raises:
        ValueError: ``length`` read as below 1 or beyond the buffers' size (where it is read).
        NotImplementedError: the Triton kernels would run (CUDA, or ``TRITON_INTERPRET=1``)
            while gradients are enabled and ``q``, ``k`` or ``v`` requires grad. The sparse
            path is inference-only: the kernels have no backward. The dense path (SDPA) and
            the PyTorch reference fallback keep autograd.
    """
    config = check_config(config)
    check_qkv(q, k, v)
    scale = check_scale(scale, q.shape[-1])
    if state is not None and not isinstance(state, HiPDecodeState):
        raise TypeError(f"state must be a HiPDecodeState or None, got {type(state).__name__}")
    if length is not None:
        return _device_decode(q, k, v, length, config, scale, state)
    if state is not None:
        state.leave_device(k.shape[2] - q.shape[2], config)
    if k.shape[2] <= config.effective_dense_threshold:
        if state is not None and q.shape[2] > config.block_size_q:
            state.reset()  # a prefill clears the state, dense or not (a new sequence's)
        elif state is not None:  # a rollback shows here first: the tree's keys after it changed
            state.follow(q.shape[2], k.shape[2], config)
        return dense_attention(q, k, v, scale)
    if uses_triton(q.device):  # before any launch: the kernels have no backward
        check_inference_only(q, k, v)

    def search() -> torch.Tensor:
        tree = state.summaries(k, config) if state else summary_tree(k, config)
        return search_tree(q, tree, k.shape[2], config, scale, k)

    indices = select_blocks(q, search, k.shape[2], config, state, k.shape[1])
    return _sparse(q, k, v, indices, config, scale, None if state is None else state._scratch)


def _device_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    length: torch.Tensor,
    config: HiPConfig,
    scale: float,
    state: HiPDecodeState | None,
) -> torch.Tensor:
    """``hip_attention(..., length=)``: a decode step whose launches do not depend on it."""
    check_device_length(q, k, length, state)
    assert state is not None
    if not uses_triton(q.device):  # the reference: read the length, attend what it covers
        ns = read_device_lengths(length, k.shape[2])
        state._note_device_step(len(ns) > 1)
        if len(ns) == 1:
            return hip_attention(q, k[:, :, : ns[0]], v[:, :, : ns[0]], config, scale=scale,
                                 state=state)  # fmt: skip
        return torch.cat([  # a padded batch: each sequence over its own keys, as the kernels do
            hip_attention(q[s : s + 1], k[s : s + 1, :, :n], v[s : s + 1, :, :n], config,
                          scale=scale, state=state.sequence(s))
            for s, n in enumerate(ns)
        ])  # fmt: skip
    check_inference_only(q, k, v)
    from hip_attn.triton_kernels.attention import KVSegments
    from hip_attn.triton_kernels.mask import decode_search_triton

    dev = state.device_buffers(k, length, config, selection_heads(q, k.shape[1], config))
    decode_search_triton(q, dev.tree, k, length, dev.done, dev.anchor, config, scale, dev.indices,
                         dev.scratch)  # fmt: skip
    kv = KVSegments.full(k, v)
    return launch_sparse(q, kv, length, dev.indices, config, scale, dev.scratch)
