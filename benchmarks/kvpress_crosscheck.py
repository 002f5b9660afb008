"""Cross-check kvsieve's SnapKV and StreamingLLM against NVIDIA kvpress on identical token ids.

Query-agnostic use, as kvpress's pipeline does it: the context is prefilled and compressed alone, then the question
is fed and the answer decoded greedily. For every prompt and cell (a kvsieve configuration paired with a kvpress
press) the script records, per layer and KV head, the original positions each library keeps right after
compression and the greedy answer, and reports the overlap ``|kept_kvsieve & kept_kvpress| / max(|kept_kvsieve|,
|kept_kvpress|)`` (the budget when both keep the same number) and whether the answers agree.

kvpress (0.5.5) needs transformers < 5.3, so it runs in its own virtualenv: this driver (kvsieve's venv) writes
the prompts' token ids to a JSON file and drives ``benchmarks/kvpress_worker.py`` in the kvpress venv over
stdin/stdout. Both load the same converted checkpoint directory in float32 with sdpa attention and the same number
of torch threads. ``--timing`` adds prefill s, decode ms/token and K/V bytes for the timed cells (the full cache,
matched SnapKV, StreamingLLM), alternating the two libraries on the same ids, and the ratios kvsieve/kvpress.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kvpress_crosscheck.py --threads 1 \\
        --out docs/results/kvpress_crosscheck.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "kvpress_worker.py"
DEFAULT_KVPRESS_PYTHON = "/work/venvs/kvpress/bin/python"

# kvpress 0.5.5's own defaults, written out so that a changed default cannot silently change the comparison.
KVPRESS_SNAPKV = {"window_size": 64, "kernel_size": 5}
KVPRESS_STREAMING = {"n_sink": 4}
REGIONS = ("start", "window_edge", "between_windows", "interior")  # see classify_differences


# ------------------------------------------------------------------------------------------ overlap arithmetic
def n_kept_kvpress(n_tokens: int, compression_ratio: float) -> int:
    """Entries per KV head that kvpress keeps of ``n_tokens``: ``max(1, int(n * (1 - ratio)))`` (a truncation;
    kvsieve rounds a fractional budget instead)."""
    return max(1, int(n_tokens * (1 - compression_ratio)))


def overlap(a: Sequence[int], b: Sequence[int]) -> float:
    """``|A & B| / max(|A|, |B|)`` of two position sets (1.0 when both are empty)."""
    size = max(len(a), len(b))
    return 1.0 if size == 0 else len(set(a) & set(b)) / size


def compare_kept(a: Sequence[Sequence[Sequence[int]]], b: Sequence[Sequence[Sequence[int]]]) -> dict[str, Any]:
    """Overlaps of two ``[layer][kv_head] -> positions`` records: per pair, their mean and minimum, and how many
    pairs are identical."""
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)):
        raise ValueError("the two records have different numbers of layers or KV heads")
    per_pair = [[overlap(x, y) for x, y in zip(la, lb)] for la, lb in zip(a, b)]
    flat = [v for layer in per_pair for v in layer]
    identical = sum(set(x) == set(y) for la, lb in zip(a, b) for x, y in zip(la, lb))
    return {
        "mean": statistics.fmean(flat),
        "min": min(flat),
        "identical_pairs": identical,
        "pairs": len(flat),
        "per_layer_mean": [statistics.fmean(layer) for layer in per_pair],
    }


def classify_differences(
    a: Sequence[Sequence[Sequence[int]]],
    b: Sequence[Sequence[Sequence[int]]],
    n_tokens: int,
    window_starts: Sequence[int],
    margin: int,
) -> dict[str, dict[str, int]]:
    """Where the positions kept by only one side lie, summed over layers and heads: ``{region: {"a_only": .,
    "b_only": .}}``.

    Regions: ``start``, the first ``margin`` tokens of the prompt (pooling sees padding there); ``window_edge``,
    the ``margin`` tokens before one of ``window_starts`` (pooling sees padding or the observation window);
    ``between_windows``, between the smallest and the largest window start (kept as window by one side, scored by
    the other); ``interior``, anywhere else.
    """
    lo, hi = (min(window_starts), max(window_starts)) if window_starts else (n_tokens, n_tokens)
    counts = {region: {"a_only": 0, "b_only": 0} for region in REGIONS}
    for la, lb in zip(a, b):
        for x, y in zip(la, lb):
            sx, sy = set(x), set(y)
            for p in sx ^ sy:
                if p < margin:
                    region = "start"
                elif any(s - margin <= p < s for s in window_starts):
                    region = "window_edge"
                elif lo <= p < hi:
                    region = "between_windows"
                else:
                    region = "interior"
                counts[region]["a_only" if p in sx else "b_only"] += 1
    return counts


# ------------------------------------------------------------------------------------------------ the cells
@dataclass(frozen=True)
class KvsieveRun:
    """A kvsieve configuration: ``build(n_context)`` returns the method (budgets may depend on the length)."""

    name: str
    build: Callable[[int], Any]
    window: int | None = None
    kernel: int | None = None


@dataclass(frozen=True)
class KvpressRun:
    """A kvpress press by short name (``full``, ``snapkv``, ``streamingllm``) and its options."""

    name: str
    press: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def window(self) -> int | None:
        return self.params.get("window_size")

    @property
    def kernel(self) -> int | None:
        return self.params.get("kernel_size")


@dataclass(frozen=True)
class Cell:
    """One row of the report: a kvsieve run compared with a kvpress run."""

    label: str
    budget: float | None
    kvsieve: KvsieveRun
    kvpress: KvpressRun
    timed: bool = False


def make_cells(budgets: Sequence[float]) -> list[Cell]:
    """The cells: the full cache; per budget SnapKV (each library's defaults, then kvsieve step by step moved to
    kvpress's window, kernel, pooling kind and budget rounding, and both without pooling) and
    StreamingLLM (kvsieve's rolling cap, and a one-shot cap like kvpress's)."""
    import kvsieve

    w, k = KVPRESS_SNAPKV["window_size"], KVPRESS_SNAPKV["kernel_size"]
    snapkv_defaults = {
        f.name: f.default for f in dataclasses.fields(kvsieve.method("snapkv")) if f.name != "budget"
    }  # window_size, kernel_size, pooling, gqa_reduce
    cells = [Cell("full", None, KvsieveRun("full", lambda n: kvsieve.method("full")), KvpressRun("full", "full"), True)]
    for b in budgets:
        ratio = 1 - b
        press_snap = KvpressRun(f"snapkv@{b}", "snapkv", {"compression_ratio": ratio, **KVPRESS_SNAPKV})
        press_snap_k1 = KvpressRun(
            f"snapkv-k1@{b}", "snapkv", {"compression_ratio": ratio, **KVPRESS_SNAPKV, "kernel_size": 1}
        )
        press_stream = KvpressRun(
            f"streamingllm@{b}", "streamingllm", {"compression_ratio": ratio, **KVPRESS_STREAMING}
        )

        def exact(n: int, ratio: float = ratio) -> int:
            return n_kept_kvpress(n, ratio)

        cells += [
            Cell(
                "snapkv: each library's defaults",
                b,
                KvsieveRun(
                    f"snapkv@{b}",
                    lambda n, b=b: kvsieve.method("snapkv", budget=b),
                    snapkv_defaults["window_size"],
                    snapkv_defaults["kernel_size"],
                ),
                press_snap,
            ),
            Cell(
                f"snapkv: kvsieve w={w} k={k} max, kvpress's budget",
                b,
                KvsieveRun(
                    f"snapkv-w{w}k{k}-max@{b}",
                    lambda n, e=exact: kvsieve.method(
                        "snapkv", budget=e(n), window_size=w, kernel_size=k, pooling="max", gqa_reduce="mean"
                    ),
                    w,
                    k,
                ),
                press_snap,
            ),
            Cell(
                f"snapkv: kvsieve w={w} k={k} avg, kvpress's budget (matched)",
                b,
                KvsieveRun(
                    f"snapkv-w{w}k{k}-avg@{b}",
                    lambda n, e=exact: kvsieve.method(
                        "snapkv", budget=e(n), window_size=w, kernel_size=k, pooling="avg", gqa_reduce="mean"
                    ),
                    w,
                    k,
                ),
                press_snap,
                timed=True,
            ),
            Cell(
                f"snapkv: both w={w} k=1 (no pooling), kvpress's budget",
                b,
                KvsieveRun(
                    f"snapkv-w{w}k1@{b}",
                    lambda n, e=exact: kvsieve.method(
                        "snapkv", budget=e(n), window_size=w, kernel_size=1, pooling="avg", gqa_reduce="mean"
                    ),
                    w,
                    1,
                ),
                press_snap_k1,
            ),
            Cell(
                "streamingllm: kvsieve rolling cap, kvpress's budget",
                b,
                KvsieveRun(
                    f"streamingllm@{b}",
                    lambda n, e=exact: kvsieve.method("streamingllm", budget=e(n), n_sink=KVPRESS_STREAMING["n_sink"]),
                ),
                press_stream,
                timed=True,
            ),
            Cell(
                "streamingllm: kvsieve one-shot cap, kvpress's budget",
                b,
                KvsieveRun(
                    f"streamingllm-oneshot@{b}",
                    lambda n, e=exact: kvsieve.method(
                        "streamingllm", budget=e(n), n_sink=KVPRESS_STREAMING["n_sink"], rolling=False
                    ),
                ),
                press_stream,
            ),
        ]
    return cells


# ------------------------------------------------------------------------------------------------ prompts
def build_prompts(tokenizer, tasks: Sequence[str], length: int, depths: Sequence[float], seed: int) -> list[dict]:
    """One sample per task and depth, rendered as ``kvsieve eval`` renders it (the chat template, split right after
    the context): the context ids are compressed, the question ids follow."""
    from kvsieve.eval.tasks import make_task, render

    prompts = []
    for task in tasks:
        samples = make_task(task, tokenizer, length=length, n_samples=1, seed=seed, depths=list(depths))
        for depth, sample in zip(depths, samples):
            context, question = render(sample, 0, tokenizer).encode(tokenizer)
            prompts.append(
                {
                    "task": task,
                    "depth": depth,
                    "seed": seed,
                    "answers": list(sample.questions[0].answers),
                    "context_ids": context,
                    "question_ids": question,
                }
            )
    return prompts


# ------------------------------------------------------------------------------------------------ kvsieve side
def _top5(logits: torch.Tensor) -> list[list[float]]:
    values, ids = logits[0].float().topk(5)
    return [[int(i), float(v)] for i, v in zip(ids, values)]


@torch.inference_mode()
def run_kvsieve(
    model, tokenizer, prompt: dict, runs: Sequence[KvsieveRun], max_new_tokens: int, shared: bool
) -> dict[str, dict]:
    """Compress the context with every run (one shared prefill, or each its own), record the kept positions per
    layer and KV head, then feed the question and decode greedily; timings as ``kvsieve eval`` measures them."""
    from kvsieve.driver import Driver
    from kvsieve.generate import decode, eos_ids
    from kvsieve.prefill_sharing import shared_prefill

    context, question = prompt["context_ids"], prompt["question_ids"]
    n = len(context)
    reserve = len(question) + max_new_tokens + 1
    methods = {run.name: run.build(n) for run in runs}
    drivers: dict[str, tuple[Driver, float]] = {}
    if shared:
        compressing = [name for name, m in methods.items() if m.name != "full"]
        result = shared_prefill(model, [methods[name] for name in compressing], context, None, reserve=reserve)
        for name, m in methods.items():
            if m.name == "full":
                drivers[name] = (Driver(model, result.full), result.shared_s)
        for name, cache, seconds in zip(compressing, result.caches, result.method_s):
            drivers[name] = (Driver(model, cache), result.shared_s + seconds)
    else:
        for name, m in methods.items():
            driver = Driver.new(model, m, n, reserve=reserve)
            driver.prefill(context)
            drivers[name] = (driver, driver.timings.prefill_s)
    stops = eos_ids(model, tokenizer)
    out = {}
    for name, (driver, context_s) in drivers.items():
        snapshot = driver.snapshot()
        kept = [layer.policy.store.positions[0].sort(dim=-1).values.tolist() for layer in driver.cache.sieve_layers]
        logits = driver.question(question)
        top5 = _top5(logits)
        tokens = decode(driver, logits, max_new_tokens, stop_ids=stops)
        out[name] = {
            "tokens": tokens,
            "text": tokenizer.decode(tokens, skip_special_tokens=True),
            "top5": top5,
            "n_kept": [len(layer[0]) for layer in kept],
            "kept": kept,
            "kv_bytes": snapshot.bytes,
            "prefill_s": context_s + driver.timings.question_s,
            "decode_s_per_token": driver.timings.decode_s_per_token,
        }
    return out


# ------------------------------------------------------------------------------------------------ kvpress side
class KvpressWorker:
    """``benchmarks/kvpress_worker.py`` in the kvpress venv: one JSON request a line in, one result a line out."""

    def __init__(self, python: str, model_dir: str, prompts_file: Path, threads: int, log_file: Path) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        env.pop("PYTHONPATH", None)  # nothing of kvsieve's environment leaks into the other venv
        self.log_file = log_file
        self._log = log_file.open("w")
        command = [python, str(WORKER), "--model", model_dir, "--prompts", str(prompts_file)]
        command += ["--threads", str(threads)]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env
        )
        self.versions = self._read()["versions"]
        self._next = 0

    def _read(self) -> dict[str, Any]:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the kvpress worker exited (code {self.process.poll()}); see {self.log_file}")
        return json.loads(line)

    def run(self, prompt: int, run: KvpressRun, max_new_tokens: int, record: bool = True) -> dict[str, Any]:
        self._next += 1
        request = {
            "id": self._next,
            "prompt": prompt,
            "press": run.press,
            "params": run.params,
            "max_new_tokens": max_new_tokens,
            "record": record,
        }
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        result = self._read()
        if "error" in result:
            raise RuntimeError(f"kvpress worker, {run.name} on prompt {prompt}: {result['error']}")
        return result

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write(json.dumps({"quit": True}) + "\n")
            self.process.stdin.flush()
            self.process.wait(timeout=60)
        self._log.close()


# ------------------------------------------------------------------------------------------------ reporting
def compare_cell(cell: Cell, prompt: dict, mine: dict, theirs: dict) -> dict[str, Any]:
    """Overlap, where the differences lie, kept counts, answers and the first step's logits for one prompt."""
    n = len(prompt["context_ids"])
    kept = compare_kept(mine["kept"], theirs["kept"])
    windows = [n - w for w in (cell.kvsieve.window, cell.kvpress.window) if w]
    kernels = [k for k in (cell.kvsieve.kernel, cell.kvpress.kernel) if k]
    where = classify_differences(mine["kept"], theirs["kept"], n, windows, max(kernels, default=1) // 2)
    same_top = mine["top5"][0][0] == theirs["top5"][0][0]
    return {
        "overlap": kept,
        "differences": where,
        "n_kept_kvsieve": mine["n_kept"][0],
        "n_kept_kvpress": theirs["n_kept"][0],
        "text_kvsieve": mine["text"],
        "text_kvpress": theirs["text"],
        "same_answer": mine["text"].strip() == theirs["text"].strip(),
        "correct_kvsieve": any(a in mine["text"] for a in prompt["answers"]),
        "correct_kvpress": any(a in theirs["text"] for a in prompt["answers"]),
        "top1_logit_diff": abs(mine["top5"][0][1] - theirs["top5"][0][1]) if same_top else None,
    }


def summarize(cells: Sequence[Cell], rows: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """Per cell over prompts: mean and min overlap, identical pairs, kept counts, answer agreement."""
    out = []
    for i, cell in enumerate(cells):
        per_prompt = rows[str(i)]
        diffs = {
            region: {side: sum(r["differences"][region][side] for r in per_prompt) for side in ("a_only", "b_only")}
            for region in REGIONS
        }
        logit = [r["top1_logit_diff"] for r in per_prompt if r["top1_logit_diff"] is not None]
        out.append(
            {
                "cell": cell.label,
                "budget": cell.budget,
                "kvsieve": cell.kvsieve.name,
                "kvpress": cell.kvpress.name,
                "kvpress_params": cell.kvpress.params,
                "mean_overlap": statistics.fmean(r["overlap"]["mean"] for r in per_prompt),
                "min_overlap": min(r["overlap"]["min"] for r in per_prompt),
                "identical_pairs": sum(r["overlap"]["identical_pairs"] for r in per_prompt),
                "pairs": sum(r["overlap"]["pairs"] for r in per_prompt),
                "n_kept": sorted({(r["n_kept_kvsieve"], r["n_kept_kvpress"]) for r in per_prompt}),
                "differences": diffs,
                "same_answers": sum(r["same_answer"] for r in per_prompt),
                "correct_kvsieve": sum(r["correct_kvsieve"] for r in per_prompt),
                "correct_kvpress": sum(r["correct_kvpress"] for r in per_prompt),
                "prompts": len(per_prompt),
                "max_top1_logit_diff": max(logit) if logit else None,
            }
        )
    return out


def markdown_table(summary: Sequence[dict[str, Any]]) -> str:
    """The overlap table, one row per cell."""
    lines = [
        "| cell | budget | mean overlap | min overlap | identical (layer, head) | kept kvsieve/kvpress "
        "| kept by kvsieve only / kvpress only: start; window edge; between windows; interior | same answer "
        "| correct kvsieve / kvpress | max top-1 logit diff |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        budget = "-" if s["budget"] is None else f"{s['budget']:.0%}"
        kept = ", ".join(f"{a}/{b}" for a, b in s["n_kept"])
        if len(kept) > 40:
            kept = f"{s['n_kept'][0][0]}/{s['n_kept'][0][1]} .. {s['n_kept'][-1][0]}/{s['n_kept'][-1][1]}"
        d = "; ".join(f"{s['differences'][r]['a_only']} / {s['differences'][r]['b_only']}" for r in s["differences"])
        logit = "-" if s["max_top1_logit_diff"] is None else f"{s['max_top1_logit_diff']:.1e}"
        lines.append(
            f"| {s['cell']} | {budget} | {s['mean_overlap']:.2%} | {s['min_overlap']:.2%} "
            f"| {s['identical_pairs']}/{s['pairs']} | {kept} | {d} "
            f"| {s['same_answers']}/{s['prompts']} | {s['correct_kvsieve']} / {s['correct_kvpress']} | {logit} |"
        )
    return "\n".join(lines)


def answers_table(prompts: Sequence[dict], cells: Sequence[Cell], rows: dict[str, list[dict]]) -> str:
    """Every answer that differs between the libraries."""
    lines = ["| prompt | cell | budget | kvsieve | kvpress |", "|---|---|---|---|---|"]
    for i, cell in enumerate(cells):
        for p, r in zip(prompts, rows[str(i)]):
            if not r["same_answer"]:
                budget = "-" if cell.budget is None else f"{cell.budget:.0%}"
                lines.append(
                    f"| {p['task']} d={p['depth']} | {cell.label} | {budget} | {r['text_kvsieve'].strip()!r} "
                    f"| {r['text_kvpress'].strip()!r} |"
                )
    return "\n".join(lines) if len(lines) > 2 else "(every answer agrees)"


def timing_table(timing: Sequence[dict[str, Any]]) -> str:
    """Median prefill, decode and K/V bytes per library, and the ratio kvsieve/kvpress per cell: the median of the
    ratios paired within one prompt and repetition, with their range over the pairs."""
    lines = [
        "| cell | budget | prefill s kvsieve / kvpress | ratio (range) | decode ms/token kvsieve / kvpress "
        "| ratio (range) | KV MB kvsieve / kvpress | pairs |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ratio(t: dict[str, Any], key: str) -> str:
        paired = t.get("paired", {}).get(key)
        if not paired:
            return f"{t['kvsieve'][key] / t['kvpress'][key]:.2f}"
        return f"{statistics.median(paired):.2f} ({min(paired):.2f}-{max(paired):.2f})"

    for t in timing:
        budget = "-" if t["budget"] is None else f"{t['budget']:.0%}"
        a, b = t["kvsieve"], t["kvpress"]
        n_pairs = len(t.get("paired", {}).get("prefill_s", []))
        lines.append(
            f"| {t['cell']} | {budget} | {a['prefill_s']:.2f} / {b['prefill_s']:.2f} | {ratio(t, 'prefill_s')}"
            f" | {1e3 * a['decode_s_per_token']:.1f} / {1e3 * b['decode_s_per_token']:.1f}"
            f" | {ratio(t, 'decode_s_per_token')}"
            f" | {a['kv_bytes'] / 2**20:.1f} / {b['kv_bytes'] / 2**20:.1f} | {n_pairs} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def crosscheck(
    model, tokenizer, worker: KvpressWorker, prompts: list[dict], cells: list[Cell], max_new: int
) -> dict[str, list[dict]]:
    """The overlap and answer comparison: one shared kvsieve prefill per prompt, one kvpress run per press."""
    kvsieve_runs = list({c.kvsieve.name: c.kvsieve for c in cells}.values())
    kvpress_runs = list({c.kvpress.name: c.kvpress for c in cells}.values())
    rows: dict[str, list[dict]] = {str(i): [] for i in range(len(cells))}
    for p, prompt in enumerate(prompts):
        start = time.perf_counter()
        mine = run_kvsieve(model, tokenizer, prompt, kvsieve_runs, max_new, shared=True)
        middle = time.perf_counter()
        theirs = {run.name: worker.run(p, run, max_new) for run in kvpress_runs}
        print(
            f"prompt {p + 1}/{len(prompts)} ({prompt['task']}, depth {prompt['depth']}, "
            f"{len(prompt['context_ids'])}+{len(prompt['question_ids'])} tokens): kvsieve {middle - start:.0f} s, "
            f"kvpress {time.perf_counter() - middle:.0f} s",
            flush=True,
        )
        for i, cell in enumerate(cells):
            rows[str(i)].append(compare_cell(cell, prompt, mine[cell.kvsieve.name], theirs[cell.kvpress.name]))
    return rows


def timings(
    model, tokenizer, worker: KvpressWorker, prompts: list[dict], cells: list[Cell], max_new: int, repeats: int
) -> list[dict[str, Any]]:
    """Each timed cell on each prompt ``repeats`` times, each run with its own prefill, the two libraries
    alternating which goes first; medians over prompts and repeats."""
    timed = [c for c in cells if c.timed]
    samples: dict[int, dict[str, list[dict]]] = {i: {"kvsieve": [], "kvpress": []} for i in range(len(timed))}
    for p, prompt in enumerate(prompts):
        for r in range(repeats):
            for i, cell in enumerate(timed):
                order = ["kvsieve", "kvpress"] if (p + r + i) % 2 == 0 else ["kvpress", "kvsieve"]
                for side in order:
                    if side == "kvsieve":
                        result = run_kvsieve(model, tokenizer, prompt, [cell.kvsieve], max_new, shared=False)
                        samples[i]["kvsieve"].append(result[cell.kvsieve.name])
                    else:
                        samples[i]["kvpress"].append(worker.run(p, cell.kvpress, max_new, record=False))
        print(f"timing: prompt {p + 1}/{len(prompts)} done", flush=True)
    out = []
    for i, cell in enumerate(timed):
        entry: dict[str, Any] = {"cell": cell.label, "budget": cell.budget}
        for side in ("kvsieve", "kvpress"):
            runs = samples[i][side]
            entry[side] = {
                key: statistics.median(x[key] for x in runs if x[key] is not None)
                for key in ("prefill_s", "decode_s_per_token", "kv_bytes")
            }
            entry[side]["runs"] = len(runs)
        pairs = list(zip(samples[i]["kvsieve"], samples[i]["kvpress"]))  # same prompt and repetition
        entry["paired"] = {
            key: [a[key] / b[key] for a, b in pairs if a[key] is not None and b[key]]
            for key in ("prefill_s", "decode_s_per_token")
        }
        out.append(entry)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model", default="qwen2.5-coder-0.5b", help="kvsieve model alias or checkpoint directory")
    parser.add_argument("--tasks", nargs="+", default=["niah_single_2", "passkey"], help="kvsieve task generators")
    parser.add_argument("--length", type=int, default=2048, help="prompt length in tokens (task generator target)")
    parser.add_argument("--depths", nargs="+", type=float, default=[0.1, 0.5, 0.9], help="needle depths")
    parser.add_argument("--seed", type=int, default=0, help="task generator seed")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.2, 0.5], help="kept fraction of the context")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="greedy answer length cap")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both libraries")
    parser.add_argument("--kvpress-python", default=DEFAULT_KVPRESS_PYTHON, help="python of the kvpress venv")
    parser.add_argument(
        "--work-dir", default="/tmp/kvpress_crosscheck", help="the token-id file (prompts.json) and the worker log"
    )
    parser.add_argument("--out", default=None, metavar="FILE", help="write the summary (and timings) here (JSON)")
    parser.add_argument("--json", dest="out", help=argparse.SUPPRESS)  # the old name of --out
    parser.add_argument("--timing", action="store_true", help="also time the timed cells, alternating libraries")
    parser.add_argument("--repeats", type=int, default=1, help="timing repeats per prompt and cell")
    parser.add_argument("--skip-crosscheck", action="store_true", help="only the timings (with --timing)")
    args = parser.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    import kvsieve

    hf_logging.disable_progress_bar()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model, tokenizer = kvsieve.load_model(args.model, dtype=torch.float32)
    model_dir = str(Path(model.name_or_path).resolve())
    prompts = build_prompts(tokenizer, args.tasks, args.length, args.depths, args.seed)
    prompts_file = work / "prompts.json"
    prompts_file.write_text(json.dumps({"model_dir": model_dir, "prompts": prompts}))
    cells = make_cells(args.budgets)
    import transformers

    versions = {
        "kvsieve": kvsieve.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
    }
    worker = KvpressWorker(args.kvpress_python, model_dir, prompts_file, args.threads, work / "worker.log")
    report: dict[str, Any] = {
        "args": vars(args),
        "model_dir": model_dir,
        "versions": {"kvsieve_side": versions, "kvpress_side": worker.versions},
        "prompts": [
            {k: p[k] for k in ("task", "depth", "seed", "answers")}
            | {"context_tokens": len(p["context_ids"]), "question_tokens": len(p["question_ids"])}
            for p in prompts
        ],
    }
    print(f"kvsieve side: {versions}\nkvpress side: {worker.versions}\nmodel: {model_dir}", flush=True)
    try:
        if not args.skip_crosscheck:
            rows = crosscheck(model, tokenizer, worker, prompts, cells, args.max_new_tokens)
            summary = summarize(cells, rows)
            report |= {"summary": summary, "rows": rows}
            print(markdown_table(summary))
            print()
            print(answers_table(prompts, cells, rows))
        if args.timing:
            report["timing"] = timings(model, tokenizer, worker, prompts, cells, args.max_new_tokens, args.repeats)
            print(timing_table(report["timing"]))
    finally:
        worker.close()
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
