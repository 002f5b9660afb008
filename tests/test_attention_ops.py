"""`kvsieve.ops.attention.attend`: sdpa bit for bit in float32, the grouped-matmul path for one low-precision query
on a CPU (torch's sdpa is many times slower there), within rounding of a float64 reference."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvsieve.ops.attention import attend, decode_attention
from kvsieve.ops.grouped import grouped_logits


class _Module(torch.nn.Module):
    num_key_value_groups = 7
    is_causal = True


def _tensors(dtype, n_keys=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 14, 1, 64, generator=g).to(dtype)
    k = torch.randn(2, 2, n_keys, 64, generator=g).to(dtype)
    v = torch.randn(2, 2, n_keys, 64, generator=g).to(dtype)
    return q, k, v


def _reference(q, k, v, mask=None):
    """float64 softmax attention, keys repeated per query head: ``[B, 1, H, D]``."""
    k64 = k.double().repeat_interleave(7, dim=1)
    v64 = v.double().repeat_interleave(7, dim=1)
    logits = q.double() @ k64.transpose(-1, -2) * 0.125
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return (logits.softmax(-1) @ v64).transpose(1, 2)


def test_float32_decode_is_sdpa_bit_for_bit():
    q, k, v = _tensors(torch.float32)
    expected, _ = sdpa_attention_forward(_Module(), q, k, v, None, scaling=0.125)
    assert torch.equal(attend(_Module(), q, k, v, 0.125), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_decode_takes_the_grouped_path_within_rounding(dtype):
    q, k, v = _tensors(dtype)
    out = attend(_Module(), q, k, v, 0.125)
    assert out.dtype == dtype and out.shape == (2, 1, 14, 64)
    assert torch.equal(out, decode_attention(q, k, v, 0.125))  # the path taken
    error = (out.double() - _reference(q, k, v)).abs().max().item()
    sdpa, _ = sdpa_attention_forward(_Module(), q, k, v, None, scaling=0.125)
    sdpa_error = (sdpa.double() - _reference(q, k, v)).abs().max().item()
    # the output is rounded to the dtype once; the softmax runs in float32: no worse than a few of sdpa's roundings
    assert error <= max(4 * sdpa_error, 2**-9)


def test_low_precision_decode_with_a_mask_ignores_the_masked_entries():
    q, k, v = _tensors(torch.bfloat16)
    mask = torch.ones(2, 14, 1, 300, dtype=torch.bool)
    mask[0, :, :, :100] = False  # row 0 drops its first 100 entries for every head
    out = attend(_Module(), q, k, v, 0.125, extra_mask=mask)
    assert (out.double() - _reference(q, k, v, mask)).abs().max().item() <= 2**-7
    # the same as attending only the kept entries
    kept = attend(_Module(), q[:1], k[:1, :, 100:], v[:1, :, 100:], 0.125)
    assert torch.allclose(out[:1].float(), kept.float(), atol=2**-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_grouped_logits_of_a_strided_cache_slice_equal_the_dense_ones(dtype):
    """A decode step's keys are a slice of a cache buffer with spare room (strided across heads); in low precision
    its logits are taken as ``K @ Q^T`` (torch's CPU matmul is several times slower the other way round there). The
    same logits as of the dense keys, in the layout ``[B, H, 1, S]``, within the dtype's rounding of float64."""
    q, _, _ = _tensors(dtype)
    buffer = torch.randn(2, 2, 400, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    keys = buffer[:, :, 37:337]
    assert not keys.is_contiguous()
    got = grouped_logits(q, keys)
    dense = grouped_logits(q, keys.contiguous())
    want = (q.double().reshape(2, 2, 7, 64) @ keys.double().transpose(-1, -2)).view(2, 14, 1, 300)
    assert got.shape == dense.shape == (2, 14, 1, 300) and got.dtype == dtype
    tol = {torch.float32: 1e-4, torch.bfloat16: 0.1, torch.float16: 2e-2}[dtype]  # |logit| ~ 8-30: a few ulps
    assert (got.double() - want).abs().max().item() < tol and (dense.double() - want).abs().max().item() < tol
    assert (got.double() - dense.double()).abs().max().item() <= tol
