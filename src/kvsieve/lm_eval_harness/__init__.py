"""EleutherAI lm-evaluation-harness client: the ``kvsieve`` model type, every request over a kvsieve cache.

lm-eval 0.4.13 finds model types only in its own registry (no plugin entry points; ``--include_path`` adds
tasks, not models), so the type exists once this module is imported. Two ways in:

* ``python -m kvsieve.lm_eval_harness --model kvsieve --model_args pretrained=smollm2-135m,method=snapkv,budget=0.2
  --tasks ...`` (or the ``kvsieve-lm-eval`` script): registers the type, then runs lm-eval's own command line.
* ``import kvsieve.lm_eval_harness`` then ``lm_eval.simple_evaluate(model="kvsieve", model_args=...)``.

`KVSieveLM` is lm-eval's `HFLM` (tokenization, truncation, chat templates: exactly as ``--model hf``) with the
three request types answered through kvsieve (see docs/lm_eval.md):

* ``loglikelihood``: the context is prefilled and compressed alone (`kvsieve.driver.Driver`, query-agnostic),
  then the continuation is fed one token at a time, as generated tokens would be, and its log-probs summed.
  Requests that share a context share its compressed cache (`Driver.copy`).
* ``generate_until``: `kvsieve.generate` on the context, stopping at ``until``, ``max_gen_toks`` or EOS.
* ``loglikelihood_rolling``: lm-eval's windows, each a one-token prompt whose tokens are all fed as decode
  steps; refused for methods that only act once after the prompt (they would score with the full cache).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as error:  # the optional extra is missing
    raise ImportError(f"kvsieve.lm_eval_harness needs lm-eval: pip install 'kvsieve[lm-eval]' ({error})") from None
from tqdm import tqdm

import kvsieve
from kvsieve.cache import check_supported
from kvsieve.driver import Driver
from kvsieve.methods.base import Method, resolve_budget
from kvsieve.methods.full import Full
from kvsieve.methods.h2o import H2O
from kvsieve.methods.infllm import InfLLM
from kvsieve.methods.refreshkv import RefreshKV
from kvsieve.methods.streamingllm import StreamingLLM

__all__ = ["KVSieveLM", "KVSieveLMError", "rolling_method_names", "score_continuation"]

log = logging.getLogger(__name__)

# Methods that keep acting while tokens are fed after the prompt (rolling eviction, partial-cache decoding, block
# retrieval per step), plus the reference: the only ones a rolling window, whose prompt is one token, exercises.
ROLLING_METHODS: tuple[type[Method], ...] = (Full, StreamingLLM, H2O, RefreshKV, InfLLM)
# generation kwargs that only matter when sampling: ignored when greedy, as transformers' generate does
_SAMPLING_ONLY = {"top_p", "top_k", "min_p", "typical_p", "seed"}


class KVSieveLMError(ValueError):
    """Bad model_args or a request kvsieve cannot answer: the message is one line naming the parameter."""


class _StopText(Exception):
    """Raised from the stream callback to end `kvsieve.generate` at a stop sequence."""


@register_model("kvsieve")
class KVSieveLM(HFLM):
    """``--model kvsieve``: lm-eval's HF model with a kvsieve cache. Requests are answered one at a time.

    model_args: ``pretrained`` (a local HF directory, a .gguf file or a known alias, `kvsieve.load_model`; default
    the embedded SmolLM2), ``method`` (default ``full``), ``budget`` (int tokens or a fraction in (0, 1]),
    ``dtype`` (default float32), ``chunk_size`` (prefill that many tokens at a time), lm-eval's ``max_length``,
    ``add_bos_token``, ``prefix_token_id``, ``device``, ``batch_size``; any other key is a parameter of the method,
    read like ``kvsieve generate --param K=V``.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        method: str = "full",
        budget: int | float | str | None = None,
        dtype: str = "float32",
        device: str | None = None,
        chunk_size: int | None = None,
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,  # lm-eval passes it to every model type; unused (no batches)
        max_length: int | None = None,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        trust_remote_code: bool = False,
        **method_params: Any,
    ) -> None:
        self.method_name = method
        self.method_params = _method_params(budget, method_params)
        self.kv_method = _build_method(method, self.method_params)  # before the slow model load
        for name, value in (("chunk_size", chunk_size), ("max_length", max_length)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise KVSieveLMError(f"model_args: {name} must be an int >= 1, got {value!r}")
        if batch_size not in (None, 1, "1"):
            log.info("kvsieve answers requests one at a time; batch_size=%s is ignored", batch_size)
        self.chunk_size = chunk_size
        try:
            model, tokenizer = kvsieve.load_model(
                pretrained, dtype=dtype, device_map=_device_map(device), trust_remote_code=bool(trust_remote_code)
            )
            check_supported(model.config.get_text_config())
        except (ValueError, TypeError, FileNotFoundError) as error:
            raise KVSieveLMError(f"model_args: {error}") from None
        self.pretrained_name = pretrained
        with _quiet("lm_eval.models.huggingface"):  # its warnings about a pre-loaded model do not apply here
            super().__init__(
                pretrained=model,
                tokenizer=tokenizer,
                backend="causal",
                max_length=max_length,
                add_bos_token=add_bos_token,
                prefix_token_id=prefix_token_id,
                batch_size=1,
            )

    # ------------------------------------------------------------------------------------------ requests
    @torch.inference_mode()
    def _loglikelihood_tokens(
        self,
        requests: Sequence[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        """Each ``(request, context_ids, continuation_ids)``: the continuation's summed log-prob over the compressed
        context, and whether greedy decoding would produce it. Left-truncated to ``max_length`` like ``hf``."""
        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        for index, (_, context, continuation) in enumerate(requests):
            context, continuation = self._fit(context, continuation)
            groups.setdefault(tuple(context), []).append((index, continuation))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="kvsieve loglikelihood")
        for context, items in groups.items():
            driver, logits = self._prefill(list(context), max(len(c) for _, c in items) + 1)
            for n, (index, continuation) in enumerate(items):
                # a one-token continuation feeds nothing; the last request may consume the shared cache
                own = driver if n + 1 == len(items) or len(continuation) == 1 else driver.copy()
                results[index] = score_continuation(own, logits, continuation)
                if requests[index][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], results[index])
                bar.update(1)
        bar.close()
        return results

    @torch.inference_mode()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """lm-eval's disjoint windows of ``max_length`` tokens, each scored from a one-token prompt with every
        token fed as a decode step, so the method acts throughout. A fractional budget is a fraction of the
        window's tokens."""
        if not isinstance(self.kv_method, ROLLING_METHODS):
            raise KVSieveLMError(
                f"loglikelihood_rolling with method {self.method_name!r}: it compresses once, right after the prompt, "
                "and a rolling window's prompt is one token, so it would score with the full cache; methods that act "
                f"while tokens are fed: {', '.join(rolling_method_names())}"
            )
        totals = []
        for (text,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="kvsieve loglikelihood_rolling"):
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            total = 0.0
            for context, continuation in map(make_disjoint_window, windows):
                method = self._method_for(len(context) + len(continuation))
                driver, logits = self._prefill(context, len(continuation) + 1, method)
                total += score_continuation(driver, logits, continuation)[0]
            totals.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """`kvsieve.generate` over the (left-truncated) context: compressed after its prefill, then decoded."""
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        outputs = []
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm, desc="kvsieve generate"):
            kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = kwargs.pop("max_gen_toks")
            sampling = _sampling_args(kwargs)
            room = self.max_length - max_new
            if room < 1:
                raise KVSieveLMError(
                    f"max_gen_toks={max_new} leaves no room for a context in max_length={self.max_length}"
                )
            ids = self.tok_encode(context, left_truncate_len=room)
            text = postprocess_generated_text(self._generate(ids, until, max_new, sampling), until, None)
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return outputs

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records with the results; never asks a model hub (``hf`` does, for the sha)."""
        return {
            "model_num_parameters": self.model.num_parameters(),
            "model_dtype": str(self.model.dtype),
            "kvsieve_version": kvsieve.__version__,
            "kvsieve_method": str(self.kv_method),
            "kvsieve_pretrained": str(self.pretrained_name or "default"),
        }

    # ----------------------------------------------------------------------------------------- internals
    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """``hf``'s truncation: the last ``max_length + 1`` tokens of context + continuation, the last one unfed."""
        if len(continuation) > self.max_length:
            raise KVSieveLMError(
                f"a continuation of {len(continuation)} tokens does not fit max_length={self.max_length}"
            )
        if len(context) + len(continuation) > self.max_length + 1:
            log.warning(
                "context + continuation exceed max_length=%d: the context is cut from the left", self.max_length
            )
        tokens = (context + continuation)[-(self.max_length + 1) :]
        return tokens[: len(tokens) - len(continuation)], continuation

    def _prefill(self, context: list[int], reserve: int, method: Method | None = None) -> tuple[Driver, torch.Tensor]:
        """A driver whose cache holds the compressed ``context``, and the logits ``[1, V]`` of its last position."""
        driver = Driver.new(self.model, method or self.kv_method, len(context), reserve=reserve)
        return driver, driver.prefill(context, self.chunk_size)

    def _method_for(self, window_tokens: int) -> Method:
        """The method for one rolling window: a fractional budget becomes that fraction of the window's tokens
        (its prompt is a single token)."""
        budget = getattr(self.kv_method, "budget", None)
        if not isinstance(budget, float):
            return self.kv_method
        return _build_method(self.method_name, {**self.method_params, "budget": resolve_budget(budget, window_tokens)})

    def _generate(self, ids: list[int], until: list[str], max_new: int, sampling: dict[str, Any]) -> str:
        pieces: list[str] = []

        def stream(piece: str) -> None:
            pieces.append(piece)
            text = "".join(pieces)
            if any(stop and stop in text for stop in until):
                raise _StopText  # the text is complete up to the stop; decoding further would be wasted

        try:
            return kvsieve.generate(
                self.model,
                self.tokenizer,
                ids,
                method=self.kv_method,
                max_new_tokens=max_new,
                chunk_size=self.chunk_size,
                stream=stream,
                **sampling,
            ).text
        except _StopText:
            return "".join(pieces)


@torch.inference_mode()
def score_continuation(driver: Driver, logits: torch.Tensor, continuation: Sequence[int]) -> tuple[float, bool]:
    """Teacher-force ``continuation`` through the driver's cache (one decode step per token, as generation feeds
    tokens), starting from ``logits`` ``[1, V]`` of the context's last position.

    Returns the summed log-probability (fp32 softmax) and whether every token is the argmax. The last token is
    never fed."""
    total, greedy = 0.0, True
    for step, token in enumerate(continuation):
        logp = torch.log_softmax(logits[0].float(), dim=-1)
        total += float(logp[token])
        greedy = greedy and int(logp.argmax()) == token
        if step + 1 < len(continuation):
            logits = driver.step(token)
    return total, greedy


def rolling_method_names() -> list[str]:
    """Registered methods and presets that `KVSieveLM.loglikelihood_rolling` accepts."""
    return sorted(info.name for info in kvsieve.methods() if isinstance(kvsieve.method(info.name), ROLLING_METHODS))


# ----------------------------------------------------------------------------------------- model_args
def _method_params(budget: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Method parameters as ``kvsieve generate --budget B --param K=V`` reads them. lm-eval has already typed
    numbers and booleans; strings it left alone are read as YAML, like ``--param``."""
    from kvsieve.cli import parse_budget, parse_param

    out = {}
    for key, value in params.items():
        out[key] = parse_param(f"{key}={value}")[1] if isinstance(value, str) else value
    if isinstance(budget, str):
        try:
            budget = parse_budget(budget)
        except Exception as error:  # argparse.ArgumentTypeError: a message naming the budget
            raise KVSieveLMError(f"model_args: {error}") from None
    if budget is not None:
        out["budget"] = budget
    return out


def _build_method(name: Any, params: dict[str, Any]) -> Method:
    if not isinstance(name, str):
        raise KVSieveLMError(f"model_args: method must be a method name (see `kvsieve methods`), got {name!r}")
    try:
        return kvsieve.method(name, **params)
    except (ValueError, TypeError) as error:
        raise KVSieveLMError(f"model_args: {error}") from None


def _device_map(device: str | None) -> str | None:
    """``device`` as `kvsieve.load_model`'s ``device_map``. lm-eval's command line defaults to ``cuda:0``, so a
    CUDA device without CUDA falls back to the CPU, as ``hf`` does."""
    if device is None or str(device) == "cpu":
        return None
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s requested but CUDA is not available: using the CPU", device)
        return None
    return str(device)


def _sampling_args(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Normalized lm-eval generation kwargs (``until`` and ``max_gen_toks`` removed) as `kvsieve.generate`'s."""
    do_sample = bool(kwargs.pop("do_sample", False))
    temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
    if not do_sample or temperature == 0.0:
        unknown = sorted(set(kwargs) - _SAMPLING_ONLY)
        args: dict[str, Any] = {"temperature": 0.0}
    else:
        args = {"temperature": temperature, "top_p": float(kwargs.pop("top_p", 1.0)), "seed": kwargs.pop("seed", None)}
        unknown = sorted(kwargs)
    if unknown:
        raise KVSieveLMError(
            f"generation kwargs {', '.join(unknown)} are not supported by the kvsieve model; supported: until, "
            "max_gen_toks, do_sample, temperature, top_p, seed"
        )
    return args


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
