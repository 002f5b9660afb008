"""Generation with a kvsieve cache: prefill (whole or chunked), optional question chunk, decode, statistics.

The loop drives the cache's phases explicitly: every prompt chunk but the last is ``PREFILL``, the last is
``PREFILL_LAST`` (one-shot methods compress right after each layer's attention over it), and everything after is
``DECODE``. With ``question``, the prompt is prefilled and compressed alone and the question follows as its own
chunk (query-agnostic use), except for methods whose proxies are the question itself (NACL): they compress after
the question chunk, knowing its span.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from kvsieve.cache import SieveCache, SieveLayer, as_method, layer_kv_bytes, stored_entries
from kvsieve.methods.base import Method, Phase, check_float, check_int

SPLIT_MARK = "<<kvsieve-question-split>>"

TokenInput = str | Sequence[int] | torch.Tensor
# A conversation: ``[{"role": "user", "content": "..."}, ...]``, rendered by the tokenizer's chat template.
Messages = Sequence[dict[str, str]]
PromptInput = TokenInput | Messages


@dataclass
class GenerationStats:
    """Measured from the cache's tensors and the clock (never computed from the configuration)."""

    method: str
    budget: int | float | None
    prompt_tokens: int
    question_tokens: int
    new_tokens: int
    kv_stored_tokens: float  # mean over layers of the entries per KV head stored right after compression
    kv_stored_tokens_per_layer: list[int]
    kv_bytes: int  # bytes of K/V held right after compression (before a question chunk and decoding)
    kv_bytes_full: int  # bytes a plain cache holds for the same prompt in the same layers (tokens x bytes/token)
    kv_bytes_end: int  # bytes of K/V held at the end of generation
    attended_per_step: float | None  # mean entries per KV head attended by a decode step, over layers
    prefill_s: float
    decode_s_per_token: float | None
    layers: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenerationOutput:
    text: str
    tokens: list[int]
    stats: GenerationStats
    stop_reason: str = "max_new_tokens"  # or "eos": the model emitted an end-of-sequence token


# ----------------------------------------------------------------------------------------------- inputs
def encode_prompt(
    tokenizer, prompt: PromptInput, question: TokenInput | None = None, chat: bool | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the question (empty when there is none).

    Strings go through the tokenizer's chat template when it has one (``chat=None``) as one user turn
    ``prompt + "\\n\\n" + question``, split right after the prompt so the two parts can be fed separately.
    A list of ``{"role", "content"}`` messages is a conversation, rendered by the chat template (the question, if
    any, ends the last user turn). Token ids (a list of ints, or a tensor with one row) are used as given. One
    prompt per call: a batch (a list of strings or of id lists, a tensor of several rows) is refused.
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
    "kvsieve.generate takes one prompt per call: a string, a list of token ids, or a list of "
    "{'role', 'content'} messages (one conversation); batches are not supported yet"
)


def _as_ids(ids: Any, name: str) -> list[int]:
    """Token ids as a list of ints; anything else (None, a batch, strings) is an error saying what is expected."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() > 2 or (ids.dim() == 2 and ids.shape[0] != 1):
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


# --------------------------------------------------------------------------------------------- sampling
def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """``[B, V]`` logits -> ``[B, 1]`` token ids: greedy at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # keeps at least the top token
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    cpu_probs = probs.cpu()  # sampling on the CPU makes a seed give the same tokens on any device
    return torch.multinomial(cpu_probs, 1, generator=generator).to(logits.device)


def eos_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return ids


# ------------------------------------------------------------------------------------------ generation
@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompt: PromptInput,
    method: Method | str | None = None,
    max_new_tokens: int = 64,
    question: TokenInput | None = None,
    chunk_size: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stream: Callable[[str], None] | None = None,
    chat: bool | None = None,
    stop_at_eos: bool = True,
) -> GenerationOutput:
    """Generate from ``prompt`` with ``method``'s cache and measure it.

    ``prompt``: a string, token ids, or a conversation (a list of ``{"role", "content"}`` messages, rendered by
    the tokenizer's chat template); one prompt per call. ``method``: a `Method`, a registered name (default
    parameters) or None (the full cache). ``chunk_size``: prefill the prompt that many tokens at a time.
    ``temperature=0`` is greedy; otherwise nucleus sampling with ``top_p`` from a generator seeded with ``seed``.
    ``stream`` receives the text as it is produced. ``out.stop_reason`` says why generation stopped: ``"eos"`` or
    ``"max_new_tokens"``.
    """
    check_int("max_new_tokens", max_new_tokens, 1)
    check_float("temperature", temperature, 0.0)
    check_float("top_p", top_p, 0.0, 1.0, low_open=True)
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, 1)
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "get_input_embeddings"):
        raise TypeError(f"model must be a transformers causal LM (kvsieve.load_model), got {type(model).__name__}")
    if not callable(getattr(tokenizer, "decode", None)):
        raise TypeError(
            f"tokenizer must be the model's tokenizer (kvsieve.load_model returns both), got {type(tokenizer).__name__}"
        )
    method = as_method(method)
    context_ids, question_ids = encode_prompt(tokenizer, prompt, question, chat)
    method = method.for_prompt(len(context_ids) + len(question_ids))
    device = model.get_input_embeddings().weight.device
    cache = SieveCache(model, method, reserve=max_new_tokens + len(question_ids) + 1)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None

    start = time.perf_counter()
    logits = prefill(model, cache, context_ids, question_ids, chunk_size, device)
    prefill_s = time.perf_counter() - start
    after_prefill = kv_snapshot(cache)

    stops = eos_ids(model, tokenizer) if stop_at_eos else set()
    emitted = ""

    def on_token(tokens: list[int]) -> None:
        nonlocal emitted
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if len(text) > len(emitted) and not text.endswith("\ufffd"):
            stream(text[len(emitted) :])
            emitted = text

    attended_before = [(layer.attended_total, layer.attend_calls) for layer in cache.sieve_layers]
    tokens, decode_s, decode_steps = decode(
        model,
        cache,
        logits,
        max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        generator=generator,
        stop_ids=stops,
        on_token=None if stream is None else on_token,
    )

    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if stream is not None and len(text) > len(emitted):
        stream(text[len(emitted) :])
    stats = _stats(
        cache,
        method,
        after_prefill,
        attended_before,
        len(context_ids),
        len(question_ids),
        tokens,
        prefill_s,
        decode_s / decode_steps if decode_steps else None,
    )
    stopped_at_eos = bool(tokens) and tokens[-1] in stops
    return GenerationOutput(
        text=text, tokens=tokens, stats=stats, stop_reason="eos" if stopped_at_eos else "max_new_tokens"
    )


def decode(
    model,
    cache,
    logits: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    stop_ids: Collection[int] = (),
    on_token: Callable[[list[int]], None] | None = None,
) -> tuple[list[int], float, int]:
    """Choose up to ``max_new_tokens`` tokens, starting from ``logits`` ``[1, V]`` (the prompt's last position) and
    feeding each chosen token through ``cache``; stops after a token in ``stop_ids``.

    Returns the tokens, the seconds spent in the decode forwards and their number (one fewer than the tokens: the
    last token is never fed). ``on_token(tokens)`` is called after each token is chosen (streaming).
    """
    tokens: list[int] = []
    decode_s = 0.0
    decode_steps = 0
    while True:
        next_token = sample_next(logits, temperature, top_p, generator)
        token = int(next_token[0, 0])
        tokens.append(token)
        if on_token is not None:
            on_token(tokens)
        if token in stop_ids or len(tokens) >= max_new_tokens:
            break
        t0 = time.perf_counter()
        out = model(input_ids=next_token, **cache_kwargs(model, cache))
        logits = out.logits[:, -1]
        decode_s += time.perf_counter() - t0
        decode_steps += 1
    return tokens, decode_s, decode_steps


def prefill(
    model,
    cache: SieveCache,
    context_ids: list[int],
    question_ids: list[int],
    chunk_size: int | None,
    device: torch.device,
    compress_after_question: bool | None = None,
) -> torch.Tensor:
    """Feed the prompt (and question) through ``cache``; returns the last position's logits ``[1, V]``.

    ``compress_after_question`` (default: the cache's method decides) makes the question chunk the one that
    completes the prompt, instead of a chunk fed after compression."""
    if compress_after_question is None:
        compress_after_question = cache.method.compress_after_question
    proxies_in_question = bool(question_ids) and compress_after_question
    pieces = _chunks(context_ids, chunk_size)
    phases = [Phase.PREFILL] * len(pieces)
    if not proxies_in_question:
        phases[-1] = Phase.PREFILL_LAST
    if question_ids:
        pieces.append(question_ids)
        phases.append(Phase.PREFILL_LAST if proxies_in_question else Phase.DECODE)
        cache.question_span = (len(context_ids), len(context_ids) + len(question_ids))
    logits = None
    for piece, phase in zip(pieces, phases):
        cache.phase = phase
        ids = torch.tensor([piece], dtype=torch.long, device=device)
        logits = model(input_ids=ids, logits_to_keep=1, **cache_kwargs(model, cache)).logits[:, -1]
    cache.phase = Phase.DECODE
    return logits


def cache_kwargs(model, cache) -> dict[str, Any]:
    """Keyword arguments that hand ``cache`` to ``model``'s forward."""
    return {_cache_keyword(type(model)): cache, "use_cache": True}


@functools.cache
def _cache_keyword(model_class: type) -> str:
    """``cache`` from transformers 5.24 on, ``past_key_values`` before (5.24 still accepts it, with a warning)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _chunks(ids: list[int], size: int | None) -> list[list[int]]:
    if size is None or size >= len(ids):
        return [list(ids)]
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def kv_snapshot(cache: SieveCache) -> dict[str, Any]:
    """Stored entries per layer (``stored``), bytes held (``bytes``) and bytes a plain cache would hold for the
    same tokens in the same layers (``bytes_full``), right after compression (before any question chunk or
    decoding). For InfLLM/ActQKV ``bytes`` is what sits on the device, their host store apart."""
    stored, held, full = [], 0, 0
    for layer in cache.layers:
        if getattr(layer, "stored_after_prefill", None) is not None:
            stored.append(layer.stored_after_prefill)
            held += layer.bytes_after_prefill
            full += layer.bytes_before_compress
        else:  # layers that do not compress once at the prompt's end, and built-in (sliding window) layers
            stored.append(stored_entries(layer))
            held += layer_kv_bytes(layer)
            full += layer.uncompressed_bytes() if isinstance(layer, SieveLayer) else layer_kv_bytes(layer)
    return {"stored": stored, "bytes": held, "bytes_full": full}


def _stats(
    cache: SieveCache,
    method: Method,
    after_prefill: dict,
    attended_before: list[tuple[int, int]],
    n_prompt: int,
    n_question: int,
    tokens: list[int],
    prefill_s: float,
    decode_s_per_token: float | None,
) -> GenerationStats:
    per_step = []
    layers = []
    sieve_index = 0
    for idx, layer in enumerate(cache.layers):
        entry: dict[str, Any] = {"layer": idx, "stored_after_prefill": after_prefill["stored"][idx]}
        if hasattr(layer, "policy"):
            total0, calls0 = attended_before[sieve_index]
            sieve_index += 1
            calls = layer.attend_calls - calls0
            if calls:
                per_step.append((layer.attended_total - total0) / calls)
                entry["attended_per_step"] = per_step[-1]
            entry.update(layer.policy.stats())
        else:
            entry["kind"] = "sliding_window"
        layers.append(entry)
    stored = after_prefill["stored"]
    return GenerationStats(
        method=method.name,
        budget=method.budget_label,
        prompt_tokens=n_prompt,
        question_tokens=n_question,
        new_tokens=len(tokens),
        kv_stored_tokens=sum(stored) / len(stored),
        kv_stored_tokens_per_layer=stored,
        kv_bytes=after_prefill["bytes"],
        kv_bytes_full=after_prefill["bytes_full"],
        kv_bytes_end=cache.kv_bytes(),
        attended_per_step=sum(per_step) / len(per_step) if per_step else None,
        prefill_s=prefill_s,
        decode_s_per_token=decode_s_per_token,
        layers=layers,
    )
