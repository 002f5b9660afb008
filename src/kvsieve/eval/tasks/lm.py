"""Long-document language-modelling windows on public-domain text shipped with kvsieve (a PG-19 stand-in).

Each document is a context (what the cache holds, possibly compressed) followed by a continuation scored
teacher-forced; the difference between full and compressed cache is the signal (perplexity, KL, top-1 agreement).
Windows start at line starts, never overlap within a source, and alternate between sources.
Debian's bible-kjv or other text is not read at run time: everything needed ships in kvsieve/data.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .base import TokenizerLike, encode
from .text import public_domain_text

__all__ = ["LM_SOURCES", "LMDoc", "lm_documents"]

# KJV Genesis-Exodus (prose), Paradise Lost (verse), Areopagitica (argumentative prose): about 0.9 MB together.
LM_SOURCES = ("kjv", "paradise_lost", "milton")


@dataclass(frozen=True)
class LMDoc:
    """One window: `input_ids_context` (starting with the tokenizer's BOS, if it adds one) and the continuation."""

    doc_id: str
    input_ids_context: list[int]
    input_ids_continuation: list[int]
    source: str


def _leading_special_ids(tokenizer: TokenizerLike) -> list[int]:
    """What the tokenizer puts in front of plain text (a BOS for Llama-style tokenizers, nothing for SmolLM2)."""
    with_special = encode(tokenizer, "a", True)
    without = encode(tokenizer, "a", False)
    if without and with_special[-len(without) :] == without:
        return with_special[: len(with_special) - len(without)]
    return []


def _line_start_positions(tokenizer: TokenizerLike, ids: Sequence[int]) -> list[int]:
    """Token positions that start a line: after a newline token, not before another one (every position if the
    tokenizer has no newline token)."""
    newline_ids = set()
    for newlines in ("\n", "\n\n", "\n\n\n"):
        piece = encode(tokenizer, "a" + newlines, False)[1:]
        if len(piece) == 1:
            newline_ids.add(piece[0])
    if not newline_ids:
        return list(range(len(ids)))
    return [0] + [i + 1 for i, token in enumerate(ids[:-1]) if token in newline_ids and ids[i + 1] not in newline_ids]


def _windows(tokenizer: TokenizerLike, text: str, window: int, rng: random.Random) -> Iterator[tuple[int, list[int]]]:
    """Non-overlapping windows of `window` tokens that start at line starts of `text`, in random order.

    The text is tokenized once, so every window holds exactly the tokens the tokenizer gives the whole text.
    """
    ids = encode(tokenizer, text, False)
    starts = [p for p in _line_start_positions(tokenizer, ids) if p + window <= len(ids)]
    rng.shuffle(starts)
    taken: list[int] = []
    for start in starts:
        if all(start + window <= other or other + window <= start for other in taken):
            taken.append(start)
            yield start, ids[start : start + window]


def lm_documents(
    tokenizer: TokenizerLike,
    context_tokens: int,
    continuation_tokens: int,
    n_docs: int,
    seed: int = 0,
    sources: Sequence[str] = LM_SOURCES,
) -> list[LMDoc]:
    """`n_docs` windows of `context_tokens` + `continuation_tokens` tokens, alternating between `sources`.

    Deterministic for (tokenizer, lengths, seed, sources). Raises ValueError when the texts hold fewer
    non-overlapping windows than asked for.
    """
    if context_tokens < 1 or continuation_tokens < 1 or n_docs < 1:
        raise ValueError(
            f"context_tokens, continuation_tokens and n_docs must be >= 1, got "
            f"{context_tokens}, {continuation_tokens}, {n_docs}"
        )
    if not sources:
        raise ValueError("sources must name at least one public-domain text")
    leading = _leading_special_ids(tokenizer)
    if context_tokens <= len(leading):
        raise ValueError(f"context_tokens must exceed the {len(leading)} leading special tokens")
    window = context_tokens - len(leading) + continuation_tokens
    iterators = {
        source: _windows(tokenizer, public_domain_text(source), window, random.Random(f"kvsieve|lm|{seed}|{source}"))
        for source in sources
    }
    docs: list[LMDoc] = []
    active = list(sources)
    while len(docs) < n_docs and active:
        for source in list(active):
            if len(docs) == n_docs:
                break
            found = next(iterators[source], None)
            if found is None:
                active.remove(source)
                continue
            start, ids = found
            cut = context_tokens - len(leading)
            docs.append(LMDoc(f"{source}@token{start}", leading + ids[:cut], ids[cut:], source))
    if len(docs) < n_docs:
        raise ValueError(
            f"only {len(docs)} non-overlapping windows of {window} tokens in {list(sources)}; "
            f"ask for fewer documents or shorter windows"
        )
    return docs
