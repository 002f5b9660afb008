"""Shared prefill: one prompt forward for every method that compresses after it.

Methods such as SnapKV, PyramidKV, H2O, StreamingLLM, NACL and RefreshKV prefill exactly like the full cache
(every prompt token appended, full attention) and do their own work only in ``observe`` (seeing the prompt's real
queries) and ``compress`` (right after the chunk that completes the prompt, layer by layer). So one forward can
serve all of them: `shared_prefill` runs the prompt through a full cache whose layers fan out to the participants.

* Every prompt chunk's keys and values are stored once, in the full cache's store. Before each chunk's attention,
  every participant's policy ``observe``-s the same call through its own store, which mirrors the full store
  (`KVStore.mirror`): no copy of the keys, but private auxiliary tensors (H2O's accumulated scores), so methods
  and budgets never see each other's state. Where a participant's ``observe`` reads the attention's log-sum-exp
  (``LayerPolicy.observes_lse``: H2O), the full cache computes its attention with it before they observe
  (`attention_with_lse`, `attend`'s output bit for bit) and hands both to each of them: the attention runs once
  per chunk however many H2O budgets ride along, and their hooks' time is their column sums alone.
* After the attention over the chunk that completes the prompt (``PREFILL_LAST``), layer by layer, each
  participant's store takes a private copy of that layer's entries (`KVStore.adopt`) and the policy runs its own
  ``compress`` on it. Peak memory is the full cache plus one layer's copy per participant, plus what the
  participants keep.

The result is one ready `SieveCache` per method (each layer with its own policy and the right ``seen`` count), equal
to what its own prefill would have built (tests/test_prefill_sharing.py checks stored keys, values and positions
and the next logits), plus the full cache itself, the reference. Methods whose prefill is their own (InfLLM,
ActQKV: ``Method.shares_prefill`` False) are refused with a clear error.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kvsieve.cache import SieveCache, SieveLayer
from kvsieve.driver import Driver
from kvsieve.methods.base import LayerPolicy, Method, Phase, PromptLayout
from kvsieve.methods.base import method as make_method
from kvsieve.ops.scored_attention import attention_with_lse

__all__ = ["SharedPrefill", "check_shareable", "copy_cache", "shared_prefill", "shares_prefill"]


def shares_prefill(method: Method) -> bool:
    """Whether ``method`` can take part in a shared prefill: it says so (``shares_prefill``) and its policy's
    ``update`` is the plain append of `LayerPolicy.update`."""
    return bool(getattr(method, "shares_prefill", False)) and method.policy.update is LayerPolicy.update


def check_shareable(methods: Sequence[Method], with_question: bool = False) -> None:
    """Raise ValueError naming every method that cannot share a prefill, or a mix that cannot share one.

    ``with_question``: a question chunk follows the prompt; methods whose compression waits for it
    (``compress_after_question``) cannot share a prefill with methods that compress before it.
    """
    refused = [m.name for m in methods if not shares_prefill(m)]
    if refused:
        raise ValueError(
            f"method(s) {', '.join(refused)} cannot share a prefill: their policy stores or attends the prompt its "
            "own way (Method.shares_prefill is False); run them with their own prefill (kvsieve.generate)"
        )
    if with_question:
        late = {bool(m.compress_after_question) for m in methods}
        if len(late) > 1:
            names = [m.name for m in methods if m.compress_after_question]
            raise ValueError(
                f"method(s) {', '.join(names)} compress after the question and the others before it: share a "
                "prefill within each group separately"
            )


class _Participant:
    """One method's cache while it rides along a shared prefill."""

    def __init__(self, cache: SieveCache) -> None:
        self.cache = cache
        self.seconds = 0.0  # time spent in this method's own hooks (observe, copy, compress)


class _FanOutLayer(SieveLayer):
    """The full cache's layer during a shared prefill: stores the prompt once, lets every participant observe and
    compress it. After the prompt it is a plain full-cache `SieveLayer`."""

    def __init__(self, policy: LayerPolicy, trace: bool, index: int, participants: list[_Participant]):
        super().__init__(policy, trace)
        self.index = index
        self.participants = participants

    def _targets(self):
        for participant in self.participants:
            yield participant, participant.cache.layers[self.index]

    def attend_call(self, call, row=0):
        if self._phase is Phase.DECODE or not self.participants:
            return super().attend_call(call, row)
        module, query, scaling, kwargs = call.module, call.query, call.scaling, call.kwargs
        if any(target.policy.observes_lse for _, target in self._targets()):  # the attention once, for all of them
            call.output, call.lse = attention_with_lse(
                module, query, call.keys, call.values, scaling, call.first_position, **kwargs
            )
        for participant, target in self._targets():
            start = time.perf_counter()
            target.follow(self._phase, call.first_position, call.seen)
            target.layout = self.layout
            store = target.policy.store
            store.mirror(self.policy.store)
            observed = target.call(module, query, store.keys, store.values, scaling, kwargs)
            observed.output, observed.lse = call.output, call.lse
            target.policy.observe(observed)
            participant.seconds += time.perf_counter() - start
        out = super().attend_call(call, row)
        if self._phase is Phase.PREFILL_LAST:
            for participant, target in self._targets():
                start = time.perf_counter()
                self._hand_over(target, module, query, call.keys, call.values, scaling, kwargs)
                participant.seconds += time.perf_counter() - start
            self.participants = []
        return out

    def _hand_over(self, target: SieveLayer, module, query, keys, values, scaling, kwargs) -> None:
        """The end of the prompt for one participant's layer: a private copy of the entries, then its compress."""
        if not target.is_initialized:
            target.lazy_initialization(keys, values)
        store = target.policy.store
        store.adopt(self.policy.store)
        # what the full attention over the prompt recorded is what the participant's own prefill records
        target.meter.take_counts(self.meter)
        target.complete_prompt(target.call(module, query, store.keys, store.values, scaling, kwargs))


@dataclass
class SharedPrefill:
    """What `shared_prefill` returns.

    ``caches[i]`` is ``methods[i]``'s cache after the prompt (and the question, if one was given), ready to decode;
    ``logits[i]`` ``[1, V]`` its last position's logits. ``full`` / ``full_logits``: the full cache, the reference.
    ``shared_s``: wall time of the forwards without the participants' hooks (what the full cache alone costs);
    ``method_s[i]``: the time ``methods[i]``'s hooks took (observe, copy, compress, and its own question chunk).
    ``shared_s + method_s[i]`` is what ``methods[i]``'s own prefill would roughly take.
    """

    full: SieveCache
    full_logits: torch.Tensor
    caches: list[SieveCache]
    logits: list[torch.Tensor]
    shared_s: float
    method_s: list[float] = field(default_factory=list)


@torch.inference_mode()
def shared_prefill(
    model,
    methods: Sequence[Method],
    context_ids: Sequence[int],
    question_ids: Sequence[int] | None = None,
    *,
    chunk_size: int | None = None,
    reserve: int = 64,
    trace: bool = False,
    layout: PromptLayout | None = None,
) -> SharedPrefill:
    """Prefill ``context_ids`` once for every method in ``methods`` and the full cache.

    Equivalent, method by method, to ``Driver(model, SieveCache(model, m)).prompt(context_ids, question_ids,
    chunk_size=chunk_size)``: the prompt in chunks of ``chunk_size``, the last chunk ``PREFILL_LAST``;
    with ``question_ids``, the question follows as its own chunk -- for methods that compress after the question
    (``compress_after_question``, all of them or none) it is part of the shared prefill, otherwise each cache
    (and the full one) gets it as a ``DECODE`` chunk after compression.
    ``reserve``: spare entries per store for what follows (question, generated tokens). ``trace``: as `SieveCache`.
    ``layout``: the prompt's parts when the question is inside ``context_ids`` (query-aware use).
    """
    methods = list(methods)
    context_ids = list(context_ids)
    question_ids = list(question_ids or [])
    if not context_ids:
        raise ValueError("context_ids is empty")
    check_shareable(methods, with_question=bool(question_ids))
    n_prompt = len(context_ids) + len(question_ids or [])
    participants = [
        _Participant(SieveCache(model, m.for_prompt(n_prompt), reserve=reserve, trace=trace)) for m in methods
    ]
    full = SieveCache(model, make_method("full"), reserve=reserve, trace=trace)
    for index, layer in enumerate(full.layers):
        if isinstance(layer, SieveLayer):
            full.layers[index] = _FanOutLayer(layer.policy, trace, index, participants)

    late = bool(question_ids) and bool(methods) and bool(methods[0].compress_after_question)
    driver = Driver(model, full)
    # the question is part of this shared forward only when it holds the proxies (NACL); otherwise each method's
    # cache gets it after compression
    logits = driver.prefill(context_ids, chunk_size, complete=not late, layout=layout)
    if late:
        logits = driver.question(question_ids, completes_prompt=True)
    elapsed = driver.timings.prefill_s + driver.timings.question_s

    caches = []
    for participant in participants:
        cache = participant.cache
        for index, layer in enumerate(full.layers):
            if not isinstance(layer, SieveLayer):  # Gemma-3's sliding-window layers: the model filled them once
                cache.layers[index] = copy.deepcopy(layer)
        cache.layout = full.layout
        caches.append(cache)
    shared_s = elapsed - sum(p.seconds for p in participants)
    method_s = [p.seconds for p in participants]
    all_logits = [logits] * len(caches)
    full_logits = logits
    if question_ids and not late:  # query-agnostic use: each cache reads the question after its compression
        timed = []
        for cache in [full, *caches]:
            reader = Driver(model, cache)
            timed.append(reader.question(question_ids))
            if cache is full:
                shared_s += reader.timings.question_s
            else:
                method_s[len(timed) - 2] += reader.timings.question_s
        full_logits, all_logits = timed[0], timed[1:]
    return SharedPrefill(full, full_logits, caches, all_logits, shared_s, method_s)


def copy_cache(cache: SieveCache) -> SieveCache:
    """An independent copy of a cache (policies, stores, meters): feed each of several questions to its own copy of
    one compressed context."""
    return copy.deepcopy(cache)
