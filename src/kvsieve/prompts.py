"""Prompt inputs: a string, token ids or a conversation, with an optional question, as token ids.

With a chat template the prompt and the question are one user turn ``prompt + "\\n\\n" + question``, rendered once
and split right after the prompt, so that the two parts can be fed separately (the context compressed before the
question arrives) and still be exactly the tokens the template makes of the whole turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "SPLIT_MARK",
    "Messages",
    "PromptBatch",
    "PromptInput",
    "TokenInput",
    "encode_context",
    "encode_prompt",
    "split_batch",
]

SPLIT_MARK = "<<kvsieve-question-split>>"

TokenInput = str | Sequence[int] | torch.Tensor
# A conversation: ``[{"role": "user", "content": "..."}, ...]``, rendered by the tokenizer's chat template.
Messages = Sequence[dict[str, str]]
PromptInput = TokenInput | Messages
# Several prompts: a list of prompts, or a 2-D tensor of token ids (one prompt per row).
PromptBatch = Sequence[PromptInput] | torch.Tensor


def split_batch(prompt: Any, question: Any) -> list[tuple[PromptInput, TokenInput | None]] | None:
    """``(prompt, question)`` per row when ``prompt`` is a batch, else None (one prompt).

    A batch is a 2-D tensor of token ids (its rows) or a list whose items are each a prompt: a string, a list of
    token ids, a 1-D tensor or a conversation. A list of ints is one prompt, a list of messages one conversation.
    ``question``: None, one question for every row (a string, or a list of ints), or a list of one per row.
    """
    if isinstance(prompt, torch.Tensor) and prompt.dim() == 2:
        prompts: list[Any] = list(prompt)
    elif isinstance(prompt, list | tuple) and prompt and all(_is_prompt_item(p) for p in prompt):
        prompts = list(prompt)
    else:
        return None
    if question is None or isinstance(question, str | torch.Tensor) or _is_id_list(question):
        return [(p, question) for p in prompts]
    if not isinstance(question, list | tuple) or not all(
        isinstance(q, str | list | tuple | torch.Tensor) for q in question
    ):
        raise TypeError(f"question must be a string, token ids or a list of one per prompt, got {question!r:.40}")
    if len(question) != len(prompts):
        raise ValueError(
            f"question: {len(question)} questions for a batch of {len(prompts)} prompts, give one per prompt"
        )
    return list(zip(prompts, question))


def _is_prompt_item(item: Any) -> bool:
    """One prompt of a batch: a string, token ids (a list or a 1-D tensor) or a conversation."""
    if isinstance(item, str):
        return True
    if isinstance(item, torch.Tensor):
        return item.dim() == 1
    return isinstance(item, list | tuple) and bool(item) and (_is_id_list(item) or _is_conversation(item))


def _is_id_list(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def encode_prompt(
    tokenizer, prompt: PromptInput, question: TokenInput | None = None, chat: bool | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the question (empty when there is none).

    Strings go through the tokenizer's chat template when it has one (``chat=None``) as one user turn
    ``prompt + "\\n\\n" + question``, split right after the prompt so the two parts can be fed separately.
    A list of ``{"role", "content"}`` messages is a conversation, rendered by the chat template (the question, if
    any, ends the last user turn). Token ids (a list of ints, or a 1-D tensor) are used as given. One prompt: a
    batch is split into its prompts first (`split_batch`).
    """
    if isinstance(prompt, str) and not prompt.strip():
        raise ValueError("prompt is empty")
    if _is_conversation(prompt):
        return _encode_conversation(tokenizer, list(prompt), question, chat)
    if not isinstance(prompt, str):
        ids = _as_ids(prompt, "prompt")
        return ids, ([] if question is None else _question_ids(tokenizer, question))
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    if not use_chat:
        context = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return context, ([] if question is None else _question_ids(tokenizer, question))
    if question is not None and not isinstance(question, str):
        raise TypeError("with a chat template, question must be a string (or pass chat=False and token ids)")
    suffix = "" if question is None else "\n\n" + question
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt + SPLIT_MARK + suffix}], tokenize=False, add_generation_prompt=True
    )
    before, after = text.split(SPLIT_MARK)
    context = tokenizer(before, add_special_tokens=False)["input_ids"]
    rest = tokenizer(after, add_special_tokens=False)["input_ids"]
    if question is None:  # the whole templated prompt is one input
        return context + rest, []
    return context, rest


def encode_context(tokenizer, prompt: PromptInput, chat: bool | None = None) -> list[int]:
    """Token ids of ``prompt`` as the context of a question still to come: what `encode_prompt` gives as the
    context for any question (the chat template's turn is split before the question, whatever it says)."""
    templated = _is_conversation(prompt) or (
        isinstance(prompt, str) and (bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat)
    )
    if not templated:
        return encode_prompt(tokenizer, prompt, None, chat)[0]
    return encode_prompt(tokenizer, prompt, "?", chat)[0]  # the text before the question does not depend on it


def _is_conversation(prompt: Any) -> bool:
    return isinstance(prompt, list | tuple) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def _encode_conversation(
    tokenizer, messages: list[dict[str, str]], question: TokenInput | None, chat: bool | None
) -> tuple[list[int], list[int]]:
    """A conversation through the chat template; with a question, the context ends where the question starts."""
    for i, message in enumerate(messages):
        if set(message) - {"role", "content"} or not all(isinstance(message.get(k), str) for k in ("role", "content")):
            raise ValueError(
                f"prompt message {i} must be {{'role': str, 'content': str}}, got {message!r} (a conversation is a "
                "list of such messages)"
            )
    if chat is False or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "a prompt of chat messages needs the tokenizer's chat template"
            + (" (chat=False was given)" if chat is False else ", and this tokenizer has none")
            + ": pass the conversation as one string instead"
        )
    if question is None:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"], []
    if not isinstance(question, str) or not question.strip():
        raise ValueError("with a conversation as the prompt, question must be a non-empty string")
    if messages[-1]["role"] != "user":
        raise ValueError("with a question, the conversation's last message must be the user's (the question ends it)")
    last = {**messages[-1], "content": messages[-1]["content"] + SPLIT_MARK + "\n\n" + question}
    text = tokenizer.apply_chat_template([*messages[:-1], last], tokenize=False, add_generation_prompt=True)
    before, after = text.split(SPLIT_MARK)
    return (
        tokenizer(before, add_special_tokens=False)["input_ids"],
        tokenizer(after, add_special_tokens=False)["input_ids"],
    )


def _question_ids(tokenizer, question: TokenInput) -> list[int]:
    if isinstance(question, str):
        if not question.strip():
            raise ValueError("question is empty")
        return tokenizer(question, add_special_tokens=False)["input_ids"]
    return _as_ids(question, "question")


_ONE_PROMPT = (
    "a prompt is a string, a list of token ids, a 1-D tensor or a list of {'role', 'content'} messages (a "
    "conversation); a batch is a list of such prompts (each of one kind) or a 2-D tensor"
)


def _as_ids(ids: Any, name: str) -> list[int]:
    """Token ids as a list of ints; anything else (None, a batch, strings) is an error saying what is expected."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"{name} is a tensor of shape {list(ids.shape)}: {_ONE_PROMPT}")
        if ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"{name} must hold integer token ids, got a {ids.dtype} tensor")
        out = ids.flatten().tolist()
    elif isinstance(ids, list | tuple):
        out = list(ids)
        batch_item = next((t for t in out if isinstance(t, str | list | tuple | torch.Tensor)), None)
        if batch_item is not None:
            kind = "strings" if isinstance(batch_item, str) else "sequences"
            raise ValueError(f"{name} is a list of {kind} (a batch?): {_ONE_PROMPT}")
        bad = next((t for t in out if isinstance(t, bool) or not isinstance(t, int)), None)
        if bad is not None:
            raise TypeError(f"{name} token ids must be ints, got {bad!r}")
    else:
        chat = ", a list of chat messages" if name == "prompt" else ""
        raise TypeError(f"{name} must be a string, a list of token ids{chat} or a tensor of ids, got {ids!r:.40}")
    if not out:
        raise ValueError(f"{name} is empty")
    return out
