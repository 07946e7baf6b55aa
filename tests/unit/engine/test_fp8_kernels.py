"""The FP8 Triton kernels against their torch definitions, on CPU through Triton's interpreter.

The interpreter runs e4m3 loads, stores and ``tl.dot`` exactly, but its float32 -> e4m3 cast
rounds wrongly (a carry into the exponent is lost: 31.05 -> 16, not 32). So every input a
kernel quantizes is built to quantize exactly: each group's values are e4m3 numbers times a
power of two, its largest one exactly 448 times it, so ``x / scale`` is an e4m3 value and no
rounding happens. The rounding itself is checked on the GPU (``gpu_engine_check.py``: kernel
== torch, bit for bit, on random inputs). Inputs the kernels do not quantize (the pre-quantized
activations of ``fp8_gemm``, the weights) are arbitrary.
"""
from __future__ import annotations

import pytest
import torch
from tandem.engine.kernels.fp8_gemm import GemmConfig, fp8_gemm, fp8_gemm_small_m, fp8_gemv
from tandem.engine.kernels.fp8_quant import quantize_activations, quantize_activations_ref
from tandem.engine.quantization import Fp8Gemm, Fp8Linear, Fp8LinearSpec
from tandem.engine.quantization import fp8 as F

E4M3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
E4M3 = E4M3[~E4M3.isnan()]


def exact_activations(M: int, K: int, group: int, g: torch.Generator) -> torch.Tensor:
    """[M, K] float32 whose per-(row, ``group`` columns) quantization is exact (see the module doc)."""
    q = E4M3[torch.randint(0, E4M3.numel(), (M, K), generator=g)]
    groups = -(-K // group)
    for i in range(groups):
        q[:, i * group] = 448.0 * torch.where(torch.rand(M, generator=g) < 0.5, -1.0, 1.0)
    scale = torch.pow(2.0, torch.randint(-9, 2, (M, groups), generator=g).float())
    return q * scale.repeat_interleave(group, dim=1)[:, :K]


def test_the_interpreter_gap_the_tests_avoid():
    """Documents why inputs are exact: exact e4m3 values survive the interpreter's cast."""
    x = E4M3.reshape(1, -1)[:, :248] * 2.0**-3
    x[0, 0] = 448.0 * 2.0**-3
    q, s = quantize_activations(x)
    assert s.item() == 2.0**-3 and torch.equal(q.float(), (x / s).clamp(-448, 448))


@pytest.mark.parametrize("M,K,group", [(3, 320, 128), (1, 128, 128), (4, 200, None), (2, 4100, None)])
def test_activation_quantization_matches_torch(M, K, group):
    g = torch.Generator().manual_seed(M * K)
    x = exact_activations(M, K, group or K, g)
    q, s = quantize_activations(x, group)
    qr, sr = quantize_activations_ref(x, group)
    assert s.shape == (M, -(-K // (group or K)))
    assert torch.equal(s, sr) and torch.equal(q.float(), qr.float())


def test_static_activation_quantization_matches_torch():
    g = torch.Generator().manual_seed(5)
    scale = torch.tensor(2.0**-4)
    x = E4M3[torch.randint(0, E4M3.numel(), (3, 96), generator=g)] * scale
    x[0, 0] = 1e4  # beyond the static range: saturates to 448
    q, s = quantize_activations(x, static_scale=scale)
    qr, sr = quantize_activations_ref(x, static_scale=scale)
    assert torch.equal(s, sr) and torch.equal(q.float(), qr.float()) and q.float()[0, 0].item() == 448.0


def _weights(N, K, layout, g):
    w = torch.randn(N, K, generator=g) * torch.linspace(0.01, 1.0, N)[:, None]
    if layout == "channel":
        q, s = F.quantize_rows(w)
        return q, s[:, 0].contiguous(), 1, None
    if layout == "block_rows":  # a merged projection whose shards do not start on block boundaries
        q, s = F.quantize_blocks(w, (128, 128))
        return q, s.repeat_interleave(128, dim=0)[:N].contiguous(), 1, 128
    q, s = F.quantize_blocks(w, (128, 128))
    return q, s, 128, 128


@pytest.mark.parametrize("layout", ["channel", "block", "block_rows"])
@pytest.mark.parametrize("M,N,K,cfg", [
    (5, 200, 320, GemmConfig(16, 64, 128)),     # K ends mid-block, N mid-tile
    (37, 136, 256, GemmConfig(16, 32, 128)),    # several row tiles (swizzled order)
    (70, 264, 384, GemmConfig(32, 64, 64, 4, 2)),  # two k-steps per weight block
])
def test_fp8_gemm_matches_torch(layout, M, N, K, cfg):
    g = torch.Generator().manual_seed(M + N + K)
    wq, ws, gn, gk = _weights(N, K, layout, g)
    x = torch.randn(M, K, generator=g) * 3
    xq, xs = quantize_activations_ref(x, gk)
    bias = torch.randn(N, generator=g)
    y = fp8_gemm(xq, xs, wq, ws, gn, gk, torch.float32, cfg, bias)
    ref = F.fp8_linear_ref(x, wq, ws, gn, gk, bias=bias)
    assert (y - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("layout", ["channel", "block", "block_rows"])
@pytest.mark.parametrize("M,cfg", [(1, GemmConfig(16, 32, 128)), (6, GemmConfig(16, 16, 128, 2, 4)),
                                   (19, GemmConfig(32, 64, 128))])
def test_fp8_gemm_small_m_matches_torch(layout, M, cfg):
    g = torch.Generator().manual_seed(M)
    N, K = 120, 300
    wq, ws, gn, gk = _weights(N, K, layout, g)
    x = exact_activations(M, K, gk or K, g)
    y = fp8_gemm_small_m(x, wq, ws, gn, gk, cfg)
    ref = F.fp8_linear_ref(x, wq, ws, gn, gk)
    assert (y - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("layout", ["channel", "block", "block_rows"])
@pytest.mark.parametrize("cfg", [GemmConfig(1, 16, 128, 4, 1, 4), GemmConfig(1, 32, 128, 4, 3, 1)])
def test_fp8_gemv_matches_torch(layout, cfg):
    g = torch.Generator().manual_seed(7)
    N, K = 120, 300
    wq, ws, gn, gk = _weights(N, K, layout, g)
    x = exact_activations(1, K, gk or K, g)
    bias = torch.randn(N, generator=g)
    y = fp8_gemv(x, wq, ws, gn, gk, cfg, bias=bias)
    ref = F.fp8_linear_ref(x, wq, ws, gn, gk, bias=bias)
    assert (y - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_fp8_gemm_small_m_static_input_and_bias():
    g = torch.Generator().manual_seed(9)
    wq, ws, gn, gk = _weights(72, 256, "channel", g)
    scale = torch.tensor(2.0**-2)
    x = E4M3[torch.randint(0, E4M3.numel(), (3, 256), generator=g)] * scale
    bias = torch.randn(72, generator=g)
    y = fp8_gemm_small_m(x, wq, ws, gn, gk, GemmConfig(16, 32, 256, 2, 4), input_scale=scale, bias=bias)
    ref = F.fp8_linear_ref(x, wq, ws, gn, gk, input_scale=scale, bias=bias)
    assert (y - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    y1 = fp8_gemv(x[:1], wq, ws, gn, gk, GemmConfig(1, 16, 256, 4, 1, 2), input_scale=scale, bias=bias)
    assert (y1 - ref[:1]).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_kernels_refuse_configs_that_split_a_scale_group():
    g = torch.Generator().manual_seed(1)
    wq, ws, gn, gk = _weights(64, 256, "block", g)
    x = exact_activations(2, 256, 128, g)
    with pytest.raises(ValueError, match="must equal the activation group"):
        fp8_gemm_small_m(x, wq, ws, gn, gk, GemmConfig(16, 32, 256))
    with pytest.raises(ValueError, match="rows > block_m"):
        fp8_gemm_small_m(exact_activations(20, 256, 128, g), wq, ws, gn, gk, GemmConfig(16, 32, 128))


@pytest.mark.parametrize("spec", [Fp8LinearSpec(), Fp8LinearSpec(group_n=128, group_k=128)])
def test_triton_backend_runs_an_fp8_linear_like_torch(spec):
    """``--fp8-gemm-backend triton`` on CPU (interpreter): the small-M kernel for a few rows, the tiled
    GEMM beyond 16, both equal to the ``torch`` backend."""
    g = torch.Generator().manual_seed(3)
    N, K = 256, 384
    layer = Fp8Linear(K, N, True, spec, Fp8Gemm("triton", "cpu"))
    wq, ws, gn, gk = _weights(N, K, "channel" if spec.group_k is None else "block", g)
    layer.weight.data, layer.weight_scale.data, layer.bias.data = wq, ws, torch.randn(N, generator=g)
    ref_gemm = Fp8Gemm("torch")
    for M in (3, 40):
        x = exact_activations(M, K, gk or K, g)
        names = list(layer.gemm.candidates(layer, M, cuda=False))
        assert names[0].startswith("small_m" if M <= 16 else "gemm")
        assert any(n.startswith("gemv") for n in layer.gemm.candidates(layer, 1, cuda=False))
        y = layer(x)
        ref = ref_gemm(layer, x)
        assert (y - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_auto_keeps_the_fastest_candidate_and_never_measures_inside_a_capture(monkeypatch):
    """The choice logic of ``--fp8-gemm-backend auto`` with the timing replaced (CUDA events need a GPU):
    the fastest candidate is kept per key and reused; inside a CUDA-graph capture nothing is measured
    (a capture cannot synchronise) and nothing is kept."""
    from tandem.engine.quantization import gemm as G

    g = torch.Generator().manual_seed(4)
    layer = Fp8Linear(256, 64, False, Fp8LinearSpec(), Fp8Gemm("triton", "cpu"))
    wq, ws, _, _ = _weights(64, 256, "channel", g)
    layer.weight.data, layer.weight_scale.data = wq, ws
    x = exact_activations(3, 256, 256, g)
    measured = []

    def fake_times(cands, layer, x, reps=10):
        measured.append(list(cands))
        return {name: (0.5 if name.startswith("gemm") else 1.0) for name in cands}  # a tiled-GEMM config wins

    monkeypatch.setattr(G, "time_candidates", fake_times)
    monkeypatch.setattr(G, "_CHOICES", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    layer.gemm.kernel_for(layer, x, cuda=True)
    assert not measured and not G.choices()
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    fn = layer.gemm.kernel_for(layer, x, cuda=True)
    assert len(measured) == 1 and [c["chosen"][:4] for c in G.choices()] == ["gemm"]
    assert layer.gemm.kernel_for(layer, x, cuda=True) is fn and len(measured) == 1  # kept: measured once
    layer.gemm.kernel_for(layer, exact_activations(40, 256, 256, g), cuda=True)  # another batch bucket: measured
    assert len(measured) == 2 and not any(n.startswith("small_m") for n in measured[1])
    y = fn(layer, x)
    assert (y - F.fp8_linear_ref(x, wq, ws, 1, None)).abs().max().item() <= 1e-5 * y.abs().max().item()


def test_engine_on_the_triton_kernels_matches_the_torch_path(tmp_path):
    """A whole FP8 engine with ``--fp8-gemm-backend triton`` (interpreter): prefill on the small-M kernel,
    decode on the GEMV, the same greedy tokens as ``--fp8-gemm-backend torch`` and logprobs within the
    interpreter's cast error (real activations are not exact e4m3 multiples, and the interpreter rounds
    some of them a step too low: ~0.02 here; a wrong scale or index moves them by whole units)."""
    from tandem.engine import LLM, SamplingParams
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(str(tmp_path))
    sp = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=True)
    outs = {}
    for backend in ("torch", "triton"):
        llm = LLM(str(tmp_path), device="cpu", dtype="float32", max_total_tokens=256, quantization="fp8",
                  fp8_gemm_backend=backend)
        assert isinstance(llm.engine.model.layers[0].mlp.down_proj, Fp8Linear)
        outs[backend] = llm.generate([[5, 17, 33, 90, 4, 61]], sp)[0]
    assert outs["triton"].token_ids == outs["torch"].token_ids
    assert max(abs(a - b) for a, b in zip(outs["triton"].logprobs, outs["torch"].logprobs)) < 0.1
