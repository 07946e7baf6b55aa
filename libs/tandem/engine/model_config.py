"""Model hyper-parameters read from a Hugging Face ``config.json``.

Only the fields the engine needs are kept. Which optional pieces a layer has
(q/k/v biases, q/k norms, a shared-expert gate, a score-correction bias) is
decided from the checkpoint's tensor names at load time, not from config flags,
so one code path covers Llama, Qwen2/3, Mistral, Qwen2/3-MoE and GLM-4-MoE.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tandem.config.hf_config import read_hf_config

DENSE_TYPES = {"llama", "qwen2", "qwen3", "mistral"}
MOE_TYPES = {"qwen2_moe", "qwen3_moe", "glm4_moe"}
SUPPORTED_MODEL_TYPES = DENSE_TYPES | MOE_TYPES


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_params: dict = field(default_factory=dict)
    partial_rotary_factor: float = 1.0
    eos_token_ids: list = field(default_factory=list)
    # MoE (num_experts == 0 means dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    scoring_func: str = "softmax"  # softmax (Qwen-MoE) or sigmoid (GLM-4-MoE / DeepSeek-V3)
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    torch_dtype: str | None = None

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @classmethod
    def from_dir(cls, path: str) -> ModelConfig:
        return cls.from_dict(read_hf_config(path))

    @classmethod
    def from_dict(cls, c: dict) -> ModelConfig:
        mt = c.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            archs = c.get("architectures")
            raise ValueError(
                f"unknown model architecture model_type={mt!r} (architectures={archs}); "
                f"supported: {sorted(SUPPORTED_MODEL_TYPES)}"
            )
        heads = c["num_attention_heads"]
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        rope = dict(c.get("rope_parameters") or {})
        if not rope:
            rope = {"rope_theta": c.get("rope_theta", 10000.0), **(c.get("rope_scaling") or {})}
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"rope_type={rope_type!r}: supported are default, linear, llama3")
        partial = rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
        eos = c.get("eos_token_id")
        eos = [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])
        mc = cls(
            model_type=mt,
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            intermediate_size=c.get("intermediate_size", 0),
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            max_position_embeddings=c.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            rope_type=rope_type,
            rope_params=rope,
            partial_rotary_factor=float(partial),
            eos_token_ids=eos,
            torch_dtype=c.get("dtype") or c.get("torch_dtype"),
        )
        if mt in ("qwen2_moe", "qwen3_moe"):
            # checkpoints say num_experts; transformers >= 5.2x writes num_local_experts for Qwen3-MoE
            mc.num_experts = c["num_experts"] if "num_experts" in c else c["num_local_experts"]
            mc.num_experts_per_tok = c["num_experts_per_tok"]
            mc.moe_intermediate_size = c["moe_intermediate_size"]
            mc.shared_expert_intermediate_size = c.get("shared_expert_intermediate_size", 0) or 0
            mc.norm_topk_prob = bool(c.get("norm_topk_prob", False))
            mc.scoring_func = "softmax"
            # Optional DeepSeek-style group-limited routing on top of softmax scores.
            mc.n_group = c.get("n_group") or 1
            mc.topk_group = c.get("topk_group") or 1
        elif mt == "glm4_moe":
            mc.num_experts = c["n_routed_experts"]
            mc.num_experts_per_tok = c["num_experts_per_tok"]
            mc.moe_intermediate_size = c["moe_intermediate_size"]
            mc.shared_expert_intermediate_size = c["moe_intermediate_size"] * (c.get("n_shared_experts") or 0)
            mc.norm_topk_prob = bool(c.get("norm_topk_prob", True))
            mc.routed_scaling_factor = float(c.get("routed_scaling_factor", 1.0))
            mc.scoring_func = "sigmoid"
            mc.n_group = c.get("n_group") or 1
            mc.topk_group = c.get("topk_group") or 1
        if mc.is_moe and mc.num_experts % mc.n_group:
            raise ValueError(f"n_group={mc.n_group} must divide the number of experts {mc.num_experts}")
        return mc
