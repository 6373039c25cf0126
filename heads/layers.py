"""Small building blocks shared by the heads: weight-normed MLPs, masked softmax, word attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

# Logit given to answers a head must never pick. Finite (not -inf) so softmax and
# BCE stay NaN-free, and small enough in magnitude to survive fp16 autocast.
MASKED_LOGIT = -1.0e4


def wn_linear(in_dim: int, out_dim: int) -> nn.Linear:
    """Linear layer with weight normalisation over the whole matrix (one scalar gain).

    BAN, MEVF and QCR use this form everywhere; it keeps the scale of each layer
    a single learnable number, which trains stably with Adamax at lr 1e-3..2e-3.
    """
    return weight_norm(nn.Linear(in_dim, out_dim), dim=None)


class FCNet(nn.Sequential):
    """Dropout -> weight-normed Linear -> activation, for each consecutive pair in `dims`."""

    def __init__(self, dims: list[int], act: bool = True, dropout: float = 0.0) -> None:
        layers: list[nn.Module] = []
        for in_dim, out_dim in zip(dims[:-1], dims[1:]):
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            layers.append(wn_linear(in_dim, out_dim))
            if act:
                layers.append(nn.ReLU())
        super().__init__(*layers)


class AnswerClassifier(nn.Sequential):
    """MEVF's answer MLP: Linear -> ReLU -> Dropout -> Linear (weight-normed)."""

    def __init__(self, in_dim: int, hidden_dim: int, num_outputs: int, dropout: float = 0.5) -> None:
        super().__init__(
            wn_linear(in_dim, hidden_dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            wn_linear(hidden_dim, num_outputs),
        )


def length_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths -> (B, max_len) bool, True at valid (non-padding) positions."""
    positions = torch.arange(max_len, device=lengths.device)
    return positions.unsqueeze(0) < lengths.unsqueeze(1)


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over `dim` where positions with mask False get exactly zero probability.

    Computed in float32 (also under autocast): attention maps are shown to users
    and summed over many (region, word) pairs.
    """
    logits = logits.float().masked_fill(~mask, float("-inf"))
    return F.softmax(logits, dim=dim)


class WordAttentionPool(nn.Module):
    """Question self-attention: a gated score per word, then a weighted sum of word states.

    The gate is tanh(W1 x) * sigmoid(W2 x), as in QCR's question attention; it lets
    the type classifier and the reasoning module each pick the words they need
    ("is", "does" for closed questions; "which", "what organ" for open ones).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.tanh_gate = nn.Linear(dim, dim)
        self.sigmoid_gate = nn.Linear(dim, dim)
        self.score = nn.Linear(dim, 1)

    def forward(self, words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        gated = torch.tanh(self.tanh_gate(words)) * torch.sigmoid(self.sigmoid_gate(words))  # (B, L, H)
        weights = masked_softmax(self.score(gated).squeeze(-1), mask)  # (B, L)
        return torch.einsum("bl,blh->bh", weights, words)  # (B, H)
