"""Loaders for benchmark files that users bring: LongBench (v1 and -E), InfiniteBench and RULER JSONL.

None of these datasets can be downloaded here; users point kvsieve at their own copies. Every row becomes a
`Sample` whose template reproduces the benchmark's prompt exactly (raw rendering), split right after the context.
A malformed row raises `DataFormatError` naming the file, the 1-based line and the problem.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .base import QA, PromptTemplate, Sample, TokenizerLike, encode, render
from .infinitebench import (
    ANSWER_PREFIXES,
    INFINITEBENCH_MAX_NEW_TOKENS,
    INFINITEBENCH_METRICS,
    INFINITEBENCH_TEMPLATES,
    KV_ANSWER_PREFIX,
)
from .longbench import (
    LONGBENCH_E_TASKS,
    LONGBENCH_FIRST_LINE_TASKS,
    LONGBENCH_MAX_NEW_TOKENS,
    LONGBENCH_METRICS,
    LONGBENCH_TEMPLATES,
    longbench_length_bucket,
)
from .ruler import RULER_ANSWER_PREFIXES, RULER_MAX_NEW_TOKENS, ruler_family

__all__ = ["BENCHMARKS", "DataFormatError", "load_benchmark_file", "truncate_middle"]

BENCHMARKS = ("longbench", "longbench-e", "infinitebench", "ruler")

# Where the context ends and the question starts in a RULER input: (last header end, last question start).
_RULER_MARKERS: dict[str, tuple[str, str]] = {
    "niah": ("afterwards.\n", "\nWhat "),
    "vt": ("hidden in the following text.\n\n", "\nQuestion: Find all variables"),
    "cwe": ("Memorize the ones that appear most often.\n", "\nQuestion: What are the 10 most common words"),
    "fwe": ("Find the three most frequently appeared coded words. ", "\nQuestion: Do not provide any explanation."),
    "qa": ("The following are given documents.\n\n", "\n\nAnswer the question based on the given documents."),
}


class DataFormatError(ValueError):
    """A benchmark file that does not have the published format; the message names file, line and problem."""


def _fail(path: Path, line: int | None, message: str) -> DataFormatError:
    where = f"{path}:{line}" if line is not None else str(path)
    return DataFormatError(f"{where}: {message}")


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                problem = f"not UTF-8 text (byte {raw[error.start]:#04x} at offset {error.start} of the line)"
                raise _fail(path, number, problem) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                # json's messages can end in "at" ("Unterminated string starting at"): no doubled word
                raise _fail(
                    path, number, f"invalid JSON ({error.msg.removesuffix(' at')} at column {error.colno})"
                ) from None
            if not isinstance(row, dict):
                raise _fail(path, number, f"expected a JSON object, got {type(row).__name__}")
            yield number, row


def _field(row: dict, name: str, kind: type | tuple[type, ...], path: Path, line: int, benchmark: str) -> Any:
    if name not in row:
        raise _fail(path, line, f"missing field {name!r} (a {benchmark} row needs it); fields: {sorted(row)}")
    value = row[name]
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise _fail(path, line, f"field {name!r} must be {expected}, got {type(value).__name__}")
    return value


def _string_list(row: dict, name: str, path: Path, line: int, benchmark: str) -> tuple[str, ...]:
    value = _field(row, name, list, path, line, benchmark)
    if not value or not all(isinstance(v, str) for v in value):
        raise _fail(path, line, f"field {name!r} must be a non-empty list of strings")
    return tuple(value)


def _closest(name: str, names) -> str:
    return ", ".join(difflib.get_close_matches(name, list(names), n=3, cutoff=0.4)) or ", ".join(sorted(names))


def _detect(row: dict, path: Path, line: int) -> str:
    if "outputs" in row and "input" in row:
        return "ruler"
    if "answers" in row and "context" in row:
        name = str(row.get("dataset", path.stem))
        return "longbench-e" if name.endswith("_e") or path.stem.endswith("_e") else "longbench"
    if "answer" in row and "context" in row:
        return "infinitebench"
    raise _fail(path, line, f"cannot tell the benchmark from the fields {sorted(row)}; pass benchmark=")


def load_benchmark_file(
    path: str | Path,
    benchmark: str | None = None,
    task: str | None = None,
    *,
    tokenizer: TokenizerLike | None = None,
    max_length: int | None = None,
    group_by_context: bool = False,
) -> list[Sample]:
    """Read one JSONL file of LongBench (v1 or -E), InfiniteBench or RULER (the prepare script's output).

    benchmark: longbench | longbench-e | infinitebench | ruler, or None to detect it from the first row's fields.
    task: the task name; by default the row's `dataset` (LongBench), the file name (InfiniteBench) or the parent
    folder (RULER writes <task>/validation.jsonl). With `tokenizer` and `max_length`, prompts longer than
    max_length tokens keep their head and tail as pred.py does (`truncate_middle`). `group_by_context` merges rows
    that share a context into one sample with several questions (one prefill, several questions).
    """
    path = Path(path)
    if benchmark is not None and benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose from {list(BENCHMARKS)}")
    if (tokenizer is None) != (max_length is None):
        raise ValueError("truncation needs both tokenizer and max_length")
    if not path.is_file():
        raise FileNotFoundError(f"no such benchmark file: {path}")
    samples: list[Sample] = []
    for line, row in _rows(path):
        kind = benchmark or _detect(row, path, line)
        if kind in ("longbench", "longbench-e"):
            sample = _longbench_sample(row, path, line, task, kind == "longbench-e")
        elif kind == "infinitebench":
            sample = _infinitebench_sample(row, path, line, task)
        else:
            sample = _ruler_sample(row, path, line, task)
        if tokenizer is not None:
            sample = truncate_middle(sample, tokenizer, max_length)
        samples.append(sample)
    if not samples:
        raise _fail(path, None, "no rows")
    return _group_by_context(samples) if group_by_context else samples


def _longbench_sample(row: dict, path: Path, line: int, task: str | None, longbench_e: bool) -> Sample:
    question = _field(row, "input", str, path, line, "LongBench")
    context = _field(row, "context", str, path, line, "LongBench")
    answers = _string_list(row, "answers", path, line, "LongBench")
    name = task or row.get("dataset") or path.stem
    if not isinstance(name, str):
        raise _fail(path, line, f"field 'dataset' must be str, got {type(name).__name__}")
    if name.endswith("_e") and name[:-2] in LONGBENCH_TEMPLATES:
        name, longbench_e = name[:-2], True
    if name not in LONGBENCH_TEMPLATES:
        raise _fail(path, line, f"unknown LongBench task {name!r}; closest: {_closest(name, LONGBENCH_TEMPLATES)}")
    if longbench_e and name not in LONGBENCH_E_TASKS:
        raise _fail(path, line, f"{name} is not a LongBench-E task; LongBench-E has {sorted(LONGBENCH_E_TASKS)}")
    meta: dict[str, Any] = {"benchmark": "longbench-e" if longbench_e else "longbench", "line": line}
    for key in ("_id", "language", "length"):
        if key in row:
            meta[key] = row[key]
    if isinstance(row.get("length"), int):
        meta["length_bucket"] = longbench_length_bucket(row["length"])
    if LONGBENCH_METRICS[name] == "classification":
        classes = row.get("all_classes")
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise _fail(path, line, f"{name} rows need 'all_classes', a list of strings, for classification scoring")
        meta["all_classes"] = classes
    if name in LONGBENCH_FIRST_LINE_TASKS:
        meta["first_line_only"] = True
    if name == "samsum":
        meta["stop_on_newline"] = True  # pred.py also stops samsum at "\n" (and forces one new token)
    sample_key = row.get("_id", f"line{line}")
    return Sample(
        task=f"longbench/{name}",
        sample_id=f"longbench/{name}/{sample_key}",
        context=context,
        questions=(QA(question, answers),),
        metric=LONGBENCH_METRICS[name],
        max_new_tokens=LONGBENCH_MAX_NEW_TOKENS[name],
        meta=meta,
        template=LONGBENCH_TEMPLATES[name],
    )


def _infinitebench_answers(row: dict, name: str, path: Path, line: int) -> tuple[str, ...]:
    if "answer" not in row:
        raise _fail(path, line, f"missing field 'answer' (an InfiniteBench row needs it); fields: {sorted(row)}")
    answer = row["answer"]
    if name in ("longbook_choice_eng", "code_debug"):
        options = _options(row, path, line)
        if isinstance(answer, list) and len(answer) == 2 and answer[1] in ("A", "B", "C", "D"):
            return (str(answer[0]), answer[1])
        text = answer[0] if isinstance(answer, list) and len(answer) == 1 else answer
        if not isinstance(text, str) or text not in options:
            raise _fail(path, line, f"'answer' must be one of the options, got {answer!r}")
        return (text, "ABCD"[options.index(text)])
    if name == "math_calc":
        values = answer[0] if isinstance(answer, list) and answer and isinstance(answer[0], list) else answer
        if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise _fail(path, line, "math_calc 'answer' must be a list of integers")
        return tuple(str(v) for v in values)
    items = answer if isinstance(answer, list) else [answer]
    if not items or not all(isinstance(a, str | int | float) and not isinstance(a, bool) for a in items):
        raise _fail(path, line, f"'answer' must be a string, a number or a list of them, got {answer!r}")
    return tuple(str(a) for a in items)


def _options(row: dict, path: Path, line: int) -> list[str]:
    options = row.get("options")
    if not isinstance(options, list) or len(options) != 4 or not all(isinstance(o, str) for o in options):
        raise _fail(path, line, "field 'options' must be a list of four strings")
    return options


def _lettered(options: list[str]) -> str:
    return "\n".join(f"{letter}. {option}" for letter, option in zip("ABCD", options))


def _infinitebench_sample(row: dict, path: Path, line: int, task: str | None) -> Sample:
    name = task or path.stem
    if name not in INFINITEBENCH_TEMPLATES:
        closest = _closest(name, INFINITEBENCH_TEMPLATES)
        raise _fail(path, line, f"unknown InfiniteBench task {name!r}; closest: {closest}")
    context = _field(row, "context", str, path, line, "InfiniteBench")
    text = row.get("input", row.get("question", ""))
    if not isinstance(text, str):
        raise _fail(path, line, f"field 'input' must be str, got {type(text).__name__}")
    answers = _infinitebench_answers(row, name, path, line)
    template = INFINITEBENCH_TEMPLATES[name]
    question, answer_prefix = text, ANSWER_PREFIXES.get(name, "")
    if name == "longbook_choice_eng":
        question = f"{text}\n{_lettered(_options(row, path, line))}"
    elif name == "code_debug":
        question = _lettered(_options(row, path, line))
    elif name in ("longbook_sum_eng", "math_calc", "longdialogue_qa_eng"):
        question = ""
    elif name == "kv_retrieval":
        match = re.fullmatch(r'\nKey: "(.*)"\nThe value associated with the specified key is: ', text, re.S)
        if match:
            question, answer_prefix = f'Key: "{match.group(1)}"', KV_ANSWER_PREFIX
        else:
            template = dataclasses.replace(template, after_context="\n\n{question}")
    elif name == "math_find":
        found = re.findall(r"The \w+ number", text)
        if not found:
            raise _fail(path, line, "math_find 'input' must name 'The <which> number' to build the prompt prefix")
        prefix = f"What is {found[0].lower()} in the following list?"
        template = dataclasses.replace(template, before_context=template.before_context.replace("{prefix}", prefix))
    elif name == "code_run":
        call = row.get("func_call", text)
        function = row.get("func", call.split("(")[0])
        question = call
        template = dataclasses.replace(template, before_context=template.before_context.replace("{func}", function))
    sample_key = row.get("id", f"line{line}")
    return Sample(
        task=f"infinitebench/{name}",
        sample_id=f"infinitebench/{name}/{sample_key}",
        context=context,
        questions=(QA(question, answers, answer_prefix),),
        metric=INFINITEBENCH_METRICS[name],
        max_new_tokens=INFINITEBENCH_MAX_NEW_TOKENS[name],
        meta={"benchmark": "infinitebench", "line": line, "id": row.get("id")},
        template=template,
    )


def _ruler_task_name(row: dict, path: Path, task: str | None) -> str:
    if task:
        return task
    if isinstance(row.get("task"), str):
        return row["task"]
    if ruler_family(path.parent.name):
        return path.parent.name
    return path.stem


def _ruler_sample(row: dict, path: Path, line: int, task: str | None) -> Sample:
    text = _field(row, "input", str, path, line, "RULER")
    answers = _string_list(row, "outputs", path, line, "RULER")
    name = _ruler_task_name(row, path, task)
    family = ruler_family(name)
    answer_prefix = row.get("answer_prefix")
    if answer_prefix is not None and not isinstance(answer_prefix, str):
        raise _fail(path, line, f"field 'answer_prefix' must be str, got {type(answer_prefix).__name__}")
    if answer_prefix is None and family is not None:
        # Older RULER keeps the answer prefix inside the input; find it as RULER does, by its first 10 characters.
        start = text.rfind(RULER_ANSWER_PREFIXES[family][:10])
        if start != -1:
            text, answer_prefix = text[:start], text[start:]
    before, context, after, question, split = text, "", "", "", "none"
    for marker_family in [family] if family else list(_RULER_MARKERS):
        header, question_marker = _RULER_MARKERS[marker_family]
        question_start = text.rfind(question_marker)
        header_end = text.rfind(header, 0, max(question_start, 0))
        if question_start != -1 and header_end != -1:
            header_end += len(header)
            rest = text[question_start:]
            stripped = rest.lstrip()
            before, context = text[:header_end], text[header_end:question_start]
            after, question, split = rest[: len(rest) - len(stripped)] + "{question}", stripped, "marker"
            break
    if split == "none":  # unknown layout: everything is context, the query-aware and -agnostic modes coincide
        before, context = "", text
    meta = {"benchmark": "ruler", "line": line, "split": split}
    for key in ("index", "length", "length_w_model_temp", "token_position_answer"):
        if key in row:
            meta[key] = row[key]
    return Sample(
        task=f"ruler/{name}",
        sample_id=f"ruler/{name}/{row.get('index', f'line{line}')}",
        context=context,
        questions=(QA(question, answers, answer_prefix or ""),),
        metric="string_match_part" if family == "qa" else "string_match_all",
        max_new_tokens=RULER_MAX_NEW_TOKENS.get(family or "", 128),
        meta=meta,
        # RULER inputs already carry the model template chosen at preparation time: never add another one.
        template=PromptTemplate(f"ruler/{name}", before, after, chat=False),
    )


def _group_by_context(samples: list[Sample]) -> list[Sample]:
    groups: dict[tuple[str, str, PromptTemplate], list[Sample]] = {}
    for sample in samples:
        groups.setdefault((sample.task, sample.context, sample.template), []).append(sample)
    merged = []
    for members in groups.values():
        first = members[0]
        if len(members) == 1:
            merged.append(first)
            continue
        meta = {**first.meta, "question_sample_ids": [m.sample_id for m in members]}
        merged.append(dataclasses.replace(first, questions=tuple(q for m in members for q in m.questions), meta=meta))
    return merged


def truncate_middle(sample: Sample, tokenizer: TokenizerLike, max_length: int) -> Sample:
    """Keep the head and tail of an over-long prompt, as LongBench's pred.py and InfiniteBench do.

    The raw prompt of the first question is tokenized; above `max_length` tokens it becomes
    decode(first half) + decode(last half), special tokens skipped, and the context is what remains between the
    template's text before and after it. If the cut reaches into the template (a very long question), the context
    alone is cut to its head and tail instead.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    rendered = render(sample, 0, None, chat=False, verify_split=False)
    ids = encode(tokenizer, rendered.full_text, True)
    if len(ids) <= max_length:
        return sample
    half = max_length // 2
    head = tokenizer.decode(ids[:half], skip_special_tokens=True)
    tail = tokenizer.decode(ids[-half:], skip_special_tokens=True)
    before = rendered.context_text[: len(rendered.context_text) - len(sample.context)]
    after = rendered.question_text
    if head.startswith(before) and tail.endswith(after) and len(head) >= len(before):
        context = head[len(before) :] + tail[: len(tail) - len(after)]
        how = "prompt"
    else:
        budget = max(2, max_length - (len(ids) - len(encode(tokenizer, sample.context, False))))
        context_ids = encode(tokenizer, sample.context, False)
        context = tokenizer.decode(context_ids[: budget // 2], skip_special_tokens=True) + tokenizer.decode(
            context_ids[-(budget // 2) :], skip_special_tokens=True
        )
        how = "context"
    meta = {**sample.meta, "truncated_from_tokens": len(ids), "truncated_to_tokens": max_length, "truncation": how}
    return dataclasses.replace(sample, context=context, meta=meta)
