"""Argument types and helpers shared by the subcommands."""

from __future__ import annotations

import argparse
import contextlib
import math
from typing import Any

import yaml


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` after every option whose default means something (not None, False or an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default is argparse.SUPPRESS or default == []
        if "default" in text or not action.option_strings or unset:
            return text
        shown = ",".join(map(str, default)) if isinstance(default, list) else "%(default)s"
        return f"{text} (default: {shown})".lstrip()


class ArgumentParser(argparse.ArgumentParser):
    """Every (sub)command's ``--help`` shows the defaults."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def parse_budget(text: str) -> int | float:
    """``"256"`` -> 256 tokens; ``"0.2"`` -> a fifth of the prompt: an integer is a token count, any other finite
    number a fraction, as in `kvsieve.Budget` labels (the range is checked where the method is built)."""
    with contextlib.suppress(ValueError):
        return int(text)
    with contextlib.suppress(ValueError):
        value = float(text)
        if math.isfinite(value):
            return value
    raise argparse.ArgumentTypeError(f"budget must be an int (tokens) or a fraction in (0, 1], got {text!r}")


def parse_param(text: str) -> tuple[str, Any]:
    """``k=v`` with ``v`` read as YAML (numbers, booleans, lists, strings)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--param expects key=value, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def _split(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def names(text: str) -> list[str]:
    return _split(text)


def budgets(text: str) -> list[int | float]:
    return [parse_budget(item) for item in _split(text)]


def ints(text: str) -> list[int]:
    try:
        return [int(item) for item in _split(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def floats(text: str) -> list[float]:
    try:
        return [float(item) for item in _split(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_model_args(parser: argparse.ArgumentParser, dtype: str = "float32") -> None:
    parser.add_argument(
        "--model", default=None, help="local HF directory, .gguf file or known alias (default: SmolLM2)"
    )
    parser.add_argument(
        "--dtype",
        default=dtype,
        help=f"float32 | bfloat16 | float16 | auto (bf16 where the hardware computes it natively, else fp32); default"
        f" {dtype}",
    )
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)


DEVICE_HELP = "cpu | cuda | cuda:N | auto (the GPUs if any, a model too big for one split over them; else the CPU)"


def model_device_map(device: str):
    """``--device`` as `kvsieve.load_model`'s ``device_map``, checked before the slow model load (CUDA asked for
    where there is none: one line, exit status 2)."""
    from kvsieve.models.devices import device_map_for

    return device_map_for(device, "--device")


def add_method_args(
    parser: argparse.ArgumentParser, default_method: str = "full", default_budget: float | None = None
) -> None:
    parser.add_argument("--method", default=default_method, help="a name from `kvsieve methods`")
    parser.add_argument(
        "--budget",
        type=parse_budget,
        default=default_budget,
        help="KV entries per layer and head: int tokens or a fraction of the prompt (default: the method's own)",
    )
    parser.add_argument(
        "--param", type=parse_param, action="append", default=[], metavar="K=V", help="a method parameter, repeatable"
    )


def make_method(args: argparse.Namespace):
    import kvsieve

    params = dict(args.param)
    if args.budget is not None:
        params["budget"] = args.budget
    return kvsieve.method(args.method, **params)


def method_params(pairs: list[tuple[str, Any]], command: str) -> dict[str, dict[str, Any]]:
    """``--param METHOD.KEY=VALUE`` pairs as ``{method: {key: value}}``."""
    params: dict[str, dict[str, Any]] = {}
    for key, value in pairs:
        method_name, dot, name = key.partition(".")
        if not dot or not method_name or not name:
            raise ValueError(
                f"--param for {command} expects METHOD.KEY=VALUE (e.g. snapkv.window_size=16), got {key!r}"
            )
        params.setdefault(method_name, {})[name] = value
    return params


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"
