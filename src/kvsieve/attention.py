"""The attention function kvsieve registers with transformers.

Models that use transformers' ``AttentionInterface`` (Llama, Mistral, Qwen2/3, Gemma-3, ...) call it with the
exact post-norm, post-RoPE query and the keys/values their ``cache.update`` returned. A `SieveLayer` tags the keys
it returns with itself, which is how this function finds the layer's method without any global state: one cache,
one call, one layer; it reads from the attention mask only which new tokens are padding (each batch row attends
over its own entries). Keys without the tag (a plain ``DynamicCache``, Gemma-3's sliding-window layers) go to
transformers' sdpa unchanged.

The mask function is registered too: without it transformers builds no mask at all for a custom attention name,
and sdpa silently truncates the keys of any chunk that follows a cache.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

ATTENTION_NAME = "kvsieve"
LAYER_TAG = "_kvsieve_layer"


def sieve_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    layer = getattr(key, LAYER_TAG, None)
    if layer is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    # The mask only tells the layer which new tokens are padding (`kvsieve.rows.real_tokens`): each batch row
    # attends over its own entries, with the causal rule of `kvsieve.ops.attention`.
    options = dict(kwargs, dropout=dropout)
    if not torch.is_grad_enabled():  # inference_mode / no_grad: the usual case, no context to enter
        return layer.attend(module, query, key, value, scaling, options, attention_mask), None
    with torch.no_grad():  # a model called outside no_grad: the stores take in-place writes and keep no history
        return layer.attend(module, query, key, value, scaling, options, attention_mask), None


def register() -> str:
    """Register the attention function and its mask under ``ATTENTION_NAME`` (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, sieve_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME


def use_sieve_attention(model: torch.nn.Module) -> None:
    """Switch ``model`` to kvsieve's attention function. With a plain cache it behaves exactly like sdpa."""
    register()
    config = model.config
    if getattr(config, "_attn_implementation", None) != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)


register()
