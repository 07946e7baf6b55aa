"""The graph-safe sampler (torch path): greedy, temperature, top-k/top-p/min-p, masks, and the
counter-based noise that makes seeded draws independent of the batch around them."""
from __future__ import annotations

import torch
from tandem.engine.philox import philox_uniform
from tandem.engine.sampler import Sampler, SamplerVariant, SamplingTensors, allow_mask

V = 50


def tensors(B, **kw):
    base = dict(temperatures=torch.ones(B), top_ks=torch.full((B,), V), top_ps=torch.ones(B),
                min_ps=torch.zeros(B), seeds=torch.arange(B, dtype=torch.int64) + 11,
                positions=torch.zeros(B, dtype=torch.int64), greedy=torch.zeros(B, dtype=torch.bool), mask=None)
    base.update(kw)
    return SamplingTensors(**base)


def draw(logits, t, variant):
    return Sampler("cpu").sample(logits, t, variant)


def test_greedy_is_argmax_and_masks_apply():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0))
    assert torch.equal(draw(logits, None, SamplerVariant()), logits.argmax(-1))
    top = logits.argmax(-1)
    mask = torch.stack([allow_mask(V, [int(t)]) for t in top])
    masked = draw(logits, tensors(4, mask=mask), SamplerVariant(masked=True))
    assert torch.all(masked != top)
    assert torch.equal(masked, logits.scatter(1, top[:, None], float("-inf")).argmax(-1))


def test_allow_mask_bits():
    m = allow_mask(70, [0, 33, 69])
    bits = [(int(m[j // 32]) >> (j % 32)) & 1 for j in range(96)]
    assert bits[:70].count(0) == 3 and bits[0] == bits[33] == bits[69] == 0
    assert bits[70:] == [0] * 26  # past the vocabulary: never allowed


def test_restrictions_leave_only_the_allowed_tokens():
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(1)).repeat(64, 1)
    best = int(logits[0].argmax())
    positions = torch.arange(64, dtype=torch.int64)
    variant = SamplerVariant(random=True, top_k_top_p=True)
    for kw in (dict(top_ks=torch.ones(64, dtype=torch.long)), dict(top_ps=torch.full((64,), 1e-6)),
               dict(min_ps=torch.ones(64))):
        t = tensors(64, positions=positions, seeds=torch.full((64,), 5), **kw)
        assert set(draw(logits, t, variant).tolist()) == {best}
    top3 = set(logits[0].topk(3).indices.tolist())
    t = tensors(64, positions=positions, top_ks=torch.full((64,), 3), temperatures=torch.full((64,), 5.0))
    got = set(draw(logits, t, variant).tolist())
    assert got <= top3 and len(got) > 1


def test_draws_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05] + [0.0] * (V - 4))
    n = 4000
    logits = probs.clamp_min(1e-30).log().repeat(n, 1)
    t = tensors(n, positions=torch.arange(n, dtype=torch.int64), seeds=torch.full((n,), 123))
    counts = torch.bincount(draw(logits, t, SamplerVariant(random=True)), minlength=V).float() / n
    assert (counts[:4] - probs[:4]).abs().max() < 0.03  # 4 sigma at n=4000 is ~0.032 for p=0.5
    assert counts[4:].sum() == 0


def test_seeded_rows_do_not_depend_on_their_neighbours():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, V, generator=g)
    t = tensors(6, positions=torch.tensor([3, 9, 9, 4, 0, 7]), seeds=torch.tensor([1, 2, 2, 3, 4, 5]))
    full = draw(logits, t, SamplerVariant(random=True))
    alone = draw(logits[2:3], tensors(1, positions=torch.tensor([9]), seeds=torch.tensor([2])),
                 SamplerVariant(random=True))
    assert full[2] == alone[0]


def test_noise_depends_on_seed_position_and_token():
    u = philox_uniform(torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0]), 1000)
    assert u.min() > 0 and u.max() < 1
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert abs(u.mean().item() - 0.5) < 0.02
    assert torch.equal(u[0], philox_uniform(torch.tensor([1]), torch.tensor([0]), 1000)[0])


def test_greedy_rows_stay_greedy_in_a_random_batch():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(4))
    t = tensors(3, greedy=torch.tensor([True, False, True]), temperatures=torch.tensor([1.0, 2.0, 1.0]))
    out = draw(logits, t, SamplerVariant(random=True))
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


def penalty_state(rows=4, vocab=V):
    from tandem.engine.sampler import PenaltyState

    return PenaltyState(rows, vocab, "cpu")


def test_penalties_follow_the_openai_and_vllm_formulas():
    from tandem.engine.sampler import apply_penalties

    st = penalty_state()
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(5)) * 3
    a = st.alloc([1, 2], [3, 3, 4], presence=0.5, frequency=0.25, repetition=1.0, logit_bias={})
    b = st.alloc([7], [8], presence=0.0, frequency=0.0, repetition=2.0, logit_bias={9: -100.0, 10: 5.0})
    rows = torch.tensor([a, b, st.neutral_row])
    out = apply_penalties(logits, rows, st)
    want = logits.clone()
    want[0, 3] -= 0.5 + 2 * 0.25  # presence once + frequency per occurrence (outputs only)
    want[0, 4] -= 0.5 + 0.25
    for j in (7, 8):  # repetition: prompt and output tokens, divide positive / multiply negative
        want[1, j] = logits[1, j] / 2 if logits[1, j] > 0 else logits[1, j] * 2
    want[1, 9] -= 100.0
    want[1, 10] += 5.0
    assert torch.allclose(out, want)
    assert torch.equal(out[2], logits[2])  # the neutral row changes nothing


def test_penalty_state_counts_sampled_tokens_on_the_device_and_rows_are_reused():
    st = penalty_state(rows=2)
    a = st.alloc([], [], 0.0, 1.0, 1.0, {})
    st.record(torch.tensor([a, a]), torch.tensor([5, 6]))
    st.record(torch.tensor([a]), torch.tensor([5]))
    assert st.counts[a, 5] == 2 and st.counts[a, 6] == 1 and bool(st.seen[a, 6])
    b = st.alloc([], [], 0.0, 0.0, 1.0, {})
    assert st.alloc([], [], 0.0, 0.0, 1.0, {}) is None  # every row taken
    st.free(a)
    c = st.alloc([1], [], 0.0, 0.0, 1.0, {})
    assert c == a and st.counts[c].sum() == 0 and bool(st.seen[c, 1]) and not bool(st.seen[c, 5])
    assert b != c


def test_frequency_penalty_turns_a_repeating_greedy_row_away():
    st = penalty_state()
    logits = torch.zeros(1, V)
    logits[0, 3], logits[0, 4] = 2.0, 1.0
    sampler = Sampler("cpu", st)
    row = st.alloc([], [3, 3], presence=0.0, frequency=1.0, repetition=1.0, logit_bias={})
    t = tensors(1, greedy=torch.tensor([True]), mask=torch.full((1, 2), -1, dtype=torch.int32),
                penalty_rows=torch.tensor([row]))
    assert int(sampler.sample(logits, t, SamplerVariant(masked=True, penalties=True))[0]) == 4
    assert int(sampler.sample(logits, None, SamplerVariant())[0]) == 3
