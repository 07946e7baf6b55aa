"""Decoder-only transformer (Llama / Qwen2 / Qwen3 / Mistral / Qwen-MoE / GLM-4-MoE)
running over a paged KV pool.

A forward pass takes a *flat* list of new tokens from several requests
(``ForwardBatch``). Every token-wise op (projections, norms, MLP, MoE) runs on
that flat ``[T, hidden]`` tensor; only attention looks at requests, through the
backend's ops (``tandem.engine.ops``): the paged Triton kernels, or the torch
reference that gathers each request's pages into dense tensors with a mask.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .model_config import ModelConfig


@dataclass
class ForwardBatch:
    """Tensors describing one forward pass (built by the model runner).

    The torch_native backend reads the dense view: ``kv_slots`` and ``attn_mask``. The triton
    backend reads the paged view: ``page_table`` and ``seq_lens``, plus ``num_splits`` for
    decode batches and ``q_start`` / ``q_lens`` for prefill and mixed (extend) batches.
    """

    input_ids: torch.Tensor  # [T] new tokens of all requests, request-major
    positions: torch.Tensor  # [T] absolute position of each new token
    slot_mapping: torch.Tensor  # [T] flat KV slot (page * page_size + offset) each new token writes (-1: none)
    q_batch_idx: torch.Tensor | None = None  # [T] which request (0..B-1) each token belongs to
    q_local_idx: torch.Tensor | None = None  # [T] index of the token among its request's new tokens
    kv_slots: torch.Tensor | None = None  # [B, Kmax] flat KV slots of each request's whole context (padded)
    attn_mask: torch.Tensor | None = None  # [B, 1, Qmax, Kmax] bool, True = attend
    logits_indices: torch.Tensor | None = None  # [S] rows of T whose logits are wanted (None: every row)
    is_decode: bool = False  # every request has exactly one new token (T == B)
    page_table: torch.Tensor | None = None  # [B, >= pages] int32 page indices of each request (paged view)
    seq_lens: torch.Tensor | None = None  # [B] context length including the new tokens (0 = padding row)
    num_splits: int = 1  # split-K ranges of the paged decode attention
    q_start: torch.Tensor | None = None  # [B] row of T where each request's new tokens start (paged extend)
    q_lens: torch.Tensor | None = None  # [B] new tokens of each request (paged extend)
    max_q_len: int = 1  # the longest q_lens (host int: sizes the extend kernel's grid)
    layer_ready: Callable[[int], None] | None = None  # called before layer i runs (HiCache: its pages loaded)
    kv_scales: torch.Tensor | None = None  # [layers, 2] (k_scale, v_scale) of the pool (read when it is FP8)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Rotary(nn.Module):
    """Rotary embedding (rotate-half convention), optionally on a prefix of head_dim."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.rot_dim = int(cfg.head_dim * cfg.partial_rotary_factor)
        dim = self.rot_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        p = cfg.rope_params
        if cfg.rope_type == "linear":
            inv_freq = inv_freq / float(p["factor"])
        elif cfg.rope_type == "llama3":
            factor, lo, hi = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
            old_ctx = float(p["original_max_position_embeddings"])
            low_wl, high_wl = old_ctx / lo, old_ctx / hi
            wavelen = 2 * math.pi / inv_freq
            scaled = torch.where(wavelen > low_wl, inv_freq / factor, inv_freq)
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
            inv_freq = torch.where(medium, smoothed, scaled)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        freqs = positions[:, None].float() * self.inv_freq[None, :].float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [T, heads, head_dim]; cos/sin: [T, rot_dim]
        cos, sin = cos[:, None, :], sin[:, None, :]
        rot, rest = x[..., : self.rot_dim], x[..., self.rot_dim :]
        half = self.rot_dim // 2
        rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
        out = rot * cos + rotated * sin
        return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, qkv_bias: bool, qk_norm: bool):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        # q, k and v projections merged at load time: one GEMM instead of three.
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.scale = cfg.head_dim**-0.5

    def forward(self, x, rope, fb: ForwardBatch, k_cache, v_cache, ops):
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        q = qkv[:, : self.q_size].view(T, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size : self.q_size + self.kv_size].view(T, self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = ops.rms_norm(q, self.q_norm.weight, self.q_norm.eps)
            k = ops.rms_norm(k, self.k_norm.weight, self.k_norm.eps)
        kv_scale = None if fb.kv_scales is None else fb.kv_scales[self.layer_idx]
        return self.o_proj(ops.attention(q, k, v, rope, fb, k_cache, v_cache, self.scale, kv_scale))


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        # gate and up projections merged at load time: [gate; up] rows.
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x, ops=None):
        gu = self.gate_up_proj(x)
        if ops is not None:
            return self.down_proj(ops.silu_and_mul(gu))
        gate, up = gu.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class MoE(nn.Module):
    """Routed experts (+ optional shared expert).

    Experts live in stacked tensors indexed by *physical slot*:
    ``w13[p] = cat(gate, up)`` and ``w2[p] = down``. The router picks *logical*
    expert ids; ``dispatch`` turns them into physical slots. By default there is
    one slot per logical expert (``physical_to_logical`` is the identity); EPLB
    may later grow the slots (replicas) and replace ``dispatch``.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, has_shared_gate: bool, has_score_bias: bool):
        super().__init__()
        self.layer_idx = layer_idx
        E, H, inter = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts, self.top_k = E, cfg.num_experts_per_tok
        self.scoring_func, self.norm_topk_prob = cfg.scoring_func, cfg.norm_topk_prob
        self.routed_scaling_factor = cfg.routed_scaling_factor
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.gate_weight = nn.Parameter(torch.zeros(E, H))
        self.score_bias = nn.Parameter(torch.zeros(E)) if has_score_bias else None
        self.w13 = nn.Parameter(torch.zeros(E, 2 * inter, H))
        self.w2 = nn.Parameter(torch.zeros(E, H, inter))
        self.register_buffer("physical_to_logical", torch.arange(E), persistent=False)
        self.shared = MLP(H, cfg.shared_expert_intermediate_size) if cfg.shared_expert_intermediate_size else None
        self.shared_gate = nn.Linear(H, 1, bias=False) if has_shared_gate else None
        # Hooks: dispatch(layer_idx, logical_ids) -> physical slot ids; recorder(layer_idx, logical_ids).
        self.dispatch: Callable[[int, torch.Tensor], torch.Tensor] | None = None
        self.recorder: Callable[[int, torch.Tensor], None] | None = None
        # Expert parallelism (tandem.engine.expert_parallel): this rank holds physical slots
        # [local_slot_start, local_slot_start + w13.shape[0]); all_reduce(buf) sums the
        # per-(token, k) expert outputs of every rank in place. Defaults: one rank, all slots.
        self.local_slot_start = 0
        self.all_reduce: Callable[[torch.Tensor], None] | None = None

    def route(self, x: torch.Tensor):
        """Return (topk_weights [T, k] float32, topk_ids [T, k] logical expert ids)."""
        logits = F.linear(x.float(), self.gate_weight.float())
        if self.scoring_func == "softmax":
            scores = logits.softmax(dim=-1)
        else:
            scores = logits.sigmoid()
        choice = scores if self.score_bias is None else scores + self.score_bias.float()
        if self.n_group > 1:
            T = x.shape[0]
            grouped = choice.view(T, self.n_group, -1)
            if self.scoring_func == "sigmoid":  # DeepSeek-V3: sum of the top-2 scores per group
                group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
            else:  # DeepSeek-V2 group_limited_greedy: best score per group
                group_scores = grouped.max(dim=-1).values
            group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
            score_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(T, -1)
            choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        topk_ids = choice.topk(self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, topk_ids)
        if self.norm_topk_prob:
            denom = weights.sum(dim=-1, keepdim=True)
            weights = weights / (denom + 1e-20 if self.scoring_func == "sigmoid" else denom)
        return weights * self.routed_scaling_factor, topk_ids

    def forward(self, x: torch.Tensor, ops=None) -> torch.Tensor:
        weights, topk_ids = self.route(x)
        if self.recorder is not None:
            self.recorder(self.layer_idx, topk_ids)
        phys = topk_ids if self.dispatch is None else self.dispatch(self.layer_idx, topk_ids)
        buf = self.expert_outputs(x, phys, weights) if ops is None else ops.routed_experts(self, x, phys, weights)
        if self.all_reduce is not None:
            self.all_reduce(buf)  # every (token, k) entry was computed by exactly one rank
        out = self.combine(buf, topk_ids)
        if self.shared is not None:  # replicated on every EP rank, added after the reduce
            s = self.shared(x, ops)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(x)) * s
            out = out + s
        return out

    def expert_outputs(self, x: torch.Tensor, phys: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted output of every (token, k) entry routed to a local slot: ``[T, k, hidden]``.

        Grouped expert MLP: entries sorted by physical slot (stably, so a slot sees its
        tokens in the same order whatever the rank), one matmul pair per used local slot.
        Entries whose slot lives on another EP rank stay zero.
        """
        T, k = phys.shape
        num_local = self.w13.shape[0]
        local = phys.reshape(-1) - self.local_slot_start
        keep = (local >= 0) & (local < num_local)
        entries = torch.arange(T * k, device=phys.device)[keep]
        local = local[keep]
        order = local.argsort(stable=True)
        entries = entries[order]
        counts = torch.bincount(local, minlength=num_local).tolist()
        xs = x[entries // k]
        w = weights.reshape(-1)[entries].to(x.dtype)
        buf = x.new_zeros(T * k, x.shape[-1])
        start = 0
        for slot, n in enumerate(counts):
            if n == 0:
                continue
            seg = slice(start, start + n)
            gate, up = F.linear(xs[seg], self.w13[slot]).chunk(2, dim=-1)
            buf[entries[seg]] = F.linear(F.silu(gate) * up, self.w2[slot]) * w[seg, None]
            start += n
        return buf.view(T, k, -1)

    @staticmethod
    def combine(buf: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """Sum each token's k outputs in ascending logical-expert order.

        A fixed order makes the float result independent of which physical slots (and
        ranks) computed the entries, i.e. of the expert placement.
        """
        k = buf.shape[1]
        if k > 1:
            perm = topk_ids.argsort(dim=1, stable=True).to(buf.device)
            buf = buf.gather(1, perm[:, :, None].expand_as(buf))
        out = buf[:, 0]
        for j in range(1, k):
            out = out + buf[:, j]
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, flags: dict):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx, flags["qkv_bias"], flags["qk_norm"])
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if flags["moe"]:
            self.mlp = MoE(cfg, layer_idx, flags["shared_gate"], flags["score_bias"])
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h, residual, rope, fb, k_cache, v_cache, ops):
        """Returns (this layer's output, the residual stream before it): the next layer's norm
        adds them (fused with its RMSNorm), exactly as ``h + attn(norm(h))`` would."""
        norm_in, norm_post = self.input_layernorm, self.post_attention_layernorm
        if residual is None:
            residual = h
            x = ops.rms_norm(h, norm_in.weight, norm_in.eps)
        else:
            x, residual = ops.rms_norm(h, norm_in.weight, norm_in.eps, residual)
        x = self.self_attn(x, rope, fb, k_cache, v_cache, ops)
        x, residual = ops.rms_norm(x, norm_post.weight, norm_post.eps, residual)
        return self.mlp(x, ops), residual


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_flags: list[dict], tie_embeddings: bool):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, f) for i, f in enumerate(layer_flags))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg)
        self.tie_embeddings = tie_embeddings
        self.lm_head = None if tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.ops = None  # set by set_backend() once the weights sit on their device

    def set_backend(self, backend: str, max_positions: int) -> None:
        """Pick the attention backend's ops (tandem.engine.ops)."""
        from .ops import make_ops

        self.ops = make_ops(backend, self.rotary, max_positions)

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE)]

    @torch.inference_mode()
    def forward(self, fb: ForwardBatch, k_caches: list, v_caches: list) -> torch.Tensor:
        """Run the batch; return logits [S, vocab] (float32) for ``fb.logits_indices`` (all rows if None)."""
        ops = self.ops
        h = self.embed_tokens(fb.input_ids)
        rope = ops.rope_inputs(fb.positions, h.dtype)
        residual = None
        for i, layer in enumerate(self.layers):
            if fb.layer_ready is not None:
                fb.layer_ready(i)
            h, residual = layer(h, residual, rope, fb, k_caches[i], v_caches[i], ops)
        if fb.logits_indices is not None:
            h, residual = h[fb.logits_indices], residual[fb.logits_indices]
        h, _ = ops.rms_norm(h, self.norm.weight, self.norm.eps, residual)
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, w).float()
