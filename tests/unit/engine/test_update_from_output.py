"""Scheduler.update_from_output on its own (no model): what a step did comes back as
StepOutput fields - a stop, a length, an abort, a prefill-only request's pages made final by
each chunk and its prefill done - and the request's pages go back when it finishes."""
from __future__ import annotations

import torch
from tandem.engine.kv_pool import KVPool
from tandem.engine.outputs import SampledTokens
from tandem.engine.radix_cache import RadixCache
from tandem.engine.request import Mode, Request, Status
from tandem.engine.scheduler import ScheduledBatch, Scheduler
from tandem.engine.stats import StatsCollector
from tandem.engine.stopping import StopChecker
from tandem.sampling import SamplingParams

PAGE = 4
EOS = 25


class CharTokenizer:
    """Token i is the character chr(ord('a') + i); EOS (25, "z") is special."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join("" if (i == EOS and skip_special_tokens) else chr(ord("a") + i) for i in ids)


def make_scheduler(num_pages=32, chunk=8, context_length=64):
    pool = KVPool(1, num_pages, PAGE, 1, 2, torch.float32, "cpu", num_aux_slots=4)
    cache = RadixCache(PAGE, pool.free)
    stats = StatsCollector(num_total_pages=num_pages)
    stop = StopChecker({EOS}, context_length, CharTokenizer())
    return Scheduler(pool, cache, chunk, chunk, 8, stop, stats), stop, pool


def add(sch, checker, rid, prompt, mode=Mode.NORMAL, **sp):
    req = Request(rid=rid, prompt_ids=list(prompt), sampling=SamplingParams(**sp), mode=mode)
    checker.start(req)
    sch.add(req)
    return req


def sampled(pairs):
    """The host side of one launched sampling step: [(request, token)]; each request holds the
    placeholder of its token being sampled, as SampleLauncher.launch leaves it."""
    for i, (req, _) in enumerate(pairs):
        req.output_ids.append(-(i + 1))
        req.num_pending = 1
    return SampledTokens([r for r, _ in pairs], [t for _, t in pairs])


def prefill(sch, req):
    """Schedule and advance until req's prompt is computed; the outputs on the way."""
    outs = []
    while req.num_uncomputed:
        batch = sch.schedule()
        assert batch.kind == "prefill"
        outs += sch.update_from_output(batch, None)
    return outs


def test_decode_tokens_then_stop_token():
    sch, stop, pool = make_scheduler()
    req = add(sch, stop, "a", [5, 6, 7, 8, 9], max_tokens=10, stop_token_ids=[11])
    assert prefill(sch, req) == []  # a normal request reports no pages
    (out,) = sch.update_from_output(ScheduledBatch("idle"), sampled([(req, 4)]))
    assert (out.new_token_ids, out.finished, out.num_output_tokens) == ([4], False, 1)
    batch = sch.schedule()
    assert batch.kind == "decode" and batch.rows_to_sample() == []  # not advanced yet
    outs = sch.update_from_output(batch, sampled([(req, 11)]))
    assert [(o.new_token_ids, o.finished, o.finish_reason) for o in outs] == [([11], True, "stop")]
    assert req.status == Status.FINISHED and "a" not in sch.requests
    assert sch.available_pages == pool.num_pages  # pages back (cached prefix pages are evictable)


def test_length_and_eos_unless_ignored():
    sch, stop, _ = make_scheduler()
    a = add(sch, stop, "a", [5, 6, 7], max_tokens=2)
    b = add(sch, stop, "b", [5, 6, 8], max_tokens=5)
    c = add(sch, stop, "c", [5, 6, 9], max_tokens=5, ignore_eos=True)
    sch.update_from_output(sch.schedule(), None)
    outs = sch.update_from_output(ScheduledBatch("idle"), sampled([(a, 3), (b, EOS), (c, EOS)]))
    assert [(o.rid, o.finished, o.finish_reason) for o in outs] == [("a", False, None), ("b", True, "stop"),
                                                                   ("c", False, None)]
    sch.update_from_output(sch.schedule(), None)
    outs = sch.update_from_output(ScheduledBatch("idle"), sampled([(a, 4), (c, 4)]))
    assert [(o.rid, o.finished, o.finish_reason) for o in outs] == [("a", True, "length"), ("c", False, None)]
    sch.finish(c, "abort")


def feed(sch, req, tokens):
    """Accept tokens one step at a time (each decoded by the next step); the outputs, up to the finish."""
    outs = []
    for tok in tokens:
        outs += sch.update_from_output(ScheduledBatch("idle"), sampled([(req, tok)]))
        if req.status == Status.FINISHED:
            break
        sch.update_from_output(sch.schedule(), None)
    return outs


def test_stop_string_says_where_the_text_ends():
    sch, stop, _ = make_scheduler()
    req = add(sch, stop, "a", [5, 6], max_tokens=20, stop=["cd"])
    prefill(sch, req)
    outs = feed(sch, req, [0, 1, 2, 3, 4])  # "a" "b" "c" "d": the stop ends the request at "d"
    assert [o.finished for o in outs] == [False, False, False, True]
    assert (outs[-1].finish_reason, outs[-1].stop_text_pos, outs[-1].matched_stop) == ("stop", 2, "cd")
    assert outs[-1].new_token_ids == [3] and outs[-1].num_output_tokens == 4
    # Stops that end at the same place: the one that starts first.
    req = add(sch, stop, "b", [5, 6], max_tokens=20, stop=["cd", "xcd"])
    prefill(sch, req)
    outs = feed(sch, req, [0, 23, 2, 3])  # "a" "x" "c" "d"
    assert (outs[-1].finish_reason, outs[-1].stop_text_pos, outs[-1].matched_stop) == ("stop", 1, "xcd")
    # The text the stop strings are matched on follows skip_special_tokens (EOS "z" is special).
    for skip, finished in ((True, [False, False, True]), (False, [False, False, False])):
        req = add(sch, stop, f"s{skip}", [5, 6], max_tokens=20, stop=["cd"], ignore_eos=True,
                  skip_special_tokens=skip)
        prefill(sch, req)
        outs = feed(sch, req, [2, EOS, 3])  # "c" EOS "d": "cd" only when EOS leaves no text
        assert [o.finished for o in outs] == finished
        sch.finish(req, "abort")


def test_stop_strings_wait_for_min_tokens():
    sch, stop, _ = make_scheduler()
    req = add(sch, stop, "a", [5, 6], max_tokens=20, min_tokens=3, stop=["b"])
    prefill(sch, req)
    finished = []
    for tok in [1, 0, 1]:  # "b" before min_tokens does not stop; the one after does
        (out,) = sch.update_from_output(ScheduledBatch("idle"), sampled([(req, tok)]))
        finished.append((out.finished, out.stop_text_pos))
        if not out.finished:
            sch.update_from_output(sch.schedule(), None)
    assert finished == [(False, None), (False, None), (True, 2)]


def test_abort_and_stuck_are_outputs_and_a_token_of_a_finished_request_is_dropped():
    sch, stop, pool = make_scheduler()
    a = add(sch, stop, "a", [5, 6, 7], max_tokens=8)
    b = add(sch, stop, "b", [5, 6, 8], max_tokens=8)
    sch.update_from_output(sch.schedule(), None)
    tokens = sampled([(a, 3), (b, 4)])
    sch.finish(a, "abort")  # aborted while its token was being sampled: the placeholder goes
    assert a.output_ids == [] and a.num_pending == 0
    outs = sch.update_from_output(ScheduledBatch("stuck", stuck=b), tokens)
    assert [(o.rid, o.finished, o.finish_reason, o.new_token_ids) for o in outs] == [("b", True, "abort", [])]
    assert "KV pool too small" in outs[0].error
    assert not sch.requests and sch.available_pages == pool.num_pages


def test_prefill_only_reports_pages_per_chunk_then_prefill_done():
    sch, stop, pool = make_scheduler(chunk=6)
    prompt = list(range(3, 17))  # 14 tokens: pages of 4 -> 3 full pages and a partial one; chunks of 6
    req = add(sch, stop, "p", prompt, mode=Mode.PREFILL_ONLY, max_tokens=1)
    outs = prefill(sch, req)
    assert [o.num_computed_tokens for o in outs] == [6, 12, 14]
    assert [len(o.pages_final) for o in outs] == [1, 2, 1]  # 6 tokens: 1 full page; 12: 3; 14: the last, partial
    assert sum((o.pages_final for o in outs), []) == req.pages and len(req.pages) == 4
    assert not any(o.finished or o.new_token_ids for o in outs)
    (done,) = sch.update_from_output(ScheduledBatch("idle"), sampled([(req, 9)]))
    assert done.prefill_done and done.finished and done.new_token_ids == [9] and done.pages_final == []
    assert req.status == Status.HELD and req.rid in sch.requests and req not in sch.running
    sch.finish(req, "prefill_done")  # EngineCore.release
    assert not sch.requests and sch.available_pages == pool.num_pages
