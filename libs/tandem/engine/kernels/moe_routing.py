"""MoE routing in two kernels at decode sizes: the router logits (``router_logits``: the float32
GEMV straight from the model-dtype activations), then the fused routing: scoring, group-limited
top-k, renormalisation, the score-correction bias, the shared expert's entries, EPLB's dispatch
to this rank's slots and the recorder's counts, in one kernel (one program per block of tokens;
no host sync).

It computes ``tandem.engine.moe_math``'s ``route`` + ``with_shared`` + ``dispatch_ids`` (static or
random; ``dynamic`` needs the whole batch and runs as torch ops after) + ``local_slots``:

* scores = softmax or sigmoid of the router logits (float32); ``choice`` = scores + bias;
* groups (``n_group > 1``): a group's score is its best choice (softmax) or the sum of its best
  two (sigmoid); the ``topk_group`` best groups stay, the others are masked out;
* top-k of ``choice`` (ties: the lower expert id), emitted in **ascending expert id**, the order
  the layer sums its entries in; weights = scores (without bias), renormalised, scaled;
* the ``S`` shared-expert chunks follow (ids ``E..E+S-1``, weight = sigmoid of the gate logit, or 1);
* each routed id -> physical slot through the dispatch tables -> this rank's slot index, or the
  slot count ("not here"); shared chunks get slots ``num_local..`` where they are computed;
* recorder: each routed entry of a real row (``seq_lens > 0`` for a padded decode graph) adds 1
  to its logical (or physical) counter: integer atomics, so the counts do not depend on order.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..moe_math import SIGMOID_EPS, RoutingSpec

ALGO_IDENTITY, ALGO_STATIC, ALGO_RANDOM, ALGO_NONE = 0, 1, 2, 3
_SIGMOID_EPS = tl.constexpr(SIGMOID_EPS)
_ALGOS = {"static": ALGO_STATIC, "random": ALGO_RANDOM, "dynamic": ALGO_NONE}


@triton.jit
def _mix32(h):
    h = (((h >> 16) ^ h) * 0x45D9F3B) & 0xFFFFFFFF
    h = (((h >> 16) ^ h) * 0x45D9F3B) & 0xFFFFFFFF
    return (h >> 16) ^ h


@triton.jit
def _router_kernel(X, W, Out, H, stride_x, stride_w, stride_o, ROWS: tl.constexpr, BLOCK_E: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    """logits[t, e] = x[t] . w[e] in float32 (x in the model dtype, w float32): program (rows, token)."""
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    t = tl.program_id(1).to(tl.int64)
    e_mask = e < ROWS
    acc = tl.zeros([BLOCK_E, BLOCK_K], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < H
        x = tl.load(X + t * stride_x + k, mask=k_mask, other=0.0).to(tl.float32)
        w = tl.load(W + e[:, None] * stride_w + k[None, :], mask=e_mask[:, None] & k_mask[None, :], other=0.0)
        acc += w * x[None, :]
    tl.store(Out + t * stride_o + e, tl.sum(acc, axis=1), mask=e_mask)


ROUTER_KERNEL_MAX_TOKENS = 64  # decode sizes; larger batches take cuBLAS (x.float() @ w.T)


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x.float(), weight)`` (float32 router) in one kernel for decode-sized batches."""
    T, H = x.shape
    if T > ROUTER_KERNEL_MAX_TOKENS or T == 0:
        return torch.nn.functional.linear(x.float(), weight)
    rows = weight.shape[0]
    out = torch.empty((T, rows), dtype=torch.float32, device=x.device)
    block_e = 8
    _router_kernel[(triton.cdiv(rows, block_e), T)](x, weight, out, H, x.stride(0), weight.stride(0), out.stride(0),
                                                    ROWS=rows, BLOCK_E=block_e, BLOCK_K=256, num_warps=4)
    return out


@triton.jit
def _take_best(values, index, sentinel: tl.constexpr):
    """Per row, the element of ``index`` with the largest value (the lowest index on ties): (pick
    mask over the row, values with the picked elements removed)."""
    best = tl.max(values, axis=1)
    first = tl.min(tl.where(values == best[:, None], index, sentinel), axis=1)
    pick = index == first[:, None]
    return pick, tl.where(pick, float("-inf"), values)


@triton.jit
def _route_kernel(
    Logits, Bias, Log2Phy, LogCnt, Positions, SeqLens, Counts,
    Ids, Slots, Weights,
    T, stride_l, stride_tab, seed, layer, scaling, local_start, num_local,
    E: tl.constexpr, TOP_K: tl.constexpr, NUM_SHARED: tl.constexpr, SHARED_GATED: tl.constexpr,
    SHARED_HERE: tl.constexpr, SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr,
    N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, ALGO: tl.constexpr, COUNT: tl.constexpr,
    COUNT_PHYSICAL: tl.constexpr, HAS_SEQLENS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """One program routes BLOCK_T tokens: every tensor is [tokens, experts], reductions along axis 1."""
    KS: tl.constexpr = TOP_K + NUM_SHARED
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    offs = tl.arange(0, BLOCK_E)
    in_range = row_ok[:, None] & (offs < E)[None, :]
    ex = tl.zeros([BLOCK_T, BLOCK_E], tl.int32) + offs[None, :]  # expert id of every element
    logits = tl.load(Logits + rows[:, None].to(tl.int64) * stride_l + offs[None, :], mask=in_range,
                     other=0.0).to(tl.float32)
    if SOFTMAX:
        z = tl.where(in_range, logits, -1e30)
        p = tl.exp(z - tl.max(z, axis=1)[:, None])
        p = tl.where(in_range, p, 0.0)
        scores = p / tl.maximum(tl.sum(p, axis=1), 1e-30)[:, None]
    else:
        scores = 1.0 / (1.0 + tl.exp(-logits))
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(Bias + offs, mask=offs < E, other=0.0)[None, :]
    choice = tl.where(in_range, choice, float("-inf"))
    if N_GROUP > 1:
        GROUP_SIZE: tl.constexpr = E // N_GROUP
        group = ex // GROUP_SIZE
        gscore = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)  # each expert carries its group's score
        for g in tl.static_range(N_GROUP):
            member = (group == g) & in_range
            c = tl.where(member, choice, float("-inf"))
            best = tl.max(c, axis=1)
            if SOFTMAX:
                score = best
            else:  # sum of the two best (the second may equal the first)
                first = tl.min(tl.where(c == best[:, None], ex, BLOCK_E), axis=1)
                score = best + tl.max(tl.where(ex == first[:, None], float("-inf"), c), axis=1)
            gscore = tl.where(member, score[:, None], gscore)
        keep = ex < 0
        gs = tl.where(in_range, gscore, float("-inf"))
        for _ in tl.static_range(TOPK_GROUP):  # the best group each round
            pick, gs = _take_best(gs, group, N_GROUP)
            keep = keep | pick
        choice = tl.where(keep & in_range, choice, float("-inf"))
    chosen = ex < 0
    for _ in tl.static_range(TOP_K):  # the best expert each round
        pick, choice = _take_best(choice, ex, BLOCK_E)
        chosen = chosen | pick
    chosen = chosen & in_range
    w = tl.where(chosen, scores, 0.0)
    if RENORM:
        denom = tl.sum(w, axis=1)
        if not SOFTMAX:
            denom = denom + _SIGMOID_EPS
        w = w / tl.where(row_ok, denom, 1.0)[:, None]
    w = w * scaling
    pos = tl.cumsum(chosen.to(tl.int32), axis=1) - 1  # output column: ascending expert id
    out = rows[:, None].to(tl.int64) * KS + pos
    tl.store(Ids + out, ex, mask=chosen)
    tl.store(Weights + out, w, mask=chosen)
    # dispatch: logical id -> physical slot -> this rank's slot index
    if ALGO == 0:
        phys = ex
    else:
        cnt = tl.load(LogCnt + ex, mask=chosen, other=1)
        if ALGO == 1:
            rep = rows[:, None] % cnt
        else:
            if ALGO == 2:
                h = _mix32(tl.zeros([BLOCK_T, BLOCK_E], tl.int64) + seed)
                h = _mix32(h ^ layer)
                position = tl.load(Positions + rows, mask=row_ok, other=0).to(tl.int64) & 0xFFFFFFFF
                h = _mix32(h ^ position[:, None])
                h = _mix32(h ^ rows[:, None])
                h = _mix32(h ^ ex)
                rep = (h % cnt).to(tl.int32)
            else:
                rep = tl.zeros([BLOCK_T, BLOCK_E], tl.int32)
        phys = tl.load(Log2Phy + ex * stride_tab + rep, mask=chosen, other=0)
    SENTINEL = num_local + NUM_SHARED
    if ALGO != 3:
        local = phys - local_start
        slot = tl.where((local >= 0) & (local < num_local), local, SENTINEL)
        tl.store(Slots + out, slot, mask=chosen)
    if COUNT:
        counted = chosen
        if HAS_SEQLENS:
            live = tl.load(SeqLens + rows, mask=row_ok, other=0) > 0
            counted = counted & live[:, None]
        if COUNT_PHYSICAL:
            tl.atomic_add(Counts + phys, tl.zeros([BLOCK_T, BLOCK_E], tl.int32) + 1, mask=counted)
        else:
            tl.atomic_add(Counts + ex, tl.zeros([BLOCK_T, BLOCK_E], tl.int32) + 1, mask=counted)
    if NUM_SHARED > 0:
        s_offs = tl.arange(0, BLOCK_S)
        s_mask = row_ok[:, None] & (s_offs < NUM_SHARED)[None, :]
        s_out = rows[:, None].to(tl.int64) * KS + TOP_K + s_offs[None, :]
        if SHARED_GATED:
            gate = tl.load(Logits + rows.to(tl.int64) * stride_l + E, mask=row_ok, other=0.0).to(tl.float32)
            sw = tl.zeros([BLOCK_T, BLOCK_S], tl.float32) + (1.0 / (1.0 + tl.exp(-gate)))[:, None]
        else:
            sw = tl.zeros([BLOCK_T, BLOCK_S], tl.float32) + 1.0
        tl.store(Ids + s_out, tl.zeros([BLOCK_T, BLOCK_S], tl.int32) + E + s_offs[None, :], mask=s_mask)
        tl.store(Weights + s_out, sw, mask=s_mask)
        if SHARED_HERE:
            s_slot = tl.zeros([BLOCK_T, BLOCK_S], tl.int32) + num_local + s_offs[None, :]
        else:
            s_slot = tl.zeros([BLOCK_T, BLOCK_S], tl.int32) + SENTINEL
        tl.store(Slots + s_out, s_slot, mask=s_mask)


def route(spec: RoutingSpec, logits: torch.Tensor, score_bias: torch.Tensor | None = None, dispatcher=None,
          layer: int = 0, positions: torch.Tensor | None = None, shared_here: bool = True,
          counts: torch.Tensor | None = None, count_physical: bool = False, seq_lens: torch.Tensor | None = None,
          block_t: int | None = None):
    """Route ``T`` tokens from their router ``logits [T, E (+1)]`` (float32).

    Returns (ids [T, KS] int32 logical, ascending, shared chunks last; slots [T, KS] int32 local
    slot or the slot count; weights [T, KS] float32). ``dispatcher`` (an ``ExpertDispatcher``, or
    None: slot = expert id) maps to this rank's slots; ``counts`` (int32, a recorder's counter
    row) gets +1 per routed entry of every row with ``seq_lens > 0`` (all rows without seq_lens).
    ``block_t``: tokens per program (default min(16, T); a fixed value lays every token's reductions
    out the same whatever T: --enable-deterministic-inference).
    """
    T = logits.shape[0]
    E, KS, S = spec.num_experts, spec.entries_per_token, spec.num_shared
    dev = logits.device
    ids = torch.empty((T, KS), dtype=torch.int32, device=dev)
    slots = torch.empty((T, KS), dtype=torch.int32, device=dev)
    weights = torch.empty((T, KS), dtype=torch.float32, device=dev)
    if dispatcher is None:
        algo, log2phy, logcnt, seed, local_start, num_local = ALGO_IDENTITY, ids, ids, 0, 0, E
    else:
        algo = _ALGOS[dispatcher.algorithm]
        log2phy, logcnt = dispatcher.log2phy[layer], dispatcher.logcnt[layer]
        seed, local_start, num_local = dispatcher.seed, dispatcher.local_start, dispatcher.num_local
    if algo == ALGO_RANDOM and positions is None:
        positions = torch.arange(T, device=dev)
    count_in_kernel = counts is not None and algo != ALGO_NONE
    if T:
        block_t = block_t or min(16, triton.next_power_of_2(T))
        _route_kernel[(triton.cdiv(T, block_t),)](
            logits, score_bias if score_bias is not None else logits, log2phy, logcnt,
            positions if positions is not None else ids, seq_lens if seq_lens is not None else ids,
            counts if count_in_kernel else ids, ids, slots, weights,
            T, logits.stride(0), log2phy.stride(0) if log2phy.dim() == 2 else 0, seed, layer,
            float(spec.routed_scaling_factor), local_start, num_local,
            E=E, TOP_K=spec.top_k, NUM_SHARED=S, SHARED_GATED=spec.shared_gated, SHARED_HERE=shared_here,
            SOFTMAX=spec.scoring_func == "softmax", HAS_BIAS=score_bias is not None, RENORM=spec.norm_topk_prob,
            N_GROUP=spec.n_group, TOPK_GROUP=spec.topk_group, ALGO=algo, COUNT=count_in_kernel,
            COUNT_PHYSICAL=count_physical, HAS_SEQLENS=seq_lens is not None,
            BLOCK_T=block_t, BLOCK_E=triton.next_power_of_2(E), BLOCK_S=triton.next_power_of_2(max(S, 1)),
            num_warps=4 if block_t * E >= 1024 else 1,
        )
    if algo == ALGO_NONE:  # dynamic: each entry's rank among its expert's entries of the whole batch
        k = spec.top_k
        phys = dispatcher.dispatch(layer, ids[:, :k], positions)
        local = phys - local_start
        slots[:, :k] = torch.where((local >= 0) & (local < num_local), local, num_local + S).to(torch.int32)
        if counts is not None:
            counted = phys if count_physical else ids[:, :k].long()
            ones = torch.ones_like(counted, dtype=torch.int32)
            if seq_lens is not None:
                ones = ones * (seq_lens > 0).view(-1, 1).to(torch.int32)
            counts.scatter_add_(0, counted.reshape(-1), ones.reshape(-1))
    return ids, slots, weights
