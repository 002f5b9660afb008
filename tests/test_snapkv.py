"""SnapKV (arXiv 2404.14469): the kept set is the released code's formula, computed here directly.

The released code scores ``attn_weights[:, :, -w:, :-w].sum(-2)`` (softmax over every key the window sees, the
prefix columns alone summed) and pools that with zero padding (``F.max_pool1d`` / ``F.avg_pool1d``, the padding
counted in the average). The window's own columns are never pooled into the prefix: a reference that pooled them in
keeps different entries on this prompt, so the test is sharp on that convention.
"""

from __future__ import annotations

import math

import pytest
import torch

import kvsieve
from helpers import random_ids, spy_observed_calls, tiny_model
from kvsieve.cache import SieveCache
from kvsieve.driver import Driver
from kvsieve.ops.scoring import pool_scores

CPU = torch.device("cpu")


def _pool(row: list[float], kernel: int, kind: str) -> list[float]:
    """Zero-padded 'same' pooling of one row, written out: max, or the sum divided by the whole kernel."""
    half = kernel // 2
    padded = [0.0] * half + row + [0.0] * half
    windows = [padded[i : i + kernel] for i in range(len(row))]
    return [max(w) if kind == "max" else sum(w) / kernel for w in windows]


def _released_priority(query, keys, scaling, window, kernel, kind, pool_window_columns=False):
    """Per KV head ``[H_kv, n - window]`` prefix scores: the released formula in float64, GQA mean."""
    q = query[0, :, -window:].double()  # [H, w, D]
    h, n_kv, n = q.shape[0], keys.shape[1], keys.shape[2]
    k = keys[0].double().repeat_interleave(h // n_kv, dim=0)  # [H, n, D]
    visible = torch.arange(n)[None, :] <= torch.arange(n - window, n)[:, None]
    probs = (q @ k.transpose(-1, -2) * scaling).masked_fill(~visible, -math.inf).softmax(dim=-1)  # [H, w, n]
    summed = probs.sum(dim=1)  # [H, n]
    columns = summed if pool_window_columns else summed[:, : n - window]
    pooled = torch.tensor([_pool(r, kernel, kind) for r in columns.tolist()], dtype=torch.float64)
    return pooled[:, : n - window].view(n_kv, h // n_kv, -1).mean(dim=1)


def test_pooling_counts_the_padding_in_the_average():
    scores = torch.tensor([[[3.0, 0.0, 0.0, 0.0, 6.0]]])
    assert pool_scores(scores, 3, "avg").tolist() == [[[1.0, 1.0, 0.0, 2.0, 2.0]]]  # 3 / 3 at the edge, not 3 / 2


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_kept_set_is_the_released_formula(kind):
    model = tiny_model("llama")
    n, window, kernel, budget = 64, 8, 5, 24
    cache = SieveCache(model, kvsieve.method("snapkv", budget=budget, window_size=window, kernel_size=kernel,
                                             pooling=kind))  # fmt: skip
    seen = spy_observed_calls(cache)
    with torch.inference_mode():
        Driver(model, cache).prompt(random_ids(n))
    sharp = False
    for i, layer in enumerate(cache.sieve_layers):
        query, keys, scaling = seen[i]
        scores = _released_priority(query, keys, scaling, window, kernel, kind)  # [H_kv, n - w]
        leaky = _released_priority(query, keys, scaling, window, kernel, kind, pool_window_columns=True)
        for head in range(keys.shape[1]):
            kept = layer.policy.store.positions[0, head].long().sort().values.tolist()
            assert kept[-window:] == list(range(n - window, n))  # the window itself, always
            chosen = torch.tensor(kept[:-window])
            assert len(chosen) == budget - window
            others = torch.ones(n - window, dtype=torch.bool)
            others[chosen] = False
            # max pooling makes plateaus (ties): what must hold is that nothing left out scores above a kept entry
            assert scores[head][chosen].min() >= scores[head][others].max() - 1e-6
            if kind == "avg":  # no ties: the top-k set itself
                assert set(chosen.tolist()) == set(scores[head].topk(budget - window).indices.tolist())
            leaky_kept = set(leaky[head].topk(budget - window).indices.tolist())
            sharp |= leaky[head][chosen].min() < leaky[head][sorted(leaky_kept)].min() - 1e-6
    assert sharp  # pooling the window's columns in would have kept other entries somewhere
