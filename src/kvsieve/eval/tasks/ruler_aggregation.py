"""RULER's aggregation tasks: common words extraction (cwe, a numbered word list) and frequent words extraction
(fwe, Zipf-distributed coded words). Templates in `ruler`."""

from __future__ import annotations

import functools
import random
import string
from collections.abc import Sequence

from .base import (
    QA,
    PromptTemplate,
    Sample,
    TokenizerLike,
    fit_to_length,
    make_sample_id,
    sample_rng,
)
from .ruler import (
    CWE_ANSWER_PREFIX,
    CWE_HEADER,
    CWE_QUESTION,
    FWE_ANSWER_PREFIX,
    FWE_HEADER,
    FWE_QUESTION,
    RULER_MAX_NEW_TOKENS,
)
from .text import word_list


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
