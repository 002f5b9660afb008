"""The evaluation runner: a sweep of methods x budgets x tasks x lengths x modes into a resumable run directory.

`run_eval` validates the configuration, plans the sweep's units (`kvsieve.eval.plan`: one sample, or LM document,
in one mode), runs them one at a time (`kvsieve.eval.evaluator`: the full cache as the reference, shared
prefills, question copies, decoding and scoring) and appends every row to the run directory as it finishes
(`kvsieve.eval.rundir`: ``config.yaml``, ``env.json``, the rows files of the run and its shards, resuming), then
rewrites the summary (`kvsieve.eval.summary`). ``env.json`` comes from `kvsieve.eval.environment`.

A killed run resumes with no row lost or duplicated: rerun it. Shards (``shard=(k, n)``, ``kvsieve eval --shard
k/n``, or ``--workers n`` through Ray) run the units whose index in the plan is ``k`` modulo ``n``, each into its
own rows file; a final run without a shard marks the run complete.

The names of the run directory and the summary that users import from here (``read_rows``, ``run_rows``,
``summarize``, ...) are re-exported from their modules.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvsieve.eval.config import EvalConfig
from kvsieve.eval.environment import environment, release_freed_memory
from kvsieve.eval.evaluator import TIMING_FIELDS, Evaluator
from kvsieve.eval.plan import Unit, beyond_window_reason, plan_units
from kvsieve.eval.rundir import (
    CONFIG,
    ENV,
    ROWS,
    SUMMARY,
    RowLog,
    RunDirError,
    check_shard,
    open_run_dir,
    previous_elapsed,
    read_rows,
    record_elapsed,
    record_environment,
    rows_files,
    rows_path,
    run_rows,
    writer_name,
)
from kvsieve.eval.summary import format_summary, skip_notes, summarize, write_summary
from kvsieve.models import trained_window
from kvsieve.progress import progress_bar

__all__ = [
    "CONFIG",
    "ENV",
    "ROWS",
    "SUMMARY",
    "TIMING_FIELDS",
    "RunDirError",
    "beyond_window_reason",
    "check_shard",
    "environment",
    "format_summary",
    "read_rows",
    "release_freed_memory",
    "rows_files",
    "run_eval",
    "run_rows",
    "skip_notes",
    "summarize",
]


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
    if open_run_dir(out, config, force, say, create=False):
        rows = run_rows(out)
        groups = summarize(rows)
        say(f"kvsieve eval: {out} already holds this finished run ({len(rows)} rows); nothing to do")
        say(format_summary(groups))
        return groups
    if model is None:
        import kvsieve
        from kvsieve.models.devices import device_map_for

        device_map = device_map_for(config.device, "device")
        model, tokenizer = kvsieve.load_model(config.model, dtype=config.dtype, device_map=device_map)
    elif tokenizer is None:
        raise ValueError("run_eval: a model was given without its tokenizer")
    # the plan builds every sample: a length too short for a task's template fails here, before any file exists
    planned = plan_units(config, runs, tokenizer, trained_window(model))
    open_run_dir(out, config, force, say)

    env = environment(model)
    if shard is not None:
        env["shard"] = list(shard)
    record_environment(out, env)

    writer = writer_name(shard)
    read_rows(rows_path(out, shard), repair=True)  # cut a write that a kill left half-done (this writer's file)
    done = {r["key"] for r in run_rows(out)}
    start = time.perf_counter()
    previous = previous_elapsed(out, writer)
    units = planned if shard is None else planned[shard[0] :: shard[1]]

    def unit_done(unit: Unit, keys: set[str]) -> bool:
        return all(unit.key(q, run) in keys for q in range(unit.n_questions) for run in runs)

    log = RowLog(rows_path(out, shard))
    evaluator = Evaluator(config, runs, model, tokenizer, log, done, on_row)
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
                record_elapsed(out, writer, previous + time.perf_counter() - start)
                write_summary(out, run_rows(out), False)
        complete = True
    finally:
        bar.close()
        log.close()
        record_elapsed(out, writer, previous + time.perf_counter() - start)
        rows = run_rows(out)
        keys = {r["key"] for r in rows}
        # complete: every unit of the plan has its rows, whichever process wrote them
        groups = write_summary(out, rows, complete and all(unit_done(unit, keys) for unit in planned))
    say(format_summary(groups))
    return groups
