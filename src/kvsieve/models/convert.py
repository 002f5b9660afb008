"""A known model's one-time conversion: its GGUF parts located in their installed packages (never imported),
verified (size, sha256), dequantized to fp32 and published as a safetensors checkpoint in kvsieve's cache.

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
from pathlib import Path

import torch

from kvsieve.models.loaders import LoadOptions, load_gguf
from kvsieve.models.registry import KnownModel, ModelIntegrityError, ModelNotFoundError, default_cache_dir

__all__ = ["MARKER_NAME", "converted_dir", "ensure_converted", "is_complete", "locate_parts"]

logger = logging.getLogger(__name__)

MARKER_NAME = "kvsieve-source.json"
_MARKER_FORMAT = 1
_STALE_TEMP_S = 3600.0  # leftovers of killed conversions older than this are removed by the next conversion


def converted_dir(entry: KnownModel) -> Path:
    """Where the converted checkpoint of ``entry`` lives: ``<cache>/models/<cache_name>``."""
    return default_cache_dir() / "models" / entry.cache_name


def is_complete(directory: Path, entry: KnownModel) -> bool:
    """True for a finished conversion of exactly this source: the marker is written last, after every file."""
    try:
        marker = json.loads((directory / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("format") != _MARKER_FORMAT or marker.get("sha256") != entry.sha256:
        return False
    has_weights = (directory / "model.safetensors").is_file() or (directory / "model.safetensors.index.json").is_file()
    return has_weights and (directory / "config.json").is_file() and (directory / "tokenizer_config.json").is_file()


def ensure_converted(entry: KnownModel) -> Path:
    """The converted checkpoint of ``entry``, converting it first unless a complete one exists."""
    target = converted_dir(entry)
    if not is_complete(target, entry):
        _convert(entry, target)
    return target


def locate_parts(entry: KnownModel) -> list[Path]:
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
    parts = locate_parts(entry)
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
        model, tokenizer = load_gguf(gguf, LoadOptions(torch.float32, None, False, "sdpa"))
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
        if is_complete(target, entry):
            return
        if target.exists() or target.is_symlink():  # an incomplete or outdated checkpoint: set it aside, then drop it
            trash = target.with_name(f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            os.rename(target, trash)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_complete(target, entry):  # without a lock (no fcntl) another process may have won
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
