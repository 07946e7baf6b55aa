"""How close an FP8 engine stays to its bf16 twin: teacher-forced top-1 agreement and KL, and
per-linear-layer output cosine similarity (used by gpu_engine_check.py and the CPU tests).

Teacher-forced: both engines read the same token sequences (text of the demo corpus), and at
every position the next-token distributions are compared: top-1 agreement (the argmax is the
same token) and KL(bf16 || fp8) in nats, averaged over positions.
"""
from __future__ import annotations

import torch


def corpus_sequences(tokenizer, count: int, length: int, seed: int = 0) -> list[list[int]]:
    """``count`` windows of ``length`` token ids from the demo corpus (deploy.demo_models), seeded."""
    from deploy.demo_models import read_corpus

    ids = tokenizer.encode(read_corpus(400_000), add_special_tokens=False).ids
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - length, (count,), generator=g).tolist()
    return [ids[s:s + length] for s in starts]


def position_logits(engine, sequences: list[list[int]]) -> torch.Tensor:
    """[sum of lengths, vocab] float32 logits of every position of every sequence, one forward pass
    of the whole batch (pages taken from the engine's pool and given back)."""
    from tandem.engine import SamplingParams
    from tandem.engine.request import Request

    reqs = []
    try:
        for i, ids in enumerate(sequences):
            r = Request(rid=f"acc{i}", prompt_ids=list(ids), sampling=SamplingParams())
            if not engine.scheduler.ensure_pages(r, len(ids)):
                raise RuntimeError("KV pool too small for the accuracy batch")
            reqs.append(r)
        with torch.inference_mode():
            _, rows = engine.runner.forward([(r, len(r.prompt_ids)) for r in reqs], all_rows=[True] * len(reqs))
        return torch.cat([rows[i].float().cpu() for i in range(len(reqs))])
    finally:
        for r in reqs:
            engine.pool.free(r.pages)


def teacher_forced(ref_engine, engine, sequences: list[list[int]]) -> dict:
    """{'top1': agreement in [0, 1], 'mean_kl': nats per position, 'positions': n}."""
    ref = position_logits(ref_engine, sequences)
    got = position_logits(engine, sequences)
    ref_lp, got_lp = ref.log_softmax(-1), got.log_softmax(-1)
    kl = (ref_lp.exp() * (ref_lp - got_lp)).sum(-1)
    return {"top1": (ref.argmax(-1) == got.argmax(-1)).float().mean().item(), "mean_kl": kl.mean().item(),
            "max_kl": kl.max().item(), "positions": ref.shape[0]}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two outputs, flattened, in float32."""
    a, b = a.float().reshape(-1), b.float().reshape(-1)
    return (a @ b / (a.norm() * b.norm()).clamp(min=1e-30)).item()
