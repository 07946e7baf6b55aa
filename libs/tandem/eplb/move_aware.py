"""Move-cost-aware rebalancing: start from the current placement, copy few experts.

Applying a plan costs one expert weight copy per physical slot whose logical expert
changes (a "move"). The plain algorithms ignore the current placement, so almost every
slot changes even when the load barely moved. This module finds, per layer, the best
placement it can reach within a move budget:

1. **Aligned target.** The balanced target of ``rebalance_experts`` is invariant under
   renumbering GPUs (inside a node and whole nodes) and reordering slots inside a GPU.
   We pick the renumbering that keeps the most experts where they already are
   (assignment problems on replica-multiset overlap), which often removes a large share
   of the moves at no cost in balance.
2. **Greedy local search.** From the old placement, repeatedly apply the single change
   with the best balance gain per copy: *reassign* one slot to another expert (changes
   replica counts; the old expert must keep >= 1 replica; 1 copy) or *swap* the experts
   of two slots on different GPUs (2 copies). Stops at the budget, or when the gain per
   copy falls below ``move_cost``.

The result per layer is the candidate (old, aligned target, local search) with the best
balancedness within the budget (``balancedness - move_cost * moves``; fewer moves on
ties). Local search optimises over all GPUs: it does not keep groups node-local.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .algorithms import (
    balancedness_per_layer,
    choose_algorithm,
    log2phy_from_phy2log,
    logcnt_from_phy2log,
    rebalance_experts,
)

__all__ = ["MoveAwareResult", "rebalance_move_aware", "align_to_old"]


@dataclass
class MoveAwareResult:
    phy2log: torch.Tensor  # [layers, physical]
    log2phy: torch.Tensor  # [layers, logical, max_replicas], -1 padded
    logcnt: torch.Tensor  # [layers, logical]
    moves: torch.Tensor  # [layers] slot copies needed from the old placement
    balancedness_before: float
    balancedness_after: float
    target_balancedness: float  # what the unconstrained algorithm reaches
    target_moves: int  # its moves after alignment (sum over layers)


# ----------------------------------------------------------------------------- alignment
def _assignment(score: np.ndarray) -> np.ndarray:
    """Row -> column maximising total score (square matrix)."""
    try:
        from scipy.optimize import linear_sum_assignment

        rows, cols = linear_sum_assignment(-score)
        out = np.empty(len(rows), dtype=np.int64)
        out[rows] = cols
        return out
    except ImportError:  # greedy fallback: best remaining pair first
        n = score.shape[0]
        out = -np.ones(n, dtype=np.int64)
        used_r, used_c = set(), set()
        for flat in np.argsort(-score, axis=None, kind="stable"):
            r, c = divmod(int(flat), n)
            if r not in used_r and c not in used_c:
                out[r] = c
                used_r.add(r)
                used_c.add(c)
        return out


def _rank_counts(p2l: np.ndarray, num_gpus: int, num_logical: int) -> np.ndarray:
    """[gpus, logical] replica counts of one layer."""
    per = len(p2l) // num_gpus
    cnt = np.zeros((num_gpus, num_logical), dtype=np.int64)
    np.add.at(cnt, (np.arange(len(p2l)) // per, p2l), 1)
    return cnt


def align_to_old(old: np.ndarray, target: np.ndarray, num_gpus: int, num_nodes: int, num_logical: int) -> np.ndarray:
    """Renumber the target's GPUs (within nodes, and whole nodes) and reorder slots within
    each GPU to keep as many slots unchanged as possible. Balance is unchanged."""
    per = len(old) // num_gpus
    gpn = num_gpus // num_nodes
    c_old = _rank_counts(old, num_gpus, num_logical)
    c_new = _rank_counts(target, num_gpus, num_logical)
    overlap = np.minimum(c_old[:, None, :], c_new[None, :, :]).sum(-1)  # [old gpu, new gpu]
    # Best GPU matching for every (old node, new node) pair, then the best node matching.
    node_score = np.zeros((num_nodes, num_nodes))
    node_match = {}
    for a in range(num_nodes):
        for b in range(num_nodes):
            sub = overlap[a * gpn:(a + 1) * gpn, b * gpn:(b + 1) * gpn]
            m = _assignment(sub)
            node_match[a, b] = m
            node_score[a, b] = sub[np.arange(gpn), m].sum()
    nodes = _assignment(node_score)
    out = np.empty_like(old)
    for a in range(num_nodes):
        b = nodes[a]
        for i, j in enumerate(node_match[a, b]):
            g_old, g_new = a * gpn + i, b * gpn + j
            need = list(target[g_new * per:(g_new + 1) * per])
            slots = old[g_old * per:(g_old + 1) * per]
            remaining = {}
            for e in need:
                remaining[e] = remaining.get(e, 0) + 1
            row = [-1] * per
            for k, e in enumerate(slots):  # keep what is already there
                if remaining.get(e, 0) > 0:
                    row[k] = e
                    remaining[e] -= 1
            fill = [e for e, n in sorted(remaining.items()) for _ in range(n)]
            for k in range(per):
                if row[k] < 0:
                    row[k] = fill.pop(0)
            out[g_old * per:(g_old + 1) * per] = row
    return out


# ----------------------------------------------------------------------------- local search
def _objective(loads: np.ndarray) -> np.ndarray:
    """Max GPU load, with a small spread term so ties at the max still make progress."""
    return loads.max(-1) + 0.01 * loads.std(-1)


def _local_search(w: np.ndarray, old: np.ndarray, num_gpus: int, budget: int, move_cost: float) -> np.ndarray:
    """Greedy reassign/swap moves from ``old`` within ``budget`` copies (one layer)."""
    x = old.copy()
    P, E, G = len(x), len(w), num_gpus
    per = P // G
    gpu = np.arange(P) // per
    mean = w.sum() / G
    if mean <= 0:
        return x
    used = 0
    while used < budget:
        cnt = np.bincount(x, minlength=E).astype(np.float64)
        n = np.zeros((E, G))
        np.add.at(n, (x, gpu), 1)
        share = np.where(cnt > 0, w / np.maximum(cnt, 1), 0.0)  # load of one replica
        loads = (n * share[:, None]).sum(0)  # [G]
        f0 = _objective(loads)
        best_gain, best = 0.0, None

        # Reassign: one (gpu g0, expert a) representative slot -> expert b.
        reps = {}
        for s in range(P):
            reps.setdefault((gpu[s], x[s]), s)
        pairs = np.array([(g, a) for (g, a) in reps if cnt[a] >= 2], dtype=np.int64).reshape(-1, 2)
        if len(pairs):
            g0, a = pairs[:, 0], pairs[:, 1]
            eye = np.eye(G)
            # change of every GPU's load from expert a losing the replica on g0
            da = -n[a] * share[a, None] + (n[a] - eye[g0]) * (w[a] / (cnt[a] - 1))[:, None]  # [K, G]
            # change from expert b gaining a replica on g0, for every b: [K, E, G]
            gain_b = (w / (cnt + 1))[None, :, None]
            db = -n[None, :, :] * share[None, :, None] + (n[None, :, :] + eye[g0][:, None, :]) * gain_b
            new = loads[None, None, :] + da[:, None, :] + db
            f = _objective(new)  # [K, E]
            f[np.arange(len(a)), a] = np.inf  # b == a is not a move
            k, b = np.unravel_index(np.argmin(f), f.shape)
            gain = (f0 - f[k, b]) / mean
            if gain > best_gain:
                best_gain, best = gain, ("reassign", reps[(g0[k], a[k])], int(b))

        # Swap the experts of two slots on different GPUs (2 copies).
        if used + 2 <= budget:
            u = share[x]
            keys = list(reps.items())
            sg = np.array([k[0] for k, _ in keys])
            se = np.array([k[1] for k, _ in keys])
            su = u[[s for _, s in keys]]
            d = su[None, :] - su[:, None]  # slot i takes j's expert: gpu(i) += u_j - u_i
            li = loads[sg][:, None] + d
            lj = loads[sg][None, :] - d
            # max over the other GPUs: top-3 loads cover excluding two GPUs
            order = np.argsort(-loads, kind="stable")[:3]
            rest = np.full(li.shape, -np.inf)
            for g in order[::-1]:
                ok = (sg[:, None] != g) & (sg[None, :] != g)
                rest = np.where(ok, loads[g], rest)
            peak = np.maximum(np.maximum(li, lj), rest)
            # spread term: only two GPUs change
            sq = (loads**2).sum() - loads[sg][:, None] ** 2 - loads[sg][None, :] ** 2 + li**2 + lj**2
            std = np.sqrt(np.maximum(sq / G - (loads.sum() / G) ** 2, 0.0))
            f = peak + 0.01 * std
            invalid = (sg[:, None] == sg[None, :]) | (se[:, None] == se[None, :])
            f[invalid] = np.inf
            i, j = np.unravel_index(np.argmin(f), f.shape)
            gain = (f0 - f[i, j]) / mean / 2
            if gain > best_gain:
                best_gain, best = gain, ("swap", keys[i][1], keys[j][1])

        if best is None or best_gain <= max(move_cost, 1e-12):
            break
        if best[0] == "reassign":
            x[best[1]] = best[2]
            used += 1
        else:
            s, t = best[1], best[2]
            x[s], x[t] = x[t], x[s]
            used += 2
    return x


# ----------------------------------------------------------------------------- entry point
def rebalance_move_aware(
    weight: torch.Tensor,
    old_phy2log: torch.Tensor,
    num_gpus: int,
    max_moves_per_layer: int | None = None,
    num_groups: int = 1,
    num_nodes: int = 1,
    move_cost: float = 0.0,
) -> MoveAwareResult:
    """New placement close to ``old_phy2log`` (``[layers, physical]``).

    ``max_moves_per_layer``: at most this many slot copies per layer (None = no limit:
    then the aligned unconstrained target is used whenever it is the most balanced).
    ``move_cost``: balancedness a copy must buy to be worth it (0 = any gain).
    """
    weight = torch.as_tensor(weight).double().cpu()
    old_phy2log = torch.as_tensor(old_phy2log).long().cpu()
    layers, num_logical = weight.shape
    if old_phy2log.dim() != 2 or old_phy2log.size(0) != layers:
        raise ValueError(f"old_phy2log shape {tuple(old_phy2log.shape)} does not match weight {tuple(weight.shape)}")
    num_physical = old_phy2log.size(1)
    if old_phy2log.min() < 0 or old_phy2log.max() >= num_logical:
        raise ValueError(f"old_phy2log has expert ids outside [0, {num_logical})")
    if (logcnt_from_phy2log(old_phy2log, num_logical) == 0).any():
        raise ValueError("old_phy2log leaves a logical expert without a replica")
    if max_moves_per_layer is not None and max_moves_per_layer < 0:
        raise ValueError("max_moves_per_layer must be >= 0")
    if choose_algorithm(num_groups, num_nodes) == "global":
        num_nodes_align = 1
    else:
        num_nodes_align = num_nodes
    target, _, _ = rebalance_experts(weight, num_physical, num_groups, num_nodes, num_gpus)

    w_np, old_np, tgt_np = weight.numpy(), old_phy2log.numpy(), target.numpy()
    budget_all = num_physical if max_moves_per_layer is None else max_moves_per_layer
    out = np.empty_like(old_np)
    target_moves = 0
    for layer in range(layers):
        old = old_np[layer]
        aligned = align_to_old(old, tgt_np[layer], num_gpus, num_nodes_align, num_logical)
        target_moves += int((aligned != old).sum())
        cands = [old, _local_search(w_np[layer], old, num_gpus, budget_all, move_cost)]
        cands.append(aligned)
        best, best_key = old, None
        for cand in cands:
            moves = int((cand != old).sum())
            if moves > budget_all:
                continue
            bal = float(balancedness_per_layer(weight[layer:layer + 1], torch.from_numpy(cand[None]), num_gpus))
            key = (bal - move_cost * moves, -moves)
            if best_key is None or key > best_key:
                best, best_key = cand, key
        out[layer] = best
    phy2log = torch.from_numpy(out)
    before = balancedness_per_layer(weight, old_phy2log, num_gpus).mean().item()
    after = balancedness_per_layer(weight, phy2log, num_gpus).mean().item()
    tgt_bal = balancedness_per_layer(weight, target, num_gpus).mean().item()
    return MoveAwareResult(
        phy2log=phy2log,
        log2phy=log2phy_from_phy2log(phy2log, num_logical),
        logcnt=logcnt_from_phy2log(phy2log, num_logical),
        moves=(phy2log != old_phy2log).sum(1),
        balancedness_before=before,
        balancedness_after=after,
        target_balancedness=tgt_bal,
        target_moves=target_moves,
    )


def refine_placement(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Improve a placement (e.g. the greedy global one) by the same local search, with no
    move limit, keeping it when it is more balanced. DeepSeek's greedy packing is far from
    optimal when there are few experts per GPU; the search never makes a layer worse.
    Node locality is not kept: use it for single-node (global) placements."""
    res = rebalance_move_aware(weight, phy2log, num_gpus, None, 1, 1)
    return res.phy2log
