"""Expert-parallel load balancing (EPLB) algorithms.

Semantics follow DeepSeek's reference ``rebalance_experts`` (same signature, same
result on the published example), written from scratch:

* **hierarchical** (used when ``num_groups % num_nodes == 0``): pack expert groups onto
  nodes so node loads are even (keeps a group on one node, which cuts cross-node
  traffic with group-limited routing), replicate the hottest experts inside each node,
  then pack the node's replicas onto its GPUs.
* **global**: the same with one group and one node: replicate over all experts, pack
  replicas onto all GPUs.

Shapes: ``weight`` is ``[layers, logical_experts]`` (tokens routed to each expert);
``phy2log`` is ``[layers, physical_experts]`` (slot -> logical expert; slot ``s`` lives
on GPU ``s // (physical_experts // num_gpus)``); ``log2phy`` is
``[layers, logical_experts, max_replicas]`` padded with -1, replicas listed by
ascending slot id; ``logcnt`` is ``[layers, logical_experts]``.

Ties are broken deterministically (stable sort, lowest index first), so results do not
depend on the torch build.
"""
from __future__ import annotations

import torch

__all__ = [
    "balanced_packing",
    "replicate_experts",
    "rebalance_experts",
    "rebalance_hierarchical",
    "rebalance_global",
    "choose_algorithm",
    "log2phy_from_phy2log",
    "logcnt_from_phy2log",
    "gpu_loads",
    "balancedness_per_layer",
    "balancedness",
    "count_moves",
]


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the ``n`` items of each row into ``num_packs`` packs of exactly ``n / num_packs``
    items, keeping pack weights even (greedy: heaviest item first, into the lightest pack
    that still has room).

    Returns ``(pack_index, rank_in_pack)``, both ``[rows, n]`` int64.
    """
    rows, n = weight.shape
    if num_packs <= 0 or n % num_packs:
        raise ValueError(f"cannot split {n} items into {num_packs} equal packs")
    per_pack = n // num_packs
    if per_pack == 1:
        return (
            torch.arange(n, dtype=torch.int64).expand(rows, n).clone(),
            torch.zeros(rows, n, dtype=torch.int64),
        )
    order = torch.sort(weight.double(), dim=-1, descending=True, stable=True).indices.tolist()
    values = weight.double().tolist()
    pack_index = torch.empty(rows, n, dtype=torch.int64)
    rank_in_pack = torch.empty(rows, n, dtype=torch.int64)
    for r in range(rows):
        load = [0.0] * num_packs
        size = [0] * num_packs
        pi, rk = [0] * n, [0] * n
        for item in order[r]:
            best = -1
            for p in range(num_packs):  # lightest pack with room; lowest index on ties
                if size[p] < per_pack and (best < 0 or load[p] < load[best]):
                    best = p
            pi[item], rk[item] = best, size[best]
            load[best] += values[r][item]
            size[best] += 1
        pack_index[r] = torch.tensor(pi)
        rank_in_pack[r] = torch.tensor(rk)
    return pack_index, rank_in_pack


def replicate_experts(weight: torch.Tensor, num_physical: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give each of the ``n`` experts of a row one slot, then hand every extra slot to the
    expert with the highest per-replica load (minimises the heaviest replica).

    Returns ``(phy2log [rows, num_physical], replica_idx [rows, num_physical],
    logcnt [rows, n])``; slot ``i < n`` holds expert ``i``.
    """
    rows, n = weight.shape
    if num_physical < n:
        raise ValueError(f"num_physical={num_physical} is smaller than the {n} logical experts")
    w = weight.double()
    phy2log = torch.arange(num_physical, dtype=torch.int64).repeat(rows, 1)
    replica_idx = torch.zeros(rows, num_physical, dtype=torch.int64)
    logcnt = torch.ones(rows, n, dtype=torch.int64)
    row_ids = torch.arange(rows)
    for slot in range(n, num_physical):
        hottest = torch.argmax(w / logcnt, dim=-1)  # first index on ties (documented)
        phy2log[:, slot] = hottest
        replica_idx[:, slot] = logcnt[row_ids, hottest]
        logcnt[row_ids, hottest] += 1
    return phy2log, replica_idx, logcnt


def _invert(perm: torch.Tensor) -> torch.Tensor:
    """Row-wise inverse of a permutation."""
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(perm.size(1), dtype=perm.dtype).expand_as(perm).contiguous())
    return inv


def _check_shapes(weight: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be [layers, logical_experts], got shape {tuple(weight.shape)}")
    num_logical = weight.size(1)
    if num_gpus <= 0 or num_nodes <= 0 or num_groups <= 0:
        raise ValueError("num_groups, num_nodes and num_gpus must be positive")
    if num_physical < num_logical:
        raise ValueError(f"num_replicas={num_physical} < {num_logical} logical experts")
    if num_physical % num_gpus:
        raise ValueError(f"num_replicas={num_physical} is not a multiple of num_gpus={num_gpus}")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus={num_gpus} is not a multiple of num_nodes={num_nodes}")
    if num_logical % num_groups:
        raise ValueError(f"{num_logical} logical experts do not split into num_groups={num_groups}")
    if (weight < 0).any():
        raise ValueError("weight has negative loads")


def rebalance_hierarchical(
    weight: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hierarchical policy. Returns ``(phy2log, replica_idx, logcnt)``."""
    _check_shapes(weight, num_physical, num_groups, num_nodes, num_gpus)
    if num_groups % num_nodes:
        raise ValueError(f"hierarchical needs num_groups={num_groups} divisible by num_nodes={num_nodes}")
    layers, num_logical = weight.shape
    w = weight.double().cpu()
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    experts_per_node = num_logical // num_nodes
    slots_per_node = num_physical // num_nodes
    gpus_per_node = num_gpus // num_nodes
    slots_per_gpu = num_physical // num_gpus

    # 1. groups -> nodes. Renumber experts "node-major": node n owns ids
    #    [n * experts_per_node, (n + 1) * experts_per_node).
    group_load = w.view(layers, num_groups, group_size).sum(-1)
    node_of_group, pos_of_group = balanced_packing(group_load, num_nodes)
    first_local = (node_of_group * groups_per_node + pos_of_group) * group_size  # [layers, groups]
    log2local = (first_local.unsqueeze(-1) + torch.arange(group_size)).flatten(1)  # [layers, logical]
    local2log = _invert(log2local)

    # 2. replicate inside each node (one row per (layer, node)).
    node_load = w.gather(1, local2log).view(layers * num_nodes, experts_per_node)
    phy2local, replica_idx, local_cnt = replicate_experts(node_load, slots_per_node)

    # 3. pack each node's replicas onto its GPUs.
    replica_load = (node_load / local_cnt).gather(1, phy2local)
    gpu_of_phy, pos_on_gpu = balanced_packing(replica_load, gpus_per_node)
    slot_of_phy = gpu_of_phy * slots_per_gpu + pos_on_gpu  # position inside the node
    phy_of_slot = _invert(slot_of_phy)

    slot2local = phy2local.gather(1, phy_of_slot).view(layers, num_nodes, slots_per_node)
    slot2local = slot2local + (torch.arange(num_nodes) * experts_per_node).view(1, -1, 1)
    phy2log = local2log.gather(1, slot2local.flatten(1))
    replica = replica_idx.gather(1, phy_of_slot).view(layers, num_physical)
    logcnt = local_cnt.view(layers, num_logical).gather(1, log2local)
    return phy2log, replica, logcnt


def rebalance_global(weight: torch.Tensor, num_physical: int, num_gpus: int):
    """Global policy (one group, one node). Returns ``(phy2log, replica_idx, logcnt)``."""
    return rebalance_hierarchical(weight, num_physical, 1, 1, num_gpus)


def choose_algorithm(num_groups: int, num_nodes: int) -> str:
    """SGLang's ``auto``: hierarchical when groups divide evenly over nodes, else global."""
    return "hierarchical" if num_groups % num_nodes == 0 else "global"


def logcnt_from_phy2log(phy2log: torch.Tensor, num_logical: int) -> torch.Tensor:
    """Replica count per logical expert, ``[layers, num_logical]``."""
    cnt = torch.zeros(phy2log.size(0), num_logical, dtype=torch.int64)
    cnt.scatter_add_(1, phy2log.long(), torch.ones_like(phy2log, dtype=torch.int64))
    return cnt


def log2phy_from_phy2log(phy2log: torch.Tensor, num_logical: int, max_replicas: int | None = None) -> torch.Tensor:
    """``[layers, num_logical, max_replicas]`` slot ids (ascending), padded with -1."""
    layers, num_physical = phy2log.shape
    cnt = logcnt_from_phy2log(phy2log, num_logical)
    width = int(cnt.max().item()) if max_replicas is None else max_replicas
    out = torch.full((layers, num_logical, max(width, 1)), -1, dtype=torch.int64)
    # Stable sort of slots by expert id gives each expert's slots in ascending order.
    order = torch.sort(phy2log.long(), dim=1, stable=True)
    starts = torch.cumsum(cnt, dim=1) - cnt  # first position of each expert in the sorted order
    pos = torch.arange(num_physical).expand(layers, -1)
    rank = pos - starts.gather(1, order.values)
    out[torch.arange(layers).unsqueeze(1).expand(-1, num_physical), order.values, rank] = order.indices
    return out


def rebalance_experts(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeepSeek-compatible entry point: ``(phy2log, log2phy, logcnt)``.

    ``num_replicas`` is the number of physical slots per layer (logical + redundant) and
    must be a multiple of ``num_gpus``. Hierarchical when ``num_groups % num_nodes == 0``,
    otherwise global.
    """
    weight = torch.as_tensor(weight)
    if choose_algorithm(num_groups, num_nodes) == "hierarchical":
        phy2log, _, logcnt = rebalance_hierarchical(weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        _check_shapes(weight, num_replicas, num_groups, num_nodes, num_gpus)
        phy2log, _, logcnt = rebalance_global(weight, num_replicas, num_gpus)
    return phy2log, log2phy_from_phy2log(phy2log, weight.size(1)), logcnt


def gpu_loads(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Load per GPU ``[layers, num_gpus]``: each replica carries logical load / replica count."""
    weight = torch.as_tensor(weight).double()
    layers, num_logical = weight.shape
    cnt = logcnt_from_phy2log(phy2log, num_logical).clamp(min=1).double()
    per_slot = (weight / cnt).gather(1, phy2log.long())
    return per_slot.view(layers, num_gpus, -1).sum(-1)


def balancedness_per_layer(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """Mean GPU load / max GPU load per layer (1.0 = perfect; idle layers count as 1.0)."""
    loads = gpu_loads(weight, phy2log, num_gpus)
    peak = loads.max(dim=1).values
    out = torch.ones_like(peak)
    busy = peak > 0
    out[busy] = loads.mean(dim=1)[busy] / peak[busy]
    return out


def balancedness(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> float:
    """Balancedness averaged over layers."""
    return float(balancedness_per_layer(weight, phy2log, num_gpus).mean().item())


def count_moves(old_phy2log: torch.Tensor, new_phy2log: torch.Tensor) -> torch.Tensor:
    """Slots whose logical expert changes (= expert weight copies), per layer."""
    if old_phy2log.shape != new_phy2log.shape:
        raise ValueError(f"placement shapes differ: {tuple(old_phy2log.shape)} vs {tuple(new_phy2log.shape)}")
    return (old_phy2log != new_phy2log).sum(dim=1)
