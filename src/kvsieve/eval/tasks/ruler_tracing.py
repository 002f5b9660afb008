"""RULER's variable tracking (vt): chains of variable assignments hidden in noise; the answer is every variable
assigned the queried value (multi-hop tracing). Templates in `ruler`."""

from __future__ import annotations

import random
import string
from collections.abc import Sequence

from .base import (
    QA,
    PromptTemplate,
    Sample,
    TokenizerLike,
    encode,
    fit_to_length,
    largest_fitting_size,
    make_sample_id,
    sample_rng,
)
from .infinitebench import NOISE_LINE
from .ruler import (
    RULER_MAX_NEW_TOKENS,
    VT_ANSWER_PREFIX,
    VT_HEADER,
    VT_QUESTION,
    interleave_needles,
)


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
    parts = interleave_needles([NOISE_LINE] * n_noise, chain, positions)
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
