"""The sample stage of a step: sample a batch's rows on the device, start copying the results
to the host, and read them back later (``resolve``) as a :class:`SampledTokens` value.

Overlap scheduling: until its tokens are resolved, each sampled request's next token is a
placeholder ``-(row + 1)`` in ``output_ids`` that the next forward pass resolves on the
device (``ModelRunner.publish_future``), so the engine can schedule and launch step N+1
before step N's tokens reach the host. Per-request sampler state lives here too: the
penalty row (``PenaltyState``) of every request with penalties or a logit bias, from its
first sampled token until it finishes (``free``).

The runner is passed in on every call: the engine may replace its runner between steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .outputs import SampledTokens
from .request import Request
from .sampler import SamplerVariant, SamplingTensors, allow_mask, mask_words


@dataclass
class _Launched:
    """One step's sampling, launched on the device: its results reach the host through
    non-blocking copies (``event`` marks their end on CUDA)."""

    reqs: list
    tokens: torch.Tensor  # [B] host
    logprobs: torch.Tensor | None  # [B] host: logprob of each sampled token
    top_ids: torch.Tensor | None  # [B, K] host, K = the largest top_logprobs asked
    top_vals: torch.Tensor | None
    status: torch.Tensor | None = None  # [1] host: the runner's collective status after the step (None: none)
    event: object = None  # torch.cuda.Event on CUDA


def _to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or t.device.type == "cpu":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def _signed64(seed: int) -> int:
    """A uint64 seed as the int64 with the same bits (the sampler keys on the bits)."""
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def prompt_logprobs(req: Request, rows: torch.Tensor) -> list:
    """[(logprob, top)] of the prompt tokens that ``rows`` predict: rows[j] are the logits after
    token num_computed + j, i.e. the distribution of the next prompt token. Empty when these
    positions were already recorded (a recomputed prompt)."""
    start, L = req.num_computed, len(req.prompt_ids)
    n = min(rows.shape[0], L - 1 - start)
    if n <= 0 or len(req.prompt_logprobs) != start:
        return []
    lp = torch.log_softmax(rows[:n].float(), dim=-1)
    targets = torch.tensor(req.prompt_ids[start + 1:start + 1 + n], device=lp.device)
    vals = lp.gather(1, targets[:, None])[:, 0].tolist()
    k = req.sampling.prompt_logprobs
    tops = [[]] * n
    if k:
        v, ix = lp.topk(k, dim=-1)
        tops = [list(zip(a, b)) for a, b in zip(ix.tolist(), v.tolist())]
    return list(zip(vals, tops))


class SampleLauncher:
    def __init__(self, vocab_size: int, eos_token_ids: set) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self._penalty_rows: dict[str, int] = {}  # rid -> row of the runner's PenaltyState
        self._inflight: _Launched | None = None

    @property
    def in_flight(self) -> bool:
        """A launched step's tokens are not read back yet."""
        return self._inflight is not None

    # ---- per-request sampler state -------------------------------------------------------
    def take_penalty_rows(self, runner, reqs: list) -> list[int]:
        """Give every request with penalties / logit bias its PenaltyState row (filled from its
        prompt and outputs so far); the indices of ``reqs`` that found none free."""
        state = runner.penalties
        refused = []
        for i, req in enumerate(reqs):
            sp = req.sampling
            if sp.penalized and req.rid not in self._penalty_rows:
                row = state.alloc(req.prompt_ids, req.output_ids, sp.presence_penalty, sp.frequency_penalty,
                                  sp.repetition_penalty, sp.logit_bias)
                if row is None:
                    refused.append(i)
                else:
                    self._penalty_rows[req.rid] = row
        return refused

    def free(self, runner, rid: str) -> None:
        """The request finished (or handed its first token over): drop its sampler state."""
        row = self._penalty_rows.pop(rid, None)
        if row is not None:
            runner.penalties.free(row)

    def inputs(self, runner, reqs: list) -> tuple[SamplingTensors | None, SamplerVariant]:
        """Host tensors of the batch's sampling parameters (None when every row is greedy, unmasked).

        Masks: a grammar row gets its matcher's allow-bitmask for the next token (the previous
        token was accepted in ``Scheduler.update_from_output``); min_tokens forbids EOS / stop ids
        until enough tokens were produced (unless that would leave a grammar row nothing to choose).
        """
        sps = [r.sampling for r in reqs]
        V = self.vocab_size
        banned_rows = []
        for req, sp in zip(reqs, sps):
            banned = []
            if len(req.output_ids) < sp.min_tokens:
                banned = list(sp.stop_token_ids) + ([] if sp.ignore_eos else list(self.eos_token_ids))
            banned_rows.append(banned)
        rows = self._penalty_rows
        penalties = any(r.rid in rows for r in reqs)
        grammar = any(r.grammar is not None for r in reqs)
        variant = SamplerVariant(random=not all(sp.greedy for sp in sps),
                                 top_k_top_p=any(not sp.greedy and (0 < sp.top_k < V or sp.top_p < 1.0)
                                                 for sp in sps),
                                 masked=any(banned_rows) or grammar or penalties, penalties=penalties)
        if variant == SamplerVariant():
            return None, variant
        mask = None
        if variant.masked:
            mask = torch.full((len(reqs), mask_words(V)), -1, dtype=torch.int32)
            for i, (req, banned) in enumerate(zip(reqs, banned_rows)):
                if req.grammar is not None:
                    req.grammar.fill(mask, i)
                if banned:
                    row = mask[i] & allow_mask(V, banned)
                    if req.grammar is None or bool(row.any()):
                        mask[i] = row
        neutral = runner.penalties.neutral_row
        return SamplingTensors(
            temperatures=torch.tensor([1.0 if sp.greedy else sp.temperature for sp in sps]),
            top_ks=torch.tensor([sp.top_k if 0 < sp.top_k < V else V for sp in sps]),
            top_ps=torch.tensor([sp.top_p for sp in sps], dtype=torch.float32),
            min_ps=torch.tensor([sp.min_p for sp in sps], dtype=torch.float32),
            seeds=torch.tensor([_signed64(r.seed) for r in reqs], dtype=torch.int64),
            positions=torch.tensor([r.seq_len for r in reqs], dtype=torch.int64),
            greedy=torch.tensor([sp.greedy for sp in sps]),
            mask=mask,
            penalty_rows=torch.tensor([rows.get(r.rid, neutral) for r in reqs], dtype=torch.int64)
            if penalties else None,
        ), variant

    # ---- launch and resolve --------------------------------------------------------------
    def launch(self, runner, reqs: list, logits: torch.Tensor) -> list:
        """Sample every row on the device and start copying the results to the host; the
        requests (of ``reqs``) that got no penalty row are returned, not sampled."""
        refused = self.take_penalty_rows(runner, reqs)
        if refused:
            gone = set(refused)
            keep = [i for i in range(len(reqs)) if i not in gone]
            refused_reqs = [reqs[i] for i in refused]
            reqs, logits = [reqs[i] for i in keep], logits[keep]
            if not reqs:
                return refused_reqs
        else:
            refused_reqs = []
        tensors, variant = self.inputs(runner, reqs)
        token_ids = runner.sample(logits, tensors, variant)
        rows = self._penalty_rows
        if variant.penalties:  # count the new tokens on the device (no host sync)
            idx = [i for i, r in enumerate(reqs) if r.rid in rows]
            dev = token_ids.device
            runner.penalties.record(torch.tensor([rows[reqs[i].rid] for i in idx], device=dev),
                                    token_ids[torch.tensor(idx, device=dev)])
        lp = top_ids = top_vals = None
        k = max(r.sampling.top_logprobs or 0 for r in reqs)
        if k or any(r.sampling.logprobs for r in reqs):
            logprobs = torch.log_softmax(logits, dim=-1)
            lp = logprobs.gather(1, token_ids[:, None].long())[:, 0]
            if k:
                top_vals, top_ids = logprobs.topk(k, dim=-1)
        launched = _Launched(reqs, _to_host(token_ids), _to_host(lp), _to_host(top_ids), _to_host(top_vals),
                             _to_host(runner.collective_status()))
        if token_ids.device.type == "cuda":
            launched.event = torch.cuda.Event()
            launched.event.record()
        runner.publish_future(token_ids)
        for i, req in enumerate(reqs):
            req.output_ids.append(-(i + 1))
            req.num_pending = 1
        self._inflight = launched
        return refused_reqs

    def resolve(self, runner) -> SampledTokens | None:
        """The launched step's tokens on the host (waits for their copy only); None when none
        is in flight. RuntimeError (the group broken) instead when a collective of the step gave up
        on a peer rank: its tokens came from incomplete sums."""
        launched, self._inflight = self._inflight, None
        if launched is None:
            return None
        if launched.event is not None:
            launched.event.synchronize()
        if launched.status is not None and int(launched.status[0]):
            raise runner.collectives_failed()
        return SampledTokens(
            reqs=launched.reqs, tokens=launched.tokens.tolist(),
            logprobs=launched.logprobs.tolist() if launched.logprobs is not None else None,
            top_ids=launched.top_ids.tolist() if launched.top_ids is not None else None,
            top_vals=launched.top_vals.tolist() if launched.top_vals is not None else None,
        )
