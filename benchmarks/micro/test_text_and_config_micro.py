"""Incremental detokenization and config loading."""
from __future__ import annotations

import pytest
import yaml
from tandem.config import DecodeConfig, load_config
from tandem.routing.detokenizer import TextStream

TEXT = ("The quick brown fox jumps over the lazy dog. tandem streams tokens to the router, which turns "
        "them into text one delta at a time; stop strings end the stream. ") * 4


@pytest.mark.parametrize("per_push", [1, 8])
def test_detokenize_stream(benchmark, demo_tokenizer, per_push):
    ids = demo_tokenizer(TEXT, add_special_tokens=False)["input_ids"]

    def run():
        ts = TextStream(demo_tokenizer, stop=["STOP"])
        out = [ts.push(ids[i:i + per_push]) for i in range(0, len(ids), per_push)]
        return "".join(out) + ts.finish()

    text = benchmark(run)
    assert text == demo_tokenizer.decode(ids, skip_special_tokens=True)


def test_config_load_flags_env_and_file(benchmark, tmp_path):
    f = tmp_path / "decode.yaml"
    f.write_text(yaml.safe_dump({"page-size": 32, "max_running_requests": 48, "prefill_addresses": ["a:1"]}))
    argv = ["--config", str(f), "--model-path", "/models/x", "--chunked-prefill-size", "256",
            "--disaggregation-mode", "decode", "--prefill-retries", "2"]
    env = {"TANDEM_MAX_RUNNING_REQUESTS": "64", "TANDEM_PREFILL_ADDRESSES": "a:1,b:2"}
    cfg, _ = benchmark(load_config, DecodeConfig, argv, env)
    assert (cfg.page_size, cfg.max_running_requests, cfg.prefill_addresses) == (32, 64, ["a:1", "b:2"])
