"""Turns a scheduled batch into tensors, runs the model over the paged KV pool, samples.

The triton backend reads K/V through the page table: decode batches take the paged
decode path and, on CUDA, replay a captured CUDA graph (``cuda_graph_runner``);
prefill and mixed batches take the paged extend path. The torch_native backend gets
the dense view (each request's context gathered, with a mask).

With several ranks the leader's runner is built with a ``ForwardMirror`` (``forward_mirror``): each
pass runs inside ``mirror.mirroring``, which hands it to the followers first, and runs from the same
records (``ForwardPass.items``) as the followers rebuild it.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .forward_mirror import ForwardMirror, ForwardPass
from .kernels import default_num_splits
from .kv_pool import KVPool
from .lora import lora_batch
from .model import CausalLM, ForwardBatch
from .request import Mode
from .sampler import PenaltyState, Sampler, SamplerVariant, SamplingTensors


def decode_inputs(batch: list, page_size: int):
    """Host arrays of a decode batch: (ids, positions, slots, seq_lens) int64 [B] and the page table
    int32 [B, max pages]; request i computes the token at position num_computed."""
    B = len(batch)
    vec = np.empty((4, B), dtype=np.int64)
    width = max((req.num_computed + page_size) // page_size for req, _ in batch)
    table = np.zeros((B, width), dtype=np.int32)
    for i, (req, _) in enumerate(batch):
        pos = req.num_computed
        n_pages = pos // page_size + 1
        pages = req.pages[:n_pages]
        table[i, :n_pages] = pages
        vec[0, i] = req.token_at(pos)
        vec[1, i] = pos
        vec[2, i] = pages[-1] * page_size + pos % page_size
        vec[3, i] = pos + 1
    return vec, table


def extend_inputs(batch: list, page_size: int):
    """Host arrays of any batch for the paged extend path: per token (ids, positions, slots) int64
    [3, T], per request (q_start, q_lens, seq_lens) int64 [3, B] and the page table int32."""
    B = len(batch)
    T = sum(n for _, n in batch)
    tok = np.empty((3, T), dtype=np.int64)
    req_vec = np.empty((3, B), dtype=np.int64)
    width = max((req.num_computed + n + page_size - 1) // page_size for req, n in batch)
    table = np.zeros((B, width), dtype=np.int32)
    row = 0
    for i, (req, n) in enumerate(batch):
        s = req.num_computed
        n_pages = (s + n + page_size - 1) // page_size
        pages = np.asarray(req.pages[:n_pages], dtype=np.int64)
        table[i, :n_pages] = pages
        pos = np.arange(s, s + n)
        tok[0, row:row + n] = req.all_ids[s:s + n]
        tok[1, row:row + n] = pos
        tok[2, row:row + n] = pages[pos // page_size] * page_size + pos % page_size
        req_vec[:, i] = (row, n, s + n)
        row += n
    return tok, req_vec, table


def logits_rows(starts: list, lens: list, all_rows: list | None) -> list:
    """Rows of the flat token batch whose logits are wanted: each request's last new token, or all
    of its new tokens where ``all_rows`` flags it (prompt logprobs)."""
    rows = []
    for i, (s, n) in enumerate(zip(starts, lens)):
        rows.extend(range(s, s + n) if all_rows and all_rows[i] else [s + n - 1])
    return rows


class ModelRunner:
    def __init__(self, model: CausalLM, pool: KVPool, device: str, cuda_graph_max_bs: int = 0,
                 penalty_rows: int = 128, mirror: ForwardMirror | None = None):
        """``mirror``: the worker's other ranks, which run every forward pass of this runner (rank 0 of
        several; None with one rank). With it, any CUDA graphs are captured here while every follower
        captures the same buckets in the same order (the collectives inside them match): build it
        once the followers build theirs (``tandem.engine.parallel``)."""
        self.model, self.pool, self.device = model, pool, device
        self.mirror = mirror
        self.page_size = pool.page_size
        self.paged = model.ops is not None and model.ops.name == "triton"  # the triton backend reads pages
        self.num_kv_heads = pool.num_kv_heads
        # Split-K of paged decode attention is sized to fill the device's multiprocessors.
        self.num_sms = (torch.cuda.get_device_properties(torch.device(device)).multi_processor_count
                        if str(device).startswith("cuda") else 1)
        self.penalties = PenaltyState(penalty_rows, model.cfg.vocab_size, device)
        self.sampler = Sampler(device, self.penalties)
        # This step's sampled tokens, still on the device (overlap scheduling): the next forward
        # pass reads row i where a request's next input id is the placeholder -(i + 1).
        self.future = torch.zeros(0, dtype=torch.long, device=device)
        self.graphs = None
        self._replayed_bs = None  # batch size of the last forward when it was a graph replay
        # Decode forward passes so far: replayed CUDA graphs and eager runs (benchmarks report both).
        self.graph_replays = 0
        self.eager_decodes = 0
        if cuda_graph_max_bs > 0 and self.paged and str(device).startswith("cuda"):
            from .cuda_graph_runner import CudaGraphRunner

            self.graphs = CudaGraphRunner(model, pool, self.sampler, cuda_graph_max_bs, self.num_sms)

    def will_replay(self, batch: list, record: bool | None = None) -> bool:
        """Whether ``forward(batch)`` (no prompt logprobs) replays a captured CUDA graph."""
        record = self._record_experts() if record is None else record
        return self.graphs is not None and self.graphs.can_run(batch, record)

    def _record_experts(self) -> bool:
        """Whether this forward pass adds to the MoE expert recorder's counters."""
        rec = self.model.expert_recorder
        return rec is not None and rec.recording

    def publish_future(self, token_ids: torch.Tensor) -> None:
        """Keep ``token_ids`` [B] (device) for the next forward pass (placeholders -1 .. -B)."""
        self.future_buffer(token_ids.numel()).copy_(token_ids)

    def future_buffer(self, n: int) -> torch.Tensor:
        """The first ``n`` placeholders' tokens, to be written by the caller (``publish_future``; a
        follower receives rank 0's)."""
        if self.future.numel() < n:
            self.future = torch.zeros(max(n, 2 * self.future.numel(), 64), dtype=torch.long, device=self.device)
        return self.future[:n]

    def _future_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.where(ids < 0, self.future[(-ids - 1).clamp_(min=0)], ids)

    def _input_ids(self, host_ids, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` (device) with placeholders resolved; ``host_ids``, the same ids on the host,
        tell without a device sync whether there is any."""
        return self._future_tokens(ids) if np.min(host_ids) < 0 else ids

    def _tensor(self, data, dtype=torch.long):
        return torch.tensor(data, dtype=dtype, device=self.device)

    def build(self, batch: list, all_rows: list | None = None) -> ForwardBatch:
        """batch: [(req, n_new)]; request i computes tokens all_ids[num_computed : num_computed + n_new].
        ``all_rows[i]``: logits for every new token of request i, not only its last (prompt logprobs)."""
        if not self.paged:
            fb = self._build_dense(batch, all_rows)
        elif all(n == 1 for _, n in batch):
            fb = self._build_paged_decode(batch)
        else:
            fb = self._build_paged_extend(batch, all_rows)
        fb.kv_scales = self.pool.kv_scales
        if self.model.lora is not None:
            fb.lora = lora_batch([req.lora_slot for req, _ in batch], [n for _, n in batch], self.device, self.paged)
        return fb

    def _build_paged_decode(self, batch: list) -> ForwardBatch:
        vec, table = decode_inputs(batch, self.page_size)
        vec_t = torch.from_numpy(vec).to(self.device)
        return ForwardBatch(
            input_ids=self._input_ids(vec[0], vec_t[0]), positions=vec_t[1], slot_mapping=vec_t[2], seq_lens=vec_t[3],
            page_table=torch.from_numpy(table).to(self.device), is_decode=True,
            num_splits=default_num_splits(len(batch), self.num_kv_heads, self.num_sms),
        )

    def _build_paged_extend(self, batch: list, all_rows: list | None = None) -> ForwardBatch:
        tok, req_vec, table = extend_inputs(batch, self.page_size)
        tok_t = torch.from_numpy(tok).to(self.device)
        req_t = torch.from_numpy(req_vec).to(self.device)
        rows = logits_rows(req_vec[0].tolist(), req_vec[1].tolist(), all_rows)
        return ForwardBatch(
            input_ids=self._input_ids(tok[0], tok_t[0]), positions=tok_t[1], slot_mapping=tok_t[2], page_table=torch.from_numpy(table).to(
                self.device), seq_lens=req_t[2], q_start=req_t[0], q_lens=req_t[1], max_q_len=int(req_vec[1].max()),
            logits_indices=self._tensor(rows),
        )

    def _build_dense(self, batch: list, all_rows: list | None = None) -> ForwardBatch:
        ps = self.page_size
        B = len(batch)
        is_decode = all(n == 1 for _, n in batch)
        ids, starts, lens, kv_lens, tables = [], [], [], [], []
        for req, n in batch:
            s = req.num_computed
            ids.extend(req.all_ids[s : s + n])
            starts.append(s)
            lens.append(n)
            kv_lens.append(s + n)
            tables.append(req.pages)
        max_pages = max((kv + ps - 1) // ps for kv in kv_lens)
        table = self._tensor([t[:max_pages] + [0] * (max_pages - min(len(t), max_pages)) for t in tables])
        kv_slots = (table[:, :, None] * ps + torch.arange(ps, device=self.device)).reshape(B, -1)
        Kmax = kv_slots.shape[1]
        starts_t, lens_t, kv_lens_t = self._tensor(starts), self._tensor(lens), self._tensor(kv_lens)
        q_batch = torch.repeat_interleave(torch.arange(B, device=self.device), lens_t)
        offsets = torch.cumsum(lens_t, 0) - lens_t
        q_local = torch.arange(q_batch.numel(), device=self.device) - offsets[q_batch]
        positions = starts_t[q_batch] + q_local
        slot_mapping = kv_slots[q_batch, positions]
        Qmax = max(lens)
        kv_idx = torch.arange(Kmax, device=self.device)
        logits_indices = None
        if not is_decode:
            starts_flat = [sum(lens[:i]) for i in range(B)]
            logits_indices = self._tensor(logits_rows(starts_flat, lens, all_rows))
        if is_decode:
            mask = (kv_idx[None, :] < kv_lens_t[:, None])[:, None, None, :]
        else:
            qpos = starts_t[:, None] + torch.arange(Qmax, device=self.device)[None, :]
            qpos = torch.where(torch.arange(Qmax, device=self.device)[None, :] < lens_t[:, None], qpos, 0)
            mask = (kv_idx[None, None, :] <= qpos[:, :, None])[:, None]
        return ForwardBatch(
            input_ids=self._input_ids(ids, self._tensor(ids)),
            positions=positions,
            slot_mapping=slot_mapping,
            q_batch_idx=q_batch,
            q_local_idx=q_local,
            kv_slots=kv_slots,
            attn_mask=mask,
            logits_indices=logits_indices,
            is_decode=is_decode,
        )

    def forward(self, batch: list, all_rows: list | None = None,
                layer_ready: Callable[[int], None] | None = None, eager: bool = False) -> torch.Tensor | tuple:
        """Logits [B, vocab] (float32) at the last new token of every request in the batch.

        ``eager``: run the model even where a captured CUDA graph could replay (a TP follower whose
        leader ran this pass eagerly: every rank must launch the same collectives).

        With ``all_rows`` (a flag per request; prompt logprobs): (logits [B, vocab], {i: [n_i,
        vocab] logits of every new token of request i} for the flagged requests).
        ``layer_ready(i)``, when given, runs before layer i (HiCache load-back on CUDA: the
        compute stream waits for layer i's pages only); it travels in the ForwardBatch.

        With a mirror the followers run the pass too (``_forward_mirrored``)."""
        if self.mirror is not None:
            return self._forward_mirrored(batch, all_rows, layer_ready)
        return self._forward(batch, all_rows, layer_ready, eager)

    def _forward_mirrored(self, batch: list, all_rows: list | None, layer_ready) -> torch.Tensor | tuple:
        """The pass sent to the followers, then run here from the same records as theirs; a
        collective that fails (a rank died or timed out) breaks the group (``mirror.fail``). A pass
        with prompt logprobs or expert recording runs eagerly on every rank."""
        mirror = self.mirror
        if not mirror.accepts_external_kv:
            for req, _ in batch:
                if req.mode == Mode.EXTERNAL:
                    raise RuntimeError(f"request {req.rid}: KV written from outside (PD decode) with several ranks "
                                       "needs a receiver on every rank (leader.attach(..., receives_kv=True)); only "
                                       "the leader's KV pool would hold it")
        records = ForwardPass.records_of(batch, self.page_size)
        items = ForwardPass(records).items()
        graph = not (all_rows is not None and any(all_rows)) and self.will_replay(items)
        fp = ForwardPass(records, graph)
        with mirror.mirroring(fp):
            try:
                if n := fp.future_count():
                    mirror.share_future(self.future[:n])
                return self._forward(items, all_rows, layer_ready, eager=not graph)
            except RuntimeError as exc:
                raise mirror.fail(f"a collective of the forward pass failed: {exc}") from exc

    def _forward(self, batch: list, all_rows: list | None, layer_ready, eager: bool) -> torch.Tensor | tuple:
        self._replayed_bs = None
        ready = layer_ready
        record = self._record_experts()
        if all_rows is not None and any(all_rows):
            fb = self.build(batch, all_rows)
            fb.layer_ready, fb.record_experts = ready, record
            with torch.profiler.record_function("tandem.model_forward"):
                out = self.model(fb, self.pool.k_buffers, self.pool.v_buffers)
            if fb.logits_indices is None:  # a batch of one-token rows: one row per request
                return out, {i: out[i:i + 1] for i, want in enumerate(all_rows) if want}
            last, extra, at = [], {}, 0
            for i, ((_, n), want) in enumerate(zip(batch, all_rows)):
                k = n if want else 1
                if want:
                    extra[i] = out[at:at + k]
                last.append(at + k - 1)
                at += k
            return out[last], extra
        # Named range so profiler traces show each forward pass of the model as one block.
        with torch.profiler.record_function("tandem.model_forward"):
            if self.will_replay(batch, record) and not eager:
                for i in range(self.pool.num_layers if ready is not None else 0):
                    ready(i)  # a captured graph cannot wait per layer
                vec, table = decode_inputs(batch, self.page_size)
                self._replayed_bs = len(batch)
                self.graph_replays += 1
                lora_slots = [req.lora_slot for req, _ in batch] if self.model.lora is not None else None
                return self.graphs.replay(vec, table, self._future_tokens if vec[0].min() < 0 else None, record,
                                          lora_slots)
            fb = self.build(batch)
            fb.layer_ready, fb.record_experts = ready, record
            self.eager_decodes += fb.is_decode
            return self.model(fb, self.pool.k_buffers, self.pool.v_buffers)

    def collective_status(self) -> torch.Tensor | None:
        """The device word a collective sets when it gave up on a peer (``ForwardMirror.collective_status``);
        None with one rank or where no collective can."""
        return None if self.mirror is None else self.mirror.collective_status()

    def collectives_failed(self) -> RuntimeError:
        """``collective_status`` was found set: the group is broken (``mirror.fail``); the error to raise."""
        return self.mirror.fail("a custom all-reduce gave up waiting for a peer rank (its barrier timed out): "
                                "that step's sums are incomplete, its tokens were dropped")

    def sample(self, logits: torch.Tensor, tensors: SamplingTensors | None, variant: SamplerVariant) -> torch.Tensor:
        """Token ids [B] (device) for every row of ``logits``; tensors on the host (None when all greedy)."""
        if self._replayed_bs == logits.shape[0] and self.graphs is not None:
            return self.graphs.sample(logits.shape[0], tensors, variant)
        if tensors is not None:
            tensors = SamplingTensors(**{k: (v.to(logits.device) if v is not None else None)
                                         for k, v in vars(tensors).items()})
        return self.sampler.sample(logits, tensors, variant)
