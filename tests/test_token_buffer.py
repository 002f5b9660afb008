"""`TokenBuffer.derived_keys`: each live token's derived key computed once, kept through drops and reallocations,
and equal to deriving the slice directly (InfLLM's memory keys of the tokens that have left the window); keys
derived ahead serve the next calls."""

from __future__ import annotations

import pytest
import torch

from kvsieve.ops.blocks import TokenBuffer


def _derive_counting(calls: list[tuple[int, int]]):
    def derive(keys: torch.Tensor, first_position: int) -> torch.Tensor:
        calls.append((first_position, keys.shape[2]))
        positions = torch.arange(first_position, first_position + keys.shape[2], dtype=keys.dtype)
        return keys * 2 + positions[:, None]  # depends on each token's position, as an un-rotation does

    return derive


def test_each_token_is_derived_once_and_the_result_equals_deriving_the_slice():
    torch.manual_seed(0)
    buf = TokenBuffer(n_heads=4, spare=3)
    keys = torch.randn(1, 2, 40, 8)
    calls: list[tuple[int, int]] = []
    derive = _derive_counting(calls)
    buf.append(keys[:, :, :10], keys[:, :, :10], 100)
    out = buf.derived_keys(4, derive)
    assert torch.equal(out, derive(keys[:, :, :4], 100)) and calls[0] == (100, 4)
    calls.clear()
    assert torch.equal(buf.derived_keys(6, derive), _derive_counting([])(keys[:, :, :6], 100))
    assert calls == [(104, 2)]  # only the two new tokens
    buf.drop_front(5)  # tokens 100..104 leave: 105 is derived already, 106.. not
    calls.clear()
    assert torch.equal(buf.derived_keys(3, derive), _derive_counting([])(keys[:, :, 5:8], 105))
    assert calls == [(106, 2)]
    for start in range(10, 40, 6):  # appends that reallocate: what was derived moves with the tokens
        buf.append(keys[:, :, start : start + 6], keys[:, :, start : start + 6], 100 + start)
    assert buf.capacity >= buf.length
    calls.clear()
    got = buf.derived_keys(buf.length, derive)
    assert torch.equal(got, _derive_counting([])(keys[:, :, 5:40], 105))
    assert calls == [(108, 32)]  # 105..107 kept through the reallocations; the rest derived now, once
    buf.drop_front(buf.length)
    assert buf.derived_keys(0, derive).shape[2] == 0
    with pytest.raises(ValueError, match="derive_keys: n must be within the 0 live tokens, got 1"):
        buf.derived_keys(1, derive)


def test_keys_derived_ahead_serve_the_next_calls_without_deriving_again():
    """A decode step's remainder grows a token a step: ``ahead`` derives the next tokens' keys in the same call (no
    further call until they are used up), never past the live tokens, and equal to deriving each slice directly."""
    torch.manual_seed(0)
    buf = TokenBuffer(n_heads=4, spare=3)
    keys = torch.randn(1, 2, 30, 8)
    calls: list[tuple[int, int]] = []
    derive = _derive_counting(calls)
    buf.append(keys[:, :, :20], keys[:, :, :20], 0)
    for n in range(1, 12):  # one more token a step
        assert torch.equal(buf.derived_keys(n, derive, ahead=4), _derive_counting([])(keys[:, :, :n], 0))
    assert calls == [(0, 5), (5, 5), (10, 5)]  # the first n and 4 ahead, each time the derived ones run out
    calls.clear()
    assert buf.derived_keys(17, derive, ahead=10).shape[2] == 17 and calls == [(15, 5)]  # up to the 20 live ones
    buf.drop_front(3)
    buf.append(keys[:, :, 20:30], keys[:, :, 20:30], 20)  # reallocates: the derived ones move with their tokens
    calls.clear()
    assert torch.equal(buf.derived_keys(18, derive, ahead=2), _derive_counting([])(keys[:, :, 3:21], 3))
    assert calls == [(20, 3)]


def test_the_derived_span_is_the_derived_tokens_keys_and_values_as_the_same_views_while_it_stays():
    """`derive_keys` counts the live tokens derived (ahead included); `derived_span` hands their keys and values,
    the same view objects while the first live token and the length stay, new ones after a drop or a
    reallocation -- always the tokens' own derived keys and values."""
    torch.manual_seed(0)
    buf = TokenBuffer(n_heads=4, spare=3)
    keys, values = torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    derive = _derive_counting([])
    buf.append(keys[:, :, :20], values[:, :, :20], 0)
    assert buf.derive_keys(2, derive, ahead=4) == 6 and buf.derive_keys(5, derive, ahead=4) == 6  # derived already
    span = buf.derived_span(6)
    assert buf.derived_span(6) is span
    assert torch.equal(span[0], _derive_counting([])(keys[:, :, :6], 0)) and torch.equal(span[1], values[:, :, :6])
    buf.drop_front(2)
    moved = buf.derived_span(4)
    assert moved is not span and torch.equal(moved[0], _derive_counting([])(keys[:, :, 2:6], 2))
    buf.append(keys[:, :, 20:30], values[:, :, 20:30], 20)  # reallocates
    again = buf.derived_span(4)
    assert again is not moved and torch.equal(again[0], moved[0]) and torch.equal(again[1], values[:, :, 2:6])
    with pytest.raises(ValueError, match="derived_span: 5 tokens, 4 derived"):
        buf.derived_span(5)


def test_appended_tokens_start_with_zero_scores_through_drops_and_reallocations():
    """An append does not write scores: every score past the live end is still the zero it was allocated as. Scores
    added to live tokens stay theirs; spans are the live tokens' own keys, values and scores."""
    torch.manual_seed(0)
    buf = TokenBuffer(n_heads=4, spare=3)
    keys = torch.randn(1, 2, 60, 8)
    position = 0
    for step, n in enumerate([5, 1, 1, 7, 1, 2, 9, 1, 1, 1, 12, 1]):
        chunk = keys[:, :, position : position + n]
        buf.append(chunk, -chunk, position)
        assert torch.equal(buf.scores[:, :, -n:], torch.zeros(1, 4, n))  # new tokens: zero, whatever was before
        buf.score_span(0, buf.length).add_(1.0)  # every live token attended
        position += n
        if step % 3 == 2:
            buf.drop_front(buf.length // 2)
    assert torch.all(buf.scores > 0)
    k, v = buf.span(2, 5)
    first = buf.first_position
    assert torch.equal(k, keys[:, :, first + 2 : first + 5]) and torch.equal(v, -k)
    assert buf.score_span(2, 5).data_ptr() == buf.scores[:, :, 2:5].data_ptr()
