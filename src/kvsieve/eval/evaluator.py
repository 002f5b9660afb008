"""Running one unit of a sweep (`kvsieve.eval.plan.Unit`): prefills, questions, decoding, scoring, and its rows.

Within a unit:

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

Every row is appended to the run's rows file as it finishes (`kvsieve.eval.rundir.RowLog`); a row whose key is
already done is not computed again.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvsieve.driver import Driver, KVSnapshot, Timings
from kvsieve.eval.config import LM_TASK, MethodRun
from kvsieve.eval.metrics import score_sample
from kvsieve.eval.plan import LM_MODE, Unit, beyond_window_reason
from kvsieve.eval.rundir import RowLog
from kvsieve.eval.tasks import Sample, render
from kvsieve.generate import CompressedContext, decode, eos_ids
from kvsieve.methods.base import PromptLayout
from kvsieve.models import trained_window
from kvsieve.prefill_sharing import shared_prefill, shares_prefill

__all__ = ["TIMING_FIELDS", "Evaluator"]

# Fields that measure time: they differ between runs of the same configuration; everything else must not.
TIMING_FIELDS = ("prefill_s", "decode_s_per_token")


@dataclass
class _Prepared:
    """A cache right after its prompt (compressed), ready to read a question or decode."""

    driver: Driver
    logits: torch.Tensor
    prefill_s: float  # this cache's prompt (a shared prefill: the shared forward plus the method's own hooks)
    snapshot: KVSnapshot
    shared: bool


class Evaluator:
    """Runs units of one sweep (`run_unit`) and writes their rows to ``log``; ``done``: the keys already written
    (updated as rows are), ``on_row(row)``: called after each row is written."""

    def __init__(self, config, runs, model, tokenizer, log: RowLog, done: set[str], on_row) -> None:
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
    def emit(self, unit: Unit, question: int, run: MethodRun, fields: dict[str, Any]) -> None:
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

    def skip(self, unit: Unit, question: int, run: MethodRun, reason: str, **extra) -> None:
        self.emit(unit, question, run, {"status": "skipped", "reason": reason, **extra})

    def todo(self, unit: Unit, question: int) -> list[MethodRun]:
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
                layout = PromptLayout.question_after(len(context), len(question))
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
    def run_qa(self, unit: Unit) -> None:
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
            compressed = {
                run: CompressedContext.of_ids(self.model, self.tokenizer, context, item.driver)
                for run, item in base.items()
            }
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
                    driver, logits = compressed[run].ask(question, reuse=remaining[run] == 0)
                    used = dataclasses.replace(item, driver=driver)
                    seconds = item.prefill_s + driver.timings.question_s
                    self.finish(unit, q, run, sample, used, logits, seconds, len(context), len(question))

    def finish(
        self,
        unit: Unit,
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
    def run_lm(self, unit: Unit) -> None:
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

    def run_unit(self, unit: Unit) -> None:
        if unit.skip_reason is not None:
            for q in range(unit.n_questions):
                for run in self.todo(unit, q):
                    self.skip(unit, q, run, unit.skip_reason)
            return
        if unit.mode == LM_MODE:
            self.run_lm(unit)
        else:
            self.run_qa(unit)
