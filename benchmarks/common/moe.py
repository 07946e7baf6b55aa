"""MoE measurements for the engine benchmarks: the roofline of the bytes a step must read, the
expert coverage it depends on, and EPLB under CUDA graphs (recorder on vs off, replays vs
eager steps, a plan applied between replays).

Roofline of a decode step (the issue's definition)::

    bytes = non-expert weights + sum over MoE layers of (distinct experts the batch hits) x (bytes of one expert)

Non-expert weights: every parameter the step reads except the routed experts: attention, norms,
routers, the shared expert (folded or not), lm_head (the embedding table is not: a step reads T
of its rows). Coverage (distinct experts per layer per decode step) is measured with the
expert-distribution recorder on the same prompts: the routing of a step does not depend on the
placement, so an EPLB engine's logical counts give the default engine's coverage. KV-cache
bytes are reported beside it (not part of the issue's formula).
"""
from __future__ import annotations

import gc
import statistics
import time

import torch
from tandem.engine import LLM, SamplingParams
from tandem.eplb.placement import ExpertLocation

EPLB_REDUNDANT = 4  # the issue's --ep-num-redundant-experts for the EPLB gate


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def weights_read(model) -> dict:
    """Bytes a step reads besides the routed experts, and one routed expert's bytes (per MoE layer)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = model.embed_tokens.weight
    if model.lm_head is not None:  # untied: the table itself is not read, T rows of it are
        total -= embed.numel() * embed.element_size()
    layers = model.moe_layers()
    expert = 0
    for m in layers:
        w13, w2 = m.routed_weights()
        routed = w13.numel() * w13.element_size() + w2.numel() * w2.element_size()
        total -= routed
        expert = routed // m.num_local
    return {"non_expert_bytes": total, "expert_bytes": expert, "moe_layers": len(layers),
            "num_experts": layers[0].num_experts if layers else 0}


def kv_bytes_read(engine, batch: int, context: int) -> int:
    """K and V of every layer a decode step of ``batch`` requests at ``context`` tokens reads."""
    mc = engine.model_config
    per_token = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * engine.pool.k_buffers[0].element_size()
    return batch * context * per_token


def step_bytes(weights: dict, coverage: float) -> int:
    """The roofline bytes for ``coverage`` distinct experts per MoE layer (mean over layers)."""
    return int(weights["non_expert_bytes"] + weights["moe_layers"] * coverage * weights["expert_bytes"])


def decode_run(engine, prompts: list, out_len: int, device: str, between=None, synced: bool = True) -> dict:
    """Run ``prompts`` to completion one engine step at a time. Folds the recorder after every step,
    as the worker does; ``between(i)`` runs after decode step ``i``.

    ``synced``: the device is synchronised around each step, so ``step_ms`` holds each decode step's
    wall clock with its host work *added* (no overlap); else steps run as served (overlap scheduling:
    the host prepares step N+1 while the device runs step N) and ``pipelined_ms`` is the decode
    phase's wall clock (one sync at its end) per decode step: the inter-token latency."""
    sp = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    engine.flush_cache()
    runner = engine.runner
    replays0, eager0 = runner.graph_replays, runner.eager_decodes
    rids = [engine.add_request(p, sp) for p in prompts]
    toks = {r: [] for r in rids}
    times, passes, decode_steps, first = [], [], 0, None
    while engine.has_work():
        if synced:
            sync(device)
        t0 = time.perf_counter()
        outs = engine.step()
        if synced:
            sync(device)
        dt = time.perf_counter() - t0
        decode = engine.stats().step_kind == "decode"
        if engine.eplb is not None:
            engine.eplb.end_pass()
            rec = engine.eplb.recorder
            if decode and rec is not None and rec.recording:
                passes.append(rec.last_pass_counts())
        for o in outs:
            toks[o.rid] += o.new_token_ids
        if decode:
            first = t0 if first is None else first
            times.append(dt)
            decode_steps += 1
            if between is not None:
                between(decode_steps)
    sync(device)
    end = time.perf_counter()
    return {"step_ms": [t * 1e3 for t in times], "tokens": [toks[r] for r in rids], "passes": passes,
            "pipelined_ms": (end - first) * 1e3 / max(1, decode_steps) if first is not None else None,
            "graph_replays": runner.graph_replays - replays0, "eager_decodes": runner.eager_decodes - eager0}


def pipelined_step_ms(engine, prompts: list, out_len: int, device: str, runs: int = 2) -> float:
    """Decode step as served (overlap scheduling, no per-step sync): median over ``runs`` after a warm-up."""
    decode_run(engine, prompts, out_len, device, synced=False)
    return statistics.median(decode_run(engine, prompts, out_len, device, synced=False)["pipelined_ms"]
                             for _ in range(runs))


def coverage(passes: list) -> dict:
    """Distinct experts hit per MoE layer per decode pass: mean over passes, per layer and overall."""
    if not passes:
        return {"mean": None, "per_layer": []}
    hit = (torch.stack(passes) > 0).sum(-1).double()  # [passes, layers]
    per_layer = hit.mean(0).tolist()
    return {"mean": sum(per_layer) / len(per_layer), "per_layer": [round(c, 2) for c in per_layer],
            "passes": len(passes)}


def rebalance(engine) -> int:
    """Apply a plan balanced from the recorded load now (between two steps); the copies made."""
    loc = engine.eplb.location
    new = ExpertLocation.from_logical_count(engine.eplb.recorder.logical_load(), loc.num_physical, 1,
                                            engine.model_config.n_group or 1)
    engine.eplb.submit(new)
    return engine.eplb.apply_pending()


def eplb_section(model: str, device: str, dtype: str, load_format: str, prompts: dict, out_len: int,
                 weights: dict, bandwidth: float | None) -> dict:
    """One engine with ``--enable-eplb --ep-num-redundant-experts 4`` (recorder on from the start):
    per batch size, alternating runs with the recorder on and off (two each), replays vs eager
    decode steps, a plan balanced from the recorded load applied mid-run between two replays (no
    re-capture), and the expert coverage of the decode passes."""
    llm = LLM(model, device=device, dtype=dtype, load_format=load_format, enable_eplb=True,
              ep_num_redundant_experts=EPLB_REDUNDANT)
    eng = llm.engine
    rec = eng.eplb.recorder
    graphs = eng.runner.graphs
    captured = len(graphs.graphs) if graphs is not None else 0
    out = {"ep_num_redundant_experts": EPLB_REDUNDANT, "cuda_graph_max_bs": eng.cuda_graph_max_bs,
           "graph_variants": list(graphs.record_variants) if graphs is not None else [], "batches": {}}
    for b, ps in prompts.items():
        decode_run(eng, ps, out_len, device)  # warm-up (and every kernel compiled) for this batch size
        runs = {"on": [], "off": []}
        for mode in ("on", "off", "on", "off"):  # alternating, as served (overlap scheduling)
            (rec.start if mode == "on" else rec.stop)()
            runs[mode].append(decode_run(eng, ps, out_len, device, synced=False))
        rec.start()
        plan = {}

        with_plan = decode_run(eng, ps, out_len, device, between=lambda step, eng=eng, plan=plan: (
            step == out_len // 2 and plan.update(at_decode_step=step, copies=rebalance(eng))))
        on = [r["pipelined_ms"] for r in runs["on"]]
        off = [r["pipelined_ms"] for r in runs["off"]]
        every = runs["on"] + runs["off"] + [with_plan]
        cov = coverage([p for r in runs["on"] for p in r["passes"]])
        row = {
            "decode_step_ms_recorder_on": statistics.median(on), "decode_step_ms_recorder_off": statistics.median(off),
            "graph_replays": sum(r["graph_replays"] for r in every),
            "eager_decode_steps": sum(r["eager_decodes"] for r in every),
            "plan": plan, "graphs_captured_before": captured,
            "graphs_captured_after": len(graphs.graphs) if graphs is not None else 0,
            "tokens_equal_after_plan": with_plan["tokens"] == runs["off"][0]["tokens"],
            "expert_coverage": cov,
        }
        row["recorder_on_over_off"] = row["decode_step_ms_recorder_on"] / row["decode_step_ms_recorder_off"]
        if cov["mean"] is not None:
            row["roofline_bytes"] = step_bytes(weights, cov["mean"])
            row["kv_bytes"] = kv_bytes_read(eng, b, len(ps[0]) + out_len // 2)
            if bandwidth:
                row["roofline_ms"] = row["roofline_bytes"] / bandwidth * 1e3
        out["batches"][b] = row
        print(f"batch {b:3d} EPLB: step recorder on {row['decode_step_ms_recorder_on']:.3f} ms / off "
              f"{row['decode_step_ms_recorder_off']:.3f} ms ({row['recorder_on_over_off']:.3f}x); "
              f"{row['graph_replays']} replays, {row['eager_decode_steps']} eager decode steps; plan of "
              f"{plan.get('copies')} copies mid-run, tokens equal: {row['tokens_equal_after_plan']}; coverage "
              f"{cov['mean']:.1f} of {weights['num_experts']} experts/layer", flush=True)
    del llm, eng, rec, graphs
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def moe_gates(result: dict) -> list[dict]:
    """The issue's MoE targets, from a result holding ``rows``, ``decode_step_ms`` and ``moe``."""
    moe = result.get("moe")
    if not moe:
        return []
    gates = []
    rows = {r["batch"]: r for r in result["rows"]}
    steps = result.get("decode_step_ms_pipelined", {})  # as served: overlap scheduling, no per-step sync
    eplb = moe["eplb"]["batches"]
    for b, limit in ((1, 2.0), (64, 1.5)):
        roof = eplb.get(b, {}).get("roofline_ms")
        if roof is not None and b in steps:
            gates.append({"target": f"batch {b}: decode step (as served) <= {limit} x roofline of the bytes "
                                    f"read ({limit * roof:.3f} ms)", "value": round(steps[b], 3),
                          "met": steps[b] <= limit * roof})
    if 1 in rows and "hf_tok_s" in rows[1]:
        gates.append({"target": "batch 1: tok/s >= 3x transformers", "value": round(rows[1]["ratio"], 2),
                      "met": rows[1]["ratio"] >= 3.0})
    for b, row in eplb.items():
        gates.append({"target": f"EPLB batch {b}: every decode step a graph replay",
                      "value": f"{row['graph_replays']} replays / {row['eager_decode_steps']} eager",
                      "met": row["eager_decode_steps"] == 0 and row["graph_replays"] > 0})
        gates.append({"target": f"EPLB batch {b}: step with recorder on <= 1.05x off",
                      "value": round(row["recorder_on_over_off"], 3), "met": row["recorder_on_over_off"] <= 1.05})
        gates.append({"target": f"EPLB batch {b}: plan applied between replays, no re-capture, greedy tokens "
                                "unchanged (bf16: a replica's rows compute bit for bit as the expert's)",
                      "value": f"{row['plan'].get('copies')} copies, graphs {row['graphs_captured_before']} -> "
                               f"{row['graphs_captured_after']}, tokens equal: {row['tokens_equal_after_plan']}",
                      "met": row["graphs_captured_before"] == row["graphs_captured_after"] > 0
                      and row["tokens_equal_after_plan"] and row["plan"].get("copies", 0) > 0})
    return gates


def moe_markdown(result: dict) -> list[str]:
    """Lines for the results' markdown: the roofline with its coverage, steps, EPLB."""
    moe = result.get("moe")
    if not moe:
        return []
    w = moe["weights"]
    lines = ["", f"MoE roofline: {moe['formula']}; non-expert {w['non_expert_bytes'] / 1e9:.3f} GB, one expert "
                 f"{w['expert_bytes'] / 1e6:.2f} MB, {w['moe_layers']} MoE layers of {w['num_experts']} experts. "
                 "Decode step as served = the decode phase's wall clock per step with overlap scheduling (one "
                 "sync at the end); synchronised = host work and device work of each step added.", "",
             "| batch | coverage (experts/layer) | roofline | step as served | x roofline | step synchronised | "
             "KV bytes | EPLB recorder on / off | replays / eager |", "|---|---|---|---|---|---|---|---|---|"]
    served, synced = result.get("decode_step_ms_pipelined", {}), result.get("decode_step_ms", {})
    for b, row in moe["eplb"]["batches"].items():
        roof = row.get("roofline_ms")
        step = served.get(b)
        ratio = f"{step / roof:.2f}x" if roof and step else "n/a"
        lines.append(f"| {b} | {row['expert_coverage']['mean']:.1f} | {roof or float('nan'):.3f} ms | "
                     f"{step or float('nan'):.3f} ms | {ratio} | {synced.get(b, float('nan')):.3f} ms | "
                     f"{row.get('kv_bytes', 0) / 1e9:.2f} GB | {row['decode_step_ms_recorder_on']:.3f} / "
                     f"{row['decode_step_ms_recorder_off']:.3f} ms ({row['recorder_on_over_off']:.3f}x) | "
                     f"{row['graph_replays']} / {row['eager_decode_steps']} |")
    return lines
