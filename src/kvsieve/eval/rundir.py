"""The run directory of `kvsieve eval` (``--out``): its files, its rows files and shards, atomic writes, and the
time its processes spent.

* ``config.yaml``: the resolved configuration. A directory holding a different one refuses to resume (``force``
  sets its rows aside and starts again).
* ``env.json``: versions (python, torch, transformers, kvsieve, git commit) and hardware; later sessions are listed
  under ``resumed``.
* ``rows.jsonl``: one JSON row per sample x question x mode x method x budget, appended as each finishes with one
  ``write`` of the whole line, then ``fsync``. On start the rows are read back, a trailing partial line (a killed
  write) is cut off, and work whose ``key`` exists is skipped: a killed run resumes with no row lost or duplicated,
  and a finished run does nothing.
* ``summary.json``: per task, mode, method and budget (`kvsieve.eval.summary`), with ``elapsed_s``: the time the
  run's processes spent, summed (each process keeps its own in ``elapsed.<writer>.json``).

Shards (``shard=(k, n)``, ``kvsieve eval --shard k/n``, or ``--workers n`` through Ray): process ``k`` of ``n``
appends to its own ``rows.shard-k-of-n.jsonl``, so shards never write to one file (safe on network filesystems
too). Every reader takes the union of the rows files, so a run resumes with any number of shards, or none.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from kvsieve.eval.config import EvalConfig

__all__ = [
    "CONFIG",
    "ENV",
    "ROWS",
    "SHARD_ROWS",
    "SUMMARY",
    "RowLog",
    "RunDirError",
    "check_shard",
    "elapsed_by_writer",
    "open_run_dir",
    "previous_elapsed",
    "read_rows",
    "record_elapsed",
    "record_environment",
    "rows_files",
    "rows_path",
    "run_rows",
    "write_atomic",
    "writer_name",
]

ROWS = "rows.jsonl"
SHARD_ROWS = "rows.shard-{k}-of-{n}.jsonl"
CONFIG = "config.yaml"
ENV = "env.json"
SUMMARY = "summary.json"


class RunDirError(ValueError):
    """The run directory cannot be used as asked (another configuration, unreadable rows)."""


# ------------------------------------------------------------------------------------------------ rows file
def read_rows(path: str | Path, repair: bool = False) -> list[dict[str, Any]]:
    """The rows of a ``rows.jsonl``. A trailing partial line (a write cut short by a kill) is ignored, and with
    ``repair`` cut off the file; a malformed complete line is an error naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        if repair:
            with path.open("r+b") as handle:
                handle.truncate(end)
                handle.flush()
                os.fsync(handle.fileno())
        data = data[:end]
    rows = []
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise RunDirError(
                f"{path}:{number}: not a JSON row ({error.msg}); the file was edited or corrupted"
            ) from None
        if not isinstance(row, dict) or "key" not in row:
            raise RunDirError(f"{path}:{number}: not a kvsieve row (no 'key')")
        rows.append(row)
    return rows


def rows_files(out: Path) -> list[Path]:
    """The rows files of the run directory ``out``: ``rows.jsonl`` and every shard's."""
    return sorted(p for p in out.glob("rows*.jsonl") if p.name == ROWS or p.name.startswith("rows.shard-"))


def run_rows(out: str | Path, repair: bool = False) -> list[dict[str, Any]]:
    """Every row of the run directory ``out``: ``rows.jsonl`` and each shard's rows file, in that order; a key
    found twice (shards of different counts racing over one unit) counts once, its first row."""
    rows: dict[str, dict[str, Any]] = {}
    for path in rows_files(Path(out)):
        for row in read_rows(path, repair=repair):
            rows.setdefault(row["key"], row)
    return list(rows.values())


def writer_name(shard: tuple[int, int] | None) -> str:
    """The name of the process writing: ``main``, or ``shard-k-of-n``."""
    return "main" if shard is None else f"shard-{shard[0]}-of-{shard[1]}"


def rows_path(out: Path, shard: tuple[int, int] | None) -> Path:
    """The rows file this process appends to: ``rows.jsonl``, or its shard's own."""
    return out / (ROWS if shard is None else SHARD_ROWS.format(k=shard[0], n=shard[1]))


# ---------------------------------------------------------------------------------------------- writing
def check_shard(shard: Any) -> tuple[int, int] | None:
    """None, or ``(k, n)`` with ``0 <= k < n``; a string ``"k/n"`` is parsed."""
    if shard is None:
        return None
    given = shard
    if isinstance(shard, str):
        k, sep, n = shard.partition("/")
        try:
            shard = (int(k), int(n)) if sep else None
        except ValueError:
            shard = None
    try:
        k, n = shard
    except (TypeError, ValueError):
        k = n = None
    if isinstance(k, bool) or isinstance(n, bool) or not isinstance(k, int) or not isinstance(n, int) or not 0 <= k < n:
        raise ValueError(f"shard must be K/N with 0 <= K < N (e.g. 0/4), got {given!r}")
    return (k, n)


class RowLog:
    """Appends rows atomically: one ``write`` of a whole line on an ``O_APPEND`` descriptor, then ``fsync``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def append(self, row: dict[str, Any]) -> None:
        data = (json.dumps(row, sort_keys=True, default=_json_default, allow_nan=False) + "\n").encode("utf-8")
        if self.fd is None:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        written = os.write(self.fd, data)
        if written != len(data):  # a regular file takes the whole buffer; anything else is a full disk
            raise OSError(f"{self.path}: short write ({written} of {len(data)} bytes); the disk may be full")
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple | set):
        return list(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` at once: written to a temporary sibling, synced, then renamed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: shards write the same files
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ the directory
def open_run_dir(out: Path, config: EvalConfig, force: bool, echo: Callable[[str], None], create: bool = True) -> bool:
    """Check ``out`` and (``create``) create it, setting aside rows of another configuration with ``force``;
    returns True when it holds this configuration's finished run. ``create=False`` only checks: nothing is
    written, so a sweep that fails later (its plan, the model) leaves no half-made directory."""
    if out.exists() and not out.is_dir():
        raise RunDirError(f"run directory {str(out)!r} is an existing file: give --out a directory (new or a run's)")
    config_path = out / CONFIG
    if config_path.exists():
        try:
            old = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise RunDirError(f"{config_path}: unreadable ({error}); use another --out or --force") from None
        differences = config.differences(old)
        if differences and not force:
            raise RunDirError(
                f"{out} holds a run with a different configuration ({'; '.join(differences)}). Use another --out, "
                "or --force to set its rows aside and start again"
            )
        if differences:
            if create:
                _set_aside(out, echo)
        elif _finished(out):
            return True
    elif any(p.stat().st_size for p in rows_files(out)):
        if not force:
            raise RunDirError(f"{out} holds rows but no {CONFIG}: use another --out, or --force to set them aside")
        if create:
            _set_aside(out, echo)
    if create:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RunDirError(f"cannot create run directory {str(out)!r}: {error.strerror}") from None
        write_atomic(config_path, yaml.safe_dump(config.to_dict(), sort_keys=False))
    return False


def _set_aside(out: Path, echo: Callable[[str], None]) -> None:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    for path in [*rows_files(out), out / SUMMARY, *out.glob("elapsed.*.json")]:
        if path.exists():
            path.rename(out / f"{path.name}.replaced-{stamp}")
            echo(f"kvsieve eval: moved the old {path.name} aside to {path.name}.replaced-{stamp}")


def _finished(out: Path) -> bool:
    try:
        summary = json.loads((out / SUMMARY).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return bool(summary.get("complete")) and summary.get("rows") == len(run_rows(out))


# ------------------------------------------------------------------------------------------------ elapsed
def elapsed_by_writer(out: Path) -> dict[str, float]:
    """Seconds each process (``main`` or ``shard-k-of-n``) has spent on the run, from its ``elapsed.*.json``."""
    elapsed = {}
    for path in sorted(out.glob("elapsed.*.json")):
        try:
            elapsed[path.name[len("elapsed.") : -len(".json")]] = float(json.loads(path.read_text())["elapsed_s"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return elapsed


def record_elapsed(out: Path, writer: str, seconds: float) -> None:
    """Record the seconds ``writer`` has spent on the run, in its ``elapsed.<writer>.json``."""
    write_atomic(out / f"elapsed.{writer}.json", json.dumps({"elapsed_s": seconds}) + "\n")


def previous_elapsed(out: Path, writer: str) -> float:
    """This writer's time from earlier sessions (a run directory older than the per-writer files: its summary's)."""
    recorded = elapsed_by_writer(out)
    if writer in recorded:
        return recorded[writer]
    if recorded or writer != "main":
        return 0.0
    try:
        return float(json.loads((out / SUMMARY).read_text(encoding="utf-8")).get("elapsed_s") or 0.0)
    except (OSError, ValueError, TypeError):
        return 0.0


def record_environment(out: Path, env: dict[str, Any]) -> None:
    """Write ``env.json``: ``env`` for a new run; appended to the first session's ``resumed`` list otherwise."""
    env_path = out / ENV
    if env_path.exists():
        try:
            first = json.loads(env_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            first = None
        if isinstance(first, dict):
            first.setdefault("resumed", []).append(env)
            env = first
    write_atomic(env_path, json.dumps(env, indent=1, default=str) + "\n")
