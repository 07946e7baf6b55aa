"""Embedding passes (``--is-embedding``): a batch of token sequences in, one pooled vector each out.

The inputs are packed one after another (no padding) into forward passes of at most
``token_budget`` tokens (an input longer than the budget runs alone); each pass takes KV pages
for its tokens, runs the model's paged extend path (the same attention kernels as prefill) up
to the final norm, pools (``tandem.engine.pooling``) and frees the pages at once: nothing is
cached and nothing is sampled. The result is a return value (:class:`EmbeddingOutput`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_pool import KVPool
from .pooling import PoolingConfig, finish, pool, pooled_rows


@dataclass
class EmbeddingOutput:
    """The embeddings of one batch, in input order: ``vectors`` [B, D] float32 on the host."""

    vectors: torch.Tensor
    num_tokens: list[int]
    pooling: str
    normalized: bool

    @property
    def prompt_tokens(self) -> int:
        return sum(self.num_tokens)


@dataclass
class _Sequence:
    """What the model runner reads of a request: its tokens, its pages, what is computed."""

    all_ids: list[int]
    pages: list[int]
    num_computed: int = 0

    def token_at(self, pos: int) -> int:
        return self.all_ids[pos]


class Embedder:
    """Runs embedding passes over ``runner``'s model and ``kv_pool``; the engine owns it."""

    def __init__(self, runner, kv_pool: KVPool, pooling: PoolingConfig, token_budget: int, context_length: int,
                 vocab_size: int, hidden_size: int) -> None:
        self.runner, self.pool, self.pooling = runner, kv_pool, pooling
        self.token_budget = token_budget
        self.context_length, self.vocab_size, self.hidden_size = context_length, vocab_size, hidden_size
        self.passes = 0  # forward passes run (tests, stats)

    def validate(self, inputs: list[list[int]], dimensions: int | None) -> None:
        """ValueError naming the field (``input[i]``, ``dimensions``) for a batch that cannot run."""
        if not inputs:
            raise ValueError("input: at least one input is required")
        if dimensions is not None and dimensions != 0 and not 1 <= dimensions <= self.hidden_size:
            raise ValueError(f"dimensions: {dimensions} is not in [1, {self.hidden_size}] (the model's size)")
        ps = self.pool.page_size
        for i, ids in enumerate(inputs):
            if not ids:
                raise ValueError(f"input[{i}]: empty (no tokens)")
            if len(ids) > self.context_length:
                raise ValueError(f"input[{i}]: {len(ids)} tokens, more than the model's context length "
                                 f"{self.context_length}")
            if min(ids) < 0 or max(ids) >= self.vocab_size:
                raise ValueError(f"input[{i}]: token ids must be in [0, {self.vocab_size})")
            if (len(ids) + ps - 1) // ps > self.pool.num_pages:
                raise ValueError(f"input[{i}]: {len(ids)} tokens do not fit the KV pool "
                                 f"({self.pool.num_pages * ps} tokens; raise --max-total-tokens)")

    def plan(self, lens: list[int]) -> list[list[int]]:
        """Input indices of each forward pass, in order: consecutive inputs while their tokens fit the
        budget and their pages fit the pool."""
        ps = self.pool.page_size
        passes, cur, tokens, pages = [], [], 0, 0
        for i, n in enumerate(lens):
            p = (n + ps - 1) // ps
            if cur and (tokens + n > self.token_budget or pages + p > self.pool.num_pages):
                passes.append(cur)
                cur, tokens, pages = [], 0, 0
            cur.append(i)
            tokens += n
            pages += p
        if cur:
            passes.append(cur)
        return passes

    def embed(self, inputs: list[list[int]], dimensions: int | None = None) -> EmbeddingOutput:
        """The pooled, truncated (``dimensions``), normalised (when configured) vector of every input."""
        self.validate(inputs, dimensions)
        lens = [len(ids) for ids in inputs]
        out: list[torch.Tensor] = []
        for group in self.plan(lens):
            out.append(self._run_pass([inputs[i] for i in group]))
        vectors = finish(torch.cat(out), dimensions, self.pooling.normalize)
        return EmbeddingOutput(vectors.cpu(), lens, self.pooling.method, self.pooling.normalize)

    def _run_pass(self, inputs: list[list[int]]) -> torch.Tensor:
        ps = self.pool.page_size
        seqs = []
        try:
            for ids in inputs:
                pages = self.pool.alloc((len(ids) + ps - 1) // ps)
                if pages is None:  # plan() kept each pass within the pool; something else holds pages
                    raise RuntimeError(f"embedding pass: {self.pool.num_free_pages} free KV pages, "
                                       f"{(len(ids) + ps - 1) // ps} needed")
                seqs.append(_Sequence(list(ids), pages))
            lens = [len(s.all_ids) for s in seqs]
            method = self.pooling.method
            batch = [(s, n) for s, n in zip(seqs, lens)]
            fb = self.runner.build(batch, [True] * len(batch) if method == "mean" else None)
            rows = pooled_rows(lens, method)
            fb.logits_indices = None if rows is None else torch.tensor(rows, dtype=torch.long,
                                                                       device=fb.input_ids.device)
            with torch.profiler.record_function("tandem.embedding_forward"):
                hidden = self.runner.model.hidden_states(fb, self.pool.k_buffers, self.pool.v_buffers)
            self.passes += 1
            return pool(hidden, lens, method)
        finally:
            for s in seqs:
                self.pool.free(s.pages)
