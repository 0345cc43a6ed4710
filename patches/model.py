"""``patch(model)`` / ``unpatch(model)``: switch a Hugging Face causal LM to HiP attention."""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
from torch.utils.hooks import RemovableHandle

from hip_attn.config import HiPConfig
from hip_attn.patches.attention import ATTN_NAME, LAYER_CACHES, LAYER_CONFIGS, register

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ModelT = TypeVar("ModelT", bound="PreTrainedModel")

# patched model -> the attention implementation it had; patched module -> its hook handles
_PREVIOUS: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()
_HOOKS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[RemovableHandle, ...]] = (
    weakref.WeakKeyDictionary()
)
_OFFLOADED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()  # patched with offload=True


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention modules of a decoder: they know their layer and are causal."""
    return [
        m
        for m in model.modules()
        if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "layer_idx", None), int)
    ]


def _check_supported(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers import PreTrainedModel

    name = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"patch expects a transformers PreTrainedModel, got {name}")
    config = model.config.get_text_config()
    if getattr(model.config, "is_encoder_decoder", False) or not getattr(config, "is_causal", True):
        raise ValueError(f"{name} is not a causal decoder: hip attention is causal only")
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError(
            f"{name} uses attention logit softcapping "
            f"(attn_logit_softcapping={config.attn_logit_softcapping}), which the HiP kernels "
            "do not implement; set it to None in the config to run without it"
        )
    modules = _attention_modules(model)
    if not modules or any(getattr(m, "is_causal", True) is False for m in modules):
        raise ValueError(f"{name} has no causal self-attention layers that hip attention can run")
    if not model._can_set_attn_implementation():
        raise ValueError(
            f"{name} does not dispatch attention through transformers' AttentionInterface"
        )
    return modules


def _remember_cache(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
    from hip_attn.patches.compat import find_cache

    LAYER_CACHES[module] = find_cache(args, kwargs)


def _forget_cache(module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
    LAYER_CACHES.pop(module, None)


def query_heads_per_kv_head(model_config: Any) -> int:
    """Query heads sharing one KV head in a transformers model config (1 without GQA)."""
    text = model_config.get_text_config()
    heads = text.num_attention_heads
    return int(heads // (getattr(text, "num_key_value_heads", None) or heads))


def patch(
    model: ModelT,
    config: HiPConfig | None = None,
    *,
    dense_layers: Any = None,
    offload: bool = False,
    offload_options: dict[str, Any] | None = None,
) -> ModelT:
    """Run ``model``'s attention with HiP; prefill and ``model.generate()`` then use it.

    Args:
        model: a transformers causal LM (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma-3, ...).
        config: the HiP configuration (defaults to ``HiPConfig()``).
        dense_layers: layer indices to keep dense (overrides ``config.dense_layers``).
        offload: keep each HiP layer's K/V in host memory: ``generate()`` then creates a
            :class:`~hip_attn.patches.offload.HiPOffloadCache` and prefills in chunks of
            ``max_chunk`` tokens.
        offload_options: :class:`~hip_attn.offload.OffloadedKV` options (``cache_blocks``,
            ``max_chunk``, ``host_chunk_tokens``, ``gather``) and ``prefetch`` (a refreshing
            layer prefetches its selection into the next layer's block cache,
            :class:`~hip_attn.patches.offload.HiPOffloadCache`), checked here: an unknown name
            or a wrong type raises ``TypeError``, a bad value ``ValueError``.

    Returns:
        ``model``, patched in place. Patching again only updates the configuration;
        :func:`unpatch` restores the attention implementation the model had.
    """
    config = HiPConfig() if config is None else config
    if not isinstance(config, HiPConfig):
        raise TypeError(f"config must be a HiPConfig or None, got {type(config).__name__}")
    modules = _check_supported(model)
    if dense_layers is not None:
        config = config.replace(dense_layers=tuple(dense_layers))
    n_layers = max(cast(int, m.layer_idx) for m in modules) + 1
    if any(i >= n_layers for i in config.dense_layers):
        raise ValueError(
            f"dense_layers {config.dense_layers} name layers beyond the model's {n_layers}"
        )
    if offload_options is not None and not isinstance(offload_options, Mapping):
        raise TypeError(
            f"offload_options must be a dict or None, got {type(offload_options).__name__}"
        )
    options = dict(offload_options or {})
    if offload:  # checked now: generate() builds the offloaded layers only on its first step
        from hip_attn.offload.layer import check_offload_options
        from hip_attn.patches.offload import HiPOffloadCache

        check_offload_options(config, options, query_heads_per_kv_head(model.config))
        HiPOffloadCache(model.config, config, **options)  # a model with nothing to offload
    register()
    if model not in _PREVIOUS:
        _PREVIOUS[model] = model.config._attn_implementation
        model.set_attn_implementation(ATTN_NAME)
        for m in modules:
            _HOOKS[m] = (
                m.register_forward_pre_hook(_remember_cache, with_kwargs=True),
                m.register_forward_hook(_forget_cache, with_kwargs=True),
            )
    for m in modules:
        LAYER_CONFIGS[m] = config
    _shadow_generate(model, config, options if offload else None)
    (_OFFLOADED.add if offload else _OFFLOADED.discard)(model)
    return model


def _setting(model: Any, call: dict[str, Any], name: str, default: Any = None) -> Any:
    """A generation setting as ``generate`` resolves it: the call's keyword, else its
    ``generation_config``'s, else the model's generation config's, else ``default``."""
    configs = (call.get("generation_config"), model.generation_config)
    values = (call.get(name), *(getattr(c, name, None) for c in configs))
    return next((v for v in values if v is not None), default)


def _hip_cache_tokens(model: Any, call: dict[str, Any]) -> int | None:
    """Tokens to preallocate for a ``generate`` call (its arguments by name): the prompt plus
    ``max_new_tokens`` up to one growth step (a caller's generous ``max_new_tokens`` must not
    reserve memory an early end of sequence never uses), ``None`` when the prompt is unknown."""
    from hip_attn.patches.cache import GROW_TOKENS

    new = _setting(model, call, "max_new_tokens")
    for x in (call.get("inputs"), call.get("input_ids"), call.get("inputs_embeds")):
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            extra = min(new, GROW_TOKENS) if isinstance(new, int) and new > 0 else 0
            return int(x.shape[1]) + extra
    return None


def _wants_default_cache(model: Any, call: dict[str, Any]) -> bool:
    """Whether ``generate`` (its arguments by name) would build its default dynamic cache:
    caching on, no ``cache_implementation`` in the call or either generation config, not an
    assistant (draft) model, whose cache transformers prepares for rollback itself."""
    supported = getattr(model, "_supports_default_dynamic_cache", lambda: True)()
    return (
        supported
        and _setting(model, call, "use_cache", True) is not False
        and _setting(model, call, "cache_implementation") is None
        and not _setting(model, call, "is_assistant", False)
    )


def _shadow_generate(model: Any, config: HiPConfig, offload: dict[str, Any] | None) -> None:
    """Shadow ``model.generate`` with one that brings its own cache when the caller passes none:
    a :class:`~hip_attn.patches.cache.HiPCache` (sized for prompt + ``max_new_tokens`` when
    both are known), or with ``offload`` options a
    :class:`~hip_attn.patches.offload.HiPOffloadCache` and prefill in chunks."""
    from hip_attn.patches.cache import HiPCache
    from hip_attn.patches.compat import cache_kwarg, given_cache

    original = type(model).generate
    signature = inspect.signature(original)
    name = cache_kwarg(model)
    if offload is not None:
        offload.setdefault("max_chunk", 4096)

    def generate(*args: Any, **kwargs: Any) -> Any:
        cache = given_cache(kwargs)
        for n in ("cache", "past_key_values"):
            kwargs.pop(n, None)  # passed on under the installed release's name only
        if cache is None and offload is not None:
            from hip_attn.patches.offload import HiPOffloadCache

            cache = HiPOffloadCache(model.config, config, **offload)
            kwargs.setdefault("prefill_chunk_size", offload["max_chunk"])
        elif cache is None:
            bound = signature.bind_partial(model, *args, **kwargs).arguments
            call = {**bound.pop("kwargs", {}), **bound}  # generate(**kwargs) collects the rest
            if _wants_default_cache(model, call):
                cache = HiPCache(model.config, max_tokens=_hip_cache_tokens(model, call))
        if cache is not None:
            kwargs[name] = cache
        return original(model, *args, **kwargs)

    generate.__doc__ = original.__doc__
    model.generate = generate


def unpatch(model: ModelT) -> ModelT:
    """Undo :func:`patch`: the model's previous attention implementation and no hooks."""
    previous = _PREVIOUS.pop(model, None)
    if previous is None:
        return model
    model.set_attn_implementation(previous)
    model.__dict__.pop("generate", None)
    _OFFLOADED.discard(model)
    for m in _attention_modules(model):
        for hook in _HOOKS.pop(m, ()):
            hook.remove()
        LAYER_CONFIGS.pop(m, None)
        LAYER_CACHES.pop(m, None)
    return model


def is_patched(model: torch.nn.Module) -> bool:
    """Whether :func:`patch` is in effect on ``model``."""
    return model in _PREVIOUS


def patched_with_offload(model: torch.nn.Module) -> bool:
    """Whether :func:`patch` is in effect on ``model`` with ``offload=True``."""
    return model in _OFFLOADED
