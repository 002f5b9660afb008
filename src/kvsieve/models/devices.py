"""Where a model runs: the device spec that the command line, `EvalConfig.device` and the Ray workers share.

A device spec is one of

* ``cpu``;
* ``cuda`` (the current CUDA device) or ``cuda:N``: the whole model on that GPU;
* ``auto``: the GPUs when there are any -- transformers' ``device_map="auto"``, which splits a model that does not
  fit one GPU over all of them, layer by layer -- else the CPU.

`check_device` reads a spec and fails at once, in one line, where it cannot be honoured (CUDA asked for on a
machine without it, a GPU index that does not exist) instead of torch's bare ``AssertionError`` deep in a load;
`device_map_for` turns it into the ``device_map`` that `kvsieve.load_model` passes to transformers.
"""

from __future__ import annotations

import re
from typing import Any

import torch

__all__ = ["DEVICE_SPECS", "check_device", "check_device_map", "cuda_unavailable", "device_map_for", "parse_device"]

DEVICE_SPECS = "cpu, cuda, cuda:N or auto"
_SPEC = re.compile(r"cpu|auto|cuda(:\d+)?")


def parse_device(spec: str | torch.device, what: str = "device") -> str:
    """``spec`` in its canonical form (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"``); syntax only, so a config
    written on a CPU machine for GPU workers validates there. ``what`` names the parameter in the error."""
    text = str(spec).strip().lower() if isinstance(spec, str | torch.device) else None
    if text is None or not _SPEC.fullmatch(text):
        raise ValueError(f"{what} must be {DEVICE_SPECS}; got {spec!r}")
    return text


def cuda_unavailable(what: str) -> str:
    """The one-line message for a CUDA request on a machine without CUDA (``what``: the request, as given)."""
    build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
    return f"{what} asks for a CUDA device, but CUDA is not available (torch {torch.__version__}, {build})"


def _check_cuda_index(index: int | None, what: str) -> None:
    count = torch.cuda.device_count()
    if index is not None and not 0 <= index < count:
        raise ValueError(f"{what} names CUDA device {index}, but there are {count} (0-{count - 1})")


def check_device(spec: str | torch.device, what: str = "device") -> str:
    """`parse_device`, then: a CUDA spec needs CUDA and an existing index. Returns the canonical spec."""
    text = parse_device(spec, what)
    if text.startswith("cuda"):
        option = what.startswith("--")  # a command-line option, else a parameter
        shown = f"{what} {text}" if option else f"{what}={text!r}"
        if not torch.cuda.is_available():
            hint = f"{what} cpu or {what} auto" if option else f"{what}='cpu' or 'auto'"
            raise ValueError(f"{cuda_unavailable(shown)}; use {hint}")
        _check_cuda_index(torch.device(text).index, shown)
    return text


def device_map_for(spec: str | torch.device, what: str = "device") -> str | None:
    """The ``device_map`` for `kvsieve.load_model`: None (the CPU, transformers' default) for ``cpu`` and for
    ``auto`` without CUDA, ``"auto"`` for ``auto`` with it, the spec itself for ``cuda``/``cuda:N``."""
    text = check_device(spec, what)
    if text == "cpu" or (text == "auto" and not torch.cuda.is_available()):
        return None
    return text


def check_device_map(device_map: Any) -> None:
    """A ``device_map`` (`kvsieve.load_model`'s, passed to transformers) that names a CUDA device needs CUDA."""
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
    what = f"device_map={device_map!r}"
    if not torch.cuda.is_available():
        raise ValueError(f"{cuda_unavailable(what)}; use device_map=None (CPU) or 'auto' (whatever devices there are)")
    for value in wanted:
        _check_cuda_index(value if isinstance(value, int) else torch.device(value).index, what)


def fastest_dtype(device_map: Any) -> torch.dtype:
    """``dtype="auto"``: bfloat16 where the hardware the model runs on computes it natively (a CUDA device with
    bf16, a CPU with AVX512-BF16 or AMX as oneDNN reports), float32 elsewhere. Measured on this project's CPU
    (docs/results/speed.md): bf16 prefills 3.2-3.7x faster than fp32 on both models and decodes 1.2-1.3x faster on the
    0.5B model, 1.03-1.21x slower on the 135M one, where the per-layer host work dominates."""
    on_cuda = device_map is not None and torch.cuda.is_available()
    if on_cuda:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
