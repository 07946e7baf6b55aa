"""The two attention backends (``--attention-backend``): the ops a forward pass runs.

``torch_native`` is the reference and the CPU path: plain torch ops, attention by
gathering each request's context into dense tensors and calling SDPA with a mask.
``triton`` is the GPU path: fused RMSNorm(+residual), SiLU-and-mul, rotary fused with
the K/V write, and attention that reads K/V through the page table: paged decode
attention (split-K) for decode batches, extend attention (causal over the new tokens,
full over the cached prefix, ragged, mixed with decodes) for everything else.

Both backends compute the same function; ``tests/unit/engine/test_triton_backend.py``
compares them token for token in float32 through the Triton interpreter.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import moe_math

BACKENDS = ("torch_native", "triton")


def dense_attention(q: torch.Tensor, fb, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
    """q [T, H, D] (rotated); each request's whole context gathered from the pool; returns [T, H*D]."""
    T, H, D = q.shape
    kv_heads = k_cache.shape[2]
    k_flat = k_cache.view(-1, kv_heads, D)
    v_flat = v_cache.view(-1, kv_heads, D)
    B, _ = fb.kv_slots.shape
    keys = k_flat[fb.kv_slots].to(q.dtype).transpose(1, 2)  # [B, kvh, Kmax, D]
    vals = v_flat[fb.kv_slots].to(q.dtype).transpose(1, 2)
    Qmax = fb.attn_mask.shape[2]
    if fb.is_decode:
        qp = q.view(B, 1, H, D)
    else:
        qp = q.new_zeros(B, Qmax, H, D)
        qp[fb.q_batch_idx, fb.q_local_idx] = q
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2), keys, vals, attn_mask=fb.attn_mask, scale=scale, enable_gqa=H != kv_heads,
    ).transpose(1, 2)  # [B, Qmax, H, D]
    if fb.is_decode:
        return out.reshape(T, -1)
    return out[fb.q_batch_idx, fb.q_local_idx].reshape(T, -1)


class TorchNativeOps:
    name = "torch_native"
    graph_safe = False  # decode shapes depend on the longest context

    def __init__(self, rotary):
        self.rotary = rotary

    def rope_inputs(self, positions: torch.Tensor, dtype: torch.dtype):
        return self.rotary.cos_sin(positions, dtype)

    def rms_norm(self, x, weight, eps, residual=None):
        if residual is not None:
            residual = x + residual
            x = residual
        dtype = x.dtype
        xf = x.float()
        out = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
        return out if residual is None else (out, residual)

    def silu_and_mul(self, x):
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    def moe_router(self, x, weight):
        return F.linear(x.float(), weight)

    def moe_route(self, *args):
        return moe_math.route_tokens(*args)

    def moe_experts(self, x, w13, w2, slots, weights, combine: bool):
        rows = moe_math.expert_rows(x, w13, w2, slots, weights)
        return moe_math.combine(rows) if combine else rows

    def moe_combine(self, rows):
        return moe_math.combine(rows)

    def attention(self, q, k, v, rope, fb, k_cache, v_cache, scale):
        cos, sin = rope
        q, k = self.rotary.apply(q, cos, sin), self.rotary.apply(k, cos, sin)
        kv_heads, D = k.shape[1], k.shape[2]
        k_cache.view(-1, kv_heads, D)[fb.slot_mapping] = k.to(k_cache.dtype)
        v_cache.view(-1, kv_heads, D)[fb.slot_mapping] = v.to(v_cache.dtype)
        return dense_attention(q, fb, k_cache, v_cache, scale)


class TritonOps:
    name = "triton"
    graph_safe = True

    def __init__(self, rotary, max_positions: int):
        from .kernels import activation, decode_attention, extend_attention, fused_moe, moe_routing, norm, rope_kv

        self._act, self._norm, self._rope, self._moe, self._routing = activation, norm, rope_kv, fused_moe, moe_routing
        self._decode, self._extend = decode_attention, extend_attention
        self.cos, self.sin = rope_kv.rope_cos_sin_cache(rotary.inv_freq, max_positions)

    def rope_inputs(self, positions: torch.Tensor, dtype: torch.dtype):
        return positions

    def rms_norm(self, x, weight, eps, residual=None):
        shape = x.shape
        if x.dim() != 2:
            x = x.reshape(-1, shape[-1])
        out = self._norm.rms_norm(x, weight, eps, residual)
        if residual is None:
            return out.view(shape)
        return out

    def silu_and_mul(self, x):
        return self._act.silu_and_mul(x)

    def moe_router(self, x, weight):
        """Router logits (float32) in one kernel at decode sizes."""
        return self._routing.router_logits(x, weight)

    def moe_route(self, *args):
        """Fused routing (scores, groups, top-k, shared entries, dispatch, recorder) in one kernel."""
        return self._routing.route(*args)

    def moe_experts(self, x, w13, w2, slots, weights, combine: bool):
        """Fused MoE experts over this rank's slots (combine: the weighted sum too), no host sync."""
        return self._moe.fused_experts(x, w13, w2, slots, weights, combine)

    def moe_combine(self, rows):
        return self._moe.combine_rows(rows)

    def attention(self, q, k, v, positions, fb, k_cache, v_cache, scale):
        self._rope.rope_and_write_kv(q, k, v, positions, self.cos, self.sin, fb.slot_mapping, k_cache, v_cache)
        if fb.is_decode:
            out = self._decode.paged_decode_attention(q, k_cache, v_cache, fb.page_table, fb.seq_lens, scale,
                                                      fb.num_splits)
        else:
            out = self._extend.extend_attention(q, k_cache, v_cache, fb.page_table, fb.q_start, fb.q_lens,
                                                fb.seq_lens, fb.max_q_len, scale)
        return out.view(q.shape[0], -1)


def make_ops(backend: str, rotary, max_positions: int):
    if backend == "torch_native":
        return TorchNativeOps(rotary)
    if backend == "triton":
        return TritonOps(rotary, max_positions)
    raise ValueError(f"attention_backend={backend!r}: allowed are {', '.join(BACKENDS)}")
