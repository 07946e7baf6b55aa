"""Tensor parallelism (TP): which slice of every weight and KV head a rank holds (Megatron style).

Layout over ``tp_size`` ranks (one process each, see ``tandem.engine.parallel``):

* attention: q heads split evenly (``num_heads % tp == 0``); KV heads split evenly when
  ``num_kv_heads >= tp`` (``num_kv_heads % tp == 0``), else each rank holds the one KV head its
  q heads read and KV heads are replicated over ``tp / num_kv_heads`` ranks (as SGLang). The
  merged QKV projection is column-parallel (each rank's q, k, v rows), ``o_proj`` row-parallel
  and followed by an all-reduce;
* MLP: ``gate_up_proj`` column-parallel (each rank's gate rows and up rows), ``down_proj``
  row-parallel + all-reduce; MoE experts likewise along their intermediate size (``ep_size=1``),
  or whole experts placed by EP (``ep_size == tp_size``); a shared expert is always TP-sharded;
* embedding and LM head vocab-parallel: each rank holds ``vocab / tp`` rows; the embedding's
  lookup is masked to the rank's rows and all-reduced; the logits are all-gathered.

Every rank's KV pool holds its ``local_kv_heads`` heads; page tables are identical on every rank.
Sharding happens in the loader on the checkpoint's tensors (``shard_state``), before q/k/v and
gate/up are merged, so every module is built with its local shape.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["TensorParallel", "HeadSplit", "head_split", "check_tp_shape", "shard_state", "shard_experts"]


@dataclass
class TensorParallel:
    """This rank's place in the TP group and its collectives (size 1: no-ops, nothing sharded)."""

    rank: int = 0
    size: int = 1
    group: object = None  # the device group (nccl or gloo); None with size 1
    expert_sharded: bool = True  # MoE experts split along their intermediate size (False: whole, placed by EP)
    # Run the collectives even with size 1 (over ``group``): the GPU check that a world-size-1 NCCL
    # all-reduce captured inside a decode CUDA graph replays correctly (benchmarks/gpu_engine_check.py).
    force_collectives: bool = False
    # The custom all-reduce (``tandem.engine.custom_all_reduce``: CUDA, one node) for the small
    # messages it takes; None (or a message it does not take): ``group``'s all-reduce.
    custom: object = None

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the TP ranks, in place; returns ``t``."""
        if self.size > 1 or self.force_collectives:
            if self.custom is not None and self.custom.can_reduce(t):
                return self.custom.all_reduce(t)
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``t`` along the last dimension (rank order)."""
        if self.size == 1 and not self.force_collectives:
            return t
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)  # the list form: gloo has no all_gather_into_tensor
        return torch.cat(parts, dim=-1)


ONE_RANK = TensorParallel()


@dataclass(frozen=True)
class HeadSplit:
    """The heads a rank holds: q heads ``[q_start, q_start + q_heads)``, KV heads
    ``[kv_start, kv_start + kv_heads)`` of the model's."""

    q_heads: int
    q_start: int
    kv_heads: int
    kv_start: int
    kv_replicas: int  # ranks holding each KV head (1: not replicated)


def head_split(num_heads: int, num_kv_heads: int, tp_size: int, tp_rank: int) -> HeadSplit:
    q = num_heads // tp_size
    if num_kv_heads >= tp_size:
        kv = num_kv_heads // tp_size
        return HeadSplit(q, tp_rank * q, kv, tp_rank * kv, 1)
    replicas = tp_size // num_kv_heads
    return HeadSplit(q, tp_rank * q, 1, tp_rank // replicas, replicas)


def check_tp_shape(mc, tp_size: int, ep_size: int = 1) -> None:
    """ValueError naming the model's field unless ``tp_size`` ranks can shard model ``mc``."""
    if tp_size == 1:
        return
    why = []
    if mc.num_heads % tp_size:
        why.append(f"num_attention_heads={mc.num_heads} is not divisible by it")
    kv = mc.num_kv_heads
    if (kv >= tp_size and kv % tp_size) or (kv < tp_size and tp_size % kv):
        why.append(f"num_key_value_heads={kv} neither divides by it nor divides it")
    if mc.vocab_size % tp_size:
        why.append(f"vocab_size={mc.vocab_size} is not divisible by it")
    if mc.intermediate_size % tp_size:
        why.append(f"intermediate_size={mc.intermediate_size} is not divisible by it")
    if mc.is_moe and ep_size == 1 and mc.moe_intermediate_size % tp_size:
        why.append(f"moe_intermediate_size={mc.moe_intermediate_size} is not divisible by it")
    if mc.shared_expert_intermediate_size % tp_size:
        why.append(f"shared_expert_intermediate_size={mc.shared_expert_intermediate_size} is not divisible by it")
    if why:
        raise ValueError(f"tp_size={tp_size}: " + "; ".join(why))


def _rows(t: torch.Tensor, start: int, n: int) -> torch.Tensor:
    return t.narrow(0, start, n).contiguous()


def _cols(t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    n = t.shape[-1] // size
    return t.narrow(-1, rank * n, n).contiguous()


def shard_state(state: dict, mc, tp: TensorParallel) -> None:
    """Keep this rank's slice of every sharded tensor of ``state`` (in place): checkpoint names
    with ``model.`` stripped and q/k/v, gate/up still separate; MoE ``mlp.w13`` / ``mlp.w2``
    packed (``[slots, 2I, H]`` / ``[slots, H, I]``)."""
    if tp.size == 1:
        return
    r, n = tp.rank, tp.size
    hs = head_split(mc.num_heads, mc.num_kv_heads, n, r)
    d = mc.head_dim
    for key in list(state):
        t = state[key]
        leaf = key.rsplit(".", 2)
        module = leaf[-2] if len(leaf) >= 2 else ""
        if key in ("embed_tokens.weight", "lm_head.weight"):
            state[key] = _rows(t, r * (t.shape[0] // n), t.shape[0] // n)
        elif module == "q_proj":
            state[key] = _rows(t, hs.q_start * d, hs.q_heads * d)
        elif module in ("k_proj", "v_proj"):
            state[key] = _rows(t, hs.kv_start * d, hs.kv_heads * d)
        elif module == "o_proj":
            state[key] = _cols(t, r, n)
        elif module in ("gate_proj", "up_proj"):
            state[key] = _rows(t, r * (t.shape[0] // n), t.shape[0] // n)
        elif module == "down_proj":
            state[key] = _cols(t, r, n)
        elif key.endswith("mlp.w13") and tp.expert_sharded:
            state[key] = shard_experts(t, None, r, n)[0]
        elif key.endswith("mlp.w2") and tp.expert_sharded:
            state[key] = _cols(t, r, n)


def shard_experts(w13: torch.Tensor | None, w2: torch.Tensor | None, rank: int, size: int):
    """This rank's part of stacked experts: ``w13 [..., 2I, H]`` (its gate rows, then its up rows)
    and ``w2 [..., H, I]`` (its columns); either may be None."""
    out13 = out2 = None
    if w13 is not None:
        inter = w13.shape[-2] // 2
        m = inter // size
        gate = w13.narrow(-2, rank * m, m)
        up = w13.narrow(-2, inter + rank * m, m)
        out13 = torch.cat([gate, up], dim=-2).contiguous()
    if w2 is not None:
        out2 = _cols(w2, rank, size)
    return out13, out2
