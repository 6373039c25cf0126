"""Image–question fusion: bilinear attention (BAN) and stacked attention (SAN).

Both take image regions `v (B, N, D)` and the question, and return
`{"fused": (B, H), "attention": (B, N), "attention_maps": ...}` where
`attention` sums to 1 over the N regions (what the demo draws as a heatmap).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from .layers import FCNet, masked_softmax, wn_linear


class _LowRankBilinearLogits(nn.Module):
    """logits[b, g, n, l] = sum_k v[b, n, k] * h[g, k] * q[b, l, k] + bias[g].

    One rank-(H*k) bilinear form per glimpse; `h` is weight-normed as a whole,
    as in BAN, so the sharpness of all glimpses is a single learnt scale.
    """

    def __init__(self, dim: int, glimpses: int) -> None:
        super().__init__()
        self.h = nn.Parameter(torch.randn(glimpses, dim))
        self.bias = nn.Parameter(torch.randn(glimpses))

    def forward(self, v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        weighted = v.unsqueeze(1) * self.h[None, :, None, :]  # (B, G, N, K)
        logits = weighted @ q.unsqueeze(1).transpose(2, 3)  # (B, G, N, L)
        return logits + self.bias.view(1, -1, 1, 1)


class BilinearAttentionFusion(nn.Module):
    """Bilinear attention network (Kim et al. 2018), as MEVF and QCR use it.

    1. Bilinear attention: `glimpses` maps over every (region, word) pair,
       each a softmax over all N*L pairs; padding words get zero weight.
    2. Per glimpse, bilinear pooling of regions and words under its map gives a
       joint vector f_g (B, H); the question is updated residually,
       q <- q + W_g f_g, so later glimpses see what earlier ones found.
    3. The fused vector is the sum of the updated word states over valid words.
    """

    def __init__(
        self,
        v_dim: int,
        q_dim: int,
        hidden_dim: int = 1024,
        glimpses: int = 2,
        k: int = 3,
        dropout: float = 0.2,
        attention_dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.glimpses = glimpses
        self.out_dim = hidden_dim
        # MEVF's question size equals the fusion size; other text towers are projected to it.
        self.q_in = nn.Identity() if q_dim == hidden_dim else wn_linear(q_dim, hidden_dim)
        self.att_v = FCNet([v_dim, hidden_dim * k], dropout=dropout)
        self.att_q = FCNet([hidden_dim, hidden_dim * k], dropout=dropout)
        self.att_dropout = nn.Dropout(attention_dropout)
        self.att_logits = weight_norm(_LowRankBilinearLogits(hidden_dim * k, glimpses), name="h", dim=None)
        self.pool_v = nn.ModuleList(FCNet([v_dim, hidden_dim], dropout=dropout) for _ in range(glimpses))
        self.pool_q = nn.ModuleList(FCNet([hidden_dim, hidden_dim], dropout=dropout) for _ in range(glimpses))
        self.q_update = nn.ModuleList(FCNet([hidden_dim, hidden_dim], act=False, dropout=dropout) for _ in range(glimpses))

    def attention_maps(self, v: torch.Tensor, q: torch.Tensor, q_mask: torch.Tensor) -> torch.Tensor:
        """(B, G, N, L) attention, each glimpse summing to 1 over regions x valid words."""
        logits = self.att_logits(self.att_dropout(self.att_v(v)), self.att_q(q))  # (B, G, N, L)
        mask = q_mask[:, None, None, :].expand_as(logits)  # (B, G, N, L)
        probs = masked_softmax(logits.flatten(2), mask.flatten(2))  # (B, G, N*L)
        return probs.view_as(logits)

    def forward(self, v: torch.Tensor, q_tokens: torch.Tensor, q_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """v (B, N, D) regions, q_tokens (B, L, Hq) word states, q_mask (B, L) True at valid words."""
        q = self.q_in(q_tokens)  # (B, L, H)
        maps = self.attention_maps(v, q, q_mask)  # (B, G, N, L)
        for g in range(self.glimpses):
            v_g = self.pool_v[g](v)  # (B, N, H)
            q_g = self.pool_q[g](q)  # (B, L, H)
            # f[b, h] = sum_{n,l} v_g[b, n, h] * A[b, n, l] * q_g[b, l, h]
            joint = ((maps[:, g].transpose(1, 2) @ v_g) * q_g).sum(1)  # (B, H)
            q = q + self.q_update[g](joint).unsqueeze(1)  # (B, L, H)
        fused = (q * q_mask.unsqueeze(-1)).sum(1)  # (B, H), padding words excluded
        region = maps.sum(dim=(1, 3)) / self.glimpses  # (B, N), sums to 1
        return {"fused": fused, "attention": region, "attention_maps": maps}


class StackedAttentionFusion(nn.Module):
    """Stacked attention network (Yang et al. 2016), MEVF's SAN variant.

    A query u (the pooled question) attends over regions; the attended image
    vector is added to u, and the refined query attends again (`hops` times).
    """

    def __init__(
        self, v_dim: int, q_dim: int, hidden_dim: int = 1024, hops: int = 2, dropout: float = 0.5
    ) -> None:
        super().__init__()
        self.out_dim = hidden_dim
        self.v_in = wn_linear(v_dim, hidden_dim)
        self.q_in = nn.Identity() if q_dim == hidden_dim else wn_linear(q_dim, hidden_dim)
        self.att_v = nn.ModuleList(wn_linear(hidden_dim, hidden_dim) for _ in range(hops))
        self.att_u = nn.ModuleList(wn_linear(hidden_dim, hidden_dim) for _ in range(hops))
        self.att_score = nn.ModuleList(wn_linear(hidden_dim, 1) for _ in range(hops))
        self.dropout = nn.Dropout(dropout)

    def forward(self, v: torch.Tensor, q_pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        """v (B, N, D) regions, q_pooled (B, Hq) question vector."""
        v = self.v_in(v)  # (B, N, H)
        u = self.q_in(q_pooled)  # (B, H)
        maps = []
        for att_v, att_u, att_score in zip(self.att_v, self.att_u, self.att_score):
            hidden = self.dropout(torch.tanh(att_v(v) + att_u(u).unsqueeze(1)))  # (B, N, H)
            probs = F.softmax(att_score(hidden).squeeze(-1).float(), dim=-1)  # (B, N), float32 under autocast
            u = u + torch.einsum("bn,bnh->bh", probs, v)  # (B, H)
            maps.append(probs)
        stacked = torch.stack(maps, dim=1)  # (B, hops, N)
        return {"fused": u, "attention": stacked.mean(1), "attention_maps": stacked}
