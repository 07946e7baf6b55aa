"""Tensor parallelism, simulated in one process: every rank's sharded model (as the loader builds it
for that rank) runs on its own thread, with collectives that sum / concatenate the threads' tensors.

Checked against the one-rank model on the demo checkpoints in float32: logits within 1e-5 over a
chunked prefill and decode steps (a sharded sum is not bit-identical), each rank's parameter bytes
and KV heads are its shard's, bad shapes and flags fail with errors naming the field.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
from tandem.config.loader import build_parser
from tandem.config.schemas import DecodeConfig, EngineConfig
from tandem.engine.kv_pool import KVPool
from tandem.engine.loader import load_model
from tandem.engine.model_config import ModelConfig
from tandem.engine.model_runner import ModelRunner
from tandem.engine.tensor_parallel import TensorParallel, check_tp_shape, head_split

PAGE = 4


@dataclass
class ThreadTP(TensorParallel):
    """A TP rank whose group is threads: all_reduce sums, all_gather concatenates, in rank order."""

    hub: object = field(default=None, repr=False)

    def all_reduce(self, t):
        total = self.hub.exchange(self.rank, t, lambda ts: torch.stack(ts).sum(0))
        t.copy_(total)
        return t

    def all_gather_last(self, t):
        return self.hub.exchange(self.rank, t, lambda ts: torch.cat(ts, dim=-1))


class Hub:
    def __init__(self, size: int):
        self.size, self.barrier, self.bufs, self.out = size, threading.Barrier(size), [None] * size, None

    def exchange(self, rank, t, combine):
        self.bufs[rank] = t.clone()
        self.barrier.wait()
        if rank == 0:
            self.out = combine(self.bufs)
        self.barrier.wait()
        out = self.out.clone()
        self.barrier.wait()
        return out


def req(ids: list, start: int, pages: list):
    return SimpleNamespace(num_computed=start, all_ids=ids, pages=pages, token_at=lambda i: ids[i])


def generate(path: str, tp: TensorParallel, prompt: list, steps: int, chunk: int):
    """Chunked prefill of ``prompt`` then ``steps`` greedy decode steps: (logits per pass, model, pool)."""
    model, mc = load_model(path, torch.float32, "cpu", tp=tp)
    model.set_backend("torch_native", 256)
    pool = KVPool(mc.num_layers, 32, PAGE, model.kv_heads_per_rank, mc.head_dim, torch.float32, "cpu", num_aux_slots=1)
    runner = ModelRunner(model, pool, "cpu")
    ids = list(prompt)
    pages = list(range(3, 3 + (len(prompt) + steps + PAGE - 1) // PAGE))  # not from 0: slots are really mapped
    out = []
    start = 0
    while start < len(prompt):  # chunked prefill
        n = min(chunk, len(prompt) - start)
        out.append(runner.forward([(req(ids, start, pages), n)]))
        start += n
    for _ in range(steps):
        ids.append(int(out[-1][0].argmax()))
        out.append(runner.forward([(req(ids, len(ids) - 1, pages), 1)]))
    return out, model, pool


def run_tp(path: str, size: int, prompt, steps=4, chunk=7):
    hub = Hub(size)
    results, errors = [None] * size, []

    def rank_main(r):
        try:
            results[r] = generate(path, ThreadTP(r, size, hub=hub), prompt, steps, chunk)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            hub.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


PROMPT = [5, 17, 301, 2000, 44, 9, 77, 1234, 8000, 3, 3, 610, 42, 1, 99, 100, 4000, 250]


@pytest.fixture(scope="module")
def one_rank(demo_models):
    return {name: generate(demo_models[name], TensorParallel(), PROMPT, 4, 7) for name in ("dense", "moe")}


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize("name", ["dense", "moe"])
@pytest.mark.parametrize("size", [2, 4])
def test_sharded_ranks_match_one_rank(demo_models, one_rank, name, size):
    ref, ref_model, ref_pool = one_rank[name]
    mc = ModelConfig.from_dir(demo_models[name])
    results = run_tp(demo_models[name], size, PROMPT)
    for r, (logits, model, pool) in enumerate(results):
        assert len(logits) == len(ref)
        for got, want in zip(logits, ref):
            assert got.shape == want.shape  # the whole vocabulary on every rank
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        # Each rank's KV pool holds its heads; K of those heads equals the one-rank pool's.
        hs = head_split(mc.num_heads, mc.num_kv_heads, size, r)
        assert pool.num_kv_heads == (mc.num_kv_heads // size if mc.num_kv_heads >= size else 1)
        for layer in (0, mc.num_layers - 1):
            torch.testing.assert_close(pool.k_buffers[layer],
                                       ref_pool.k_buffers[layer][:, :, hs.kv_start:hs.kv_start + hs.kv_heads],
                                       atol=1e-5, rtol=0)
        # Sharding is real: about 1/size of the sharded bytes plus the replicated ones.
        replicated = sum(p.numel() * p.element_size() for n, p in ref_model.named_parameters()
                         if "norm" in n or "gate_weight" in n or "score_bias" in n or "k_proj" in n)
        kv_rows = 2 * mc.num_layers * hs.kv_heads * mc.head_dim * mc.hidden_size * 4  # k and v rows kept
        assert param_bytes(model) <= (param_bytes(ref_model) - replicated) / size + replicated + kv_rows
        assert param_bytes(model) < param_bytes(ref_model) / size * 1.3


def test_head_split_replicates_kv_heads_when_fewer_than_ranks():
    assert head_split(8, 2, 2, 1) == head_split(8, 2, 2, 1).__class__(4, 4, 1, 1, 1)
    s = [head_split(8, 2, 4, r) for r in range(4)]
    assert [(h.q_start, h.kv_start, h.kv_heads, h.kv_replicas) for h in s] == [
        (0, 0, 1, 2), (2, 0, 1, 2), (4, 1, 1, 2), (6, 1, 1, 2)]
    # every q head's KV head (GQA group q // 4) is the one its rank holds
    for h in s:
        for q in range(h.q_start, h.q_start + h.q_heads):
            assert q // (8 // 2) == h.kv_start


def test_bad_shapes_name_the_field(demo_models):
    mc = ModelConfig.from_dir(demo_models["dense"])  # 8 heads, 2 KV heads
    with pytest.raises(ValueError, match="tp_size=3: num_attention_heads=8 is not divisible by it"):
        check_tp_shape(mc, 3)
    odd = SimpleNamespace(**{**vars(mc), "num_kv_heads": 3, "num_heads": 12, "vocab_size": 8191})
    odd = SimpleNamespace(**vars(odd), is_moe=False)
    with pytest.raises(ValueError, match="num_key_value_heads=3 neither divides by it nor divides it.*vocab_size=8191"):
        check_tp_shape(odd, 2)
    check_tp_shape(mc, 8)  # 8 heads, KV heads replicated 4 times: fine


def test_flags():
    p = build_parser(DecodeConfig)
    assert vars(p.parse_args(["--tensor-parallel-size", "4"]))["tp_size"] == "4"
    assert vars(p.parse_args(["--tp-size", "2"]))["tp_size"] == "2"
    assert "--tensor-parallel-size" in p.format_help()
    with pytest.raises(ValueError, match="ep_size=2 with tp_size=4: allowed are ep_size=1"):
        EngineConfig(model_path="m", tp_size=4, ep_size=2)
    with pytest.raises(ValueError, match="quantization='fp8' with tp_size=2"):
        EngineConfig(model_path="m", tp_size=2, quantization="fp8")
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        EngineConfig(model_path="m", tp_size=0)
    assert EngineConfig(model_path="m", tp_size=4, ep_size=4).world_size == 4
    assert EngineConfig(model_path="m", ep_size=2).world_size == 2


def test_engine_without_its_group_is_refused(demo_models):
    from tandem.engine import EngineCore

    with pytest.raises(ValueError, match="tp_size=2: the engine needs its parallel group"):
        EngineCore(demo_models["dense"], tp_size=2, max_total_tokens=256, dtype="float32", device="cpu")
