"""CUDA graphs for decode: one captured forward pass per batch-size bucket.

At start every bucket (1, 2, 4, 8, then every 8 up to ``--cuda-graph-max-bs``) is
captured over static input buffers, largest first, all in one memory pool. A decode
step copies its inputs into the buffers (two host-to-device copies), pads the batch
to its bucket with rows that read and write nothing (context length 0, slot -1) and
replays. Sampling has graphs of its own, one per (bucket, ``SamplerVariant``), also
captured at start: a capture while serving would race other threads' CUDA calls (KV
transfer). Greedy, unmasked batches just take the argmax.

A MoE model with an expert recorder gets two forward graphs per bucket: one whose routing adds
to the recorder's device counters and one that does not, replayed as recording is on or off
(the per_token mode copies ids to the host inside the pass: it decodes eagerly while recording).
EPLB changes nothing here: a plan is copied into the weights and dispatch tables the graphs
read, in place, between two replays. Nor does LoRA: with ``--enable-lora`` the graphs run the
LoRA kernels over the static adapter slot buffers and a fifth input row, each row's adapter
slot (-1: the base model; padding rows too), so any mix of adapters replays the same graph.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from .kernels import default_num_splits
from .lora import LoraBatch
from .model import ForwardBatch
from .sampler import SAMPLER_VARIANTS, SamplerVariant, SamplingTensors, mask_words

log = logging.getLogger(__name__)


def graph_buckets(max_bs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_bs] + list(range(16, max_bs, 8)) + [max_bs]
    return sorted(set(sizes))


class CudaGraphRunner:
    def __init__(self, model, pool, sampler, max_bs: int, num_sms: int):
        self.model, self.pool, self.sampler, self.num_sms = model, pool, sampler, num_sms
        self.max_bs = max_bs
        self.buckets = graph_buckets(max_bs)
        self.page_size = pool.page_size
        dev = pool.k_buffers[0].device
        self.max_pages = -(-model.ops.cos.shape[0] // self.page_size) + 1
        self.lora = model.lora is not None
        rows = 5 if self.lora else 4
        # ids, positions, slots, seq_lens (and the LoRA slot of each row)
        self.vec = torch.zeros((rows, max_bs), dtype=torch.int64, device=dev)
        # LoRA segments of a decode batch: row i alone (start i, length 1).
        self.lora_seg = torch.stack([torch.arange(max_bs, device=dev), torch.ones(max_bs, dtype=torch.int64, device=dev)])
        self.page_table = torch.zeros((max_bs, self.max_pages), dtype=torch.int32, device=dev)
        # Two pinned input buffers used in turn: with overlap scheduling the host fills step
        # N+1's inputs before step N's non-blocking copy is known to have run.
        self.host_vecs = [torch.zeros((rows, max_bs), dtype=torch.int64).pin_memory() for _ in range(2)]
        self.host_tables = [torch.zeros(max_bs * self.max_pages, dtype=torch.int32).pin_memory() for _ in range(2)]
        self._turn = 0
        self._copied: list = [None, None]  # per buffer: event after its last host-to-device copy
        vocab = model.cfg.vocab_size
        self.sampling = SamplingTensors(
            temperatures=torch.ones(max_bs, device=dev), top_ks=torch.full((max_bs,), vocab, device=dev),
            top_ps=torch.ones(max_bs, device=dev), min_ps=torch.zeros(max_bs, device=dev),
            seeds=torch.zeros(max_bs, dtype=torch.int64, device=dev),
            positions=torch.zeros(max_bs, dtype=torch.int64, device=dev),
            greedy=torch.ones(max_bs, dtype=torch.bool, device=dev),
            mask=torch.full((max_bs, mask_words(vocab)), -1, dtype=torch.int32, device=dev),
            penalty_rows=torch.full((max_bs,), sampler.penalties.neutral_row, dtype=torch.int64, device=dev),
        )
        self.mempool = torch.cuda.graph_pool_handle()
        rec = model.expert_recorder
        self.record_variants = (False, True) if rec is not None and rec.graph_safe else (False,)
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.sampler_graphs: dict[tuple[int, bool, SamplerVariant], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._bucket = None
        self._capture_all()

    # ---- capture ---------------------------------------------------------------------------
    def _forward_batch(self, bs: int, record: bool) -> ForwardBatch:
        v = self.vec
        return ForwardBatch(input_ids=v[0, :bs], positions=v[1, :bs], slot_mapping=v[2, :bs], seq_lens=v[3, :bs],
                            page_table=self.page_table[:bs], is_decode=True,
                            num_splits=default_num_splits(bs, self.pool.num_kv_heads, self.num_sms),
                            record_experts=record, kv_scales=self.pool.kv_scales,
                            lora=LoraBatch(self.lora_seg[0, :bs], self.lora_seg[1, :bs], v[4, :bs], 1, True,
                                           row_slots=v[4, :bs])
                            if self.lora else None)

    def _capture(self, fn) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compile and autotune every kernel outside the capture
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            out = fn()
        return graph, out

    def _capture_all(self) -> None:
        self.vec.zero_()
        self.vec[2].fill_(-1)  # capture-time runs write no KV
        if self.lora:
            self.vec[4].fill_(-1)  # nor read an adapter
        k, v = self.pool.k_buffers, self.pool.v_buffers
        with torch.inference_mode():
            for bs in reversed(self.buckets):
                for record in self.record_variants:
                    fb = self._forward_batch(bs, record)
                    self.graphs[(bs, record)] = self._capture(lambda fb=fb: self.model(fb, k, v))
                    if record:  # the capture's warm-up runs counted into the recorder: not real passes
                        self.model.expert_recorder.discard_pass()
                    logits = self.graphs[(bs, record)][1]
                    for variant in SAMPLER_VARIANTS:  # each reads its forward graph's logits buffer
                        self.sampler_graphs[(bs, record, variant)] = self._capture(
                            lambda logits=logits, bs=bs, variant=variant:
                            self.sampler.sample(logits, self._static(bs), variant))
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s (forward%s + %d sampler variants each)",
                 self.buckets, " with and without expert recording" if len(self.record_variants) > 1 else "",
                 len(SAMPLER_VARIANTS))

    # ---- replay ----------------------------------------------------------------------------
    def can_run(self, batch: list, record: bool = False) -> bool:
        return (len(batch) <= self.max_bs and all(n == 1 for _, n in batch)
                and (not record or record in self.record_variants))

    def bucket(self, bs: int) -> int:
        return next(b for b in self.buckets if b >= bs)

    def replay(self, vec: np.ndarray, table: np.ndarray, future_tokens=None, record: bool = False,
               lora_slots: list | None = None) -> torch.Tensor:
        """vec [4, B] and table [B, W] from ``model_runner.decode_inputs``; returns logits [B, V].
        ``future_tokens(ids)``: resolves the ids of tokens still being sampled (negative) on the device;
        ``record``: the variant whose MoE routing adds to the expert recorder; ``lora_slots``: each
        row's adapter slot (-1: none) when the graphs were captured with LoRA."""
        bs, width = table.shape
        bucket = self.bucket(bs)
        turn = self._turn
        self._turn ^= 1
        host_vec, host_table = self.host_vecs[turn], self.host_tables[turn]
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()  # its previous copy has left the buffer
        hv = host_vec.numpy()
        hv[:4, :bs] = vec
        hv[:, bs:bucket] = 0
        hv[2, bs:bucket] = -1  # padding rows: no KV write, context length 0
        if self.lora:
            hv[4, :bs] = lora_slots
            hv[4, bs:bucket] = -1
        ht = host_table[: bs * width].numpy().reshape(bs, width)
        ht[:] = table
        self.vec[:, :bucket].copy_(host_vec[:, :bucket], non_blocking=True)
        self.page_table[:bs, :width].copy_(host_table[: bs * width].view(bs, width), non_blocking=True)
        self._copied[turn] = torch.cuda.Event()
        self._copied[turn].record()
        if future_tokens is not None:
            self.vec[0, :bs] = future_tokens(self.vec[0, :bs])
        graph, logits = self.graphs[(bucket, record)]
        graph.replay()
        self._bucket = (bucket, record)
        return logits[:bs]

    def sample(self, bs: int, tensors: SamplingTensors | None, variant: SamplerVariant) -> torch.Tensor:
        """Sample the rows of the last replay (``tensors`` on the host, None when all greedy)."""
        bucket, record = self._bucket
        logits = self.graphs[(bucket, record)][1]
        if variant == SamplerVariant():
            return logits[:bs].argmax(dim=-1)
        st = self.sampling
        for name, src in vars(tensors).items():
            if src is not None:
                getattr(st, name)[:bs].copy_(src, non_blocking=True)
        graph, tokens = self.sampler_graphs[(bucket, record, variant)]
        graph.replay()
        return tokens[:bs]

    def _static(self, bucket: int) -> SamplingTensors:
        return SamplingTensors(**{k: v[:bucket] for k, v in vars(self.sampling).items()})
