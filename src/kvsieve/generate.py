"""Generation with a kvsieve cache: `generate` (one prompt, one answer) and `compress` (one context, many questions).

Both feed the cache through one `kvsieve.driver.Driver`: the prompt (whole or chunked), the question as its own
chunk after compression (query-agnostic use; NACL, whose proxies are the question, compresses after it), then the
decode steps; and both measure the same `GenerationStats`. ``compress(...).generate(q)`` returns what
``generate(..., question=q)`` returns, token for token: the compressed cache is copied for each question.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from kvsieve.cache import SieveCache, SieveLayer
from kvsieve.driver import Driver, KVSnapshot
from kvsieve.methods.base import Method, check_float, check_int
from kvsieve.prompts import PromptBatch, PromptInput, TokenInput, encode_context, encode_prompt, split_batch

__all__ = ["CompressedContext", "GenerationOutput", "GenerationStats", "compress", "decode", "eos_ids", "generate"]


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
def _check_model(model, tokenizer) -> None:
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "get_input_embeddings"):
        raise TypeError(f"model must be a transformers causal LM (kvsieve.load_model), got {type(model).__name__}")
    if not callable(getattr(tokenizer, "decode", None)):
        raise TypeError(
            f"tokenizer must be the model's tokenizer (kvsieve.load_model returns both), got {type(tokenizer).__name__}"
        )


@dataclass(frozen=True)
class Sampling:
    """How the answer is chosen: greedy at ``temperature`` 0, else nucleus sampling seeded with ``seed``."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens, 1)
        check_float("temperature", self.temperature, 0.0)
        check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompt: PromptInput | PromptBatch,
    method: Method | str | None = None,
    max_new_tokens: int = 64,
    question: TokenInput | Sequence[TokenInput] | None = None,
    chunk_size: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stream: Callable[[str], None] | None = None,
    chat: bool | None = None,
    stop_at_eos: bool = True,
) -> GenerationOutput | list[GenerationOutput]:
    """Generate from ``prompt`` with ``method``'s cache and measure it.

    ``prompt``: a string, token ids, or a conversation (a list of ``{"role", "content"}`` messages, rendered by
    the tokenizer's chat template). A batch -- a list of such prompts, or a 2-D tensor of token ids (one prompt per
    row) -- returns a list of outputs, one per prompt, each what that prompt alone returns (greedy: the same
    tokens; sampled: the same draws, each row's generator seeded with ``seed``); its times are the batch's.
    ``question``: fed after the prompt is compressed (the query-agnostic use; a fractional budget is a fraction of
    the prompt without it); for a batch, one question for all or a list with one per prompt. ``method``: a
    `Method`, a registered name (default parameters) or None (the full cache). ``chunk_size``: prefill the prompt
    that many tokens at a time. ``temperature=0`` is greedy; otherwise nucleus sampling with ``top_p`` from a
    generator seeded with ``seed``. ``stream`` receives the text as it is produced (one prompt only).
    ``out.stop_reason`` says why generation stopped: ``"eos"`` or ``"max_new_tokens"``.
    """
    sampling = Sampling(max_new_tokens, temperature, top_p, seed, stop_at_eos)
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, 1)
    _check_model(model, tokenizer)
    batch = split_batch(prompt, question)
    if batch is not None and stream is not None:
        raise ValueError("stream takes one prompt: a batch returns its outputs when every row has finished")
    pairs = [encode_prompt(tokenizer, p, q, chat) for p, q in (batch or [(prompt, question)])]
    contexts, questions = [c for c, _ in pairs], [q for _, q in pairs]
    reserve = max_new_tokens + max(map(len, questions)) + 1
    lengths = [len(c) for c in contexts]
    driver = Driver.new(model, method, lengths if batch is not None else lengths[0], reserve=reserve)
    logits = driver.prompt_rows(contexts, questions, chunk_size=chunk_size)
    outputs = _answer(driver, tokenizer, logits, lengths, [len(q) for q in questions], sampling, stream)
    return outputs if batch is not None else outputs[0]


@torch.inference_mode()
def compress(
    model,
    tokenizer,
    context: PromptInput,
    method: Method | str | None = None,
    *,
    chunk_size: int | None = None,
    chat: bool | None = None,
) -> CompressedContext:
    """Prefill ``context`` and compress it once, to answer several questions (`CompressedContext.generate`).

    ``ctx = kvsieve.compress(model, tok, document, method="snapkv")`` then ``ctx.generate(question)`` for each
    question: each answer reads a copy of the compressed cache and equals ``kvsieve.generate(model, tok, document,
    question=question, method=...)`` token for token. Methods whose compression needs the question (NACL with the
    question's tokens as proxies: ``compress_after_question``) keep the context uncompressed here and compress a
    copy for each question.
    """
    if chunk_size is not None:
        check_int("chunk_size", chunk_size, 1)
    _check_model(model, tokenizer)
    if isinstance(context, str) and not context.strip():
        raise ValueError("context is empty")
    context_ids = encode_context(tokenizer, context, chat)
    driver = Driver.new(model, method, len(context_ids))
    late = driver.method.compress_after_question
    driver.prefill(context_ids, chunk_size, complete=not late)
    return CompressedContext(model, tokenizer, context, chat, context_ids, driver)


class CompressedContext:
    """A context prefilled (and compressed) once; `generate` answers a question from a copy of its cache."""

    def __init__(self, model, tokenizer, context, chat, context_ids: list[int], driver: Driver) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.context = context
        self.chat = chat
        self.context_ids = context_ids
        self._driver = driver

    @classmethod
    def of_ids(cls, model, tokenizer, context_ids: list[int], driver: Driver) -> CompressedContext:
        """A context already encoded and fed to ``driver`` (the eval runner's shared prefills); its questions are
        token ids, encoded apart."""
        return cls(model, tokenizer, list(context_ids), False, list(context_ids), driver)

    @property
    def method(self) -> Method:
        return self._driver.method

    @property
    def cache(self) -> SieveCache:
        """The compressed cache (never fed a question: each answer reads a copy)."""
        return self._driver.cache

    @property
    def compressed(self) -> bool:
        """False for methods that compress after the question (each question compresses its own copy)."""
        return not self.method.compress_after_question

    def kv_bytes(self) -> int:
        return self.cache.kv_bytes()

    @torch.inference_mode()
    def generate(
        self,
        question: TokenInput,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stream: Callable[[str], None] | None = None,
        stop_at_eos: bool = True,
    ) -> GenerationOutput:
        """Answer ``question`` from a copy of the compressed context; the same `GenerationOutput` as
        ``kvsieve.generate(model, tok, context, question=question, method=...)`` (``prefill_s``: the context's
        prefill and compression, measured once, plus this question's chunk)."""
        if question is None:
            raise ValueError("question is required: a string or token ids to answer from the compressed context")
        sampling = Sampling(max_new_tokens, temperature, top_p, seed, stop_at_eos)
        context_ids, question_ids = encode_prompt(self.tokenizer, self.context, question, self.chat)
        if context_ids != self.context_ids:  # the chat template split the turn elsewhere: never answer silently
            raise RuntimeError("the question changed how the context is tokenized; use kvsieve.generate instead")
        driver, logits = self.ask(question_ids)
        return _answer(driver, self.tokenizer, logits, [len(context_ids)], [len(question_ids)], sampling, stream)[0]

    @torch.inference_mode()
    def ask(self, question_ids: list[int], *, reuse: bool = False) -> tuple[Driver, torch.Tensor]:
        """Feed ``question_ids`` as their own chunk to a copy of the compressed cache (``reuse``: to the cache itself,
        when no question follows); returns that driver, ready to decode, and the question's last logits ``[1, V]``.
        What `generate` answers from, and the eval runner's several questions per context."""
        if self._driver is None:
            raise RuntimeError("this compressed context was handed to its last question (reuse=True) already")
        completes_prompt = not self.compressed
        driver = self._driver if reuse else self._driver.copy()
        if reuse:
            self._driver = None  # spent: a later question would read a cache that holds this one
        return driver, driver.question(question_ids, completes_prompt=completes_prompt)


def _answer(
    driver: Driver,
    tokenizer,
    logits: torch.Tensor,
    n_prompt: list[int],
    n_question: list[int],
    sampling: Sampling,
    stream: Callable[[str], None] | None,
) -> list[GenerationOutput]:
    """Decode every batch row from the prompt's last ``logits`` ``[B, V]`` and measure each (what `generate` and
    `CompressedContext` share)."""
    rows = range(driver.batch_size)
    after_prefill = [driver.snapshot(row) for row in rows]
    marks = [driver.mark(row) for row in rows]
    stops = eos_ids(driver.model, tokenizer) if sampling.stop_at_eos else set()
    generators = [
        None if sampling.seed is None else torch.Generator().manual_seed(sampling.seed) for _ in rows
    ]  # one per row, so that a row draws what it draws alone
    emitted = ""

    def on_token(tokens: list[int]) -> None:
        nonlocal emitted
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        if len(text) > len(emitted) and not text.endswith("\ufffd"):
            stream(text[len(emitted) :])
            emitted = text

    tokens = decode_rows(
        driver,
        logits,
        sampling.max_new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        generators=generators,
        stop_ids=stops,
        on_token=None if stream is None else on_token,
    )
    outputs = []
    for row in rows:
        text = tokenizer.decode(tokens[row], skip_special_tokens=True)
        if stream is not None and len(text) > len(emitted):
            stream(text[len(emitted) :])
        stats = _stats(driver, after_prefill[row], marks[row], n_prompt[row], n_question[row], tokens[row], row)
        stopped_at_eos = bool(tokens[row]) and tokens[row][-1] in stops
        outputs.append(
            GenerationOutput(
                text=text, tokens=tokens[row], stats=stats, stop_reason="eos" if stopped_at_eos else "max_new_tokens"
            )
        )
    return outputs


def decode(
    driver: Driver,
    logits: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    stop_ids: Collection[int] = (),
    on_token: Callable[[list[int]], None] | None = None,
) -> list[int]:
    """Choose up to ``max_new_tokens`` tokens, starting from ``logits`` ``[1, V]`` (the prompt's last position) and
    feeding each chosen token through the driver; stops after a token in ``stop_ids``. The last token is never
    fed (the driver's `Timings` count the steps). ``on_token(tokens)`` is called after each token is chosen."""
    return decode_rows(
        driver,
        logits,
        max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        generators=[generator],
        stop_ids=stop_ids,
        on_token=on_token,
    )[0]


def decode_rows(
    driver: Driver,
    logits: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generators: Sequence[torch.Generator | None],
    stop_ids: Collection[int] = (),
    on_token: Callable[[list[int]], None] | None = None,
) -> list[list[int]]:
    """`decode` for a batch: ``logits`` ``[B, V]``, one generator per row; a row stops on its own (after a token in
    ``stop_ids`` or ``max_new_tokens``) and is fed nothing after that. ``on_token``: one-row batches only."""
    tokens: list[list[int]] = [[] for _ in generators]
    live = list(range(len(generators)))
    while True:
        fed: list[int | None] = [None] * len(generators)
        for row in live:
            token = int(sample_next(logits[row : row + 1], temperature, top_p, generators[row])[0, 0])
            tokens[row].append(token)
            if on_token is not None:
                on_token(tokens[row])
            if token not in stop_ids and len(tokens[row]) < max_new_tokens:
                fed[row] = token
        live = [row for row in live if fed[row] is not None]
        if not live:
            return tokens
        logits = driver.step_rows(fed)


def _stats(
    driver: Driver,
    after_prefill: KVSnapshot,
    mark: list[tuple[int, int]],
    n_prompt: int,
    n_question: int,
    tokens: list[int],
    row: int = 0,
) -> GenerationStats:
    """Batch row ``row``'s statistics (the timings are the batch's)."""
    cache, timings = driver.cache, driver.timings
    method = cache.row_method(row)
    per_step = []
    layers = []
    sieve = iter(zip(cache.sieve_layers, mark))
    for idx, layer in enumerate(cache.layers):
        entry: dict[str, Any] = {"layer": idx, "stored_after_prefill": after_prefill.stored[idx]}
        if isinstance(layer, SieveLayer):
            _, layer_mark = next(sieve)
            attended = layer.rows[row].meter.attended_since(layer_mark)
            if attended is not None:
                per_step.append(attended)
                entry["attended_per_step"] = attended
            entry.update(layer.rows[row].policy.stats())
        else:
            entry["kind"] = "sliding_window"
        layers.append(entry)
    return GenerationStats(
        method=method.name,
        budget=method.budget_label,
        prompt_tokens=n_prompt,
        question_tokens=n_question,
        new_tokens=len(tokens),
        kv_stored_tokens=after_prefill.mean_stored,
        kv_stored_tokens_per_layer=after_prefill.stored,
        kv_bytes=after_prefill.bytes,
        kv_bytes_full=after_prefill.bytes_full,
        kv_bytes_end=cache.kv_bytes_of_row(row),
        attended_per_step=sum(per_step) / len(per_step) if per_step else None,
        prefill_s=timings.prefill_s + timings.question_s,
        decode_s_per_token=timings.decode_s_per_token,
        layers=layers,
    )
