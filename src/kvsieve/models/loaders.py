"""Loading a model from where it lies: a safetensors checkpoint directory, a GGUF file, or a hub id in the local
Hugging Face cache (nothing is downloaded unless allowed), with the options `kvsieve.models.load_model` checks."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kvsieve.models.devices import check_device_map
from kvsieve.models.registry import KNOWN_MODELS, ModelIntegrityError, ModelNotFoundError, default_cache_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "LoadOptions",
    "check_device_map",
    "finish",
    "load_checkpoint_dir",
    "load_gguf",
    "load_hub_id",
    "looks_like_path",
    "resolve_dtype",
]

_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# --------------------------------------------------------------------------------------------------------------
# options and small helpers


@dataclass(frozen=True)
class LoadOptions:
    """What `load_model` passes on to transformers, checked."""

    dtype: torch.dtype
    device_map: str | dict[str, Any] | None
    trust_remote_code: bool
    attn_implementation: str

    def model_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"dtype": self.dtype, "attn_implementation": self.attn_implementation}
        if self.device_map is not None:
            kwargs["device_map"] = self.device_map
        if self.trust_remote_code:
            kwargs["trust_remote_code"] = True
        return kwargs

    def tokenizer_kwargs(self) -> dict[str, Any]:
        return {"trust_remote_code": True} if self.trust_remote_code else {}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch floating dtype, from itself or its name (``"bfloat16"``, ``"torch.bfloat16"``)."""
    allowed = ", ".join(repr(name) for name in _DTYPES) + " or 'auto' (the fastest on the hardware)"
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch dtype or one of {allowed}; got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype must be a floating-point torch dtype or one of {allowed}; got {dtype!r}")


def looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``namespace/name``; anything else that does not exist was meant as a path."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or "\\" in name
        or name.lower().endswith(".gguf")
    )


def finish(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The loaded pair made ready: a pad token (the EOS) where there is none, and the model in eval mode."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


# --------------------------------------------------------------------------------------------------------------
# loaders


def load_checkpoint_dir(path: Path, options: LoadOptions) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; it holds {', '.join(ggufs)}: pass the .gguf file itself" if ggufs else ""
        raise ModelNotFoundError(f"{str(path)!r} is not a Hugging Face checkpoint directory (no config.json){hint}")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise ValueError(
                f"{str(path)!r} holds only pickle weights ({', '.join(pickles)}). kvsieve loads safetensors only,"
                " because unpickling a file can run arbitrary code. Convert it once where you trust the file:"
                " AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir) writes safetensors."
            )
        raise ModelNotFoundError(f"{str(path)!r} has a config.json but no *.safetensors weights")
    _check_safetensors(path)
    tokenizer = AutoTokenizer.from_pretrained(path, **options.tokenizer_kwargs())
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **options.model_kwargs())
    except SafetensorError as error:
        raise ModelIntegrityError(
            f"{str(path)!r}: its safetensors weights cannot be read ({error}){_redo(path)}"
        ) from None
    return model, tokenizer


def _check_safetensors(path: Path) -> None:
    """Read every weight file's header (cheap): a truncated or corrupted file is named, not a Rust traceback."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ModelIntegrityError(
                f"{str(file)!r} is not a readable safetensors file ({error}): it is truncated or corrupted{_redo(path)}"
            ) from None


def _redo(path: Path) -> str:
    """How to get a good copy of a checkpoint directory."""
    try:
        path.resolve().relative_to((default_cache_dir() / "models").resolve())
    except ValueError:
        return "; copy or save the checkpoint again"
    return f"; delete {str(path)!r} and kvsieve converts the model again on the next load"


def load_gguf(path: Path, options: LoadOptions) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF through transformers, which dequantizes every tensor to ``options.dtype`` (needs accelerate)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **options.model_kwargs())
    return model, tokenizer


def load_hub_id(
    repo_id: str, options: LoadOptions, *, allow_download: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A hub id from the local Hugging Face cache, or downloaded by transformers with ``allow_download``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not allow_download:
        # Ask the cache directly first: it answers without any network access, and its miss gives a clearer
        # error than transformers' "couldn't connect" message.
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(repo_id, "config.json")
        except ValueError:  # HFValidationError: not a valid repo id
            cached = None
        if not isinstance(cached, str):
            raise ModelNotFoundError(
                f"{repo_id!r} is not a local directory, a .gguf file or a known model"
                f" ({', '.join(KNOWN_MODELS)}), and it is not in the local Hugging Face cache. kvsieve does not"
                " download models at run time: point at a local checkpoint directory with"
                " kvsieve.load_model('/path/to/checkpoint') (command line: --model /path/to/checkpoint),"
                " or pass allow_download=True to let transformers download it."
            )
    local = {} if allow_download else {"local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(repo_id, **local, **options.tokenizer_kwargs())
    model = AutoModelForCausalLM.from_pretrained(repo_id, use_safetensors=True, **local, **options.model_kwargs())
    return model, tokenizer
