"""The MoE layer's math in plain torch: the reference both attention backends follow.

``torch_native`` runs these functions; the ``triton`` backend runs the kernels of
``tandem.engine.kernels`` (``moe_routing``, ``moe_align``, ``fused_moe``), each tested against
the function here that it replaces. No host sync anywhere except the ``per_token`` recorder
and the grouped expert loop of ``expert_rows`` (the CPU path), so the same layer runs under
a CUDA graph on the triton backend.

One MoE layer, for ``T`` tokens::

    logits  = x.float() @ router.T             # [T, E (+1: the shared expert's gate, last)]
    ids, w  = route(logits)                    # [T, k] logical experts ascending, float32 weights
    ids, w  = + the shared expert's chunks     # [T, KS], KS = k + S (ids E .. E+S-1)
    slots   = dispatch(ids) -> local slot      # EPLB placement; S slots after the routed ones
    rows    = w[e] * expert(slot[e], x[token]) # [T, KS, H], each rounded as F.linear would
    out     = rows[t, 0] + rows[t, 1] + ...    # fixed order (float32), rounded once

The shared expert (intermediate ``S * I``) is folded in as ``S`` always-chosen experts of
intermediate ``I`` whose routing weight is its gate (``sigmoid``) or 1: SiLU-and-mul is
elementwise over the intermediate and the down projection sums over it, so the split is
exact up to float summation order. A token's rows are summed in ascending logical order,
shared chunks last: the result does not depend on which physical slot (replica, EP rank)
computed a row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The score-correction-free sigmoid renormalisation adds this to the denominator (DeepSeek-V3).
SIGMOID_EPS = 1e-20


@dataclass(frozen=True)
class RoutingSpec:
    """A MoE layer's fixed routing parameters (built once by the layer)."""

    num_experts: int  # routed (logical) experts E
    top_k: int
    scoring_func: str  # softmax | sigmoid
    norm_topk_prob: bool
    routed_scaling_factor: float
    n_group: int
    topk_group: int
    num_shared: int  # shared-expert chunks folded in as always-chosen experts (S)
    shared_gated: bool  # the router's last logit is the shared expert's gate

    @property
    def entries_per_token(self) -> int:
        return self.top_k + self.num_shared


def route(spec: RoutingSpec, logits: torch.Tensor, score_bias: torch.Tensor | None = None):
    """(ids [T, k] int64 logical experts in ascending order, weights [T, k] float32)."""
    E = spec.num_experts
    routed = logits[:, :E]
    scores = routed.softmax(dim=-1) if spec.scoring_func == "softmax" else routed.sigmoid()
    choice = scores if score_bias is None else scores + score_bias.float()
    if spec.n_group > 1:
        T = logits.shape[0]
        grouped = choice.view(T, spec.n_group, -1)
        if spec.scoring_func == "sigmoid":  # DeepSeek-V3: sum of the top-2 scores per group
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        else:  # DeepSeek-V2 group_limited_greedy: best score per group
            group_scores = grouped.max(dim=-1).values
        group_idx = group_scores.topk(spec.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        score_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(T, -1)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    ids = choice.topk(spec.top_k, dim=-1, sorted=False)[1].sort(dim=-1).values
    weights = scores.gather(1, ids)
    if spec.norm_topk_prob:
        denom = weights.sum(dim=-1, keepdim=True)
        weights = weights / (denom + SIGMOID_EPS if spec.scoring_func == "sigmoid" else denom)
    return ids, weights * spec.routed_scaling_factor


def with_shared(spec: RoutingSpec, logits: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
    """Append the folded shared expert's S chunks (ids E.., weight = its gate or 1) to every token."""
    S = spec.num_shared
    if not S:
        return ids, weights
    T = ids.shape[0]
    sid = torch.arange(spec.num_experts, spec.num_experts + S, device=ids.device).expand(T, S)
    gate = logits[:, spec.num_experts:spec.num_experts + 1].sigmoid() if spec.shared_gated else \
        torch.ones(T, 1, device=logits.device)
    return torch.cat([ids, sid], dim=1), torch.cat([weights, gate.expand(T, S)], dim=1)


def local_slots(phys: torch.Tensor, local_start: int, num_local: int, num_shared: int,
                shared_here: bool) -> torch.Tensor:
    """Physical slots of the routed entries ``phys [T, k]`` -> this rank's slot index (int32), with
    the S shared entries appended; ``num_local + num_shared`` (the slot count) = not on this rank."""
    sentinel = num_local + num_shared
    local = phys - local_start
    out = torch.where((local >= 0) & (local < num_local), local, sentinel).to(torch.int32)
    if num_shared:
        T = phys.shape[0]
        shared = torch.arange(num_local, num_local + num_shared, dtype=torch.int32, device=phys.device)
        if not shared_here:
            shared = torch.full_like(shared, sentinel)
        out = torch.cat([out, shared.expand(T, num_shared)], dim=1)
    return out


def route_tokens(spec: RoutingSpec, logits: torch.Tensor, score_bias: torch.Tensor | None = None, dispatcher=None,
                 layer: int = 0, positions: torch.Tensor | None = None, shared_here: bool = True,
                 counts: torch.Tensor | None = None, count_physical: bool = False,
                 seq_lens: torch.Tensor | None = None):
    """What the routing kernel (``kernels.moe_routing.route``) computes, same arguments and results:
    (ids [T, KS] int32, slots [T, KS] int32, weights [T, KS] float32), and +1 in ``counts`` per
    routed entry of every real row (``seq_lens > 0``; every row without them)."""
    k = spec.top_k
    ids, weights = with_shared(spec, logits, *route(spec, logits, score_bias))
    if dispatcher is None:
        phys, local_start, num_local = ids[:, :k], 0, spec.num_experts
    else:
        phys = dispatcher.dispatch(layer, ids[:, :k], positions)
        local_start, num_local = dispatcher.local_start, dispatcher.num_local
    slots = local_slots(phys, local_start, num_local, spec.num_shared, shared_here)
    if counts is not None:
        counted = phys if count_physical else ids[:, :k]
        ones = torch.ones_like(counted, dtype=torch.int32)
        if seq_lens is not None:
            ones = ones * (seq_lens > 0).view(-1, 1).to(torch.int32)
        counts.scatter_add_(0, counted.reshape(-1).long(), ones.reshape(-1))
    return ids.to(torch.int32), slots, weights.float()


def expert_rows(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, slots: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
    """Weighted output of every (token, entry) whose slot is here: ``[T, KS, H]`` (zero elsewhere).

    Grouped expert MLP: entries sorted by slot (stably), one matmul pair per used slot. Each
    GEMM's output is rounded to the model dtype, SiLU-and-mul as ``F.silu(gate) * up``, then the
    routing weight (in the model dtype) applied and rounded again.
    """
    T, KS = slots.shape
    num_slots = w13.shape[0]
    flat = slots.reshape(-1).long()
    keep = flat < num_slots
    entries = torch.arange(T * KS, device=slots.device)[keep]
    flat = flat[keep]
    order = flat.argsort(stable=True)
    entries = entries[order]
    counts = torch.bincount(flat, minlength=num_slots).tolist()
    xs = x[entries // KS]
    w = weights.reshape(-1)[entries].to(x.dtype)
    buf = x.new_zeros(T * KS, x.shape[-1])
    start = 0
    for slot, n in enumerate(counts):
        if n == 0:
            continue
        seg = slice(start, start + n)
        gate, up = F.linear(xs[seg], w13[slot]).chunk(2, dim=-1)
        buf[entries[seg]] = F.linear(F.silu(gate) * up, w2[slot]) * w[seg, None]
        start += n
    return buf.view(T, KS, -1)


def combine(rows: torch.Tensor) -> torch.Tensor:
    """``[T, KS, H]`` -> ``[T, H]``: the entries of a token summed in order, in float32, rounded once."""
    acc = rows[:, 0].float()
    for j in range(1, rows.shape[1]):
        acc = acc + rows[:, j].float()
    return acc.to(rows.dtype)
