"""Fixtures for router unit tests: a tiny byte-level BPE checkpoint dir (tokenizer + chat
template + config.json), trained locally with `tokenizers`."""
from __future__ import annotations

import json

import pytest

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Streaming text with émojis 🦊 and 漢字 and ünïcödé.",
    "tandem routes requests to workers; the router detokenizes incrementally.",
    "Stop strings end generation. STOP here. Done.",
] * 20

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer_dir(path, context_length: int = 256) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    (path / "config.json").write_text(json.dumps({"max_position_embeddings": context_length}))
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return make_tokenizer_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def hf_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)
