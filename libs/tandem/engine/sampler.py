"""Batched sampling on the device: greedy, temperature, top-k, top-p, min-p and token masks.

Everything is a tensor op with static shapes and no host synchronisation, so a CUDA
graph can hold it (``cuda_graph_runner``); the caller fetches the sampled ids once.

Drawing uses the Gumbel-max trick: ``argmax(logits / T + G)`` with ``G = -log(-log U)``
draws from ``softmax(logits / T)`` exactly. ``U`` comes from a counter-based generator
(``tandem.engine.philox``) keyed by the request's seed and the position of the token
being drawn, so a seeded request yields the same tokens alone or batched, eager or
replayed, aggregated or disaggregated. Top-k / top-p / min-p / masks set logits to
-inf before the draw (top-p keeps the smallest prefix of the sorted distribution whose
mass reaches p, the first token always).

Per-request token masks (structured output) are allow-bitmasks ``[B, ceil(V / 32)]``
int32: bit ``j % 32`` of word ``j // 32`` set = token ``j`` allowed. ``min_tokens``
uses them too (EOS and stop ids disallowed until enough tokens were produced).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .philox import gumbel_noise


@dataclass(frozen=True)
class SamplerVariant:
    """The code path a batch needs; one CUDA graph is captured per (batch bucket, variant)."""

    random: bool = False  # some row samples (else every row is greedy)
    top_k_top_p: bool = False  # some row restricts by top-k or top-p (a sort over the vocabulary)
    masked: bool = False  # some row has a token mask


# Every variant that needs more than an argmax (top-k/top-p only matter when drawing).
SAMPLER_VARIANTS = (
    SamplerVariant(masked=True),
    SamplerVariant(random=True),
    SamplerVariant(random=True, top_k_top_p=True),
    SamplerVariant(random=True, masked=True),
    SamplerVariant(random=True, top_k_top_p=True, masked=True),
)


@dataclass
class SamplingTensors:
    """Per-row sampling parameters on the sampling device, shapes [B] (mask [B, W])."""

    temperatures: torch.Tensor  # float32 (1.0 on greedy rows)
    top_ks: torch.Tensor  # int64 (vocab size = off)
    top_ps: torch.Tensor  # float32 (1.0 = off)
    min_ps: torch.Tensor  # float32 (0.0 = off)
    seeds: torch.Tensor  # int64
    positions: torch.Tensor  # int64, position of the token being drawn
    greedy: torch.Tensor  # bool
    mask: torch.Tensor | None = None  # int32 allow-bitmask, or None


def mask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allow_mask(vocab_size: int, banned: list | None = None) -> torch.Tensor:
    """A host bitmask row [W] int32 allowing every token but ``banned``."""
    bits = torch.ones(mask_words(vocab_size) * 32, dtype=torch.bool)
    bits[vocab_size:] = False
    if banned:
        bits[torch.tensor(banned, dtype=torch.long)] = False
    weights = 1 << torch.arange(32, dtype=torch.int64)
    words = (bits.view(-1, 32).to(torch.int64) * weights).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def apply_mask(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    V = logits.shape[1]
    j = torch.arange(V, device=logits.device)
    allowed = (mask[:, j // 32] >> (j % 32).to(torch.int32)) & 1
    return logits.masked_fill(allowed == 0, float("-inf"))


def apply_top_k_top_p(scores: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    V = scores.shape[1]
    sorted_s, idx = scores.sort(dim=-1, descending=True)
    ranks = torch.arange(V, device=scores.device)[None, :]
    cut = ranks >= top_ks[:, None]
    probs = sorted_s.softmax(dim=-1)
    cut |= (probs.cumsum(dim=-1) - probs) > top_ps[:, None]
    return torch.empty_like(scores).scatter_(1, idx, sorted_s.masked_fill(cut, float("-inf")))


def apply_min_p(scores: torch.Tensor, min_ps: torch.Tensor) -> torch.Tensor:
    # p_j >= min_p * p_max  <=>  score_j >= max_score + log(min_p)   (log 0 = -inf: off)
    thresh = scores.max(dim=-1, keepdim=True).values + torch.log(min_ps)[:, None]
    return scores.masked_fill(scores < thresh, float("-inf"))


class Sampler:
    """``sample(logits, tensors, variant)``: token ids [B] int64 on the logits' device."""

    def __init__(self, device: str):
        self.device = device
        self._gumbel_argmax = None
        if str(device).startswith("cuda"):
            from .kernels.sampling import gumbel_argmax

            self._gumbel_argmax = gumbel_argmax

    def sample(self, logits: torch.Tensor, t: SamplingTensors, variant: SamplerVariant) -> torch.Tensor:
        if variant.masked:
            logits = apply_mask(logits, t.mask)
        greedy_tokens = logits.argmax(dim=-1)
        if not variant.random:
            return greedy_tokens
        scores = logits / t.temperatures[:, None]
        if variant.top_k_top_p:
            scores = apply_top_k_top_p(scores, t.top_ks, t.top_ps)
        scores = apply_min_p(scores, t.min_ps)
        if self._gumbel_argmax is not None:
            drawn = self._gumbel_argmax(scores, t.seeds, t.positions)
        else:
            drawn = (scores + gumbel_noise(t.seeds, t.positions, scores.shape[1])).argmax(dim=-1)
        return torch.where(t.greedy, greedy_tokens, drawn)
