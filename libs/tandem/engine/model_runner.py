"""Turns a scheduled batch into tensors, runs the model over the paged KV pool."""
from __future__ import annotations

import torch

from .kv_pool import KVPool
from .model import CausalLM, ForwardBatch


class ModelRunner:
    def __init__(self, model: CausalLM, pool: KVPool, device: str):
        self.model, self.pool, self.device = model, pool, device
        self.page_size = pool.page_size

    def _tensor(self, data, dtype=torch.long):
        return torch.tensor(data, dtype=dtype, device=self.device)

    def build(self, batch: list) -> ForwardBatch:
        """batch: [(req, n_new)]; request i computes tokens all_ids[num_computed : num_computed + n_new]."""
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
        if is_decode:
            mask = (kv_idx[None, :] < kv_lens_t[:, None])[:, None, None, :]
        else:
            qpos = starts_t[:, None] + torch.arange(Qmax, device=self.device)[None, :]
            qpos = torch.where(torch.arange(Qmax, device=self.device)[None, :] < lens_t[:, None], qpos, 0)
            mask = (kv_idx[None, None, :] <= qpos[:, :, None])[:, None]
        return ForwardBatch(
            input_ids=self._tensor(ids),
            positions=positions,
            slot_mapping=slot_mapping,
            q_batch_idx=q_batch,
            q_local_idx=q_local,
            kv_slots=kv_slots,
            attn_mask=mask,
            logits_indices=offsets + lens_t - 1,
            is_decode=is_decode,
        )

    def forward(self, batch: list) -> torch.Tensor:
        """Logits [B, vocab] (float32) at the last new token of every request in the batch."""
        fb = self.build(batch)
        # Named range so profiler traces show each forward pass of the model as one block.
        with torch.profiler.record_function("tandem.model_forward"):
            return self.model(fb, self.pool.k_buffers, self.pool.v_buffers)
