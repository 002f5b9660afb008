"""Rotary position embedding helpers, computed from the model's config like the model itself does.

transformers caches keys after RoPE and hands the attention function post-RoPE queries. Methods that need
pre-RoPE vectors (RefreshKV's query similarity, InfLLM's block memory) undo the rotation: RoPE is a rotation per
pair of channels, so rotating by ``-position`` recovers the input exactly up to float rounding. Methods that give
tokens positions of their own (InfLLM: window-relative local keys, one fixed distance for memory) rotate again.

Layout: the "rotate half" convention of Llama/Qwen/Mistral/Gemma in transformers (channel ``i`` pairs with
``i + D/2``). ``attention_scaling`` (YaRN, LongRoPE) multiplies cos and sin exactly as the model does.
"""

from __future__ import annotations

import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from kvsieve.ops.grouped import cast


def _default_inv_freq(config) -> tuple[torch.Tensor, float]:
    base = config.rope_parameters["rope_theta"]
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(dim * config.rope_parameters.get("partial_rotary_factor", 1.0))
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim)), 1.0


Positions = torch.Tensor | range
_MEMO_SPAN = 64  # ranges of at most this many positions (decode steps, short windows) keep their angles
_MEMO_ENTRIES = 64


class Rotary:
    """cos/sin of the model's RoPE at arbitrary positions, and (un)rotation of ``[..., S, D]`` tensors.

    Positions are a tensor, or a ``range``: the angles of a short range are kept (a few per step), so the layers of
    one cache that share a `Rotary` (`shared_rotary`) compute a decode step's angles once, not once per layer."""

    def __init__(self, config, layer_type: str | None = None) -> None:
        params = config.rope_parameters
        if layer_type is not None and layer_type in params:  # Gemma-3: per layer-type parameters
            params = params[layer_type]
        rope_type = params.get("rope_type", "default")
        proxy = _ConfigView(config, params)
        if rope_type == "default":
            inv_freq, scaling = _default_inv_freq(proxy)
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](proxy, device=torch.device("cpu"))
        # built on the CPU whatever the default device; one copy per device it is used on (layers of a model split
        # over GPUs each read their own, with no host-to-device copy per call)
        self.inv_freq = inv_freq
        self._inv_freq_on: dict[torch.device, torch.Tensor] = {inv_freq.device: inv_freq}
        self.attention_scaling = float(scaling)
        self._memo: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(
        self, positions: Positions, dtype: torch.dtype, device: torch.device, scaled: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` ``[...]`` -> cos, sin ``[..., D]`` (computed in float32, cast like the model), times the
        attention scaling unless not ``scaled``."""
        device = torch.device(device)
        if isinstance(positions, range):
            positions = torch.arange(positions.start, positions.stop, device=device)
        inv_freq = self._inv_freq_on.get(device)
        if inv_freq is None:
            inv_freq = self._inv_freq_on[device] = self.inv_freq.to(device)
        freqs = positions.to(device=device, dtype=torch.float32)[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        if not scaled or self.attention_scaling == 1.0:
            return emb.cos().to(dtype), emb.sin().to(dtype)
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)

    def rotate(self, x: torch.Tensor, positions: Positions) -> torch.Tensor:
        """Apply RoPE at ``positions`` (broadcastable to ``x.shape[:-1]``) to ``x`` ``[..., S, D]``."""
        return self._transform("rotate", x, positions)

    def move(self, x: torch.Tensor, positions: Positions, target: int) -> torch.Tensor:
        """A post-RoPE ``x`` ``[..., S, D]`` at ``positions`` ``[S]`` as if rotated at position ``target`` instead:
        ``rotate(unrotate(x, positions), target)`` in one rotation (the attention scaling cancels). The angle is
        ``target - position`` by the angle-difference formulas on the model's own ``cos/sin(position)``, so the
        model's rotation is undone as exactly as by `unrotate` (an angle ``(target - position) * f`` rounded anew
        would drift by ``position x ulp``: 1e-4 rad at 2K, 8e-3 at 128K)."""
        return self._transform("move", x, positions, target)

    def unrotate(self, x: torch.Tensor, positions: Positions) -> torch.Tensor:
        """Undo RoPE at ``positions``: the pre-RoPE vector, exact up to float rounding (the inverse of a rotation
        is the rotation by ``-position``; ``attention_scaling`` s scales both cos and sin, hence the ``1/s^2``)."""
        return self._transform("unrotate", x, positions)

    def _transform(self, kind: str, x: torch.Tensor, positions: Positions, target: int | None = None) -> torch.Tensor:
        """``x`` rotated as ``kind`` says. At a single position (a decode step's query or leaving key) the rotation
        is one ``[D, D]`` matrix, shared by the layers: one matmul instead of the three ops of `_apply` (equal up to
        float rounding: each output channel sums the same two products)."""
        if isinstance(positions, range) and len(positions) == 1:
            return cast(torch.matmul(cast(x, torch.float32), self._matrix(kind, positions, x.device, target)), x.dtype)
        return _apply(x, *self._angles(kind, positions, x.device, target))

    def _matrix(self, kind: str, positions: range, device: torch.device, target: int | None) -> torch.Tensor:
        """float32 ``[D, D]`` ``R`` with ``x @ R = _apply(x, c, s)`` for one position's angles: ``R[i, i] = c_i``
        and ``R[i + D/2 mod D, i] = s_i`` (channel ``i`` of "rotate half" reads channel ``i + D/2``)."""
        key = ("matrix", kind, positions, target, torch.device(device))
        matrix = self._memo.get(key)
        if matrix is None:
            c, s = self._angles(kind, positions, device, target)
            d = c.shape[-1]
            channels = torch.arange(d, device=device)
            matrix = torch.diag(c.reshape(d))
            matrix[(channels + d // 2) % d, channels] = s.reshape(d)
            self._remember(key, matrix)
        return matrix

    def _remember(self, key: tuple, value) -> None:
        if len(self._memo) >= _MEMO_ENTRIES:
            self._memo.clear()
        self._memo[key] = value

    def _angles(
        self, kind: str, positions: Positions, device: torch.device, target: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 ``(c, s)`` with ``kind``'s rotation ``x * c + roll(x, D/2) * s`` (the sign of "rotate half"
        folded into ``s``); kept for a short ``range``."""
        key = None
        if isinstance(positions, range) and len(positions) <= _MEMO_SPAN:
            key = (kind, positions, target, torch.device(device))
            if key in self._memo:
                return self._memo[key]
        if kind == "move":
            cos_p, sin_p = self.cos_sin(positions, torch.float32, device, scaled=False)
            cos_t, sin_t = self.cos_sin(range(target, target + 1), torch.float32, device, scaled=False)
            c, s = cos_t * cos_p + sin_t * sin_p, sin_t * cos_p - cos_t * sin_p
        else:
            c, s = self.cos_sin(positions, torch.float32, device)
            if kind == "unrotate":  # the rotation by -position, divided by s^2
                scale = self.attention_scaling**2
                c, s = (c, -s) if scale == 1.0 else (c / scale, -s / scale)
        half = s.shape[-1] // 2
        angles = c, torch.cat((-s[..., :half], s[..., half:]), dim=-1)
        if key is not None:
            self._remember(key, angles)
        return angles


def shared_rotary(info, layer_type: str | None = None) -> Rotary:
    """The one `Rotary` of a layer type for all layers of a cache (``info.shared``, a `LayerInfo`'s), so a decode
    step's angles are computed once for all of them."""
    key = ("rotary", layer_type)
    if key not in info.shared:
        info.shared[key] = Rotary(info.config, layer_type)
    return info.shared[key]


def _apply(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` in float32, with ``rotate_half(x) * sin = roll(x, D/2) * signed_sin``."""
    xf = cast(x, torch.float32)
    out = torch.addcmul(xf * cos, xf.roll(x.shape[-1] // 2, dims=-1), signed_sin)
    return cast(out, x.dtype)


class _ConfigView:
    """The config with ``rope_parameters`` replaced (ROPE_INIT_FUNCTIONS read them from the config)."""

    def __init__(self, config, rope_parameters: dict) -> None:
        self._config = config
        self.rope_parameters = rope_parameters

    def __getattr__(self, name: str):
        return getattr(self._config, name)
