"""FP8 KV cache in the Triton kernels, on CPU through the Triton interpreter, against the torch
references (``kv_quant``): the FP8 conversion of the K/V write bit for bit, the rotary + K/V
write into an FP8 pool byte for byte, and paged decode / extend attention reading FP8 pools.

Interpreter gap (Triton 3.9): its float32 -> FP8 cast truncates bit fields without rounding
carry or saturation, so the write kernel converts with integer ops (``kernels/fp8.py``), the
same code on the GPU; the FP8 -> float32/bfloat16 reads are exact in the interpreter (checked
here for all 256 bytes). Its ``tl.dot`` on bfloat16 operands is wrong (off by 1e10 for a
plain 16x16 product, FP8 or not), so the kernels run here with float32 queries: FP8 keys and
values convert to float32 in registers, the same code path as to bfloat16 on the GPU. What the
interpreter cannot show (bf16 products, speed, the GPU's own conversion instructions) is covered by ``benchmarks/gpu_engine_check.py --kv-cache-dtype fp8_e4m3``
(accuracy on the GPU) and ``benchmarks/kv_cache_bench.py`` (memory and speed)."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from tandem.engine import kv_quant
from tandem.engine.kernels import decode_attention, extend_attention, rope_kv
from tandem.engine.kernels.fp8 import fp8_bits

FORMATS = [torch.float8_e4m3fn, torch.float8_e5m2]


@triton.jit
def _convert(X, Y, n, E4M3: tl.constexpr, B: tl.constexpr):
    i = tl.program_id(0) * B + tl.arange(0, B)
    m = i < n
    tl.store(Y + i, fp8_bits(tl.load(X + i, mask=m, other=0.0), E4M3), mask=m)


@triton.jit
def _read(X, Y32, Y16, n, B: tl.constexpr):
    i = tl.arange(0, B)
    m = i < n
    x = tl.load(X + i, mask=m, other=0.0)
    tl.store(Y32 + i, x.to(tl.float32), mask=m)
    tl.store(Y16 + i, x.to(tl.bfloat16), mask=m)


@pytest.mark.parametrize("dtype", FORMATS, ids=["e4m3", "e5m2"])
def test_fp8_conversion_is_torchs_round_to_nearest_even_saturated(dtype):
    top = torch.finfo(dtype).max
    every = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    every = every[torch.isfinite(every)].unique()  # every finite FP8 value, sorted
    mids = (every[1:] + every[:-1]) / 2  # ties: round half to even
    g = torch.Generator().manual_seed(0)
    x = torch.cat([every, mids, torch.nextafter(mids, torch.tensor(1e30)), torch.nextafter(mids, torch.tensor(-1e30)),
                   torch.randn(2000, generator=g) * top / 4, torch.randn(2000, generator=g) * 1e-3,
                   torch.tensor([top * 1.01, -top * 3, 1e30, -1e30, 0.0, -0.0, 1e-30, -1e-30])])
    got = torch.empty(x.numel(), dtype=torch.uint8)
    _convert[(triton.cdiv(x.numel(), 512),)](x, got, x.numel(), E4M3=dtype == torch.float8_e4m3fn, B=512)
    want = kv_quant.quantize(x, 1.0, dtype).view(torch.uint8)
    assert torch.equal(got, want)
    assert got[-8:-6].view(dtype).float().abs().tolist() == [top, top]  # saturated, never inf or NaN


@pytest.mark.parametrize("dtype", FORMATS, ids=["e4m3", "e5m2"])
def test_fp8_reads_are_exact_in_the_interpreter(dtype):
    x = torch.arange(256, dtype=torch.uint8).view(dtype)
    y32, y16 = torch.empty(256), torch.empty(256, dtype=torch.bfloat16)
    _read[(1,)](x, y32, y16, 256, B=256)
    finite = torch.isfinite(x.float())
    assert torch.equal(y32[finite], x.float()[finite]) and torch.equal(y16.float()[finite], x.float()[finite])


def _scales(k: float, v: float) -> torch.Tensor:
    return torch.tensor([k, v], dtype=torch.float32)


@pytest.mark.parametrize("dtype,head_dim,rot_frac", [
    (torch.float8_e4m3fn, 64, 1.0), (torch.float8_e5m2, 64, 0.5), (torch.float8_e4m3fn, 48, 1.0)])
def test_rope_and_fp8_kv_write_match_reference_bytes(dtype, head_dim, rot_frac):
    g = torch.Generator().manual_seed(head_dim)
    T, H, KVH = 7, 4, 2
    rot = int(head_dim * rot_frac)
    qkv = torch.randn(T, (H + 2 * KVH) * head_dim, generator=g) * 30
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    cos, sin = rope_kv.rope_cos_sin_cache(inv, 100)
    pos = torch.randint(0, 100, (T,), generator=g)
    slots = torch.tensor([3, -1, 5, 7, 0, 9, 11])  # -1: a padding row writes nothing
    scale = _scales(0.05 if dtype == torch.float8_e4m3fn else 1e-3, 0.37)  # some keys saturate
    outs = []
    for fn in (rope_kv.rope_and_write_kv, rope_kv.rope_and_write_kv_ref):
        x = qkv.clone()
        kc = torch.full((4, 4, KVH, head_dim), 7.0).to(dtype)
        vc = kc.clone()
        q = x[:, : H * head_dim].view(T, H, head_dim)
        k = x[:, H * head_dim:(H + KVH) * head_dim].view(T, KVH, head_dim)
        v = x[:, (H + KVH) * head_dim:].view(T, KVH, head_dim)
        fn(q, k, v, pos, cos, sin, slots, kc, vc, scale)
        outs.append((x, kc.view(torch.uint8), vc.view(torch.uint8)))
    (x, kc, vc), (x_ref, kc_ref, vc_ref) = outs
    assert torch.equal(x, x_ref) and torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    assert torch.all(kc.view(dtype).float().view(-1, KVH, head_dim)[1] == 7.0)  # slot 1 never written
    top = torch.finfo(dtype).max
    assert (kc.view(dtype).float().abs() == top).any()  # saturated values were stored at the max, not NaN


def test_fp8_pool_without_scales_is_refused():
    kc = torch.zeros(2, 4, 1, 8, dtype=torch.float8_e4m3fn)
    q = torch.zeros(1, 1, 8)
    with pytest.raises(ValueError, match="needs kv_scale"):
        decode_attention.paged_decode_attention(q, kc, kc, torch.zeros(1, 2, dtype=torch.int32),
                                                torch.tensor([3]), 1.0, 1)


def _table(lens, page_size, g):
    width = max(-(-n // page_size) for n in lens) + 1
    npages = width * len(lens) + 3
    return torch.stack([torch.randperm(npages, generator=g)[:width] for _ in lens]).int(), npages


def _fp8_pool(npages, page_size, kv_heads, D, dtype, g, scale):
    """Random K/V quantized into an FP8 pool with scale (k_scale, v_scale)."""
    k = torch.randn(npages, page_size, kv_heads, D, generator=g) * 3
    v = torch.randn(npages, page_size, kv_heads, D, generator=g) * 3
    return kv_quant.quantize(k, scale[0], dtype), kv_quant.quantize(v, scale[1], dtype)


@pytest.mark.parametrize("dtype,page_size,heads,kv_heads,lens,splits", [
    (torch.float8_e4m3fn, 16, 8, 2, [33, 0, 1], 4),    # GQA 4, a padding row, split-K
    (torch.float8_e5m2, 1, 4, 4, [5, 17], 1),          # page size 1, MHA, no split
    (torch.float8_e4m3fn, 16, 7, 1, [130, 64], 8),     # GQA 7, many splits
])
def test_paged_decode_attention_reads_fp8_pools(dtype, page_size, heads, kv_heads, lens, splits):
    g = torch.Generator().manual_seed(len(lens) + page_size + heads)
    D = 32
    table, npages = _table([max(n, 1) for n in lens], page_size, g)
    scale = _scales(0.02, 0.5)
    kc, vc = _fp8_pool(npages, page_size, kv_heads, D, dtype, g, scale)
    q = torch.randn(len(lens), heads, D, generator=g)
    sl = torch.tensor(lens, dtype=torch.int32)
    out = decode_attention.paged_decode_attention(q, kc, vc, table, sl, D**-0.5, splits, kv_scale=scale)
    ref = decode_attention.paged_decode_attention_ref(q, kc, vc, table, sl, D**-0.5, kv_scale=scale)
    assert (out - ref).abs().max().item() < 1e-5
    assert torch.all(out[sl == 0] == 0)
    # The scales are applied: the same pool read with scale 1 is another result.
    unscaled = decode_attention.paged_decode_attention(q, kc, vc, table, sl, D**-0.5, splits, kv_scale=_scales(1, 1))
    assert (unscaled - ref).abs().max().item() > 1e-2


@pytest.mark.parametrize("dtype,page_size,heads,kv_heads,q_lens,prefixes", [
    (torch.float8_e4m3fn, 16, 8, 2, [5, 1, 70, 0], [0, 33, 17, 4]),  # ragged, a decode row, nothing new
    (torch.float8_e5m2, 4, 4, 4, [66], [7]),                         # MHA, two query blocks, odd prefix
])
def test_extend_attention_reads_fp8_pools(dtype, page_size, heads, kv_heads, q_lens, prefixes):
    g = torch.Generator().manual_seed(sum(q_lens))
    D = 32
    seq = [n + p for n, p in zip(q_lens, prefixes)]
    table, npages = _table([max(s, 1) for s in seq], page_size, g)
    scale = _scales(0.03, 0.25)
    kc, vc = _fp8_pool(npages, page_size, kv_heads, D, dtype, g, scale)
    q = torch.randn(sum(q_lens), heads, D, generator=g)
    q_start = torch.tensor([sum(q_lens[:i]) for i in range(len(q_lens))])
    args = (q, kc, vc, table, q_start, torch.tensor(q_lens), torch.tensor(seq))
    out = extend_attention.extend_attention(*args, max(q_lens), D**-0.5, kv_scale=scale)
    ref = extend_attention.extend_attention_ref(*args, D**-0.5, kv_scale=scale)
    assert (out - ref).abs().max().item() < 1e-5
