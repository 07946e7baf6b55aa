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
int32: bit ``j % 32`` of word ``j // 32`` set = token ``j`` allowed (xgrammar's layout, so
its matcher fills the rows directly). ``min_tokens`` uses them too (EOS and stop ids
disallowed until enough tokens were produced).

Penalties (presence, frequency, repetition) and logit bias need per-request state on the
device: ``PenaltyState`` holds, per *penalty row* (one per running request that uses
them), the output-token counts, a seen-in-prompt-or-output flag and the bias as dense
``[rows, V]`` tensors, plus the three penalty values. A step passes only ``penalty_rows``
[B] (the state row of each batch row; rows without penalties point at an all-neutral
row), so the shapes stay static and a CUDA graph reads the state in place. Rows are filled
once per request (host -> device, the prompt's and outputs' bincount) and updated on the
device after each sampled token (one scatter, no host sync). Cost: memory
``rows x V x 9`` bytes (float32 counts and bias, bool seen); per step, only for batches
that use them, a gather of ``B x V x 9`` bytes and a few elementwise ops.
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
    penalties: bool = False  # some row has presence/frequency/repetition penalties or a logit bias
    # (always with masked=True: rows without a mask get an all-ones one; this keeps the
    # number of captured variants at 8 instead of 11)


# Every variant that needs more than an argmax (top-k/top-p only matter when drawing).
SAMPLER_VARIANTS = (
    SamplerVariant(masked=True),
    SamplerVariant(random=True),
    SamplerVariant(random=True, top_k_top_p=True),
    SamplerVariant(random=True, masked=True),
    SamplerVariant(random=True, top_k_top_p=True, masked=True),
    SamplerVariant(masked=True, penalties=True),
    SamplerVariant(random=True, masked=True, penalties=True),
    SamplerVariant(random=True, top_k_top_p=True, masked=True, penalties=True),
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
    penalty_rows: torch.Tensor | None = None  # int64 row of PenaltyState per batch row, or None


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


class PenaltyState:
    """Device-resident penalty and logit-bias state, one row per request that uses them.

    Row ``num_rows`` (the last) is neutral (no penalty, no bias) and never handed out:
    batch rows without penalties point at it. Rows are handed out by ``alloc`` and
    returned by ``free`` (host bookkeeping only).
    """

    def __init__(self, num_rows: int, vocab_size: int, device):
        self.num_rows, self.vocab_size = num_rows, vocab_size
        n = num_rows + 1
        self.counts = torch.zeros((n, vocab_size), dtype=torch.float32, device=device)
        self.seen = torch.zeros((n, vocab_size), dtype=torch.bool, device=device)
        self.bias = torch.zeros((n, vocab_size), dtype=torch.float32, device=device)
        self.presence = torch.zeros(n, dtype=torch.float32, device=device)
        self.frequency = torch.zeros(n, dtype=torch.float32, device=device)
        self.repetition = torch.ones(n, dtype=torch.float32, device=device)
        self._free = list(range(num_rows - 1, -1, -1))

    @property
    def neutral_row(self) -> int:
        return self.num_rows

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, prompt_ids: list, output_ids: list, presence: float, frequency: float,
              repetition: float, logit_bias: dict) -> int | None:
        """A row initialised for a request (None when every row is taken)."""
        if not self._free:
            return None
        row = self._free.pop()
        dev, V = self.counts.device, self.vocab_size
        out = torch.tensor(output_ids, dtype=torch.long)
        counts = torch.bincount(out, minlength=V).to(torch.float32)
        seen = (torch.bincount(torch.tensor(prompt_ids, dtype=torch.long), minlength=V) > 0) | (counts > 0)
        bias = torch.zeros(V, dtype=torch.float32)
        if logit_bias:
            bias[torch.tensor(list(logit_bias), dtype=torch.long)] = torch.tensor(list(logit_bias.values()))
        self.counts[row].copy_(counts.to(dev))
        self.seen[row].copy_(seen.to(dev))
        self.bias[row].copy_(bias.to(dev))
        self.presence[row], self.frequency[row], self.repetition[row] = presence, frequency, repetition
        return row

    def free(self, row: int) -> None:
        self._free.append(row)

    def record(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count one sampled token per row (device tensors; no host sync)."""
        self.counts.index_put_((rows, tokens), torch.ones_like(tokens, dtype=torch.float32), accumulate=True)
        self.seen.index_put_((rows, tokens), torch.ones_like(tokens, dtype=torch.bool))


def apply_penalties(logits: torch.Tensor, rows: torch.Tensor, st: PenaltyState) -> torch.Tensor:
    """Repetition penalty on tokens seen in the prompt or output, then frequency and presence on
    the output counts, then the logit bias (vLLM's order)."""
    counts, seen = st.counts[rows], st.seen[rows]
    rep = st.repetition[rows][:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - st.frequency[rows][:, None] * counts - st.presence[rows][:, None] * (counts > 0)
    return logits + st.bias[rows]


class Sampler:
    """``sample(logits, tensors, variant)``: token ids [B] int64 on the logits' device."""

    def __init__(self, device: str, penalties: PenaltyState | None = None):
        self.device = device
        self.penalties = penalties
        self._gumbel_argmax = None
        if str(device).startswith("cuda"):
            from .kernels.sampling import gumbel_argmax

            self._gumbel_argmax = gumbel_argmax

    def sample(self, logits: torch.Tensor, t: SamplingTensors, variant: SamplerVariant) -> torch.Tensor:
        if variant.penalties:
            logits = apply_penalties(logits, t.penalty_rows, self.penalties)
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
