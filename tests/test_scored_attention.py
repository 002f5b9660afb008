"""The fused prefill attention + column sums (`kvsieve.ops.scored_attention`) and H2O built on it.

* Op level, on random tensors (causal, GQA, whole prompt, a chunk after a past, one query; float32 and bfloat16):
  the output is `attend`'s bit for bit, the column sums equal the plain computation (the whole softmax matrix
  summed over its queries) within 1e-5 relative in float32, 3e-2 in bfloat16 (the logits are taken in bfloat16, as
  H2O's release does), and the fallback path (no CPU flash kernel) gives the same. bfloat16 also against its
  recipe done plainly (``logit - lse`` rounded once) and closer to the exact sums than the release's recipe, and the
  per-KV-head sums (``per_query_head=False``) against the per-head ones added.
* Method level: H2O through the fast op keeps, at every step, exactly the entries of a plain reference policy
  (n x n softmax at prefill, a masked softmax row and the float64 priority's argmin at decode), with scores within
  1e-5, and the same logits.
"""

from __future__ import annotations

import pytest
import torch

import kvsieve
from helpers import greedy_with_logits, random_ids, tiny_model
from kvsieve.cache import SieveCache
from kvsieve.methods.base import Phase
from kvsieve.methods.eviction import PriorityEvictionPolicy
from kvsieve.methods.h2o import H2O, SCORE, H2OPolicy
from kvsieve.ops import scored_attention as sa
from kvsieve.ops.attention import attend
from kvsieve.ops.scoring import top_indices

pytestmark = pytest.mark.usefixtures("one_thread")


class _Module(torch.nn.Module):
    """What sdpa_attention_forward reads from an attention module."""

    is_causal = True

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups


def _plain_column_sums(query, keys, scaling, query_start):
    """The whole ``q x S`` causal softmax in float64, summed over the queries: ``[B, H, S]``."""
    h, q = query.shape[1:3]
    s = keys.shape[2]
    k = keys.double().repeat_interleave(h // keys.shape[1], dim=1)
    logits = query.double() @ k.transpose(-1, -2) * scaling
    visible = torch.arange(s)[None, :] <= (query_start + torch.arange(q))[:, None]
    return logits.masked_fill(~visible, -torch.inf).softmax(dim=-1).sum(dim=2)


def _scored(module, query, keys, values, scaling, query_start, block=128, per_query_head=True):
    """What H2O's ``observe`` does: the output and log-sum-exp, then the column sums from them."""
    out, lse = sa.attention_with_lse(module, query, keys, values, scaling, query_start, block)
    return out, sa.prefix_column_sums(query, keys, scaling, lse, query_start, block, per_query_head)


CASES = [(40, 0), (13, 37), (1, 49), (300, 0)]  # (queries, past keys)


# against the float64 softmax of the same inputs: bfloat16 on a CPU never rounds `logit - lse` (`swapped_column_sums`:
# 1e-4 seen, the flash kernel's exponentials); float16's tiles round it once to float16 (2e-3 seen)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-4), (torch.float16, 1e-2)])
@pytest.mark.parametrize("n_query, n_past", CASES)
@pytest.mark.parametrize("flash", [True, False], ids=["flash", "fallback"])
def test_output_is_attend_and_column_sums_are_the_plain_ones(monkeypatch, dtype, tol, n_query, n_past, flash):
    if not flash:
        monkeypatch.setattr(sa, "_flash_applies", lambda *args: False)
    torch.manual_seed(n_query)
    s, module = n_query + n_past, _Module(3)
    query = torch.randn(2, 6, n_query, 16, dtype=dtype) * 2
    keys, values = torch.randn(2, 2, s, 16, dtype=dtype), torch.randn(2, 2, s, 16, dtype=dtype)
    out, sums = _scored(module, query, keys, values, 0.3, n_past, block=8)
    assert torch.equal(out, attend(module, query, keys, values, 0.3))
    plain = _plain_column_sums(query, keys, 0.3, n_past)
    assert sums.dtype == torch.float32 and sums.shape == plain.shape
    assert ((sums.double() - plain).abs() / plain.clamp_min(1e-3)).max().item() < tol
    assert sums.sum().item() == pytest.approx(2 * 6 * n_query, rel=1e-3)  # every query's row sums to one


def _release_column_sums(query, keys, scaling, query_start):
    """H2O's release in a low-precision model: ``q @ k^T`` in the model's dtype (the logits rounded), then float32
    scaling, causal softmax and column sums: ``[B, H, S]``."""
    h, q = query.shape[1:3]
    s = keys.shape[2]
    k = keys.repeat_interleave(h // keys.shape[1], dim=1)
    logits = (query @ k.transpose(-1, -2)).float() * scaling
    visible = torch.arange(s)[None, :] <= (query_start + torch.arange(q))[:, None]
    return logits.masked_fill(~visible, -torch.inf).softmax(dim=-1).sum(dim=2)


def _rounded_after_lse_column_sums(query, keys, scaling, query_start, lse):
    """kvsieve's low-precision recipe done plainly: ``scale x (q . k - lse / scale)`` in float64 (``lse / scale`` as
    its high and low parts in the model's dtype: ~5e-5 at |lse| ~ 10), rounded to that dtype once, exponentiated in
    float64 and summed: ``[B, H, S]``."""
    h, q = query.shape[1:3]
    s = keys.shape[2]
    k = keys.repeat_interleave(h // keys.shape[1], dim=1).double()
    shifted = lse / scaling
    high = shifted.to(query.dtype)
    low = (shifted - high.float()).to(query.dtype)
    exponents = scaling * (query.double() @ k.transpose(-1, -2) - (high.double() + low.double()).unsqueeze(-1))
    visible = torch.arange(s)[None, :] <= (query_start + torch.arange(q))[:, None]
    probs = exponents.to(query.dtype).double().exp().masked_fill(~visible, 0.0)
    return probs.sum(dim=2)


def _max_relative_error(sums, reference):
    return ((sums.double() - reference).abs() / reference.clamp_min(1e-3)).max().item()


@pytest.mark.parametrize("n_query, n_past", CASES)
@pytest.mark.parametrize("flash", [True, False], ids=["flash", "fallback"])
def test_bfloat16_tiles_round_once_after_the_log_sum_exp(monkeypatch, n_query, n_past, flash):
    """The tiled pass in bfloat16 (off the CPU; float16 on it): ``- lse / scale`` is folded into the bfloat16 matmul
    (high and low parts) and the scale is its alpha, so ``logit - lse`` is rounded once: the sums are that recipe's
    done plainly with the same ``lse`` (2e-3 relative, 7e-4 seen: float32 against float64 accumulation moves a few
    exponents by one bfloat16 step, where rounding the logit instead is ~1.5e-2 away)."""
    if not flash:
        monkeypatch.setattr(sa, "_flash_applies", lambda *args: False)
    torch.manual_seed(n_query)
    s = n_query + n_past
    query = torch.randn(2, 6, n_query, 16, dtype=torch.bfloat16) * 2
    keys, values = torch.randn(2, 2, s, 16, dtype=torch.bfloat16), torch.randn(2, 2, s, 16, dtype=torch.bfloat16)
    if flash:
        lse = sa._flash_with_lse(query, keys, values, 0.3)[1]
    else:
        lse = sa.causal_lse(query, keys, 0.3, n_past, block=1000)
    sums = sa.causal_column_sums(query, keys, 0.3, lse, n_past, 8)
    assert _max_relative_error(sums, _rounded_after_lse_column_sums(query, keys, 0.3, n_past, lse)) < 2e-3


# (head dim, tokens, query scale)
@pytest.mark.parametrize("head_dim, n, sharpness", [(128, 512, 2), (64, 512, 2), (64, 1024, 3), (16, 300, 2)])
def test_bfloat16_column_sums_of_the_keys_h2o_keeps_are_within_3e_3_of_the_exact_ones(head_dim, n, sharpness):
    """The keys a 20% budget keeps (the top fifth of the exact sums): the tiles' rounding of ``logit - lse`` (whose
    magnitude is small exactly where a key draws attention) keeps them within 3e-3 of the float64 sums (2.7e-3
    seen), where rounding the logit (the release) is more than 4e-3 off (4.3e-3 to 1e-2 here); over all keys both
    are ~1.5e-2 (the tiny probabilities). The CPU's swapped flash kernel, which rounds neither, keeps every key
    within 5e-4 (1e-4 seen)."""
    torch.manual_seed(0)
    query = (torch.randn(1, 6, n, head_dim) * sharpness).bfloat16()
    keys = torch.randn(1, 2, n, head_dim).bfloat16()
    scaling = head_dim**-0.5
    lse = sa.causal_lse(query, keys, scaling, 0, 128)
    sums = sa.causal_column_sums(query, keys, scaling, lse, 0, 128)
    exact = _plain_column_sums(query, keys, scaling, 0)
    kept = exact >= exact.quantile(0.8, dim=-1, keepdim=True)
    assert ((sums.double() - exact).abs() / exact)[kept].max().item() < 3e-3
    swapped = sa.prefix_column_sums(query, keys, scaling, lse, 0)
    assert ((swapped.double() - exact).abs() / exact).max().item() < 5e-4
    release = _release_column_sums(query, keys, scaling, 0).double()
    assert ((release - exact).abs() / exact)[kept].max().item() > 4e-3  # the bound tells the two roundings apart


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-6)])
@pytest.mark.parametrize("n_query, n_past", CASES)
def test_group_sums_are_the_query_heads_sums_added(dtype, tol, n_query, n_past):
    """``per_query_head=False``: each KV head's ``g`` query heads summed inside the op, ``[B, H_kv, S]``."""
    torch.manual_seed(n_query)
    s, module = n_query + n_past, _Module(3)
    query = torch.randn(2, 6, n_query, 16, dtype=dtype) * 2
    keys, values = torch.randn(2, 2, s, 16, dtype=dtype), torch.randn(2, 2, s, 16, dtype=dtype)
    out, per_head = _scored(module, query, keys, values, 0.3, n_past, block=8)
    out_grouped, grouped = _scored(module, query, keys, values, 0.3, n_past, 8, False)
    assert torch.equal(out_grouped, out) and grouped.shape == (2, 2, s)
    expected = per_head.double().view(2, 2, 3, s).sum(dim=2)
    assert ((grouped.double() - expected).abs() / expected.clamp_min(1e-3)).max().item() < tol


def test_tiles_cover_every_key_whatever_the_block():
    """Blocks that do not divide the queries, tiles that do not divide the keys (`KEY_TILE`): the same sums."""
    torch.manual_seed(0)
    module = _Module(2)
    query, keys = torch.randn(1, 4, 700, 8), torch.randn(1, 2, 1300, 8)
    values = torch.randn(1, 2, 1300, 8)
    plain = _plain_column_sums(query, keys, 0.5, 600)
    for block in (1, 7, 128, 1000):
        _, sums = _scored(module, query, keys, values, 0.5, 600, block=block)
        assert ((sums.double() - plain).abs() / plain.clamp_min(1e-3)).max().item() < 1e-5, block


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_accelerator_tiling_one_key_tile_and_large_blocks_gives_the_same_sums(monkeypatch, dtype):
    """Off the CPU (`tiling`): every key in one tile, query blocks grown to ~`ACCELERATOR_TILE_ELEMENTS` floats --
    here 2,000 floats: blocks of 2000 // (4 heads x 1,300 keys) -> the method's 3 at least."""
    torch.manual_seed(0)
    query, keys = torch.randn(1, 4, 700, 8, dtype=dtype), torch.randn(1, 2, 1300, 8, dtype=dtype)
    lse = sa.causal_lse(query, keys, 0.5, 600, 64)
    cpu = sa.causal_column_sums(query, keys, 0.5, lse, 600, 64)
    one_tile = sa.causal_column_sums(query, keys, 0.5, lse, 600, 300, True, 1300)
    grouped = sa.causal_column_sums(query, keys, 0.5, lse, 600, 300, False, 1300)
    assert torch.allclose(one_tile, cpu, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grouped, cpu.view(1, 2, 2, 1300).sum(dim=2), rtol=1e-5, atol=1e-5)
    assert sa.tiling(query, 1300, 128) == (128, sa.KEY_TILE)  # a CPU: cache-sized tiles
    monkeypatch.setattr(sa, "ACCELERATOR_TILE_ELEMENTS", 2000)
    on_meta = query.to("meta")  # any device but the CPU
    assert sa.tiling(on_meta, 1300, 3) == (3, 1300)  # 2000 // 5200 = 0 queries: the method's block
    monkeypatch.setattr(sa, "ACCELERATOR_TILE_ELEMENTS", 2**20)
    assert sa.tiling(on_meta, 1300, 3) == (201, 1300)  # 2**20 // 5200
    assert sa.tiling(on_meta, 10, 3) == (700, 10)  # never more than the queries


def test_keys_must_be_the_prefix_up_to_the_last_query():
    query, keys = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 9, 8)
    with pytest.raises(ValueError, match="4 queries from token 3 need 7 keys, got 9"):
        _scored(_Module(1), query, keys, keys, 0.3, 3)


# ------------------------------------------------------------------------------------------- method level
class _PlainH2OPolicy(H2OPolicy):
    """H2O computed the plain way: the n x n softmax summed at prefill, a masked softmax row and the float64
    priority at decode (the reference of the fast path)."""

    def observe(self, call):
        keys = self.store.keys
        h, q = call.query.shape[1:3]
        k = keys.repeat_interleave(h // keys.shape[1], dim=1)
        logits = call.query @ k.transpose(-1, -2) * call.scaling
        visible = self.store.positions[:, :1, None, :] <= (call.first_position + torch.arange(q))[:, None]
        self._accumulate(logits.masked_fill(~visible, -torch.inf).softmax(dim=-1).sum(dim=2))

    def attend(self, call):
        return PriorityEvictionPolicy.attend(self, call)

    def after_decode_attention(self, call):
        keys = self.store.keys
        h = call.query.shape[1]
        logits = call.query @ keys.repeat_interleave(h // keys.shape[1], dim=1).transpose(-1, -2) * call.scaling
        self._accumulate(logits.softmax(dim=-1).sum(dim=2))

    def evict_to_budget(self, call):
        if self.k is None or self.store.length <= self.k:
            return
        priority = self.priority(call)
        if self.store.length == self.k + 1:
            self.store.evict(priority.argmin(dim=-1))
        else:
            self.store.keep(top_indices(priority, self.k))


class _PlainH2O(H2O):
    policy = _PlainH2OPolicy


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("chunk_size", [None, 20])
def test_h2o_keeps_what_the_plain_computation_keeps(arch, chunk_size):
    model = tiny_model(arch)
    fast = SieveCache(model, kvsieve.method("h2o", budget=20))
    plain = SieveCache(model, _PlainH2O(budget=20))
    steps = []
    for cache in (fast, plain):
        # snapshot the kept positions and scores after every decode step
        kept = []
        for layer in cache.sieve_layers:
            original = layer.policy.evict_to_budget

            def spy(call, original=original, policy=layer.policy, kept=kept):
                original(call)
                if call.phase is Phase.DECODE or call.phase is Phase.PREFILL_LAST:
                    store = policy.store
                    kept.append((store.positions.sort(dim=-1).values.clone(), _sorted_scores(store)))

            layer.policy.evict_to_budget = spy
        tokens, logits = greedy_with_logits(model, cache, random_ids(48), 8, chunk_size=chunk_size)
        steps.append((tokens, logits, kept))
    (fast_tokens, fast_logits, fast_kept), (plain_tokens, plain_logits, plain_kept) = steps
    assert len(fast_kept) == len(plain_kept) == 3 * 8  # 3 layers: after the prompt, then 7 decode steps
    for (fp, fs), (pp, ps) in zip(fast_kept, plain_kept):
        assert torch.equal(fp, pp)
        assert torch.allclose(fs, ps, rtol=1e-5, atol=1e-6)
    assert fast_tokens == plain_tokens
    assert (fast_logits - plain_logits).abs().max().item() < 1e-4


def _sorted_scores(store):
    order = store.positions.sort(dim=-1).indices
    return store.aux(SCORE).gather(-1, order).clone()


def test_bench_h2o_prefill_runs_at_a_toy_size():
    from helpers import load_benchmark

    bench = load_benchmark("bench_h2o_prefill")
    rows = bench.run(tiny_model("llama"), bench.parse_args(["--lengths", "40", "--repeats", "2", "--budget", "10"]))
    assert [r["tokens"] for r in rows] == [40] and len(rows[0]["ratios"]) == 2
    assert rows[0]["ratio_min"] <= rows[0]["ratio_median"] <= rows[0]["ratio_max"]
    share, cost = rows[0]["attention_share"], rows[0]["colsum_over_attention"]
    assert share > 0 and cost > 0 and rows[0]["expected_ratio"] == pytest.approx(1 + share * cost)
    assert "40" in bench.table(rows)


def test_bench_h2o_prefill_times_each_key_tile_against_the_same_full_runs(monkeypatch):
    from helpers import load_benchmark

    bench = load_benchmark("bench_h2o_prefill")
    seen: list[int] = []
    real = bench.time_prefill

    def spy(model, ids, method):
        seen.append(sa.KEY_TILE if method.name == "h2o" else 0)
        return real(model, ids, method)

    monkeypatch.setattr(bench, "time_prefill", spy)
    args = bench.parse_args(["--lengths", "40", "--repeats", "2", "--budget", "10", "--key-tiles", "8", "16"])
    (row,) = bench.run(tiny_model("llama"), args)
    assert sorted(seen[1:]) == [0, 0, 8, 8, 16, 16] and sa.KEY_TILE == 256  # after the warm-up; restored
    assert list(row["key_tiles"]) == ["8", "16"] and row["h2o_s"] == row["key_tiles"]["8"]["h2o_s"]
    for cell in row["key_tiles"].values():
        assert cell["ratios"] == [h / f for h, f in zip(cell["h2o_s"], row["full_s"])]
    assert "tile 16" in bench.tile_table([row])
    with pytest.raises(SystemExit):
        bench.parse_args(["--key-tiles", "0"])
    with pytest.raises(SystemExit):  # bfloat16 takes no tiles on a CPU: nothing to compare
        bench.parse_args(["--key-tiles", "256", "512", "--dtype", "bfloat16"])


def test_bench_h2o_scoring_kernels_runs_at_a_toy_size(capsys):
    from helpers import load_benchmark

    bench = load_benchmark("bench_h2o_scoring_kernels")
    bench.main(["--lengths", "40", "--repeats", "1"])
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 40 |")]
    assert len(row) == 1
    # one pass at two query blocks, on other head counts: a column each, the output and sums the adopted path's
    bench.main(["--lengths", "40", "--repeats", "1", "--one-pass-blocks", "8", "16", "--heads", "4", "--kv-heads", "2"])
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 40 |")]
    cells = row[0].strip("| ").split(" | ")
    assert len(cells) == 7  # tokens, flash s, column sums, two one passes, swapped flash, the differences
    assert all(float(diff) < 1e-4 for diff in cells[-1].split(", "))


def test_bench_h2o_scoring_kernels_tile_grid_gives_a_ratio_per_tile(capsys):
    from helpers import load_benchmark

    bench = load_benchmark("bench_h2o_scoring_kernels")
    bench.main(["--lengths", "40", "--repeats", "1", "--key-tiles", "8", "16", "--heads", "4", "--kv-heads", "2"])
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 40 |")]
    assert len(row) == 1 and len(row[0].strip("| ").split(" | ")) == 4  # tokens, flash s, one ratio per tile
    with pytest.raises(SystemExit):
        bench.main(["--lengths", "40", "--heads", "3", "--kv-heads", "2"])


def test_bench_h2o_scoring_kernels_pieces_split_a_tile_and_bound_the_pass(capsys):
    from helpers import load_benchmark

    bench = load_benchmark("bench_h2o_scoring_kernels")
    bench.main(["--lengths", "300", "--repeats", "1", "--pieces", "--heads", "4", "--kv-heads", "2"])
    out = capsys.readouterr().out.splitlines()
    pieces = [line for line in out if line.startswith(("| Q K^T", "| expo", "| sum"))]
    shares = [float(line.split(" | ")[-1].rstrip(" |")) for line in pieces]
    assert len(shares) == 3 and abs(sum(shares) - 1) < 0.02
    row = next(line for line in out if line.startswith("| 300 |")).strip("| ").split(" | ")
    assert len(row) == 6 and all(float(cell.replace(",", "")) > 0 for cell in row)  # timings: no order asserted
    for bad in (["--pieces", "--dtype", "bfloat16"], ["--pieces", "--key-tiles", "256"]):
        with pytest.raises(SystemExit):
            bench.main(["--lengths", "40", *bad])
