"""Every Triton kernel of the triton backend against its torch reference, on CPU through the
Triton interpreter (float32: the kernels' dot products use IEEE precision, so the comparisons
are tight). Small shapes that still cover the edges: lengths that straddle pages, empty rows,
GQA ratios 1/4/7, split-K on and off, strided views into a merged QKV projection."""
from __future__ import annotations

import pytest
import torch
from tandem.engine import philox
from tandem.engine.kernels import (
    activation,
    decode_attention,
    default_num_splits,
    extend_attention,
    norm,
    rope_kv,
    sampling,
)


def _table(lens, page_size, g):
    width = max(-(-n // page_size) for n in lens) + 1
    npages = width * len(lens) + 3
    return torch.stack([torch.randperm(npages, generator=g)[:width] for _ in lens]).int(), npages


@pytest.mark.parametrize("page_size,heads,kv_heads,lens,splits", [
    (1, 4, 4, [5, 0, 17], 1),          # page size 1, MHA, an empty (padding) row
    (16, 8, 2, [33, 16, 1], 4),        # GQA 4, lengths on and across page boundaries
    (16, 7, 1, [130, 64], 8),          # GQA 7 (group not a power of two), split-K
    (128, 8, 2, [300, 129, 128], 2),   # big pages, one token into the next page
    (16, 4, 1, [1000], 16),            # long context, many splits
])
def test_paged_decode_attention_matches_reference(page_size, heads, kv_heads, lens, splits):
    g = torch.Generator().manual_seed(len(lens) + page_size)
    D = 32
    table, npages = _table(lens, page_size, g)
    kc = torch.randn(npages, page_size, kv_heads, D, generator=g)
    vc = torch.randn(npages, page_size, kv_heads, D, generator=g)
    q = torch.randn(len(lens), heads, D, generator=g)
    sl = torch.tensor(lens, dtype=torch.int32)
    out = decode_attention.paged_decode_attention(q, kc, vc, table, sl, D**-0.5, splits)
    ref = decode_attention.paged_decode_attention_ref(q, kc, vc, table, sl, D**-0.5)
    assert (out - ref).abs().max().item() < 1e-5
    assert torch.all(out[sl == 0] == 0)


def test_split_count_fills_the_device_and_stays_bounded():
    assert default_num_splits(1, 2, 132) == 16
    assert default_num_splits(64, 8, 132) == 1
    assert default_num_splits(4, 8, 132) == 16 and default_num_splits(16, 8, 132) == 4
    assert default_num_splits(1, 1, 1) == 2 and default_num_splits(8, 2, 1) == 1


@pytest.mark.parametrize("head_dim,rot_frac", [(64, 1.0), (64, 0.5), (48, 1.0)])
def test_rope_and_kv_write_match_reference(head_dim, rot_frac):
    g = torch.Generator().manual_seed(head_dim)
    T, H, KVH = 7, 4, 2
    rot = int(head_dim * rot_frac)
    qkv = torch.randn(T, (H + 2 * KVH) * head_dim, generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    cos, sin = rope_kv.rope_cos_sin_cache(inv, 100)
    pos = torch.randint(0, 100, (T,), generator=g)
    slots = torch.tensor([3, -1, 5, 7, 0, 9, 11])  # -1: a padding row writes nothing
    outs = []
    for fn in (rope_kv.rope_and_write_kv, rope_kv.rope_and_write_kv_ref):
        x = qkv.clone()
        kc = torch.full((4, 4, KVH, head_dim), 7.0)
        vc = torch.full_like(kc, 7.0)
        q = x[:, : H * head_dim].view(T, H, head_dim)
        k = x[:, H * head_dim:(H + KVH) * head_dim].view(T, KVH, head_dim)
        v = x[:, (H + KVH) * head_dim:].view(T, KVH, head_dim)
        fn(q, k, v, pos, cos, sin, slots, kc, vc)
        outs.append((x, kc, vc))
    (x, kc, vc), (x_ref, kc_ref, vc_ref) = outs
    assert torch.equal(x, x_ref) and torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    assert torch.all(kc.view(-1, KVH, head_dim)[1] == 7.0)  # slot 1 was never written
    if rot < head_dim:  # the dims past rot_dim pass through unrotated
        assert torch.equal(x[:, head_dim - 1 : H * head_dim : head_dim], qkv[:, head_dim - 1 : H * head_dim : head_dim])


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(with_residual):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 96, generator=g)[:, :80]  # strided rows
    w = torch.randn(80, generator=g)
    if with_residual:
        r1, r2 = torch.randn(6, 80, generator=g), None
        r2 = r1.clone()
        out, res = norm.rms_norm(x, w, 1e-6, r1)
        ref, res_ref = norm.rms_norm_ref(x, w, 1e-6, r2)
        assert res is r1 and torch.equal(res, res_ref)  # the sum is the new residual, in place
    else:
        out, ref = norm.rms_norm(x, w, 1e-6), norm.rms_norm_ref(x, w, 1e-6)
    assert (out - ref).abs().max().item() < 1e-5


def test_silu_and_mul_matches_reference():
    x = torch.randn(5, 2 * 1500, generator=torch.Generator().manual_seed(2))
    assert (activation.silu_and_mul(x) - activation.silu_and_mul_ref(x)).abs().max().item() < 1e-6


def test_philox_matches_tritons_own_generator():
    import triton
    import triton.language as tl

    @triton.jit
    def words(out, seed, c1, N: tl.constexpr):
        offs = tl.arange(0, N)
        z = tl.full([N], 0, tl.uint32)
        r0, r1, r2, r3 = tl.philox(seed, offs.to(tl.uint32), z + c1, z, z)
        for j, r in enumerate((r0, r1, r2, r3)):
            tl.store(out + offs * 4 + j, r.to(tl.int64))

    got = torch.zeros(64, dtype=torch.int64)
    words[(1,)](got, 12345678901, 77, N=16)
    seed = torch.tensor([12345678901])
    g = torch.arange(16)[None]
    ref = philox.philox4x32(g, torch.full_like(g, 77), torch.zeros_like(g), torch.zeros_like(g),
                            seed[:, None] & 0xFFFFFFFF, seed[:, None] >> 32)
    assert torch.equal(got, torch.stack(ref, -1).reshape(-1))


def test_gumbel_argmax_kernel_draws_the_reference_tokens():
    g = torch.Generator().manual_seed(3)
    V = 3000
    scores = torch.randn(6, V, generator=g) * 3
    scores[1, 100:] = float("-inf")  # a masked row can only draw from its first 100 entries
    seeds = torch.tensor([1, 2, 3, 2**40 + 5, 7, 7])
    pos = torch.tensor([0, 5, 2**33, 9, 9, 10])
    got = sampling.gumbel_argmax(scores, seeds, pos)
    assert torch.equal(got, sampling.gumbel_argmax_ref(scores, seeds, pos))
    assert got[1] < 100


@pytest.mark.parametrize("page_size,heads,kv_heads,q_lens,prefixes", [
    (16, 8, 2, [5, 1, 70, 0], [0, 33, 17, 4]),  # ragged: empty prefix, a decode row, a long chunk, nothing new
    (1, 7, 1, [3, 1], [10, 0]),                 # page size 1, GQA 7
    (4, 4, 4, [130], [7]),                      # MHA, more than two query blocks, prefix not a page multiple
    (128, 8, 2, [1, 1, 1], [200, 0, 127]),      # a batch of decodes through the extend kernel
])
def test_extend_attention_matches_reference(page_size, heads, kv_heads, q_lens, prefixes):
    g = torch.Generator().manual_seed(sum(q_lens))
    D = 32
    seq = [n + p for n, p in zip(q_lens, prefixes)]
    table, npages = _table([max(s, 1) for s in seq], page_size, g)
    kc = torch.randn(npages, page_size, kv_heads, D, generator=g)
    vc = torch.randn(npages, page_size, kv_heads, D, generator=g)
    q = torch.randn(sum(q_lens), heads, D, generator=g)
    q_start = torch.tensor([sum(q_lens[:i]) for i in range(len(q_lens))])
    args = (q, kc, vc, table, q_start, torch.tensor(q_lens), torch.tensor(seq))
    ref = extend_attention.extend_attention_ref(*args, D**-0.5)
    out = extend_attention.extend_attention(*args, max(q_lens), D**-0.5)
    assert (out - ref).abs().max().item() < 1e-5
    # The other tiles extend_attention_bench.py compares (taller query blocks, narrower key blocks).
    for config in (extend_attention.ExtendConfig(128, 32, 8, 3),):
        out = extend_attention.extend_attention(*args, max(q_lens), D**-0.5, config=config)
        assert (out - ref).abs().max().item() < 1e-5, config


