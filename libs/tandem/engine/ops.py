"""The two attention backends (``--attention-backend``): the ops a forward pass runs.

``torch_native`` is the reference and the CPU path: plain torch ops, attention by
gathering each request's context into dense tensors and calling SDPA with a mask.
``triton`` is the GPU path: fused RMSNorm(+residual), SiLU-and-mul, rotary fused with
the K/V write, and attention that reads K/V through the page table: paged decode
attention (split-K) for decode batches, extend attention (causal over the new tokens,
full over the cached prefix, ragged, mixed with decodes) for everything else.

With an FP8 pool (``--kv-cache-dtype``) both quantize K/V as they write them and dequantize
what they read with the layer's (k_scale, v_scale): torch_native in torch (``kv_quant``), triton
in the kernels' registers.

Both backends compute the same function; ``tests/unit/engine/test_triton_backend.py``
compares them token for token in float32 through the Triton interpreter.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import moe_math
from .kv_quant import is_fp8, read_slots, write_slots

BACKENDS = ("torch_native", "triton")


def _pool_scales(k_cache: torch.Tensor, kv_scale: torch.Tensor | None):
    """(k_scale, v_scale) of an FP8 pool (it must have them), (None, None) otherwise."""
    if not is_fp8(k_cache.dtype):
        return None, None
    if kv_scale is None:
        raise ValueError(f"a {k_cache.dtype} KV pool needs its layer's kv_scale (ForwardBatch.kv_scales)")
    return kv_scale[0], kv_scale[1]


def dense_attention(q: torch.Tensor, fb, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
                    kv_scale: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, H, D] (rotated); each request's whole context gathered from the pool (dequantized when
    it is FP8, ``kv_scale`` = (k_scale, v_scale)); returns [T, H*D]."""
    T, H, D = q.shape
    kv_heads = k_cache.shape[2]
    k_scale, v_scale = _pool_scales(k_cache, kv_scale)
    B, _ = fb.kv_slots.shape
    keys = read_slots(k_cache, fb.kv_slots, k_scale, q.dtype).transpose(1, 2)  # [B, kvh, Kmax, D]
    vals = read_slots(v_cache, fb.kv_slots, v_scale, q.dtype).transpose(1, 2)
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

    def attention(self, q, k, v, rope, fb, k_cache, v_cache, scale, kv_scale=None):
        cos, sin = rope
        q, k = self.rotary.apply(q, cos, sin), self.rotary.apply(k, cos, sin)
        k_scale, v_scale = _pool_scales(k_cache, kv_scale)
        write_slots(k_cache, fb.slot_mapping, k, k_scale)
        write_slots(v_cache, fb.slot_mapping, v, v_scale)
        return dense_attention(q, fb, k_cache, v_cache, scale, kv_scale)


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

    def _write_kv(self, q, k, v, positions, fb, k_cache, v_cache, kv_scale):
        """Rotary on q (in place) and k, the new K/V written into the pool."""
        _pool_scales(k_cache, kv_scale)  # an FP8 pool must come with its scales
        self._rope.rope_and_write_kv(q, k, v, positions, self.cos, self.sin, fb.slot_mapping, k_cache, v_cache,
                                     kv_scale)

    def attention(self, q, k, v, positions, fb, k_cache, v_cache, scale, kv_scale=None):
        self._write_kv(q, k, v, positions, fb, k_cache, v_cache, kv_scale)
        if fb.is_decode:
            out = self._decode.paged_decode_attention(q, k_cache, v_cache, fb.page_table, fb.seq_lens, scale,
                                                      fb.num_splits, kv_scale=kv_scale)
        else:
            out = self._extend.extend_attention(q, k_cache, v_cache, fb.page_table, fb.q_start, fb.q_lens,
                                                fb.seq_lens, fb.max_q_len, scale, kv_scale=kv_scale)
        return out.view(q.shape[0], -1)


def make_ops(backend: str, rotary, max_positions: int, deterministic: bool = False):
    """``deterministic`` (--enable-deterministic-inference): the triton backend's batch-invariant ops."""
    if deterministic:
        if backend != "triton":
            raise ValueError(f"enable_deterministic_inference needs attention_backend='triton', not {backend!r}")
        from .batch_invariant import DeterministicTritonOps

        return DeterministicTritonOps(rotary, max_positions)
    if backend == "torch_native":
        return TorchNativeOps(rotary)
    if backend == "triton":
        return TritonOps(rotary, max_positions)
    raise ValueError(f"attention_backend={backend!r}: allowed are {', '.join(BACKENDS)}")
