"""The RoPE helper reproduces the model's own rotary embedding and inverts it."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import kvsieve
from helpers import tiny_model
from kvsieve.cache import SieveCache
from kvsieve.ops.rope import Rotary


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_rotate_matches_the_model_and_unrotate_inverts(arch):
    model = tiny_model(arch)
    config = model.config
    rotary = Rotary(config)
    torch.manual_seed(0)
    x = torch.randn(1, 2, 7, config.head_dim if hasattr(config, "head_dim") and config.head_dim else 16)
    positions = torch.tensor([0, 1, 5, 100, 513, 700, 1000])
    cos, sin = model.model.rotary_emb(x, positions[None])
    expected, _ = apply_rotary_pos_emb(x, x, cos, sin)
    assert torch.allclose(rotary.rotate(x, positions), expected, atol=1e-5)
    assert torch.allclose(rotary.unrotate(expected, positions), x, atol=1e-5)


def test_yarn_scaling_is_inverted():
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=2048,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 2.0,
            "original_max_position_embeddings": 1024,
            "rope_theta": 10000.0,
        },
    )
    rotary = Rotary(config)
    assert rotary.attention_scaling != 1.0
    x = torch.randn(1, 1, 3, 16)
    positions = torch.tensor([3, 1500, 2000])
    assert torch.allclose(rotary.unrotate(rotary.rotate(x, positions), positions), x, atol=1e-5)


@pytest.mark.parametrize("rope", [None, {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 1024}])
def test_move_is_unrotate_then_rotate_in_one_rotation(rope):
    """InfLLM's memory queries: a post-RoPE query at its own position, re-rotated at one fixed position. With
    YaRN's attention scaling s, rotate multiplies by s and unrotate divides by it: the move carries no factor."""
    from transformers import LlamaConfig

    params = {"rope_theta": 10000.0, **(rope or {"rope_type": "default"})}
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=2048, rope_parameters=params)
    rotary = Rotary(config)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 16)
    positions, target = torch.tensor([0, 7, 300, 1500, 2040]), 127
    two_steps = rotary.rotate(rotary.unrotate(x, positions), torch.tensor(target))
    moved = rotary.move(x, positions, target)
    assert torch.allclose(moved, two_steps, atol=2e-6)  # the model's angles, not rounded anew
    assert torch.allclose(moved.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # a rotation: norms kept
    assert not torch.allclose(moved, x, atol=1e-2)


@pytest.mark.parametrize("rope", [None, {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 1024}])
def test_a_range_of_positions_gives_what_the_tensor_gives_and_its_angles_are_kept(rope):
    """Decode steps pass ``range``s: their angles are computed once and reused (all layers of a cache share the
    `Rotary`), with the same results as positions given as a tensor, however often asked."""
    from transformers import LlamaConfig

    params = {"rope_theta": 10000.0, **(rope or {"rope_type": "default"})}
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=2048, rope_parameters=params)
    rotary = Rotary(config)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 2, 16)
    for first in (0, 1500, 1500, 7):
        span, tensor = range(first, first + 2), torch.arange(first, first + 2)
        assert torch.equal(rotary.rotate(x, span), rotary.rotate(x, tensor))
        assert torch.equal(rotary.unrotate(x, span), rotary.unrotate(x, tensor))
        assert torch.equal(rotary.move(x, span, 127), rotary.move(x, tensor, 127))
    assert len(rotary._memo) == 9  # three kinds at three distinct ranges
    for first in range(200):  # bounded
        rotary.rotate(x[:, :, :1], range(first, first + 1))
    assert len(rotary._memo) <= 64


@pytest.mark.parametrize("rope", [None, {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 1024}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_position_is_rotated_by_one_matrix_as_by_the_elementwise_formula(rope, dtype):
    """A decode step's single position goes through a ``[D, D]`` matrix (one matmul); positions given as a tensor
    through ``x * cos + rotate_half(x) * sin``: the same rotation up to float rounding, for every kind."""
    from transformers import LlamaConfig

    params = {"rope_theta": 10000.0, **(rope or {"rope_type": "default"})}
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=2048, rope_parameters=params)
    rotary = Rotary(config)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 1, 16).to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for p in (0, 1, 517, 2047):
        one, tensor = range(p, p + 1), torch.tensor([p])
        for by_matrix, by_formula in (
            (rotary.rotate(x, one), rotary.rotate(x, tensor)),
            (rotary.unrotate(x, one), rotary.unrotate(x, tensor)),
            (rotary.move(x, one, 127), rotary.move(x, tensor, 127)),
        ):
            assert by_matrix.dtype == dtype
            assert torch.allclose(by_matrix.float(), by_formula.float(), atol=tol, rtol=tol)
    assert any(key[0] == "matrix" for key in rotary._memo)


def test_layers_of_one_cache_share_one_rotary_per_layer_type():
    model = tiny_model("llama")
    cache = SieveCache(model, kvsieve.method("infllm", n_init=4, n_local=16, block_size=4, topk=3, exc_block_size=8))
    rotaries = {id(layer.rows[0].policy.rotary) for layer in cache.sieve_layers}
    other = SieveCache(model, kvsieve.method("infllm", n_init=4, n_local=16, block_size=4, topk=3, exc_block_size=8))
    assert len(rotaries) == 1 and id(other.sieve_layers[0].rows[0].policy.rotary) not in rotaries
