"""The plan of a sweep: its *units*, one sample (or LM document) in one mode, in the order they run.

A unit is the work that shares a prefill: every method x budget of the sweep on one sample's questions. Its rows'
keys (``task|L<length>|<sample>|q<question>|<mode>|<method>|<budget>``) are what a resumed run looks for, and a
shard runs the units whose index in the plan is its own modulo the shard count. Lengths beyond the model's window
(``max_position_embeddings``) plan units whose rows are ``status: skipped`` with the reason when no method of the
sweep can extrapolate (``Method.extrapolates``), without building their samples.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvsieve.eval.config import LM_TASK, EvalConfig, MethodRun
from kvsieve.eval.tasks import TASKS, LMDoc, Sample, lm_documents, load_benchmark_file, make_task
from kvsieve.eval.tasks.base import make_sample_id

__all__ = ["LM_MODE", "Unit", "beyond_window_reason", "plan_units"]

LM_MODE = "lm"


@dataclass
class Unit:
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


def plan_units(config: EvalConfig, runs: list[MethodRun], tokenizer, window: int | None) -> list[Unit]:
    """Every unit of the sweep, in the order they run: per task, length, sample and mode, then the data files'.
    ``window``: the model's trained context (None: unbounded)."""
    units: list[Unit] = []
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
                    units.append(Unit(task, length, LM_MODE, sample_id, i, doc=doc, skip_reason=reason))
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
                        Unit(
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
                        Unit(sample.task, length, mode, sample.sample_id, i, sample, n_questions=len(sample.questions))
                    )
    return units


def beyond_window_reason(tokens: int, window: int) -> str:
    """The ``reason`` of a row skipped because ``tokens`` positions exceed the model's ``window``."""
    return (
        f"{tokens} positions exceed the model's window of {window} tokens (max_position_embeddings) and the method "
        "cannot extrapolate"
    )
