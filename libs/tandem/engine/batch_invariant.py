"""``--enable-deterministic-inference`` (SGLang's flag): batch-invariant computation.

A request's logits are a function of its own tokens only: the same bits alone or in any batch,
with or without prefix-cache hits and chunked prefill, eager or replayed from a CUDA graph,
aggregated or disaggregated. Every reduction a row goes through has an order fixed by the row
itself, never by the batch (Thinking Machines, "Defeating Nondeterminism in LLM Inference"):

* linear layers, the LM head (tied or not) and the MoE router: ``kernels.invariant_gemm``, whose
  tiles and split-K depend on the weight's shape only; built through the model's linear factory
  (``InvariantLinears``; with FP8 weights the FP8 GEMM with one fixed tile, ``Fp8Gemm``);
* attention: every row (prompt tokens, decode tokens, decodes inside a prefill chunk's batch) is
  computed by one kernel, the extend kernel, over the row's context in key tiles of ``BLOCK_N``
  from position 0, one softmax pass in order: no split of the context that the batch decides
  (the default decode kernel splits by batch size to fill the device). Prefix KV computed by
  another request, or by this request's own decode steps, is bit-identical to recomputing it;
* MoE: the routing kernel with a fixed block of tokens (its per-token reductions are laid out
  by the block), the fused experts with one fixed configuration (``moe_config``: the blocked
  schedule, whose rows do not depend on their block's other rows; the combine sums each
  token's entries in order);
* per row already: RMSNorm (+ residual), SiLU-and-mul, rotary + K/V write (one program per
  row or token), the Gumbel sampling kernel, and torch's row-wise softmax / log-softmax / sort /
  cumsum of the sampler and logprobs (one block per row, chosen by the vocabulary size).

CUDA graphs and overlap scheduling stay on. Not covered: tensor parallelism (none here); expert
parallelism's all-reduce adds one rank's row to zeros, exact in any order.
"""
from __future__ import annotations

import torch
from torch import nn

from .ops import TritonOps

# Tokens per program of the MoE routing kernel (its default, min(16, batch), lays the per-token
# softmax sums out differently for batches under 16).
ROUTE_BLOCK_T = 16


def moe_config(interpreter: bool) -> dict:
    """The one fused-experts configuration: the blocked schedule (``tokens``, the default at decode
    sizes, computes a row with other arithmetic than ``blocks``)."""
    if interpreter:  # few, large tiles (the interpreter runs programs one by one)
        return {"mode": "blocks", "BLOCK_M": 16,
                "up": {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1},
                "down": {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1}}
    return {"mode": "blocks", "BLOCK_M": 16,
            "up": {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
            "down": {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}}


class InvariantLinear(nn.Linear):
    """``nn.Linear`` computed by the batch-invariant GEMM."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .kernels.invariant_gemm import matmul

        return matmul(x, self.weight, self.bias)


class InvariantLinears:
    """The model's linear factory in deterministic mode (``model.PlainLinears``' protocol)."""

    def __call__(self, name: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return InvariantLinear(in_features, out_features, bias=bias)

    @staticmethod
    def matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        from .kernels.invariant_gemm import matmul

        return matmul(x, weight)


class DeterministicTritonOps(TritonOps):
    """The triton backend's ops with the batch-invariant choices above."""

    name = "triton"

    def __init__(self, rotary, max_positions: int):
        super().__init__(rotary, max_positions)
        from .kernels import invariant_gemm

        self._gemm = invariant_gemm

    def moe_router(self, x, weight):
        return self._gemm.matmul(x, weight, out_dtype=torch.float32)

    def moe_route(self, *args):
        return self._routing.route(*args, block_t=ROUTE_BLOCK_T)

    def moe_experts(self, x, w13, w2, slots, weights, combine: bool):
        return self._moe.fused_experts(x, w13, w2, slots, weights, combine, moe_config(x.device.type != "cuda"))

    def attention(self, q, k, v, positions, fb, k_cache, v_cache, scale, kv_scale=None):
        if not fb.is_decode:
            return super().attention(q, k, v, positions, fb, k_cache, v_cache, scale, kv_scale)
        self._write_kv(q, k, v, positions, fb, k_cache, v_cache, kv_scale)
        # One row per request (no per-batch tensors for a CUDA graph to hold); padding rows of a graph
        # bucket (context 0) see no key and come out zero.
        out = self._extend.extend_attention(q, k_cache, v_cache, fb.page_table, None, None, fb.seq_lens, 1, scale,
                                            kv_scale=kv_scale)
        return out.view(q.shape[0], -1)
