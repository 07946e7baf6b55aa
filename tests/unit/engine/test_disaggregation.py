"""Prefill-only on one engine, KV pages copied into another engine's pre-allocated pages,
decode there: the same tokens as generating locally."""
from __future__ import annotations

import pytest
import torch
from tandem.engine import OutOfPages, SamplingParams
from tandem.transfer import AuxRow, KvBuffers, build_layout, pack_aux_row, unpack_aux_row


def copy_pages(src, dst, src_pages, dst_pages):
    """What the transfer library does with NIXL: page i of every layer's K and V, plus nothing else."""
    s, d = torch.tensor(src_pages), torch.tensor(dst_pages)
    for layer in range(src.pool.num_layers):
        dst.pool.k_buffers[layer][d] = src.pool.k_buffers[layer][s]
        dst.pool.v_buffers[layer][d] = src.pool.v_buffers[layer][s]


def run_to_end(eng, rid):
    toks, reason = [], None
    while reason is None:
        for o in eng.step():
            if o.rid == rid:
                toks += o.new_token_ids
                if o.finished:
                    reason = o.finish_reason
    return toks, reason


@pytest.fixture(scope="module")
def prefill_engine(demo_models, make_llm):
    return make_llm(demo_models["dense"], chunked_prefill_size=8).engine


@pytest.mark.parametrize("sp", [
    SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True),
], ids=["greedy", "seeded"])
def test_prefill_only_then_external_decode_equals_local(prefill_engine, dense_llm, prompts, sp):
    pe, de = prefill_engine, dense_llm.engine
    for prompt in prompts[:4]:
        de.flush_cache()
        pe.flush_cache()  # no prefix hit: the prompt is computed in several chunks
        local = dense_llm.generate([prompt], sp)[0].token_ids
        de.flush_cache()

        alloc = de.allocate_external(prompt, sp)
        assert len(alloc.page_indices) == -(-alloc.num_tokens // de.page_size)
        chunks = []
        rid = pe.add_request(prompt, sp, mode="prefill_only")
        first, done = [], None
        while done is None:
            for o in pe.step():
                if o.rid != rid:
                    continue
                if o.pages_final:
                    # stream finished pages as chunks complete (position in the prompt -> decode page)
                    start = sum(len(c) for c in chunks)
                    chunks.append(o.pages_final)
                    copy_pages(pe, de, o.pages_final, alloc.page_indices[start:start + len(o.pages_final)])
                first += o.new_token_ids
                if o.finished:
                    done = o
        assert done.prefill_done and done.finish_reason == "prefill_done" and len(first) == 1
        res = done
        assert res.new_token_ids[0] == first[0] and res.num_prompt_tokens == alloc.num_tokens
        assert sum(chunks, []) == pe.requests[rid].pages[:len(alloc.page_indices)]
        if len(alloc.page_indices) > 1:
            assert len(chunks) > 1  # chunked_prefill_size=8 < prompt: pages arrive in several chunks
        # The aux row travels like the KV pages: written into decode's slot, read back there.
        slot = de.pool.aux[alloc.aux_slot]
        slot[:] = torch.frombuffer(bytearray(pack_aux_row(
            AuxRow.one(7, res.new_token_ids[0], float("nan"), res.cached_tokens), slot.numel())),
            dtype=torch.uint8)
        row = unpack_aux_row(slot)
        pe.release(rid)
        de.activate_external(alloc.rid, row.first_token_id, row.samples[0].logprob, row.cached_tokens)
        decoded, reason = run_to_end(de, alloc.rid)  # decode streams the first token too
        assert reason == "length"
        assert decoded[0] == first[0]
        assert decoded == local, prompt


def test_prefill_only_counts_requests_and_prefix_cache_hits(prefill_engine, prompts):
    """The prefill worker's sglang:cached_tokens_total comes from these counters."""
    pe = prefill_engine
    pe.flush_cache()
    sp = SamplingParams(max_tokens=1, temperature=0)
    prompt = prompts[0] * 4  # several pages: a repeat hits all but the last
    cached = []
    for _ in range(2):
        before = pe.stats()
        rid = pe.add_request(prompt, sp, mode="prefill_only")
        run_to_end(pe, rid)
        cached.append(pe.requests[rid].cached_tokens)
        pe.release(rid)
        after = pe.stats()
        assert after.num_requests_total == before.num_requests_total + 1
        assert after.cached_tokens_total == before.cached_tokens_total + cached[-1]
    assert cached[0] == 0 and cached[1] >= pe.page_size


def test_external_allocation_cancel_and_errors(dense_llm, prompts):
    de = dense_llm.engine
    start = de.num_available_pages
    alloc = de.allocate_external(prompts[0], SamplingParams(max_tokens=4))
    assert de.num_available_pages == start - len(alloc.page_indices)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        de.activate_external(alloc.rid, first_token_id=10**9)
    assert de.abort(alloc.rid)
    de.step()
    assert de.num_available_pages == start
    with pytest.raises(ValueError, match="no pre-allocated request"):
        de.activate_external(alloc.rid, first_token_id=1)
    with pytest.raises(ValueError, match="no held prefill-only request"):
        de.release("nope")


def test_external_allocation_out_of_pages(demo_models, make_llm, prompts):
    eng = make_llm(demo_models["dense"], max_total_tokens=64, page_size=16).engine
    a = eng.allocate_external(prompts[0] + prompts[3], SamplingParams(max_tokens=4))
    with pytest.raises(OutOfPages):
        eng.allocate_external(prompts[5] + prompts[7] + prompts[1], SamplingParams(max_tokens=4))
    eng.abort(a.rid)
    eng.step()


def test_pool_is_what_the_transfer_library_registers(dense_llm):
    # The engine's pool, as workers hand it to KV transfer: one contiguous K and V tensor per
    # layer, host aux rows of at least 64 bytes; the layout names exactly those addresses.
    pool = dense_llm.engine.pool
    lay = build_layout(KvBuffers(pool.k_buffers, pool.v_buffers, pool.aux))
    assert lay.k_base_addrs[0] == pool.k_buffers[0].data_ptr()
    assert lay.v_base_addrs[-1] == pool.v_buffers[-1].data_ptr()
    assert lay.bytes_per_page * lay.num_pages == pool.k_buffers[0].numel() * pool.k_buffers[0].element_size()
    assert lay.aux_slot_bytes >= 64 and lay.mem_type == "DRAM" and lay.aux_mem_type == "DRAM"


def _remote_turn(pe, de, ids, sp, reuse):
    """One PD request: decode allocates (reusing its cached prefix when ``reuse``), prefill
    computes the whole prompt and its pages after decode's cached prefix are copied; decode runs
    to the end. (tokens, the allocation, pages copied)."""
    alloc = de.allocate_external(ids, sp, reuse_prefix=reuse)
    skip = alloc.num_cached_tokens // de.page_size
    rid = pe.add_request(ids, sp, mode="prefill_only")
    seen, copied, done = 0, 0, None
    while done is None:
        for o in pe.step():
            if o.rid != rid:
                continue
            src = o.pages_final[max(0, skip - seen):]
            start = max(0, seen - skip)
            seen += len(o.pages_final)
            if src:
                copy_pages(pe, de, src, alloc.page_indices[start:start + len(src)])
                copied += len(src)
            if o.finished:
                done = o
    pe.release(rid)
    de.activate_external(alloc.rid, done.new_token_ids[0], None, done.cached_tokens)
    toks, _ = run_to_end(de, alloc.rid)
    return toks, alloc, copied


def test_decode_reuses_its_cached_prefix_and_receives_only_the_rest(prefill_engine, dense_llm, prompts):
    """Turn 2 of a chat: decode holds turn 1's prompt and output in its prefix cache, so prefill's
    pages for that prefix are not written; the tokens equal a local run; an aborted allocation
    frees only its own pages (the shared prefix stays cached)."""
    pe, de = prefill_engine, dense_llm.engine
    de.flush_cache()
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    tok = dense_llm.tokenizer
    turn1 = tok.encode(prompts[0] * 2, add_special_tokens=False).ids
    out1, alloc1, copied1 = _remote_turn(pe, de, turn1, sp, reuse=True)
    assert alloc1.num_cached_tokens == 0 and copied1 == len(alloc1.page_indices)
    turn2 = turn1 + out1 + tok.encode(" and then", add_special_tokens=False).ids
    local = dense_llm.generate([turn2], sp)[0].token_ids
    out2, alloc2, copied2 = _remote_turn(pe, de, turn2, sp, reuse=True)
    held = (len(turn1) + len(out1)) // de.page_size * de.page_size  # turn 1's full pages, cached on decode
    assert alloc2.num_cached_tokens >= min(held, len(turn2) - 1) - de.page_size > 0
    assert copied2 == len(alloc2.page_indices) == -(-len(turn2) // de.page_size) - alloc2.num_cached_tokens // de.page_size
    assert out2 == local
    # Without reuse every page is written.
    _, alloc3, copied3 = _remote_turn(pe, de, turn2, sp, reuse=False)
    assert alloc3.num_cached_tokens == 0 and copied3 == -(-len(turn2) // de.page_size)
    # An aborted allocation gives back only its own pages; the cached prefix stays matchable.
    before = de.num_available_pages
    a = de.allocate_external(turn2, sp, reuse_prefix=True)
    assert a.num_cached_tokens > 0  # its prefix pages are locked (not evictable) until it ends
    assert de.abort(a.rid)
    de.step()
    assert de.num_available_pages == before
    assert de.cached_prefix_tokens(turn2) >= a.num_cached_tokens


@pytest.mark.parametrize("sp", [
    SamplingParams(max_tokens=14, temperature=0, ignore_eos=True, frequency_penalty=0.7),
    SamplingParams(max_tokens=14, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True, repetition_penalty=1.3),
], ids=["greedy", "seeded"])
def test_a_request_moved_mid_decode_continues_with_the_same_tokens_and_nothing_recomputed(
        prefill_engine, dense_llm, prompts, sp):
    """Drain by moving KV, at the engine level: a decoding request is held on one engine
    (hold_for_move), its pages exported and copied into pages the other engine reserved for its
    prompt and output but the last token (allocate_external with output_ids), activated with its
    last token: it decodes on with exactly the tokens of an uninterrupted run, and the target's
    first step is a decode step of one token (nothing of the prompt is computed again)."""
    src, dst = prefill_engine, dense_llm.engine
    prompt = prompts[1]
    for e in (src, dst):
        e.flush_cache()
    want = dense_llm.generate([prompt], sp)[0].token_ids
    dst.flush_cache()
    rid = src.add_request(prompt, sp)
    before = []
    while len(before) < 5:
        before += [t for o in src.step() if o.rid == rid for t in o.new_token_ids]
    held = src.hold_for_move(rid)
    tail = [o for o in src.step() if o.rid == rid]  # a token sampled before the hold, then "moved"
    before += [t for o in tail for t in o.new_token_ids]
    assert tail[-1].finished and tail[-1].finish_reason == "moved"
    ids = src.tokenize(prompt)
    assert held.kv_token_ids == ids + before[:-1] and held.last_token_id == before[-1]
    assert src.stats().num_held_reqs == 1 and src.requests[rid].status == "held"

    alloc = dst.allocate_external(ids, sp, rid="moved", output_ids=before)
    assert alloc.num_tokens == len(ids) + len(before) - 1 and len(alloc.page_indices) == len(held.pages)
    out = src.export_held(rid)
    assert out.prefill_done and out.pages_final == held.pages and out.new_token_ids == [before[-1]]
    copy_pages(src, dst, out.pages_final, alloc.page_indices)
    src.release(rid)
    assert src.stats().num_used_pages == src.stats().num_cached_pages  # nothing held there any more
    with pytest.raises(ValueError, match="ends with token"):
        dst.activate_external("moved", (before[-1] + 1) % 100)
    dst.activate_external("moved", before[-1])
    first = dst.step()
    assert dst.stats().step_kind == "decode" and dst.stats().step_num_tokens == 1
    after = [t for o in first if o.rid == "moved" for t in o.new_token_ids]
    rest, reason = run_to_end(dst, "moved")
    assert reason == "length"
    assert before + after + rest == want


def test_hold_for_move_refuses_a_request_that_is_not_decoding(dense_llm, prompts):
    eng = dense_llm.engine
    rid = eng.add_request(prompts[0], SamplingParams(max_tokens=4, ignore_eos=True))
    with pytest.raises(ValueError, match="not a decoding request"):
        eng.hold_for_move(rid)  # waiting: never prefilled
    with pytest.raises(ValueError, match="no request held"):
        eng.export_held(rid)
    assert eng.hold_for_move("nobody") is None
    eng.abort(rid)
    eng.step()
