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

from . import moe_math
from .model_config import ModelConfig
from .moe_math import RoutingSpec
from .tensor_parallel import ONE_RANK, TensorParallel, head_split


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
    record_experts: bool = False  # MoE layers add their routing to the expert recorder's counters
    kv_scales: torch.Tensor | None = None  # [layers, 2] (k_scale, v_scale) of the pool (read when it is FP8)
    lora: object = None  # tandem.engine.lora.LoraBatch: each request's adapter slot (None: no adapter in the pass)


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


class PlainLinears:
    """The default linear factory: ``factory(module name, in, out, bias) -> module`` builds every
    linear layer of the model (the LM head included); ``factory.matmul(x, weight)`` computes the
    logits of tied embeddings. The loader passes another one to build them differently (FP8:
    ``tandem.engine.quantization``; --enable-deterministic-inference: ``tandem.engine.batch_invariant``)."""

    def __call__(self, name: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    @staticmethod
    def matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)


plain_linear = PlainLinears()


class Attention(nn.Module):
    """Self-attention over this TP rank's heads (``tp``): QKV column-parallel, ``o_proj`` row-parallel
    and all-reduced (``tandem.engine.tensor_parallel``)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, qkv_bias: bool, qk_norm: bool, linear=plain_linear,
                 tp: TensorParallel = ONE_RANK, lora=None):
        super().__init__()
        self.layer_idx = layer_idx
        heads = head_split(cfg.num_heads, cfg.num_kv_heads, tp.size, tp.rank)
        self.num_heads, self.num_kv_heads, self.head_dim = heads.q_heads, heads.kv_heads, cfg.head_dim
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        self.tp = tp
        # q, k and v projections merged at load time: one GEMM instead of three.
        p = f"layers.{layer_idx}.self_attn."
        self.qkv_proj = linear(p + "qkv_proj", cfg.hidden_size, self.q_size + 2 * self.kv_size, qkv_bias)
        self.o_proj = linear(p + "o_proj", self.q_size, cfg.hidden_size, False)
        # LoRA (tandem.engine.lora): a delta added beside each base projection's output.
        self.qkv_lora = (lora(p + "qkv_proj", cfg.hidden_size, (self.q_size, self.kv_size, self.kv_size),
                              self.qkv_proj) if lora else None)
        self.o_lora = lora(p + "o_proj", self.q_size, (cfg.hidden_size,), self.o_proj) if lora else None
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.scale = cfg.head_dim**-0.5

    def forward(self, x, rope, fb: ForwardBatch, k_cache, v_cache, ops):
        T = x.shape[0]
        qkv = self.qkv_proj(x) if self.qkv_lora is None else self.qkv_lora.project(x, fb.lora)
        q = qkv[:, : self.q_size].view(T, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size : self.q_size + self.kv_size].view(T, self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = ops.rms_norm(q, self.q_norm.weight, self.q_norm.eps)
            k = ops.rms_norm(k, self.k_norm.weight, self.k_norm.eps)
        kv_scale = None if fb.kv_scales is None else fb.kv_scales[self.layer_idx]
        attn = ops.attention(q, k, v, rope, fb, k_cache, v_cache, self.scale, kv_scale)
        out = self.o_proj(attn) if self.o_lora is None else self.o_lora.project(attn, fb.lora)
        return self.tp.all_reduce(out)


class MLP(nn.Module):
    """``inter`` is this TP rank's share of the intermediate size: gate/up column-parallel,
    ``down_proj`` row-parallel and all-reduced over ``tp``."""

    def __init__(self, hidden: int, inter: int, linear=plain_linear, prefix: str = "", tp: TensorParallel = ONE_RANK,
                 lora=None):
        super().__init__()
        self.tp = tp
        # gate and up projections merged at load time: [gate; up] rows.
        self.gate_up_proj = linear(prefix + "gate_up_proj", hidden, 2 * inter, False)
        self.down_proj = linear(prefix + "down_proj", inter, hidden, False)
        self.gate_up_lora = lora(prefix + "gate_up_proj", hidden, (inter, inter), self.gate_up_proj) if lora else None
        self.down_lora = lora(prefix + "down_proj", inter, (hidden,), self.down_proj) if lora else None

    def forward(self, x, ops=None, lora_batch=None):
        gu = self.gate_up_proj(x) if self.gate_up_lora is None else self.gate_up_lora.project(x, lora_batch)
        if ops is not None:
            act = ops.silu_and_mul(gu)
        else:
            gate, up = gu.chunk(2, dim=-1)
            act = F.silu(gate) * up
        out = self.down_proj(act) if self.down_lora is None else self.down_lora.project(act, lora_batch)
        return self.tp.all_reduce(out)


class MoE(nn.Module):
    """Routed experts (+ the shared expert), computed as ``tandem.engine.moe_math`` defines.

    Expert weights live in stacked tensors indexed by *local slot*: ``w13[s] = cat(gate, up)``
    and ``w2[s] = down``. Slots ``[0, num_local)`` hold the routed experts this rank computes, in
    the order of the ``dispatcher``'s placement (EPLB: replicas, EP: this rank's share; without a
    dispatcher, slot = expert id); slots ``num_local..`` hold the shared expert's ``S`` chunks
    when its intermediate size is a multiple of the experts' (folded in, see ``moe_math``;
    otherwise it stays an ``MLP``). The router's weight carries the shared expert's gate as its
    last row. Both collaborators come at construction: the ``dispatcher``
    (``tandem.eplb.dispatch.ExpertDispatcher``: logical -> physical slots on the device, EP's
    local slots and all-reduce) and the optional ``recorder`` (``ExpertDistributionRecorder``,
    whose device counters the routing adds to when the forward batch says ``record_experts``).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, has_shared_gate: bool, has_score_bias: bool,
                 moe_index: int = 0, dispatcher=None, recorder=None, linear=plain_linear,
                 tp: TensorParallel = ONE_RANK):
        super().__init__()
        if dispatcher is not None and moe_index >= dispatcher.num_layers:
            raise ValueError(f"the expert placement has {dispatcher.num_layers} MoE layers; this is MoE layer "
                             f"{moe_index} (decoder layer {layer_idx})")
        self.layer_idx = layer_idx
        self.moe_index = moe_index  # ordinal among the MoE layers (placement and recorder rows)
        E, H, inter = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        shared_inter = cfg.shared_expert_intermediate_size or 0
        fold = shared_inter > 0 and shared_inter % inter == 0
        S = shared_inter // inter if fold else 0
        self.spec = RoutingSpec(E, cfg.num_experts_per_tok, cfg.scoring_func, cfg.norm_topk_prob,
                                cfg.routed_scaling_factor, cfg.n_group, cfg.topk_group, S, has_shared_gate)
        self.gate_weight = nn.Parameter(torch.zeros(E + int(has_shared_gate), H))
        self.score_bias = nn.Parameter(torch.zeros(E)) if has_score_bias else None
        self.num_local = dispatcher.num_local if dispatcher is not None else E
        # Tensor parallelism without EP: every expert (and folded shared chunk) holds this rank's
        # share of the intermediate size, and the rows are partial sums until the all-reduce.
        self.tp_sharded = tp.size > 1 and tp.expert_sharded
        local_inter = inter // tp.size if self.tp_sharded else inter
        self.w13 = nn.Parameter(torch.zeros(self.num_local + S, 2 * local_inter, H))
        self.w2 = nn.Parameter(torch.zeros(self.num_local + S, H, local_inter))
        self.shared = MLP(H, shared_inter // tp.size, linear, f"layers.{layer_idx}.mlp.shared.", tp) \
            if shared_inter and not fold else None
        self.dispatcher, self.recorder = dispatcher, recorder
        # Expert parallelism: the folded shared expert's rows are computed by rank 0 alone, so the
        # all-reduce adds each row exactly once (an unfolded shared MLP is TP-sharded and reduced itself).
        # TP-sharded experts: every rank computes its part of every row, shared chunks included.
        self.shared_here = dispatcher is None or dispatcher.rank == 0 or self.tp_sharded
        self.reduce = (dispatcher.all_reduce if dispatcher is not None and dispatcher.all_reduce is not None
                       else tp.all_reduce if self.tp_sharded else None)

    @property
    def num_experts(self) -> int:
        return self.spec.num_experts

    @property
    def top_k(self) -> int:
        return self.spec.top_k

    def local_experts(self) -> torch.Tensor:
        """Logical expert of each routed local slot (host int64)."""
        if self.dispatcher is None:
            return torch.arange(self.num_experts)
        return self.dispatcher.local_experts(self.moe_index)

    def pack_experts(self, w13: torch.Tensor, w2: torch.Tensor, shared: tuple | None = None):
        """Slot tensors from a checkpoint's experts (``w13 [E, 2I, H]``, ``w2 [E, H, I]``, by logical
        id) and shared expert (``gate, up [S*I, H]``, ``down [H, S*I]``): ``(w13, w2)`` as this layer holds them."""
        idx = self.local_experts()
        w13, w2 = w13.index_select(0, idx), w2.index_select(0, idx)
        S = self.spec.num_shared
        if S:
            gate, up, down = shared
            inter = w2.shape[2]
            c13 = [torch.cat([gate[c * inter:(c + 1) * inter], up[c * inter:(c + 1) * inter]]) for c in range(S)]
            c2 = [down[:, c * inter:(c + 1) * inter] for c in range(S)]
            w13 = torch.cat([w13, torch.stack(c13).to(w13.dtype)])
            w2 = torch.cat([w2, torch.stack(c2).to(w2.dtype)])
        return w13, w2

    def routed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the routed slots' weights (EPLB copies new experts into them in place)."""
        return self.w13[: self.num_local], self.w2[: self.num_local]

    def forward(self, x: torch.Tensor, ops=None, fb: ForwardBatch | None = None) -> torch.Tensor:
        """``ops``: the backend's (None: the torch reference). ``fb`` gives positions (random
        dispatch), which rows are a graph's padding (decode ``seq_lens == 0``) and whether to record."""
        spec, k = self.spec, self.spec.top_k
        logits = F.linear(x.float(), self.gate_weight) if ops is None else ops.moe_router(x, self.gate_weight)
        positions = seq_lens = counts = None
        record = self.recorder is not None and fb is not None and fb.record_experts
        if fb is not None:
            positions = fb.positions
            if fb.is_decode and fb.seq_lens is not None and fb.seq_lens.shape[0] == x.shape[0]:
                seq_lens = fb.seq_lens
        if record:
            counts = self.recorder.counter(self.moe_index)
        route = moe_math.route_tokens if ops is None else ops.moe_route
        ids, slots, weights = route(spec, logits, self.score_bias, self.dispatcher, self.moe_index, positions,
                                    self.shared_here, counts, record and self.recorder.counts_physical, seq_lens)
        if record and self.recorder.mode == "per_token":
            self.recorder.record_tokens(self.moe_index, ids[:, :k], positions,
                                        None if seq_lens is None else seq_lens > 0)
        reduce = self.reduce
        if ops is None:
            rows = moe_math.expert_rows(x, self.w13, self.w2, slots, weights)
            if reduce is not None:
                reduce(rows)  # every (token, entry) row was computed by exactly one rank
            out = moe_math.combine(rows)
        elif reduce is None:
            out = ops.moe_experts(x, self.w13, self.w2, slots, weights, True)
        else:
            rows = ops.moe_experts(x, self.w13, self.w2, slots, weights, False)
            reduce(rows)
            out = ops.moe_combine(rows)
        if self.shared is not None:  # not folded: added after the reduce (TP: reduced in its down_proj)
            s = self.shared(x, ops)
            if spec.shared_gated:
                s = torch.sigmoid(logits[:, spec.num_experts:]).to(s.dtype) * s
            out = out + s
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, flags: dict, moe_index: int = 0, dispatcher=None,
                 recorder=None, linear=plain_linear, tp: TensorParallel = ONE_RANK, lora=None):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx, flags["qkv_bias"], flags["qk_norm"], linear, tp, lora)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = flags["moe"]
        if self.is_moe:
            self.mlp = MoE(cfg, layer_idx, flags["shared_gate"], flags["score_bias"], moe_index, dispatcher, recorder,
                           linear, tp)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size // tp.size, linear, f"layers.{layer_idx}.mlp.", tp,
                           lora)

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
        return (self.mlp(x, ops, fb) if self.is_moe else self.mlp(x, ops, fb.lora)), residual


class CausalLM(nn.Module):
    """``expert_dispatcher`` / ``expert_recorder``: what every MoE layer gets at construction (None
    for a dense model, or a MoE model without EPLB, expert parallelism or recording). Linears (q/k/v,
    o, gate/up, down, a shared expert's, lm_head) come from ``linear``, and the logits of tied
    embeddings from its ``matmul``; the embeddings are plain. ``lora``
    (``tandem.engine.lora.LoraWeights``, None without ``--enable-lora``) gives each linear of the
    attention and of the dense MLPs its LoRA delta (not a MoE layer's shared expert, nor lm_head).

    ``tp``: this rank's place in its tensor-parallel group; every module holds its shard
    (``tandem.engine.tensor_parallel``), embedding and LM head ``vocab / tp`` rows each. LoRA
    needs one rank (its deltas are not sharded)."""

    def __init__(self, cfg: ModelConfig, layer_flags: list[dict], tie_embeddings: bool, expert_dispatcher=None,
                 expert_recorder=None, linear=plain_linear, tp: TensorParallel = ONE_RANK, lora=None):
        super().__init__()
        if lora is not None and tp.size > 1:
            raise ValueError(f"LoRA with tensor parallelism (tp size {tp.size}) is not supported: "
                             "the adapters' deltas are not sharded")
        self.cfg = cfg
        self.tp = tp
        self.expert_dispatcher, self.expert_recorder = expert_dispatcher, expert_recorder
        vocab = cfg.vocab_size // tp.size
        self.vocab_start = tp.rank * vocab  # first token id of this rank's embedding rows
        self.embed_tokens = nn.Embedding(vocab, cfg.hidden_size)
        moe_index = [sum(f["moe"] for f in layer_flags[:i]) for i in range(len(layer_flags))]
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, f, moe_index[i], expert_dispatcher, expert_recorder, linear,
                                                 tp, lora)
                                    for i, f in enumerate(layer_flags))
        self.lora = lora
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg)
        self.tie_embeddings = tie_embeddings
        self.lm_head = None if tie_embeddings else linear("lm_head", cfg.hidden_size, vocab, False)
        self.tied_matmul = linear.matmul  # logits of tied embeddings
        self.ops = None  # set by set_backend() once the weights sit on their device

    def set_backend(self, backend: str, max_positions: int, deterministic: bool = False) -> None:
        """Pick the attention backend's ops (tandem.engine.ops); ``deterministic``: its batch-invariant
        ops (--enable-deterministic-inference; the linears come from the loader's factory)."""
        from .ops import make_ops

        self.ops = make_ops(backend, self.rotary, max_positions, deterministic)

    @property
    def kv_heads_per_rank(self) -> int:
        """KV heads this rank's attention layers (and so its KV pool) hold."""
        return self.layers[0].self_attn.num_kv_heads

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoE)]

    @torch.inference_mode()
    def forward(self, fb: ForwardBatch, k_caches: list, v_caches: list) -> torch.Tensor:
        """Run the batch; return logits [S, vocab] (float32) for ``fb.logits_indices`` (all rows if None)."""
        h = self.hidden_states(fb, k_caches, v_caches)
        logits = self.tied_matmul(h, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(h)
        return self.tp.all_gather_last(logits.float())  # vocab-parallel: every rank's columns

    @torch.inference_mode()
    def hidden_states(self, fb: ForwardBatch, k_caches: list, v_caches: list) -> torch.Tensor:
        """Run the batch; return the final (normed) hidden states [S, hidden] in the model dtype
        for ``fb.logits_indices`` (all rows if None): what the LM head reads, and what
        embedding pooling reads."""
        ops = self.ops
        h = self.embed(fb.input_ids)
        rope = ops.rope_inputs(fb.positions, h.dtype)
        residual = None
        for i, layer in enumerate(self.layers):
            if fb.layer_ready is not None:
                fb.layer_ready(i)
            h, residual = layer(h, residual, rope, fb, k_caches[i], v_caches[i], ops)
        if fb.logits_indices is not None:
            h, residual = h[fb.logits_indices], residual[fb.logits_indices]
        h, _ = ops.rms_norm(h, self.norm.weight, self.norm.eps, residual)
        return h

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings; vocab-parallel: each rank looks up its own rows (others zero), all-reduced."""
        if self.tp.size == 1 and not self.tp.force_collectives:
            return self.embed_tokens(ids)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.embed_tokens.num_embeddings)
        h = self.embed_tokens(local.masked_fill(outside, 0))
        return self.tp.all_reduce(h.masked_fill(outside[:, None], 0))
