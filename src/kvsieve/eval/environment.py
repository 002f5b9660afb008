"""Where a run ran: versions and hardware for a run directory's ``env.json`` (and ``kvsieve bench``'s machine line),
and returning freed heap memory to the OS between units."""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import functools
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["environment", "release_freed_memory"]


def environment(model=None) -> dict[str, Any]:
    """Versions and hardware, for ``env.json``."""
    import transformers

    import kvsieve

    env: dict[str, Any] = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kvsieve": kvsieve.__version__,
        "git_commit": None,
        "git_dirty": None,
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _memory_gib(),
        "gpu": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
    }
    source = Path(kvsieve.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode == 0:
            env["git_commit"] = commit.stdout.strip()
            status = subprocess.run(
                ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            env["git_dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    if model is not None:
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        env["model"] = {
            "type": getattr(config, "model_type", None),
            "name_or_path": getattr(model.config, "_name_or_path", None),
            "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "device": str(next(model.parameters()).device),
            "max_position_embeddings": getattr(config, "max_position_embeddings", None),
        }
    return env


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return None


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


def release_freed_memory() -> None:
    """Return freed heap memory to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    glibc keeps freed blocks of the many differently sized CPU tensors a unit allocates (cache copies, scores) in
    its heap, so without this a process grows sample by sample: a 25-column sweep at 4K tokens went from 7 to
    16 GB resident in 9 samples, while trimming after each sample holds it flat.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
