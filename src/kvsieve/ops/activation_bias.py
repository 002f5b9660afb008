"""ActQKV's Activation Bias (`kvsieve.methods.actqkv`): running per-channel statistics of the retrieval queries and
each token's weight in its window's probe query.

Token ``t`` of a window weighs ``b_t / sum b`` with ``b_t = mean_j (q_tj - mu_j)^2 / (var_j + mean(var) / 100)``:
how far its query (every head's memory query, concatenated) sits from the running mean ``mu`` and variance ``var``
of the queries seen so far, updated window by window by the released code's rule (``spec/methods.md`` section 2).
"""

from __future__ import annotations

import torch

from kvsieve.ops.grouped import cast


class ActivationStats:
    """Running per-channel mean and variance of retrieval queries, and each token's Activation Bias weight.

    ``token_weights(h)`` with ``h`` ``[B, c, H * D]`` (a window's memory queries, heads concatenated) updates the
    statistics with the window (the code's rule, ``count`` capped at ``horizon``) and returns the weights ``[B, c]``
    (summing to 1), or None while warming up (``count <= warmup``: uniform weights, the plain mean).

    A decode step's one-token window only counts at once: its query is folded into ``mean`` and ``var`` when they
    are next read (a multi-token window, `bias_weights`, or the attributes), up to `max_pending` of them together
    (`_fold`: the same recurrence, vectorised; equal up to float rounding). A decode step reads neither -- its
    probe is its query -- so it skips the update's four ops.
    """

    max_pending = 256  # one-token windows folded together at most (0: each at once, as the recurrence runs)

    def __init__(self, horizon: int = 1000, warmup: int = 1000) -> None:
        self.horizon = horizon
        self.warmup = warmup
        self._mean: torch.Tensor | None = None  # [B, H * D] float32
        self._var: torch.Tensor | None = None
        self.count = 0
        self._pending: list[torch.Tensor] = []  # the last one-token windows [B, H * D], counted, not folded in yet

    @property
    def mean(self) -> torch.Tensor | None:
        self._fold()
        return self._mean

    @property
    def var(self) -> torch.Tensor | None:
        self._fold()
        return self._var

    def token_weights(self, h: torch.Tensor) -> torch.Tensor | None:
        """`update` with the window, then its `bias_weights`; None while warming up."""
        return self.bias_weights(h) if self.update(h) else None

    def update(self, h: torch.Tensor) -> bool:
        """Fold the window ``h`` ``[B, c, H * D]`` into the statistics; whether its tokens are to be weighted (False
        while warming up: ``count <= warmup`` before this window)."""
        return self.update_one(h[:, 0]) if h.shape[1] == 1 else self._fold_window(h)

    def update_one(self, x: torch.Tensor) -> bool:
        """`update` with a one-token window given as its query ``x`` ``[B, H * D]`` (a decode step's): counted now,
        folded in when the statistics are next read (the first window ever, or with ``max_pending = 0``: at once)."""
        if self._mean is None or not self.max_pending:
            return self._fold_window(x[:, None])
        warming = self.count <= self.warmup
        self._pending.append(cast(x, torch.float32))  # a view of the step's own queries, which nothing writes to
        self.count += 1
        if len(self._pending) >= self.max_pending:
            self._fold()
        return not warming

    def _fold_window(self, h: torch.Tensor) -> bool:
        """`update`, the window folded in now."""
        h = cast(h, torch.float32)
        c = h.shape[1]
        warming = self.count <= self.warmup
        self._fold()
        one = c == 1  # the window's mean is its token and its variance exactly 0 (two ops fewer)
        mu_w = h[:, 0] if one else h.mean(dim=1)
        # the window's biased variance in two passes: torch's var along a non-inner dim is ~8x slower on a CPU
        # (0.79 against 0.07-0.10 ms at [1, 256, 576], torch 2.13; docs/results/speed/op_costs_1207.py)
        var_w = None if one else (h - mu_w[:, None]).square().mean(dim=1)
        if self._mean is None:
            self._var = torch.zeros_like(mu_w) if one else var_w * c / (c - 1)
            self._mean = mu_w.clone() if one else mu_w  # updated in place below: not a view of the queries
        else:
            if self._mean.device != h.device:  # shared by all layers (stats_scope="shared"): on a model split over
                self._mean, self._var = self._mean.to(h.device), self._var.to(h.device)  # GPUs they follow it
            # var <- (var (n - 1/c) + var_w + d^2 / (1 + 1/n)) / (n + 1 - 1/c) and mean <- (mean n + mu_w) / (n + 1),
            # d = mu_w - mean, with the scalars folded: four ops a one-token window instead of nine, in place
            n = min(self.count, self.horizon)
            norm = n + 1 - 1 / c
            d = mu_w - self._mean
            self._var.mul_((n - 1 / c) / norm).addcmul_(d, d, value=1 / ((1 + 1 / n) * norm))
            if not one:
                self._var.add_(var_w, alpha=1 / norm)
            self._mean.add_(d, alpha=1 / (n + 1))
        self.count += 1
        return not warming

    def _fold(self) -> None:
        """Fold the pending one-token windows ``x_t`` in (``t = 0 .. m-1``, the last ``m`` counted, so ``n_t =
        min(count - m + t, horizon)``): the recurrence ``d_t = x_t - mean_{t-1}``, ``var_t = var_{t-1} (n_t - 1) /
        n_t + d_t^2 / (n_t + 1)``, ``mean_t = mean_{t-1} + d_t / (n_t + 1)`` as three matmuls. With ``k_t = 1 - 1 /
        (n_t + 1)``, ``mean_{t-1} = (prod_{u<t} k_u) mean_0 + sum_{s<t} x_s / (n_s + 1) prod_{s<u<t} k_u`` for
        every ``t`` at once, and the last ``var`` is ``var_0 prod_t r_t + sum_t d_t^2 / (n_t + 1) prod_{u>t} r_u``
        (``r_t = (n_t - 1) / n_t``); the coefficients in float64."""
        if not self._pending:
            return
        xs = torch.stack([x.to(self._mean.device) for x in self._pending])  # [m, B, C]
        m, self._pending = xs.shape[0], []
        counts = torch.arange(self.count - m, self.count, dtype=torch.float64, device="cpu")  # coefficients: host
        n = counts.clamp_max(self.horizon)
        a = 1 / (n + 1)
        log_k = torch.cat([n.new_zeros(1), torch.log1p(-a).cumsum(0)])  # [m + 1]: sum_{u<t} log k_u
        t, s = torch.arange(m, device="cpu")[:, None], torch.arange(m, device="cpu")[None, :]
        before = (a[None, :] * (log_k[:m, None] - log_k[None, 1:]).exp()).masked_fill_(s >= t, 0.0)  # [m, m]
        flat = xs.view(m, -1)
        mean_0 = self._mean.view(1, -1)
        dev = dict(device=flat.device, dtype=torch.float32)
        means = torch.addmm(log_k[:m, None].exp().to(**dev) * mean_0, before.to(**dev), flat)  # mean_{t-1}, [m, B C]
        r = (n - 1) / n
        after = torch.cat([r.flip(0).cumprod(0).flip(0)[1:], r.new_ones(1)])  # prod_{u>t} r_u
        squares = (flat - means).square_()
        var = torch.addmm(self._var.view(1, -1), (a * after).to(**dev)[None], squares, beta=float(r.prod()))
        last = (a * (log_k[m] - log_k[1:]).exp()).to(**dev)[None]  # the weight of x_s in mean_m
        mean = torch.addmm(mean_0, last, flat, beta=float(log_k[m].exp()))
        self._mean, self._var = mean.view_as(self._mean), var.view_as(self._var)

    def bias_weights(self, h: torch.Tensor) -> torch.Tensor:
        """``b_t / sum_t b_t`` with ``b_t`` the mean over channels of the standardised squared deviation."""
        var, mean = self.var, self.mean  # folded
        denom = (var + var.mean(dim=-1, keepdim=True) / 100).clamp_min(torch.finfo(torch.float32).tiny)
        # the mean over channels as a matmul with 1 / (denom x channels): three passes over the window, not four
        weights = (denom * denom.shape[-1]).reciprocal_()  # [B, H * D]
        deviation = (cast(h, torch.float32) - mean[:, None]).square_()  # [B, c, H * D]
        bias = torch.matmul(deviation, weights[..., None]).squeeze(-1)  # [B, c]
        total = bias.sum(dim=1, keepdim=True)
        uniform = torch.full_like(bias, 1.0 / bias.shape[1])
        return torch.where(total > 0, bias / total.clamp_min(torch.finfo(torch.float32).tiny), uniform)
