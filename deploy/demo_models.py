"""Build the small demo checkpoints offline: ``python -m deploy.demo_models --out models``.

Three Hugging Face-format checkpoints, deterministic from a seed on a given machine:

* ``tandem-demo-dense``: Qwen2 architecture (~27M parameters, tied embeddings).
* ``tandem-demo-moe``: GLM-4-MoE architecture (8 routed experts, top-2,
  DeepSeek-style group-limited routing n_group=4 / topk_group=2, one shared
  expert, sigmoid router with score-correction bias, partial RoPE).
* ``tandem-demo-embed``: an embedding model saved the way Qwen3-Embedding ships: Qwen3
  architecture without ``lm_head`` (the base model's weights), sentence-transformers files
  (``modules.json``: Transformer -> last-token Pooling -> Normalize) and a tokenizer that
  appends ``<|endoftext|>`` to every input.

Each gets a byte-level BPE tokenizer trained with ``tokenizers`` on text found on
the machine (license texts and Python standard-library sources), a ChatML chat
template, and a few dozen steps of CPU training on the same text so that greedy
output is not pure noise. A stamp file (``tandem_build.json``) holding the build
spec makes the builder idempotent: an existing checkpoint with the same spec is
skipped.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import sys
import time

BUILD_VERSION = 1
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DENSE_SPEC = {
    "name": "tandem-demo-dense",
    "seed": 1234,
    "vocab_size": 8192,
    "train_steps": 40,
    "config": {
        "model_type": "qwen2",
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
    },
}
MOE_SPEC = {
    "name": "tandem-demo-moe",
    "seed": 4321,
    "vocab_size": 8192,
    "train_steps": 40,
    "config": {
        "model_type": "glm4_moe",
        "hidden_size": 256,
        "intermediate_size": 768,
        "moe_intermediate_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_group": 4,
        "topk_group": 2,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.0,
        "num_nextn_predict_layers": 0,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    },
}
EMBED_SPEC = {
    "name": "tandem-demo-embed",
    "kind": "embedding",
    "seed": 2468,
    "vocab_size": 8192,
    "train_steps": 20,
    "config": {
        "model_type": "qwen3",
        "hidden_size": 256,
        "intermediate_size": 768,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
    },
}
SPECS = [DENSE_SPEC, MOE_SPEC, EMBED_SPEC]

# sentence-transformers files of an embedding checkpoint, as Qwen3-Embedding ships them:
# Transformer -> last-token Pooling -> Normalize.
ST_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]


def st_pooling_config(hidden: int, mode: str = "lasttoken") -> dict:
    """1_Pooling/config.json of sentence-transformers with one mode on."""
    keys = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "lasttoken": "pooling_mode_lasttoken"}
    cfg = {"word_embedding_dimension": hidden, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
           "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
           "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": False, "include_prompt": True}
    cfg[keys[mode]] = True
    return cfg


def write_sentence_transformers(out_dir: str, hidden: int, mode: str = "lasttoken", normalize: bool = True) -> None:
    """modules.json, 1_Pooling/config.json (and 2_Normalize/ when normalising)."""
    modules = ST_MODULES if normalize else ST_MODULES[:2]
    with open(os.path.join(out_dir, "modules.json"), "w") as f:
        json.dump(modules, f, indent=2)
    os.makedirs(os.path.join(out_dir, "1_Pooling"), exist_ok=True)
    with open(os.path.join(out_dir, "1_Pooling", "config.json"), "w") as f:
        json.dump(st_pooling_config(hidden, mode), f, indent=2)
    if normalize:
        os.makedirs(os.path.join(out_dir, "2_Normalize"), exist_ok=True)
    with open(os.path.join(out_dir, "config_sentence_transformers.json"), "w") as f:
        json.dump({"prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"}, f, indent=2)


def corpus_files() -> list[str]:
    """Text files available on any Debian machine with Python: licenses + stdlib sources."""
    files = sorted(glob.glob("/usr/share/common-licenses/*"))
    files += sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
    return [f for f in files if os.path.isfile(f) and not os.path.islink(f)]


def read_corpus(max_bytes: int = 4_000_000) -> str:
    parts, total = [], 0
    for fn in corpus_files():
        try:
            with open(fn, encoding="utf-8", errors="ignore") as f:
                text = f.read()
        except OSError:
            continue
        parts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return "\n".join(parts)


def train_tokenizer(text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    chunks = [text[i : i + 10000] for i in range(0, len(text), 10000)]
    tok.train_from_iterator(chunks, trainer=trainer)
    return tok


def spec_hash(spec: dict) -> str:
    blob = json.dumps({"v": BUILD_VERSION, "spec": spec}, sort_keys=True).encode()
    return hashlib.blake2b(blob, digest_size=8).hexdigest()


def is_built(out_dir: str, spec: dict) -> bool:
    stamp = os.path.join(out_dir, "tandem_build.json")
    try:
        with open(stamp) as f:
            return json.load(f).get("spec_hash") == spec_hash(spec)
    except (OSError, ValueError):
        return False


def build_one(spec: dict, root: str, text: str, log=print) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out_dir = os.path.join(root, spec["name"])
    if is_built(out_dir, spec):
        log(f"{spec['name']}: up to date ({out_dir})")
        return out_dir
    t0 = time.time()
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    tok = train_tokenizer(text, spec["vocab_size"])
    embedding = spec.get("kind") == "embedding"
    if embedding:
        # As Qwen3-Embedding's tokenizer: every input ends with <|endoftext|>, whose final
        # hidden state is the embedding (last-token pooling).
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(
            single="$A <|endoftext|>", pair="$A <|endoftext|> $B <|endoftext|>",
            special_tokens=[("<|endoftext|>", tok.token_to_id("<|endoftext|>"))])
    tok.save(os.path.join(tmp, "tokenizer.json"))
    eos_id = tok.token_to_id("<|im_end|>")
    pad_id = tok.token_to_id("<|endoftext|>")
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "chat_template": CHAT_TEMPLATE,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "bos_token": None,
                "model_max_length": spec["config"]["max_position_embeddings"],
                "clean_up_tokenization_spaces": False,
                **({"padding_side": "left"} if embedding else {}),
            },
            f,
            indent=2,
        )

    cfg_kwargs = dict(spec["config"])
    model_type = cfg_kwargs.pop("model_type")
    cfg = AutoConfig.for_model(
        model_type, vocab_size=tok.get_vocab_size(), eos_token_id=eos_id, pad_token_id=pad_id,
        bos_token_id=None, **cfg_kwargs,
    )
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _train(model, tok, text, spec)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = pad_id
    if embedding:
        # Qwen3-Embedding ships the base model: no lm_head, weights without the "model." prefix.
        model = model.model
        write_sentence_transformers(tmp, cfg.hidden_size)
    model.save_pretrained(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    with open(os.path.join(tmp, "tandem_build.json"), "w") as f:
        json.dump({"spec_hash": spec_hash(spec), "spec": spec, "num_parameters": n_params}, f, indent=2)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    log(f"{spec['name']}: built {n_params / 1e6:.1f}M params in {time.time() - t0:.0f}s -> {out_dir}")
    return out_dir


def _train(model, tok, text: str, spec: dict, seq_len: int = 64, batch: int = 8) -> None:
    """A few AdamW steps of next-token prediction so that output has some structure."""
    import torch

    steps = spec["train_steps"]
    if steps <= 0:
        return
    ids = torch.tensor(tok.encode(text[:400_000]).ids, dtype=torch.long)
    g = torch.Generator().manual_seed(spec["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=g)
        x = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def build_all(out: str = "models", log=print) -> dict:
    """Build (or skip, if up to date) every demo checkpoint; return {name: path}."""
    import torch

    os.makedirs(out, exist_ok=True)
    paths = {s["name"]: os.path.join(out, s["name"]) for s in SPECS}
    if all(is_built(paths[s["name"]], s) for s in SPECS):
        for s in SPECS:
            log(f"{s['name']}: up to date ({paths[s['name']]})")
        return paths
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # fixed thread count: same reduction order, same weights
    try:
        text = read_corpus()
        for s in SPECS:
            build_one(s, out, text, log)
    finally:
        torch.set_num_threads(threads)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="models", help="output folder (default: models)")
    args = ap.parse_args(argv)
    build_all(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
