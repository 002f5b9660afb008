"""RULER's synthetic tasks, regenerated offline with the evaluated tokenizer: their templates and the niah variants
here; vt in `ruler_tracing`, cwe and fwe in `ruler_aggregation`, qa in `ruler_qa`.

Templates, answer prefixes, needle sentences, the singular rewrite and the haystacks follow RULER's
``scripts/data/synthetic`` (spec/benchmarks.md §3). Differences, all deliberate:
* the length budget is for the prompt alone (RULER also reserves the tokens to generate);
* the essay haystack is split into sentences once and grows by whole sentences (RULER cuts N words, then splits);
* random choices that do not depend on the haystack size (keys, values, depths) are drawn once per sample, so the
  length search never changes the needles;
* a requested depth places the answer-bearing needle (the first value of the first queried key) at that depth;
  the other needles keep random depths from RULER's 40-point grid;
* few-shot blocks (vt, cwe) are separated from the task by one blank line and their answers by one space;
* qa fills the room its last whole document leaves with later candidate documents that still fit, and for
  HotpotQA only the supporting paragraphs must fit (RULER requires all ten of the question's paragraphs).
"""

from __future__ import annotations

import functools
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from .base import (
    QA,
    PromptTemplate,
    Sample,
    TokenizerLike,
    fit_to_length,
    make_sample_id,
    sample_rng,
)
from .infinitebench import DEPTH_GRID
from .text import NOISE_SENTENCE, essay_sentences, resolve_essay_source, word_list

__all__ = [
    "NIAH_CONFIGS",
    "RULER_ANSWER_PREFIXES",
    "RULER_MAX_NEW_TOKENS",
    "NiahConfig",
    "build_niah",
    "interleave_needles",
    "niah_prompt",
    "ruler_family",
]

NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."

NIAH_HEADER = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n"
)
NIAH_QUESTION = "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
NIAH_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"

VT_HEADER = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
VT_QUESTION = "Find all variables that are assigned the value {query} in the text above."
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned "
    "the value {query}, they are: "
)
CWE_HEADER = (
    "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that "
    "appear most often.\n"
)
CWE_QUESTION = "What are the 10 most common words in the above list?"
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_HEADER = (
    "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
    "appeared coded words. "
)
FWE_QUESTION = (
    "Do not provide any explanation. Please ignore the dots '....'. What are the three most frequently appeared "
    "words in the above coded text?"
)
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
QA_INSTRUCTION = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words."
)
QA_HEADER = QA_INSTRUCTION + "\n\nThe following are given documents.\n\n"
QA_AFTER = "\n\n" + QA_INSTRUCTION + "\n\nQuestion: {question}"
QA_ANSWER_PREFIX = " Answer:"

RULER_MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}
RULER_ANSWER_PREFIXES = {
    "niah": NIAH_ANSWER_PREFIX,
    "vt": VT_ANSWER_PREFIX,
    "cwe": CWE_ANSWER_PREFIX,
    "fwe": FWE_ANSWER_PREFIX,
    "qa": QA_ANSWER_PREFIX,
}


def ruler_family(task: str) -> str | None:
    """niah, vt, cwe, fwe or qa for a RULER task name (also its published aliases), else None."""
    if task.startswith("niah"):
        return "niah"
    if task in ("vt", "variable_tracking"):
        return "vt"
    if task in ("cwe", "common_words_extraction"):
        return "cwe"
    if task in ("fwe", "freq_words_extraction"):
        return "fwe"
    if task.startswith("qa"):
        return "qa"
    return None


@dataclass(frozen=True)
class NiahConfig:
    """One row of RULER's synthetic.yaml for the niah generator."""

    haystack: str  # noise | essay | needle
    type_needle_k: str  # words | numbers | uuids
    type_needle_v: str
    num_needle_k: int = 1
    num_needle_v: int = 1
    num_needle_q: int = 1


NIAH_CONFIGS: dict[str, NiahConfig] = {
    "niah_single_1": NiahConfig("noise", "words", "numbers"),
    "niah_single_2": NiahConfig("essay", "words", "numbers"),
    "niah_single_3": NiahConfig("essay", "words", "uuids"),
    "niah_multikey_1": NiahConfig("essay", "words", "numbers", num_needle_k=4),
    "niah_multikey_2": NiahConfig("needle", "words", "numbers"),
    "niah_multikey_3": NiahConfig("needle", "uuids", "uuids"),
    "niah_multivalue": NiahConfig("essay", "words", "numbers", num_needle_v=4),
    "niah_multiquery": NiahConfig("essay", "words", "numbers", num_needle_q=4),
}


def _singular(text: str) -> str:
    """RULER's rewrite of the template when one value is asked for (applied to the template, not the fillings)."""
    return text.replace("Some", "A").replace("are all", "is").replace("are", "is").replace("answers", "answer")


def _join_queries(queries: Sequence[str]) -> str:
    return queries[0] if len(queries) == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]


def niah_prompt(type_needle_v: str, queries: Sequence[str], n_answers: int) -> tuple[str, str, str]:
    """(text before the context, question, answer prefix) of a niah prompt, singular when one answer is asked."""
    header, question, prefix = NIAH_HEADER, NIAH_QUESTION, NIAH_ANSWER_PREFIX
    if n_answers == 1:
        header, question, prefix = _singular(header), _singular(question), _singular(prefix)
        type_needle_v = type_needle_v[:-1]
    query = _join_queries(queries)
    fill = {"type_needle_v": type_needle_v, "query": query}
    return header.format(**fill), question.format(**fill), prefix.format(**fill)


@functools.lru_cache(maxsize=1)
def _key_words() -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(sorted(set(word_list("adjectivelist")))), tuple(sorted(set(word_list("nounlist"))))


def _random_value(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "words":
        adjectives, nouns = _key_words()
        return f"{rng.choice(adjectives)}-{rng.choice(nouns)}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}; choose from numbers, words, uuids")


def _distinct(rng: random.Random, kind: str, count: int, exclude: set[str]) -> list[str]:
    values: list[str] = []
    while len(values) < count:
        value = _random_value(rng, kind)
        if value not in exclude and value not in values:
            values.append(value)
    return values


def interleave_needles(units: Sequence[str], needles: Sequence[str], positions: Sequence[int]) -> list[str]:
    """Insert each needle before unit `positions[i]` (== len(units) appends); ties keep the needle order."""
    by_position: dict[int, list[str]] = {}
    for needle, position in zip(needles, positions):
        by_position.setdefault(position, []).append(needle)
    out: list[str] = []
    for i in range(len(units) + 1):
        out.extend(by_position.get(i, ()))
        if i < len(units):
            out.append(units[i])
    return out


def _cycled(items: Sequence[str], count: int) -> list[str]:
    return [items[i % len(items)] for i in range(count)]


def build_niah(
    task: str,
    tokenizer: TokenizerLike,
    length: int,
    depth: float | None,
    seed: int,
    index: int,
    chat: bool | None = None,
    *,
    config: NiahConfig,
    haystack: str | None = None,
    haystack_source: str = "auto",
    max_new_tokens: int | None = None,
) -> Sample:
    """A RULER niah sample. `haystack` overrides the config's (noise | essay | needle); `haystack_source` picks the
    essay text (auto | paul_graham | kjv | milton)."""
    kind = haystack or config.haystack
    if kind not in ("noise", "essay", "needle"):
        raise ValueError(f"haystack must be noise, essay or needle, got {kind!r}")
    source = resolve_essay_source(haystack_source) if kind == "essay" else None
    num_k = max(config.num_needle_k, config.num_needle_q)
    rng = sample_rng(task, length, depth, seed, index, "needles")
    keys = _distinct(rng, config.type_needle_k, num_k, set())
    values = [_distinct(rng, config.type_needle_v, config.num_needle_v, set()) for _ in keys]
    queried = rng.sample(range(num_k), config.num_needle_q)
    needles = [
        (k, v, NEEDLE.format(type_needle_v=config.type_needle_v, key=keys[k], value=v))
        for k in range(num_k)
        for v in values[k]
    ]
    rng.shuffle(needles)
    target = next(i for i, (k, v, _) in enumerate(needles) if k == queried[0] and v == values[queried[0]][0])
    target_depth = rng.choice(DEPTH_GRID) if depth is None else depth
    other_depths = rng.sample([d for d in DEPTH_GRID if d != target_depth], len(needles) - 1)
    needle_depths = [*other_depths[:target], target_depth, *other_depths[target:]]
    answers = tuple(v for k in queried for v in values[k])
    before, question, answer_prefix = niah_prompt(config.type_needle_v, [keys[k] for k in queried], len(answers))
    template = PromptTemplate(f"ruler/{task}", before, "\n{question}", chat=True)
    qa = QA(question, answers, answer_prefix)
    distractor_rng = sample_rng(task, length, depth, seed, index, "distractors")
    distractors: list[str] = []
    taken_keys = set(keys)

    def build(size: int) -> Sample:
        if kind == "essay":
            units = _cycled(essay_sentences(source), size)
            separator = " "
        elif kind == "noise":
            units = [NOISE_SENTENCE] * size
            separator = "\n"
        else:
            while len(distractors) < size:
                key = _distinct(distractor_rng, config.type_needle_k, 1, taken_keys)[0]
                taken_keys.add(key)
                value = _random_value(distractor_rng, config.type_needle_v)
                distractors.append(NEEDLE.format(type_needle_v=config.type_needle_v, key=key, value=value))
            units = distractors[:size]
            separator = "\n"
        # RULER: essay needles go before sentence int(n * depth); line haystacks use the nearest line.
        positions = [int(size * d) if kind == "essay" else round(size * d) for d in needle_depths]
        context = separator.join(interleave_needles(units, [text for _, _, text in needles], positions))
        return Sample(
            task=task,
            sample_id=make_sample_id(task, length, depth, seed, index),
            context=context,
            questions=(qa,),
            metric="string_match_all",
            max_new_tokens=max_new_tokens or RULER_MAX_NEW_TOKENS["niah"],
            target_tokens=length,
            depth=target_depth,
            meta={
                "benchmark": "ruler",
                "haystack": kind,
                "haystack_source": source or kind,
                "haystack_units": size,
                "needles": [
                    {"key": keys[k], "value": v, "position": p, "depth": d, "queried": k in queried}
                    for (k, v, _), p, d in zip(needles, positions, needle_depths)
                ],
                "target_needle": target,
                "actual_depth": positions[target] / size if size else 0.0,
            },
            template=template,
        )

    return fit_to_length(build, tokenizer, length, chat=chat, start_size=32, task=task)
