"""The sample model shared by every task, and the one place that turns a sample into model input.

A sample holds one long context and one or more questions about it. `render` splits the prompt right after the
context, so that the query-agnostic mode can compress `context_text` before the question exists and the
query-aware mode can feed `context_text + question_text` in one go; both see exactly the same tokens.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

__all__ = [
    "QA",
    "PromptTemplate",
    "Rendered",
    "Sample",
    "TokenizerLike",
    "count_prompt_tokens",
    "encode",
    "fit_to_length",
    "has_chat_template",
    "largest_fitting_size",
    "make_sample_id",
    "render",
    "sample_rng",
]

_SENTINEL = "\u2063KVSIEVE-CONTEXT-END\u2063"
_SPLIT_SEARCH_CHARS = 256


class TokenizerLike(Protocol):
    """What the task layer needs from a tokenizer: `encode`; a chat template is optional."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


@dataclass(frozen=True)
class QA:
    """One question about a sample's context.

    `answer_prefix` is the text the model is fed after the question (RULER's answer prefix, InfiniteBench's
    trailing cue such as "The pass key is"); it is never scored.
    """

    question: str
    answers: tuple[str, ...]
    answer_prefix: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.answers, str) or not isinstance(self.answers, Sequence):
            raise TypeError(f"QA.answers must be a sequence of strings, got {type(self.answers).__name__}")
        answers = tuple(self.answers)
        if not all(isinstance(a, str) for a in answers):
            raise TypeError("QA.answers must contain only strings")
        object.__setattr__(self, "answers", answers)


@dataclass(frozen=True)
class PromptTemplate:
    """The benchmark's prompt around the context, split at the context.

    `before_context` and `after_context` may contain the placeholder ``{question}`` (filled by plain replacement,
    so braces in the context or the question are safe). `chat` says whether a chat template may wrap the prompt:
    LongBench feeds its few-shot and code tasks raw, and RULER files arrive already templated.
    """

    name: str = "plain"
    before_context: str = ""
    after_context: str = "\n\n{question}"
    chat: bool = True

    def fill(self, question: str) -> tuple[str, str]:
        """The text before and after the context for one question."""
        return (
            self.before_context.replace("{question}", question),
            self.after_context.replace("{question}", question),
        )


@dataclass(frozen=True)
class Sample:
    """One long context with one or more questions about it, and how to prompt and score them.

    `sample_id` is stable for (task, length, depth, seed, index), so runs can resume and compare. `meta` holds
    JSON-serialisable details: needle positions, haystack source, all_classes for classification, and so on.
    """

    task: str
    sample_id: str
    context: str
    questions: tuple[QA, ...]
    metric: str
    max_new_tokens: int
    target_tokens: int | None = None
    depth: float | None = None
    meta: dict = field(default_factory=dict)
    template: PromptTemplate = PromptTemplate()

    def __post_init__(self) -> None:
        questions = tuple(self.questions)
        if not questions:
            raise ValueError(f"sample {self.sample_id!r} has no questions")
        object.__setattr__(self, "questions", questions)
        if self.depth is not None and not 0.0 <= self.depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {self.depth}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy, for run directories."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sample:
        """The inverse of `to_dict`."""
        fields = dict(data)
        fields["questions"] = tuple(
            QA(q["question"], tuple(q["answers"]), q.get("answer_prefix", "")) for q in fields["questions"]
        )
        fields["template"] = PromptTemplate(**fields.get("template", {}))
        return cls(**fields)


@dataclass(frozen=True)
class Rendered:
    """A prompt split right after the context.

    `context_text + question_text` is the query-aware prompt; `context_text` alone is what the query-agnostic mode
    compresses. `add_special_tokens` says whether the tokenizer's own special tokens (a BOS) go in front of the
    context: yes for raw prompts, no when a chat template already wrote them into the text. `token_exact` is True
    when tokenizing the two halves separately was checked to give the same tokens as tokenizing the whole.
    """

    context_text: str
    question_text: str
    chat: bool
    add_special_tokens: bool
    token_exact: bool

    @property
    def full_text(self) -> str:
        return self.context_text + self.question_text

    def encode(self, tokenizer: TokenizerLike) -> tuple[list[int], list[int]]:
        """Token ids of the context part and of the question part, in the way the split was checked."""
        return (
            encode(tokenizer, self.context_text, self.add_special_tokens),
            encode(tokenizer, self.question_text, False),
        )


def encode(tokenizer: TokenizerLike, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids of `text`; the one tokenization call of the task layer."""
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) and hasattr(tokenizer, "apply_chat_template")


def render(
    sample: Sample,
    question_index: int,
    tokenizer: TokenizerLike | None,
    chat: bool | None = None,
    *,
    verify_split: bool = True,
) -> Rendered:
    """Turn one question of `sample` into model input, split right after the context.

    chat=None uses the tokenizer's chat template when it has one and the sample's template allows it; True forces
    it (error without one); False feeds the benchmark prompt raw. With a chat template, the whole prompt is one user
    message and the answer prefix starts the assistant turn (stripped of surrounding whitespace there).
    If the tokenizer merges tokens across the split, the split moves to the nearest newline boundary that does not
    merge, preferring moves over newlines only, and never past the start of the question.
    """
    if not 0 <= question_index < len(sample.questions):
        raise IndexError(f"question_index {question_index} out of range: sample has {len(sample.questions)}")
    qa = sample.questions[question_index]
    before, after = sample.template.fill(qa.question)
    user_context = before + sample.context
    use_chat = _resolve_chat(sample, tokenizer, chat)
    if use_chat:
        if _SENTINEL in user_context or _SENTINEL in after:
            raise ValueError("the prompt contains kvsieve's split sentinel; cannot split it")
        messages = [{"role": "user", "content": user_context + _SENTINEL + after}]
        templated = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if templated.count(_SENTINEL) != 1:
            raise ValueError("the chat template dropped or repeated the prompt text; cannot split it")
        context_text, question_text = templated.split(_SENTINEL)
        question_text += qa.answer_prefix.strip()
        add_special = False
    else:
        context_text, question_text = user_context, after + qa.answer_prefix
        add_special = True
    token_exact = False
    if verify_split and tokenizer is not None:
        found = question_text.find(qa.question) if qa.question else -1
        forward_limit = found if found != -1 else len(question_text)
        cut, token_exact = _token_stable_cut(tokenizer, context_text, question_text, add_special, forward_limit)
        whole = context_text + question_text
        context_text, question_text = whole[:cut], whole[cut:]
    return Rendered(context_text, question_text, use_chat, add_special, token_exact)


def _resolve_chat(sample: Sample, tokenizer: Any, chat: bool | None) -> bool:
    if chat is None:
        return sample.template.chat and tokenizer is not None and has_chat_template(tokenizer)
    if chat and not has_chat_template(tokenizer):
        raise ValueError("chat=True but the tokenizer has no chat template")
    return bool(chat)


def _token_stable_cut(
    tokenizer: TokenizerLike, context_text: str, question_text: str, add_special: bool, forward_limit: int
):
    """The split position at which tokenizing the halves equals tokenizing the whole, nearest the context end.

    Candidates are newline boundaries up to `_SPLIT_SEARCH_CHARS` before the context end and up to
    `forward_limit` characters after it (never into the question itself); moves over newlines only come first.
    """
    whole = context_text + question_text
    whole_ids = encode(tokenizer, whole, add_special)

    def stable(cut: int) -> bool:
        return encode(tokenizer, whole[:cut], add_special) + encode(tokenizer, whole[cut:], False) == whole_ids

    base = len(context_text)
    if stable(base):
        return base, True
    low = max(0, base - _SPLIT_SEARCH_CHARS)
    high = base + min(forward_limit, _SPLIT_SEARCH_CHARS)
    cuts = {cut for m in re.finditer(r"\n+", whole[low:high]) for cut in (low + m.start(), low + m.end())}
    cuts.discard(base)

    def cost(cut: int) -> tuple[int, int]:
        moved = whole[min(cut, base) : max(cut, base)]
        return len(moved) - moved.count("\n"), abs(cut - base)

    for cut in sorted(cuts, key=cost):
        if stable(cut):
            return cut, True
    return base, False


def count_prompt_tokens(sample: Sample, tokenizer: TokenizerLike, chat: bool | None = None) -> int:
    """Tokens of the longest full (query-aware) prompt over the sample's questions."""
    longest = 0
    for index in range(len(sample.questions)):
        rendered = render(sample, index, tokenizer, chat, verify_split=False)
        longest = max(longest, len(encode(tokenizer, rendered.full_text, rendered.add_special_tokens)))
    return longest


def largest_fitting_size(
    fits: Callable[[int], bool], *, min_size: int = 0, start_size: int = 16, max_size: int | None = None
) -> int | None:
    """The largest size with `fits(size)`, assuming fitting is monotone; None when even `min_size` does not fit.

    Exponential search for an upper bound, then bisection: about 2 log2(size) calls.
    """
    if not fits(min_size):
        return None
    good = min_size
    size = max(start_size, min_size + 1)
    while True:
        if max_size is not None and size >= max_size:
            if fits(max_size):
                return max_size
            bad = max_size
            break
        if not fits(size):
            bad = size
            break
        good, size = size, size * 2
    while bad - good > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good


def fit_to_length(
    build: Callable[[int], Sample],
    tokenizer: TokenizerLike,
    target_tokens: int,
    *,
    chat: bool | None = None,
    min_size: int = 0,
    start_size: int = 16,
    max_size: int | None = None,
    task: str = "task",
) -> Sample:
    """The sample with the largest haystack size whose full prompt fits `target_tokens` (RULER's search).

    `build(size)` must be deterministic for a given size and grow with it. Unlike RULER, the budget is for the
    prompt alone: RULER also reserves the tokens to generate.
    """
    measured: dict[int, tuple[Sample, int]] = {}

    def fits(size: int) -> bool:
        if size not in measured:
            sample = build(size)
            measured[size] = (sample, count_prompt_tokens(sample, tokenizer, chat))
        return measured[size][1] <= target_tokens

    size = largest_fitting_size(fits, min_size=min_size, start_size=start_size, max_size=max_size)
    if size is None:
        raise ValueError(
            f"length={target_tokens} is too small for task {task}: its prompt without haystack already takes "
            f"{measured[min_size][1]} tokens"
        )
    return measured[size][0]


def _depth_key(depth: float | None) -> str:
    return "rand" if depth is None else f"{depth:.4f}"


def make_sample_id(task: str, length: int, depth: float | None, seed: int, index: int) -> str:
    """Stable id for (task, length, depth, seed, index)."""
    return f"{task}/L{length}/d{_depth_key(depth)}/s{seed}/{index}"


def sample_rng(
    task: str, length: int | None, depth: float | None, seed: int, index: int, *extra: object
) -> random.Random:
    """A generator private to one sample (and `extra` purpose), independent of every other sample and of
    PYTHONHASHSEED, so adding samples, depths or lengths never changes existing ones."""
    parts = ["kvsieve", task, str(length), _depth_key(depth), str(seed), str(index), *map(str, extra)]
    return random.Random("|".join(parts))
