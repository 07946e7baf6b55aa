"""--enable-deterministic-inference, kernel by kernel, on CPU through the Triton interpreter: a
given row comes out bit-identical alone and inside batches of 3, 13 and 64 (at another position,
among other rows), and the batch-invariant GEMM matches its definition.

The kernels without ``tl.dot`` (RMSNorm, SiLU-and-mul, rotary + K/V write) are checked in bf16 too.
The GEMM, attention and MoE kernels in float32 only: the interpreter's bf16 ``tl.dot`` is broken (a
16x128 @ 128x64 bf16 product came out 1.6e11 off its float32 value, measured with triton 3.9), so
their bf16 invariance is the GPU check's (``benchmarks/gpu_engine_check.py --only deterministic``).
Negative controls show the checks can fail: a split-K chosen by the batch, and the default ops'
split decode kernel."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tandem.engine import moe_math
from tandem.engine.batch_invariant import ROUTE_BLOCK_T, DeterministicTritonOps, moe_config
from tandem.engine.kernels import activation, fused_moe, invariant_gemm, moe_routing, norm, rope_kv
from tandem.engine.kernels.invariant_gemm import InvariantGemmConfig, gemm_config, matmul, matmul_ref
from tandem.engine.model import ForwardBatch
from tandem.engine.moe_math import RoutingSpec
from tandem.engine.ops import TritonOps
from tandem.engine.sampler import Sampler, SamplerVariant, SamplingTensors

BATCHES = (1, 3, 13, 64)


AT = {1: 0, 3: 1, 13: 6, 64: 37}  # the target row's index in each batch


def placements(n_rows: int):
    """(batch size, the target row's index): the target moves around, last in the largest batch."""
    return [(b, AT[b]) for b in BATCHES] + [(n_rows, n_rows - 1)]


def batch_with(target: torch.Tensor, others: torch.Tensor, b: int, at: int) -> torch.Tensor:
    """``b`` rows: ``others[:b - 1]`` with ``target`` inserted at row ``at``."""
    rows = list(others[:b - 1])
    rows.insert(at, target)
    return torch.stack(rows)


def assert_row_invariant(fn, target: torch.Tensor, others: torch.Tensor):
    alone = fn(target[None])[0]
    for b, at in placements(others.shape[0] + 1):
        assert torch.equal(fn(batch_with(target, others, b, at))[at], alone), f"batch {b}, row {at}"
    return alone


# ---- GEMM ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("N,K,bias,config", [
    (300, 200, True, None),                                   # the interpreter's configuration
    (96, 640, False, InvariantGemmConfig(16, 32, 64, 4, 4, 1)),  # split-K 4, K not a multiple of the slices
    (130, 96, True, InvariantGemmConfig(32, 64, 32, 2, 4, 1)),   # split-K 2 with a bias, ragged column tiles
])
def test_gemm_row_is_bit_identical_in_any_batch(N, K, bias, config):
    g = torch.Generator().manual_seed(N + K)
    w = torch.randn(N, K, generator=g) * 0.1
    b = torch.randn(N, generator=g) if bias else None
    x = torch.randn(64, K, generator=g)
    alone = assert_row_invariant(lambda rows: matmul(rows, w, b, config=config), x[0], x[1:])
    assert (alone - matmul_ref(x[:1], w, b)[0]).abs().max().item() < 1e-5
    full = matmul(x, w, b, config=config)
    assert (full - matmul_ref(x, w, b)).abs().max().item() < 1e-5


def test_the_invariance_check_catches_a_split_k_chosen_by_the_batch():
    """Negative control: a GEMM that picks split-K by the row count (as cuBLAS does) fails the check that
    the invariant GEMM passes; float32 sums in another order differ in their last bits."""
    g = torch.Generator().manual_seed(5)
    w, x = torch.randn(64, 1024, generator=g), torch.randn(64, 1024, generator=g)

    def by_batch(rows):  # few rows: split K in 8 to fill the device; many rows: no split
        split = 8 if rows.shape[0] < 8 else 1
        return matmul(rows, w, config=InvariantGemmConfig(16, 64, 64, split, 4, 1))

    with pytest.raises(AssertionError, match="batch"):
        assert_row_invariant(by_batch, x[0], x[1:])


def test_gemm_router_case_float32_weight_bf16_activations():
    """The MoE router: bf16 activations times a float32 weight, float32 out (``F.linear(x.float(), w)``)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(12, 64, generator=g)
    x = torch.randn(64, 64, generator=g).bfloat16()
    alone = assert_row_invariant(lambda rows: matmul(rows, w, out_dtype=torch.float32), x[0], x[1:])
    assert alone.dtype == torch.float32
    assert (alone - torch.nn.functional.linear(x[:1].float(), w)[0]).abs().max().item() < 1e-5


def test_gemm_configuration_depends_on_the_weight_not_the_batch():
    """No row count in the signature: the tiles and split-K of every shape, for an H100's 132 SMs."""
    h100 = {(N, K): gemm_config(N, K, torch.bfloat16, 132) for N, K in
            ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096))}
    assert all(c.block_m == 64 for c in h100.values())
    # every weight gets at least ~one program per SM at decode sizes (one row tile)
    assert all(-(-N // c.block_n) * c.split_k >= 128 for (N, K), c in h100.items())
    assert h100[(128256, 4096)].split_k == 1 and h100[(4096, 14336)].split_k > 1
    assert invariant_gemm.config_for(torch.zeros(3, 64), torch.zeros(8, 64)) == gemm_config(8, 64, torch.float32, 1,
                                                                                             True)


# ---- attention -------------------------------------------------------------------------------------
H, KVH, D, PAGE = 4, 2, 16, 4
TARGET_LEN = 70  # context of the target request (keys in two BLOCK_N tiles of the extend kernel)


class _Pool:
    """A paged KV pool, the target request's raw q/k/v per position, and random other requests."""

    def __init__(self, g):
        self.g = g
        self.pages = 4096
        self.k = torch.zeros(self.pages, PAGE, KVH, D)
        self.v = torch.zeros(self.pages, PAGE, KVH, D)
        self.free = list(range(self.pages))
        self.q_raw = torch.randn(TARGET_LEN, H, D, generator=g)
        self.k_raw = torch.randn(TARGET_LEN, KVH, D, generator=g)
        self.v_raw = torch.randn(TARGET_LEN, KVH, D, generator=g)
        self.target = self.alloc(TARGET_LEN)

    def alloc(self, n):
        pages = [self.free.pop(int(torch.randint(len(self.free), (1,), generator=self.g))) for _ in range(-(-n // PAGE))]
        return pages

    def slots(self, pages, positions):
        return torch.tensor([pages[p // PAGE] * PAGE + p % PAGE for p in positions])


def _ops():
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    return DeterministicTritonOps(SimpleNamespace(inv_freq=inv), 256)


def _table(page_lists):
    width = max(len(p) for p in page_lists)
    return torch.tensor([p + [0] * (width - len(p)) for p in page_lists], dtype=torch.int32)


def _target_row(ops, pool, requests, is_decode, num_splits=4):
    """Run one forward batch's attention: ``requests`` = [(pages, context length, new tokens, q, k, v) | None
    (a graph's padding row)]; returns the output rows of the first request whose q is the target's."""
    qs, ks, vs, pos, slots, tables, seq, q_lens = [], [], [], [], [], [], [], []
    for r in requests:
        if r is None:  # padding row of a CUDA-graph bucket: context 0, writes nothing
            qs.append(torch.zeros(1, H, D)), ks.append(torch.zeros(1, KVH, D)), vs.append(torch.zeros(1, KVH, D))
            pos.append(torch.zeros(1, dtype=torch.long)), slots.append(torch.tensor([-1]))
            tables.append([0]), seq.append(0), q_lens.append(1)
            continue
        pages, L, n, q, k, v = r
        qs.append(q), ks.append(k), vs.append(v)
        pos.append(torch.arange(L - n, L)), slots.append(pool.slots(pages, range(L - n, L)))
        tables.append(pages), seq.append(L), q_lens.append(n)
    q_all = torch.cat(qs).clone()
    q_lens_t = torch.tensor(q_lens)
    fb = ForwardBatch(input_ids=torch.zeros(len(q_all), dtype=torch.long), positions=torch.cat(pos),
                      slot_mapping=torch.cat(slots), page_table=_table(tables), seq_lens=torch.tensor(seq),
                      is_decode=is_decode, num_splits=num_splits,
                      q_start=None if is_decode else torch.cumsum(q_lens_t, 0) - q_lens_t,
                      q_lens=None if is_decode else q_lens_t, max_q_len=max(q_lens))
    out = ops.attention(q_all, torch.cat(ks), torch.cat(vs), fb.positions, fb, pool.k, pool.v, D**-0.5)
    return out.view(-1, H, D)


def _other(pool, g, L, n):
    pages = pool.alloc(L)
    return (pages, L, n, torch.randn(n, H, D, generator=g), torch.randn(n, KVH, D, generator=g),
            torch.randn(n, KVH, D, generator=g))


def test_attention_row_is_the_same_in_decode_mixed_and_prefill_batches():
    """The target's last token (position 69) attended: as its prompt's last row (one chunk; a later
    chunk after a prefix hit; a one-token extend after a full hit), as a decode row alone and in
    decode batches of 3, 13 and 64 (with graph padding rows), and inside a prefill chunk's batch."""
    g = torch.Generator().manual_seed(0)
    pool = _Pool(g)
    ops = _ops()
    t = pool.target

    def target(n):  # the target's last n positions, computed anew
        return (t, TARGET_LEN, n, pool.q_raw[-n:], pool.k_raw[-n:], pool.v_raw[-n:])

    got = {"prefill": _target_row(ops, pool, [target(TARGET_LEN)], False)[-1]}
    got["chunk after a prefix hit"] = _target_row(ops, pool, [_other(pool, g, 30, 9), target(13)], False)[9 + 12]
    got["one-token extend after a full hit"] = _target_row(ops, pool, [target(1), _other(pool, g, 40, 5)], False)[0]
    for b in BATCHES:
        others = [_other(pool, g, int(torch.randint(1, 150, (1,), generator=g)), 1) for _ in range(b - 1)]
        if b > 3:
            others[-2:] = [None, None]  # padding rows of the graph bucket
        at = AT[b]
        batch = others[:at] + [target(1)] + others[at:]
        got[f"decode batch {b}"] = _target_row(ops, pool, batch, True)[at]
    prefills = [_other(pool, g, 90, 40), _other(pool, g, 20, 20)]
    got["decode row in a prefill chunk's batch"] = _target_row(ops, pool, prefills[:1] + [target(1)] + prefills[1:],
                                                               False)[40]
    want = got["prefill"]
    assert all(torch.equal(v, want) for v in got.values()), [k for k, v in got.items() if not torch.equal(v, want)]
    # Negative control: the default ops compute a decode row with the split decode kernel, whose sums
    # differ from the extend kernel's (the prompt's row) and change with the split the batch size picks.
    default = TritonOps(SimpleNamespace(inv_freq=1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))), 256)
    rows = {}
    for splits in (1, 4):
        rows[splits] = _target_row(default, pool, [target(1)], True, num_splits=splits)[0]
    assert not (torch.equal(rows[1], want) and torch.equal(rows[4], want) and torch.equal(rows[1], rows[4]))


# ---- per-row kernels -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_silu_and_rotary_rows_are_bit_identical_in_any_batch(dtype):
    """In bf16 too: these kernels have no ``tl.dot``, which the interpreter gets wrong in bf16."""
    g = torch.Generator().manual_seed(2)
    x, r = torch.randn(64, 96, generator=g).to(dtype), torch.randn(64, 96, generator=g).to(dtype)
    w = torch.randn(96, generator=g).to(dtype)
    assert_row_invariant(lambda rows: norm.rms_norm(rows, w, 1e-6), x[0], x[1:])
    xr = torch.cat([x, r], 1)
    assert_row_invariant(lambda rows: torch.cat(norm.rms_norm(rows[:, :96], w, 1e-6, rows[:, 96:].clone()), 1),
                         xr[0], xr[1:])
    assert_row_invariant(activation.silu_and_mul, xr[0], xr[1:])
    cos, sin = rope_kv.rope_cos_sin_cache(1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16)), 64)

    def rotate(rows):  # rows: [q (2 heads), k, v (1 head)] of 16 + position
        n = rows.shape[0]
        q = rows[:, :32].reshape(n, 2, 16).clone()
        kc, vc = torch.zeros(n, 1, 1, 16, dtype=rows.dtype), torch.zeros(n, 1, 1, 16, dtype=rows.dtype)
        rope_kv.rope_and_write_kv(q, rows[:, 32:48].reshape(n, 1, 16), rows[:, 48:64].reshape(n, 1, 16),
                                  rows[:, 64].long(), cos, sin, torch.arange(n), kc, vc)
        return torch.cat([q.reshape(n, -1), kc.reshape(n, -1), vc.reshape(n, -1)], 1)

    rows = torch.cat([torch.randn(64, 64, generator=g), torch.randint(0, 64, (64, 1), generator=g).float()], 1)
    rows = rows.to(dtype)  # positions < 64: exact in bf16
    assert_row_invariant(rotate, rows[0], rows[1:])


def test_sampler_and_logprobs_rows_are_bit_identical_in_any_batch():
    g = torch.Generator().manual_seed(3)
    V = 300
    logits = torch.randn(64, V, generator=g) * 3
    sampler = Sampler("cpu")
    variant = SamplerVariant(random=True, top_k_top_p=True)

    def draw(rows):
        n = rows.shape[0]
        t = SamplingTensors(temperatures=torch.full((n,), 0.8), top_ks=torch.full((n,), 50), top_ps=torch.full((n,), 0.9),
                            min_ps=torch.zeros(n), seeds=torch.full((n,), 11), positions=torch.full((n,), 5),
                            greedy=torch.zeros(n, dtype=torch.bool))
        return torch.cat([sampler.sample(rows, t, variant)[:, None].float(), torch.log_softmax(rows, -1)], 1)

    assert_row_invariant(draw, logits[0], logits[1:])


# ---- MoE -------------------------------------------------------------------------------------------
def test_moe_routing_and_experts_rows_are_bit_identical_in_any_batch():
    """The routing kernel with the fixed block of tokens, the fused experts with the fixed configuration."""
    g = torch.Generator().manual_seed(4)
    E, Hd, inter, KS = 16, 64, 32, 4
    spec = RoutingSpec(E, KS - 1, "sigmoid", True, 2.5, 4, 2, 1, False)  # groups, bias, a folded shared chunk
    bias = torch.randn(E, generator=g) * 0.1
    logits = torch.randn(64, E, generator=g)

    def route(rows):
        ids, slots, weights = moe_routing.route(spec, rows, bias, block_t=ROUTE_BLOCK_T)
        return torch.cat([ids.float(), slots.float(), weights], 1)

    assert_row_invariant(route, logits[0], logits[1:])
    ids, slots, weights = moe_routing.route(spec, logits, bias, block_t=ROUTE_BLOCK_T)
    want = moe_math.route_tokens(spec, logits, bias)
    assert torch.equal(ids, want[0]) and (weights - want[2]).abs().max().item() < 1e-6
    x = torch.randn(64, Hd, generator=g)
    w13 = torch.randn(E + 1, 2 * inter, Hd, generator=g) * 0.1
    w2 = torch.randn(E + 1, Hd, inter, generator=g) * 0.1
    cfg = moe_config(interpreter=True)
    packed = torch.cat([x, slots.float(), weights], 1)  # a token: its activations and its routing

    def experts(rows):
        return fused_moe.fused_experts(rows[:, :Hd], w13, w2, rows[:, Hd:Hd + KS].to(torch.int32), rows[:, Hd + KS:],
                                       True, cfg)

    alone = assert_row_invariant(experts, packed[0], packed[1:])
    ref = moe_math.combine(moe_math.expert_rows(x[:1], w13, w2, slots[:1], weights[:1]))[0]
    assert (alone - ref).abs().max().item() < 1e-5


# ---- FP8 weights -------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [False, True], ids=["per-channel", "block-scaled"])
def test_fp8_linear_rows_are_bit_identical_in_any_batch(block):
    """FP8 weights with the flag: one fp8_gemm tile whatever the batch (``deterministic_config``), activations
    quantized per row; equal to the torch definition. Inputs exact in e4m3 (the interpreter's cast is not
    the GPU's rounding: tests/unit/engine/test_fp8_kernels.py)."""
    from tandem.engine.quantization import Fp8Gemm, Fp8Linear, Fp8LinearSpec
    from tandem.engine.quantization import fp8 as F

    g = torch.Generator().manual_seed(6)
    N, K = 96, 256
    e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    e4m3 = e4m3[~e4m3.isnan()]
    w = torch.randn(N, K, generator=g) * 0.1
    spec = Fp8LinearSpec(group_n=128, group_k=128) if block else Fp8LinearSpec()
    layer = Fp8Linear(K, N, False, spec, Fp8Gemm("auto", "cpu", deterministic=True))
    if block:
        layer.weight.data, layer.weight_scale.data = F.quantize_blocks(w, (128, 128))
    else:
        q, s = F.quantize_rows(w)
        layer.weight.data, layer.weight_scale.data = q, s[:, 0].contiguous()
    group = 128 if block else K
    x = e4m3[torch.randint(0, e4m3.numel(), (64, K), generator=g)]
    x[:, ::group] = 448.0  # each (row, group)'s max is 448: its scale is 1, its values exact
    alone = assert_row_invariant(layer, x[0], x[1:])
    ref = Fp8Gemm("torch")(layer, x[:1])[0]
    assert (alone - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
