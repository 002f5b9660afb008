"""The evaluation runner: a sweep of methods x budgets x tasks x lengths x modes into a resumable run directory.

Work is done one *unit* at a time: one sample (or LM document) in one mode. Within a unit:

* the full cache always runs, as the reference (budget ``-``);
* methods that compress after prefill (``Method.shares_prefill``) share one prompt forward with it
  (`kvsieve.prefill_sharing`); the others (InfLLM, ActQKV) run their own prefill;
* query-aware mode: the question is part of the compressed prompt (one prefill per question);
  query-agnostic mode: the context is compressed once and each question is fed, as its own chunk, to a copy of the
  compressed cache -- except for methods that compress after the question (NACL's proxies), which prefill the
  context with each question;
* ``lm``: a context of ``length`` tokens, then ``lm_continuation`` tokens teacher-forced one step at a time with
  every method in lockstep with the full cache, so that only one vocabulary distribution per cache is ever held:
  perplexity, mean KL(full || method) and top-1 agreement with the full cache.

Run directory (``--out``):

* ``config.yaml``: the resolved configuration. A directory holding a different one refuses to resume (``force``
  sets its rows aside and starts again).
* ``env.json``: versions (python, torch, transformers, kvsieve, git commit) and hardware; later sessions are listed
  under ``resumed``.
* ``rows.jsonl``: one JSON row per sample x question x mode x method x budget, appended as each finishes with one
  ``write`` of the whole line, then ``fsync``. On start the rows are read back, a trailing partial line (a killed
  write) is cut off, and work whose ``key`` exists is skipped: a killed run resumes with no row lost or duplicated,
  and a finished run does nothing.
* ``summary.json``: per task, mode, method and budget, rewritten after every unit (``complete: true`` once every
  unit's rows exist), with ``elapsed_s``: the time the run's processes spent, summed (each process keeps its own
  in ``elapsed.<writer>.json``).

Shards (``shard=(k, n)``, ``kvsieve eval --shard k/n``, or ``--workers n`` through Ray): process ``k`` of ``n``
runs the units whose index in the plan is ``k`` modulo ``n`` and appends to its own ``rows.shard-k-of-n.jsonl``,
so shards never write to one file (safe on network filesystems too). Every reader takes the union of the rows
files, so a run resumes with any number of shards, or none.

Lengths beyond the model's window (``max_position_embeddings``) give ``status: skipped`` rows with the reason for
methods that cannot extrapolate (``Method.extrapolates``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from kvsieve.driver import Driver, KVSnapshot, Timings
from kvsieve.eval.config import FULL, LM_TASK, EvalConfig, MethodRun
from kvsieve.eval.metrics import score_sample
from kvsieve.eval.stats import format_interval, wilson_interval
from kvsieve.eval.tasks import TASKS, LMDoc, Sample, lm_documents, load_benchmark_file, make_task, render
from kvsieve.eval.tasks.base import make_sample_id
from kvsieve.generate import decode, eos_ids
from kvsieve.methods.base import PromptLayout
from kvsieve.models import trained_window
from kvsieve.prefill_sharing import shared_prefill, shares_prefill
from kvsieve.progress import progress_bar

__all__ = [
    "ROWS",
    "TIMING_FIELDS",
    "RunDirError",
    "format_summary",
    "read_rows",
    "rows_files",
    "run_eval",
    "run_rows",
    "skip_notes",
    "summarize",
]

ROWS = "rows.jsonl"
SHARD_ROWS = "rows.shard-{k}-of-{n}.jsonl"
CONFIG = "config.yaml"
ENV = "env.json"
SUMMARY = "summary.json"
LM_MODE = "lm"
# Fields that measure time: they differ between runs of the same configuration; everything else must not.
TIMING_FIELDS = ("prefill_s", "decode_s_per_token")


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
    return sorted(p for p in out.glob("rows*.jsonl") if p.name == ROWS or p.name.startswith("rows.shard-"))


def run_rows(out: str | Path, repair: bool = False) -> list[dict[str, Any]]:
    """Every row of the run directory ``out``: ``rows.jsonl`` and each shard's rows file, in that order; a key
    found twice (shards of different counts racing over one unit) counts once, its first row."""
    rows: dict[str, dict[str, Any]] = {}
    for path in rows_files(Path(out)):
        for row in read_rows(path, repair=repair):
            rows.setdefault(row["key"], row)
    return list(rows.values())


def _writer(shard: tuple[int, int] | None) -> str:
    return "main" if shard is None else f"shard-{shard[0]}-of-{shard[1]}"


def _rows_path(out: Path, shard: tuple[int, int] | None) -> Path:
    return out / (ROWS if shard is None else SHARD_ROWS.format(k=shard[0], n=shard[1]))


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


class _RowLog:
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


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: shards write the same files
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _open_run_dir(out: Path, config: EvalConfig, force: bool, echo: Callable[[str], None], create: bool = True) -> bool:
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
        _write_atomic(config_path, yaml.safe_dump(config.to_dict(), sort_keys=False))
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


# ----------------------------------------------------------------------------------------------- environment
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


# ----------------------------------------------------------------------------------------------------- plan
@dataclass
class _Unit:
    """One sample (or LM document) in one mode: the work that shares a prefill."""

    task: str
    length: int
    mode: str
    sample_id: str
    index: int
    sample: Sample | None = None
    doc: LMDoc | None = None
    n_questions: int = 1
    skip_reason: str | None = None  # every method that cannot extrapolate is skipped (without building samples)

    def pair(self, question: int) -> str:
        """The row key without method and budget: rows with the same pair are compared to the full cache."""
        return f"{self.task}|L{self.length}|{self.sample_id}|q{question}|{self.mode}"

    def key(self, question: int, run: MethodRun) -> str:
        return f"{self.pair(question)}|{run.name}|{run.label}"


def _plan(config: EvalConfig, runs: list[MethodRun], tokenizer, window: int | None) -> list[_Unit]:
    units: list[_Unit] = []
    for task in config.tasks:
        for length in config.lengths:
            needed = length + (config.lm_continuation if task == LM_TASK else 0)
            beyond = window is not None and needed > window
            reason = None
            if beyond and not any(r.method.extrapolates for r in runs):
                reason = beyond_window_reason(needed, window)
            if task == LM_TASK:
                docs = (
                    [None] * config.samples
                    if reason
                    else lm_documents(tokenizer, length, config.lm_continuation, config.samples, seed=config.seed)
                )
                for i, doc in enumerate(docs):
                    sample_id = f"lm/L{length}/s{config.seed}/{i}"
                    units.append(_Unit(task, length, LM_MODE, sample_id, i, doc=doc, skip_reason=reason))
                continue
            spec = TASKS[task]
            depths = config.depths if spec.supports_depth else None
            if reason:
                samples: list[Sample | None] = []
                ids = [
                    make_sample_id(task, length, None if depths is None else float(d), config.seed, i)
                    for d in (depths or [None])
                    for i in range(config.samples)
                ]
            else:
                samples = make_task(
                    task,
                    tokenizer,
                    length=length,
                    n_samples=config.samples,
                    seed=config.seed,
                    depths=depths,
                    chat=config.chat,
                    **config.task_options.get(task, {}),
                )
                ids = [s.sample_id for s in samples]
            for i, sample_id in enumerate(ids):
                sample = samples[i] if samples else None
                for mode in config.modes:
                    units.append(
                        _Unit(
                            task,
                            length,
                            mode,
                            sample_id,
                            i,
                            sample=sample,
                            n_questions=len(sample.questions) if sample else 1,
                            skip_reason=reason,
                        )
                    )
    for entry in config.data:
        for length in config.lengths:
            loaded = load_benchmark_file(
                entry["path"],
                entry.get("benchmark"),
                entry.get("task"),
                tokenizer=tokenizer,
                max_length=length,
                group_by_context=bool(entry.get("group_by_context", False)),
            )
            for i, sample in enumerate(loaded[: config.samples]):
                for mode in config.modes:
                    units.append(
                        _Unit(sample.task, length, mode, sample.sample_id, i, sample, n_questions=len(sample.questions))
                    )
    return units


def beyond_window_reason(tokens: int, window: int) -> str:
    return (
        f"{tokens} positions exceed the model's window of {window} tokens (max_position_embeddings) and the method "
        "cannot extrapolate"
    )


# --------------------------------------------------------------------------------------------------- runner
@dataclass
class _Prepared:
    """A cache right after its prompt (compressed), ready to read a question or decode."""

    driver: Driver
    logits: torch.Tensor
    prefill_s: float  # this cache's prompt (a shared prefill: the shared forward plus the method's own hooks)
    snapshot: KVSnapshot
    shared: bool


class _Evaluator:
    def __init__(self, config, runs, model, tokenizer, log: _RowLog, done: set[str], on_row) -> None:
        self.config = config
        self.runs = runs
        self.model = model
        self.tokenizer = tokenizer
        self.log = log
        self.done = done
        self.on_row = on_row
        self.window = trained_window(model)
        self.stops = eos_ids(model, tokenizer)
        self.reserve = 64

    # ----------------------------------------------------------------------------------------------- rows
    def emit(self, unit: _Unit, question: int, run: MethodRun, fields: dict[str, Any]) -> None:
        key = unit.key(question, run)
        if key in self.done:
            return
        sample = unit.sample
        row: dict[str, Any] = {
            "key": key,
            "pair": unit.pair(question),
            "task": unit.task,
            "benchmark": (sample.meta.get("benchmark") if sample else None) or ("lm" if unit.task == LM_TASK else None),
            "length": unit.length,
            "depth": sample.depth if sample else None,
            "sample_id": unit.sample_id,
            "question": question,
            "mode": unit.mode,
            "method": run.name,
            "budget": run.label,
            "params": run.method.params(),
            **fields,
        }
        self.log.append(row)
        self.done.add(key)
        if self.on_row is not None:
            self.on_row(row)

    def skip(self, unit: _Unit, question: int, run: MethodRun, reason: str, **extra) -> None:
        self.emit(unit, question, run, {"status": "skipped", "reason": reason, **extra})

    def todo(self, unit: _Unit, question: int) -> list[MethodRun]:
        return [run for run in self.runs if unit.key(question, run) not in self.done]

    # ------------------------------------------------------------------------------------------ prefills
    def prepare(
        self, runs: Sequence[MethodRun], context: list[int], question: list[int], question_in_prompt: bool = False
    ) -> dict[MethodRun, _Prepared]:
        """Caches of ``runs`` after ``context`` and ``question`` as `Driver.prompt` feeds them (``question_in_prompt``:
        query-aware). The full cache and the methods that can share ride one shared prefill; the others prefill on
        their own."""
        out: dict[MethodRun, _Prepared] = {}
        shared = [r for r in runs if self.config.share_prefill and not r.is_full and shares_prefill(r.method)]
        full = [r for r in runs if r.is_full]
        if self.config.share_prefill and (full or shared):
            layout = None
            if question_in_prompt:
                layout = PromptLayout(question=(len(context), len(context) + len(question)))
            result = shared_prefill(
                self.model,
                [r.method for r in shared],
                context + question if question_in_prompt else context,
                None if question_in_prompt else question,
                chunk_size=self.config.chunk_size,
                reserve=self.reserve,
                layout=layout,
            )
            for run in full:
                driver = Driver(self.model, result.full)
                out[run] = _Prepared(driver, result.full_logits, result.shared_s, driver.snapshot(), bool(shared))
            for run, cache, logits, seconds in zip(shared, result.caches, result.logits, result.method_s):
                driver = Driver(self.model, cache)
                out[run] = _Prepared(driver, logits, result.shared_s + seconds, driver.snapshot(), True)
        for run in runs:
            if run in out:
                continue
            driver = Driver.new(self.model, run.method, len(context) + len(question), reserve=self.reserve)
            logits = driver.prompt(
                context, question, chunk_size=self.config.chunk_size, question_in_prompt=question_in_prompt
            )
            seconds = driver.timings.prefill_s + driver.timings.question_s
            out[run] = _Prepared(driver, logits, seconds, driver.snapshot(), False)
        return out

    # ------------------------------------------------------------------------------------------- QA units
    def run_qa(self, unit: _Unit) -> None:
        sample = unit.sample
        assert sample is not None
        max_new = self.config.max_new_tokens or sample.max_new_tokens
        encoded: dict[int, tuple[list[int], list[int]]] = {}
        live: dict[int, list[MethodRun]] = {}
        for q in range(unit.n_questions):
            runs = self.todo(unit, q)
            if not runs:
                continue
            rendered = render(sample, q, self.tokenizer, self.config.chat)
            context, question = rendered.encode(self.tokenizer)
            encoded[q] = (context, question)
            positions = len(context) + len(question) + max_new
            can_run = []
            for run in runs:
                if self.window is not None and positions > self.window and not run.method.extrapolates:
                    self.skip(
                        unit, q, run, beyond_window_reason(positions, self.window), prompt_tokens=positions - max_new
                    )
                else:
                    can_run.append(run)
            if can_run:
                live[q] = can_run
        if not live:
            return
        if unit.mode == "query_aware":
            for q, runs in live.items():
                context, question = encoded[q]
                prepared = self.prepare(runs, context, question, question_in_prompt=True)
                for run in runs:
                    item = prepared[run]
                    self.finish(unit, q, run, sample, item, item.logits, item.prefill_s, len(context), len(question))
            return
        # query-agnostic: compress each distinct context once; questions read copies of it
        by_context: dict[tuple[int, ...], list[int]] = {}
        for q in live:
            by_context.setdefault(tuple(encoded[q][0]), []).append(q)
        for context_key, questions in by_context.items():
            context = list(context_key)
            early = list(dict.fromkeys(r for q in questions for r in live[q] if not r.method.compress_after_question))
            early = [r for r in self.runs if r in early]  # sweep order
            base = self.prepare(early, context, []) if early else {}
            remaining = {run: sum(run in live[q] for q in questions) for run in early}
            for q in questions:
                question = encoded[q][1]
                late = [r for r in live[q] if r.method.compress_after_question]
                late_prepared = self.prepare(late, context, question) if late else {}
                for run in live[q]:
                    if run in late_prepared:
                        item = late_prepared[run]
                        self.finish(
                            unit, q, run, sample, item, item.logits, item.prefill_s, len(context), len(question)
                        )
                        continue
                    item = base[run]
                    remaining[run] -= 1
                    driver = item.driver if remaining[run] == 0 else item.driver.copy()
                    driver.timings = Timings()
                    logits = driver.question(question)
                    used = dataclasses.replace(item, driver=driver)
                    seconds = item.prefill_s + driver.timings.question_s
                    self.finish(unit, q, run, sample, used, logits, seconds, len(context), len(question))

    def finish(
        self,
        unit: _Unit,
        q: int,
        run: MethodRun,
        sample: Sample,
        item: _Prepared,
        logits: torch.Tensor,
        prefill_s: float,
        prompt_tokens: int,
        question_tokens: int,
    ) -> None:
        """Decode the answer, score it and write the row."""
        driver = item.driver
        max_new = self.config.max_new_tokens or sample.max_new_tokens
        mark = driver.mark()
        driver.timings = Timings()
        tokens = decode(driver, logits, max_new, stop_ids=self.stops)
        prediction = self.tokenizer.decode(tokens, skip_special_tokens=True)
        metric = self.config.metrics.get(unit.task, sample.metric)
        scored = sample if metric == sample.metric else dataclasses.replace(sample, metric=metric)
        snapshot = item.snapshot
        self.emit(
            unit,
            q,
            run,
            {
                "status": "ok",
                "prediction": prediction,
                "answers": list(sample.questions[q].answers),
                "score": score_sample(scored, q, prediction),
                "metric": metric,
                "prompt_tokens": prompt_tokens,
                "question_tokens": question_tokens,
                "new_tokens": len(tokens),
                "kv_stored_tokens": snapshot.mean_stored,
                "kv_bytes": snapshot.bytes,
                "kv_bytes_full": snapshot.bytes_full,
                "attended_per_step": driver.attended_since(mark),
                "prefill_s": prefill_s,
                "decode_s_per_token": driver.timings.decode_s_per_token,
                "shared_prefill": item.shared,
            },
        )

    # ------------------------------------------------------------------------------------------- LM units
    def run_lm(self, unit: _Unit) -> None:
        doc = unit.doc
        assert doc is not None
        runs = self.todo(unit, 0)
        if not runs:
            return
        context, continuation = doc.input_ids_context, doc.input_ids_continuation
        positions = len(context) + len(continuation)
        live = []
        for run in runs:
            if self.window is not None and positions > self.window and not run.method.extrapolates:
                self.skip(unit, 0, run, beyond_window_reason(positions, self.window), doc_id=doc.doc_id)
            elif not run.is_full:
                live.append(run)
        if not live and unit.key(0, next(r for r in self.runs if r.is_full)) in self.done:
            return  # only the reference's row was missing, and it is a skip row now
        full_run = next(r for r in self.runs if r.is_full)
        order = [full_run, *live]
        prepared = self.prepare(order, context, [])
        logits = {run: prepared[run].logits for run in order}
        nll = dict.fromkeys(order, 0.0)
        kl = dict.fromkeys(order, 0.0)
        agree = dict.fromkeys(order, 0)
        marks = {run: prepared[run].driver.mark() for run in order}
        steps = len(continuation)
        for t, target in enumerate(continuation):
            reference = torch.log_softmax(logits[full_run][0].float(), dim=-1)
            p_reference = reference.exp()
            top_reference = int(reference.argmax())
            for run in order:
                logp = reference if run is full_run else torch.log_softmax(logits[run][0].float(), dim=-1)
                nll[run] -= float(logp[target])
                if run is not full_run:
                    kl[run] += float((p_reference * (reference - logp)).sum())
                agree[run] += int(int(logp.argmax()) == top_reference)
            if t + 1 == steps:
                break
            for run in order:  # in lockstep: one vocabulary distribution per cache is held at a time
                logits[run] = prepared[run].driver.step(target)
        for run in order:
            if unit.key(0, run) in self.done:
                continue
            item = prepared[run]
            snapshot = item.snapshot
            self.emit(
                unit,
                0,
                run,
                {
                    "status": "ok",
                    "doc_id": doc.doc_id,
                    "source": doc.source,
                    "metric": "top1_agreement",
                    "score": agree[run] / steps,
                    "ppl": math.exp(nll[run] / steps),
                    "nll": nll[run] / steps,
                    "kl": kl[run] / steps,
                    "top1_agreement": agree[run] / steps,
                    "prompt_tokens": len(context),
                    "new_tokens": steps,
                    "kv_stored_tokens": snapshot.mean_stored,
                    "kv_bytes": snapshot.bytes,
                    "kv_bytes_full": snapshot.bytes_full,
                    "attended_per_step": item.driver.attended_since(marks[run]),
                    "prefill_s": item.prefill_s,
                    "decode_s_per_token": item.driver.timings.decode_s_per_token,
                    "shared_prefill": item.shared,
                },
            )

    def run_unit(self, unit: _Unit) -> None:
        if unit.skip_reason is not None:
            for q in range(unit.n_questions):
                for run in self.todo(unit, q):
                    self.skip(unit, q, run, unit.skip_reason)
            return
        if unit.mode == LM_MODE:
            self.run_lm(unit)
        else:
            self.run_qa(unit)


# -------------------------------------------------------------------------------------------------- summary
def _mean(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _budget_order(label: str) -> tuple[int, float]:
    if label == "-":
        return (0, 0.0)
    try:
        value = float(label)
    except ValueError:
        return (2, 0.0)
    return (1 if value <= 1.0 and "." in label else 2, value)


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task, mode, method and budget: rows, mean score, retention (method score / full-cache score over the
    same samples and questions), mean KV bytes, prefill seconds and decode ms per token (LM: perplexity and KL).

    Every mean score comes with its count and 95% Wilson interval (`wilson_interval`, summed scores as successes):
    ``n``, ``score_lo``, ``score_hi``, and ``full_n``, ``full_score``, ``full_score_lo``, ``full_score_hi`` for the
    full cache over the pairs that retention compares. ``None`` where there is nothing to score."""

    def interval(total: float, n: int) -> tuple[float | None, float | None]:
        return wilson_interval(total, n) if n else (None, None)

    full_scores = {
        r["pair"]: r["score"] for r in rows if r["method"] == FULL and r.get("status") == "ok" and "pair" in r
    }
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["mode"], row["method"], row["budget"]), []).append(row)
    method_order = list(dict.fromkeys(r["method"] for r in rows))
    out = []
    for (task, mode, method, budget), members in groups.items():
        ok = [r for r in members if r.get("status") == "ok"]
        paired = [r for r in ok if r.get("pair") in full_scores]
        full_sum = sum(full_scores[r["pair"]] for r in paired)
        score_sum = sum(r["score"] for r in ok)
        score_lo, score_hi = interval(score_sum, len(ok))
        full_lo, full_hi = interval(full_sum, len(paired))
        entry = {
            "task": task,
            "mode": mode,
            "method": method,
            "budget": budget,
            "n": len(ok),
            "skipped": len(members) - len(ok),
            "skip_reasons": _reasons(members),
            "score": score_sum / len(ok) if ok else None,
            "score_lo": score_lo,
            "score_hi": score_hi,
            "retention": sum(r["score"] for r in paired) / full_sum if paired and full_sum > 0 else None,
            "full_n": len(paired),
            "full_score": full_sum / len(paired) if paired else None,
            "full_score_lo": full_lo,
            "full_score_hi": full_hi,
            "kv_bytes": _mean(r.get("kv_bytes") for r in ok),
            "kv_bytes_full": _mean(r.get("kv_bytes_full") for r in ok),
            "kv_stored_tokens": _mean(r.get("kv_stored_tokens") for r in ok),
            "prefill_s": _mean(r.get("prefill_s") for r in ok),
            "decode_ms_per_token": _mean(
                None if r.get("decode_s_per_token") is None else 1000 * r["decode_s_per_token"] for r in ok
            ),
        }
        if task == LM_TASK:
            entry["ppl"] = _mean(r.get("ppl") for r in ok)
            entry["kl"] = _mean(r.get("kl") for r in ok)
        out.append(entry)
    out.sort(
        key=lambda g: (
            g["task"],
            g["mode"],
            method_order.index(g["method"]) if g["method"] in method_order else 0,
            _budget_order(g["budget"]),
        )
    )
    return out


def _reasons(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Why rows were skipped: each distinct reason with its count."""
    reasons: dict[str, int] = {}
    for row in rows:
        if row.get("status") == "skipped":
            reason = row.get("reason") or "no reason recorded"
            reasons[reason] = reasons.get(reason, 0) + 1
    return reasons


def skip_notes(groups: Sequence[dict[str, Any]]) -> list[str]:
    """One line per distinct skip reason: how many rows, of which tasks and methods."""
    where: dict[str, tuple[int, dict[str, None], dict[str, None]]] = {}
    for g in groups:
        for reason, count in (g.get("skip_reasons") or {}).items():
            total, tasks, methods = where.get(reason, (0, {}, {}))
            tasks[g["task"]] = None
            methods[g["method"]] = None
            where[reason] = (total + count, tasks, methods)
    return [
        f"{total} rows skipped ({', '.join(tasks)}; {', '.join(methods)}): {reason}"
        for reason, (total, tasks, methods) in where.items()
    ]


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec)


def format_summary(groups: Sequence[dict[str, Any]]) -> str:
    """The terminal table: one line per task, mode, method and budget."""
    has_lm = any(g["task"] == LM_TASK for g in groups)
    header = [
        "task",
        "mode",
        "method",
        "budget",
        "n",
        "score",
        "95% CI",
        "retention",
        "KV MiB",
        "prefill s",
        "decode ms/tok",
    ]
    if has_lm:
        header += ["ppl", "KL"]
    lines = [header]
    for g in groups:
        line = [
            g["task"],
            g["mode"],
            g["method"],
            g["budget"],
            str(g["n"]) + (f" (+{g['skipped']} skipped)" if g["skipped"] else ""),
            _fmt(g["score"], ".3f"),
            format_interval(g["score_lo"], g["score_hi"], 3),
            _fmt(g["retention"], ".3f"),
            _fmt(None if g["kv_bytes"] is None else g["kv_bytes"] / 2**20, ".2f"),
            _fmt(g["prefill_s"], ".2f"),
            _fmt(g["decode_ms_per_token"], ".1f"),
        ]
        if has_lm:
            line += [_fmt(g.get("ppl"), ".2f"), _fmt(g.get("kl"), ".4f")]
        lines.append(line)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    text = []
    for n, line in enumerate(lines):
        cells = [str(c).ljust(w) if i < 4 else str(c).rjust(w) for i, (c, w) in enumerate(zip(line, widths))]
        text.append("  ".join(cells).rstrip())
        if n == 0:
            text.append("  ".join("-" * w for w in widths))
    text += [f"note: {line}" for line in skip_notes(groups)]
    return "\n".join(text)


def _write_summary(out: Path, rows: list[dict[str, Any]], complete: bool) -> list[dict]:
    groups = summarize(rows)
    elapsed = _elapsed_by_writer(out)
    summary = {
        "complete": complete,
        "rows": len(rows),
        "ok": sum(r.get("status") == "ok" for r in rows),
        "skipped": sum(r.get("status") == "skipped" for r in rows),
        "elapsed_s": sum(elapsed.values()) if elapsed else None,
        "elapsed_s_by_writer": elapsed,
        "groups": groups,
    }
    _write_atomic(out / SUMMARY, json.dumps(summary, indent=1, allow_nan=False) + "\n")
    return groups


def _elapsed_by_writer(out: Path) -> dict[str, float]:
    """Seconds each process (``main`` or ``shard-k-of-n``) has spent on the run, from its ``elapsed.*.json``."""
    elapsed = {}
    for path in sorted(out.glob("elapsed.*.json")):
        try:
            elapsed[path.name[len("elapsed.") : -len(".json")]] = float(json.loads(path.read_text())["elapsed_s"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return elapsed


def _record_elapsed(out: Path, writer: str, seconds: float) -> None:
    _write_atomic(out / f"elapsed.{writer}.json", json.dumps({"elapsed_s": seconds}) + "\n")


def _previous_elapsed(out: Path, writer: str) -> float:
    """This writer's time from earlier sessions (a run directory older than the per-writer files: its summary's)."""
    recorded = _elapsed_by_writer(out)
    if writer in recorded:
        return recorded[writer]
    if recorded or writer != "main":
        return 0.0
    try:
        return float(json.loads((out / SUMMARY).read_text(encoding="utf-8")).get("elapsed_s") or 0.0)
    except (OSError, ValueError, TypeError):
        return 0.0


# -------------------------------------------------------------------------------------------------- entry
def run_eval(
    config: EvalConfig | dict[str, Any],
    out: str | Path,
    *,
    model=None,
    tokenizer=None,
    force: bool = False,
    progress: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    echo: Callable[[str], None] | None = print,
    shard: tuple[int, int] | str | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) a sweep into the run directory ``out``; returns the summary groups.

    ``config``: an `EvalConfig` or its dict. Everything is validated before any work. ``model``/``tokenizer``:
    already loaded (else ``kvsieve.load_model(config.model, dtype=config.dtype)``). ``force``: set aside the rows
    of a different configuration found in ``out`` (not with concurrent shards). ``on_row(row)`` is called after
    each row is safely written. ``echo``: where the summary table and notes go (None: nowhere). ``shard``:
    ``(k, n)`` or ``"k/n"``: run only every n-th unit of the plan, from the k-th, into its own rows file.
    """
    say = echo or (lambda _text: None)
    shard = check_shard(shard)
    if not isinstance(config, EvalConfig):
        config = EvalConfig.from_dict(config)
    runs = config.validate()
    if model is None and config.model is None:
        from kvsieve.models import DEFAULT_MODEL

        config.model = DEFAULT_MODEL  # the resolved configuration names the model it ran
    out = Path(out)
    if _open_run_dir(out, config, force, say, create=False):
        rows = run_rows(out)
        groups = summarize(rows)
        say(f"kvsieve eval: {out} already holds this finished run ({len(rows)} rows); nothing to do")
        say(format_summary(groups))
        return groups
    if model is None:
        import kvsieve

        model, tokenizer = kvsieve.load_model(config.model, dtype=config.dtype)
    elif tokenizer is None:
        raise ValueError("run_eval: a model was given without its tokenizer")
    # the plan builds every sample: a length too short for a task's template fails here, before any file exists
    planned = _plan(config, runs, tokenizer, trained_window(model))
    _open_run_dir(out, config, force, say)

    env_path = out / ENV
    env = environment(model)
    if shard is not None:
        env["shard"] = list(shard)
    if env_path.exists():
        try:
            first = json.loads(env_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            first = None
        if isinstance(first, dict):
            first.setdefault("resumed", []).append(env)
            env = first
    _write_atomic(env_path, json.dumps(env, indent=1, default=str) + "\n")

    writer = _writer(shard)
    read_rows(_rows_path(out, shard), repair=True)  # cut a write that a kill left half-done (this writer's file)
    done = {r["key"] for r in run_rows(out)}
    start = time.perf_counter()
    previous = _previous_elapsed(out, writer)
    units = planned if shard is None else planned[shard[0] :: shard[1]]

    def unit_done(unit: _Unit, keys: set[str]) -> bool:
        return all(unit.key(q, run) in keys for q in range(unit.n_questions) for run in runs)

    log = _RowLog(_rows_path(out, shard))
    evaluator = _Evaluator(config, runs, model, tokenizer, log, done, on_row)
    bar = progress_bar(len(units), sum(unit_done(unit, done) for unit in units), progress, "kvsieve eval", "sample")
    complete = False
    try:
        with torch.inference_mode():
            for unit in units:
                if unit_done(unit, done):
                    continue
                bar.set_postfix_str(f"{unit.task} L{unit.length} {unit.mode}", refresh=False)
                evaluator.run_unit(unit)
                release_freed_memory()
                bar.update(1)
                # after every unit: a SIGKILL (no `finally`) loses at most one unit's time from elapsed_s
                _record_elapsed(out, writer, previous + time.perf_counter() - start)
                _write_summary(out, run_rows(out), False)
        complete = True
    finally:
        bar.close()
        log.close()
        _record_elapsed(out, writer, previous + time.perf_counter() - start)
        rows = run_rows(out)
        keys = {r["key"] for r in rows}
        # complete: every unit of the plan has its rows, whichever process wrote them
        groups = _write_summary(out, rows, complete and all(unit_done(unit, keys) for unit in planned))
    say(format_summary(groups))
    return groups
