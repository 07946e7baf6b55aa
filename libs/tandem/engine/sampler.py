"""Batched sampling: temperature, top-k, top-p, min-p, per-request seeded generators.

Sampling uses the exponential-race trick (argmax of p / E with E ~ Exp(1)), which
draws from p exactly. Each seeded request draws its noise from its own
``torch.Generator``, so its tokens do not depend on the other requests in the batch.
"""
from __future__ import annotations

import torch


class Sampler:
    def __init__(self, device: str, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def skip_draw(self, generator: torch.Generator, vocab_size: int) -> None:
        """Advance `generator` exactly as one sampling step of a row does."""
        torch.empty(vocab_size, dtype=torch.float32, device=self.device).exponential_(generator=generator)

    def __call__(self, logits: torch.Tensor, reqs: list):
        """logits [B, V] float32; returns (token_ids list[int], logprobs [B, V] or None)."""
        sps = [r.sampling for r in reqs]
        want_lp = any(sp.logprobs or sp.top_logprobs for sp in sps)
        logprobs = torch.log_softmax(logits, dim=-1) if want_lp else None
        if all(sp.greedy for sp in sps):
            return logits.argmax(dim=-1).tolist(), logprobs
        B, V = logits.shape
        dev = logits.device
        temps = torch.tensor([sp.temperature if not sp.greedy else 1.0 for sp in sps], device=dev)
        probs = torch.softmax(logits / temps[:, None], dim=-1)
        top_ks = [sp.top_k if sp.top_k > 0 else V for sp in sps]
        top_ps = [sp.top_p for sp in sps]
        min_ps = [sp.min_p for sp in sps]
        if any(k < V for k in top_ks) or any(p < 1.0 for p in top_ps):
            sorted_p, idx = probs.sort(dim=-1, descending=True)
            ranks = torch.arange(V, device=dev)[None, :]
            mask = ranks >= torch.tensor(top_ks, device=dev)[:, None]
            cum = sorted_p.cumsum(dim=-1)
            mask |= (cum - sorted_p) > torch.tensor(top_ps, device=dev)[:, None]
            sorted_p = sorted_p.masked_fill(mask, 0.0)
            probs = torch.zeros_like(probs).scatter_(1, idx, sorted_p)
        if any(m > 0 for m in min_ps):
            thresh = probs.max(dim=-1, keepdim=True).values * torch.tensor(min_ps, device=dev)[:, None]
            probs = probs.masked_fill(probs < thresh, 0.0)
        noise = torch.empty_like(probs)
        for i, r in enumerate(reqs):
            g = r.generator if r.generator is not None else self.generator
            noise[i].exponential_(generator=g)
        tokens = (probs / noise).argmax(dim=-1)
        greedy_rows = [i for i, sp in enumerate(sps) if sp.greedy]
        if greedy_rows:
            rows = torch.tensor(greedy_rows, device=dev)
            tokens[rows] = logits[rows].argmax(dim=-1)
        return tokens.tolist(), logprobs
