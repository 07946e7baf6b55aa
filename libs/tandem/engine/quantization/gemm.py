"""Which kernel runs an FP8 linear layer: measured, once per layer shape and batch-size bucket.

Candidates (``--fp8-gemm-backend``):

* ``scaled_mm``: per-token activation quantization (Triton) + ``torch._scaled_mm`` with rowwise
  scales (cuBLASLt); per-channel weights only;
* ``gemv`` (batch 1) and ``small_m`` (up to 16 rows): ``fp8_gemv`` / ``fp8_gemm_small_m`` (one
  launch, activations quantized inside), a few tile widths each;
* ``gemm``: activation quantization + the tiled ``fp8_gemm``, a few tile shapes;
* ``torch``: ``fp8.fp8_linear_ref`` (dequantize, matmul): the CPU path, the reference, and with
  ``auto`` on CUDA the fallback when no kernel runs (not timed: it dequantizes the whole weight at
  every call).

With ``auto`` on CUDA every applicable candidate runs on the real inputs the first time a key
(out features, in features, scale groups, static input, dtype, bias, batch rounded up to a power
of two) is seen outside a CUDA-graph capture, and the fastest is kept for the life of the
process (all models share the choices, so a graph replay and an eager pass of one shape run the
same kernel). The CUDA-graph runner's warm-up passes make every decode bucket's choice before
its capture. ``auto`` on CPU is ``torch``; ``triton`` on CPU (``TRITON_INTERPRET=1``) takes the
first Triton candidate without timing.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from .fp8 import fp8_linear_ref, quantize_row_groups, quantize_rows, quantize_static

log = logging.getLogger(__name__)

SMALL_M_MAX = 16  # largest batch the fused small-M kernel is a candidate for
# Process-wide: key -> candidate name; and what was measured, for benchmarks and logs.
_CHOICES: dict[tuple, str] = {}
_TIMINGS: dict[tuple, dict[str, float]] = {}


def bucket_of(m: int) -> int:
    return 1 << max(0, m - 1).bit_length()


def choices() -> list[dict]:
    """Every choice made in this process: shape, batch bucket, the kernel kept and each candidate's ms."""
    out = []
    for key, name in _CHOICES.items():
        N, K, group_n, group_k, static, dtype, bias, bucket, device = key
        out.append({"N": N, "K": K, "group_n": group_n, "group_k": group_k, "static_input": static,
                    "batch_bucket": bucket, "chosen": name, "ms": _TIMINGS.get(key, {})})
    return out


# A few configurations each (every one is a Triton compile on first use, ~1 s on the GPU); the
# measurement keeps the fastest. BLOCK_K is the weight block's width where scales are per block.
def _gemv_configs(group_k: int | None):
    from tandem.engine.kernels.fp8_gemm import GemmConfig

    bk = group_k or 256
    return [GemmConfig(1, 16, bk, 4, 4, 1), GemmConfig(1, 32, bk, 4, 1, 4)]  # pipelined 4 deep; unrolled by 4


def _small_m_configs(group_k: int | None, bucket: int):
    from tandem.engine.kernels.fp8_gemm import GemmConfig

    bm, bk = max(16, bucket), group_k or 256
    return [GemmConfig(bm, 16, bk, 2, 4), GemmConfig(bm, 32, bk, 4, 4)]


def _gemm_configs(group_k: int | None, bucket: int):
    from tandem.engine.kernels.fp8_gemm import GemmConfig

    bk = min(128, group_k or 128)
    if bucket <= 16:  # narrow tiles: N=4096 still makes 128 programs for 132 SMs
        return [GemmConfig(16, 32, bk, 4, 4), GemmConfig(64, 64, bk, 4, 3)]
    if bucket <= 64:
        return [GemmConfig(bucket, 32, bk, 4, 4), GemmConfig(bucket, 64, bk, 4, 4)]
    return [GemmConfig(64, 128, bk, 4, 3), GemmConfig(128, 128, bk, 8, 3)]


def deterministic_config(group_k: int | None, interpreter: bool = False):
    """The one ``fp8_gemm`` tile of --enable-deterministic-inference: 64 rows (a decode batch up to 64 in
    one tile), 64 columns, one weight block column a step."""
    from tandem.engine.kernels.fp8_gemm import GemmConfig

    if interpreter:
        return GemmConfig(16, 128, min(128, group_k or 128), 4, 1)
    return GemmConfig(64, 64, min(128, group_k or 128), 4, 4)


class Fp8Gemm:
    """Runs ``Fp8Linear.forward``: ``gemm(layer, x [M, K]) -> [M, N]`` on the chosen kernel."""

    def __init__(self, backend: str = "auto", device: str = "cpu", deterministic: bool = False):
        """``deterministic`` (--enable-deterministic-inference): every batch runs ``fp8_gemm`` with one tile
        configuration per layer shape (``deterministic_config``), activations quantized per row by the
        Triton kernel: a row's result does not depend on the batch. Nothing is measured."""
        if backend not in ("auto", "scaled_mm", "triton", "torch"):
            raise ValueError(f"fp8_gemm_backend={backend!r}: allowed are auto, scaled_mm, triton, torch")
        on_cpu = not str(device).startswith("cuda")
        if (backend == "triton" or deterministic) and on_cpu and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("fp8_gemm_backend='triton' (and FP8 with enable_deterministic_inference) on CPU runs only "
                             "through the Triton interpreter (set TRITON_INTERPRET=1; slow, for tests); use auto or "
                             "torch on CPU")
        if deterministic and backend in ("scaled_mm", "torch"):
            raise ValueError(f"fp8_gemm_backend={backend!r} is not batch-invariant (its kernel depends on the batch "
                             "size); with enable_deterministic_inference use auto or triton")
        self.backend, self.deterministic = backend, deterministic
        self._fns: dict[tuple, Callable] = {}  # key -> the chosen kernel (skips rebuilding the candidates)

    def __call__(self, layer, x: torch.Tensor) -> torch.Tensor:
        if x.stride(-1) != 1:
            x = x.contiguous()
        if self.deterministic:
            from tandem.engine.kernels.fp8_gemm import fp8_gemm

            xq, xs = self._quantize(layer, x)
            return fp8_gemm(xq, xs, layer.weight, layer.weight_scale, layer.group_n, layer.group_k, x.dtype,
                            deterministic_config(layer.group_k, x.device.type != "cuda"), layer.bias)
        cuda = x.device.type == "cuda"
        if self.backend == "torch" or (self.backend == "auto" and not cuda):
            return self._torch(layer, x)
        return self.kernel_for(layer, x, cuda)(layer, x)

    def kernel_for(self, layer, x: torch.Tensor, cuda: bool) -> Callable:
        """The kernel ``fn(layer, x)`` that runs ``layer`` on a batch like ``x``: chosen (measured on CUDA) the
        first time its key is seen, then kept."""
        key = (layer.out_features, layer.in_features, layer.group_n, layer.group_k, layer.input_scale is not None,
               x.dtype, layer.bias is not None, bucket_of(x.shape[0]), str(x.device))
        fn = self._fns.get(key)
        return fn if fn is not None else self._choose(key, layer, x, cuda)

    def _choose(self, key: tuple, layer, x: torch.Tensor, cuda: bool) -> Callable:
        cands = self.candidates(layer, x.shape[0], cuda)
        if not cands:
            raise ValueError(f"fp8_gemm_backend={self.backend!r} has no kernel for a {layer.group_n}x{layer.group_k} "
                             "block-scaled weight (use auto or triton)")
        name = _CHOICES.get(key)  # another model of this process may have measured this key
        if name is None or name not in cands:
            if not cuda or len(cands) == 1:
                name = next(iter(cands))
                _CHOICES[key] = name
            elif torch.cuda.is_current_stream_capturing():
                # Never measured inside a capture (the graph runner's warm-up passes measure first); not kept.
                return cands[next(iter(cands))]
            else:
                name = self._measure(key, cands, layer, x)
        self._fns[key] = cands[name]
        return cands[name]

    # ---- candidates ------------------------------------------------------------------------
    def candidates(self, layer, M: int, cuda: bool) -> dict[str, Callable]:
        """name -> fn(layer, x) of every kernel allowed for this layer and batch, in order of preference."""
        out: dict[str, Callable] = {}
        per_channel = layer.group_k is None
        if per_channel and self.backend in ("auto", "scaled_mm"):
            out["scaled_mm"] = self._scaled_mm
        if self.backend in ("auto", "triton"):
            from tandem.engine.kernels.fp8_gemm import fp8_gemm, fp8_gemm_small_m, fp8_gemv

            bucket = bucket_of(M)
            if M == 1:
                for c in _gemv_configs(layer.group_k):
                    out[f"gemv{tuple(c)}"] = lambda layer, x, c=c: fp8_gemv(
                        x, layer.weight, layer.weight_scale, layer.group_n, layer.group_k, c, layer.input_scale,
                        layer.bias)
            if M <= SMALL_M_MAX:
                for c in _small_m_configs(layer.group_k, bucket):
                    out[f"small_m{tuple(c)}"] = lambda layer, x, c=c: fp8_gemm_small_m(
                        x, layer.weight, layer.weight_scale, layer.group_n, layer.group_k, c, layer.input_scale,
                        layer.bias)
            for c in _gemm_configs(layer.group_k, bucket):
                out[f"gemm{tuple(c)}"] = lambda layer, x, c=c: fp8_gemm(
                    *self._quantize(layer, x), layer.weight, layer.weight_scale, layer.group_n, layer.group_k,
                    x.dtype, c, layer.bias)
        if cuda and self.backend == "auto":
            out["torch"] = self._torch  # the definition: the fallback should no kernel run on this GPU (not timed)
        return out

    def _quantize(self, layer, x: torch.Tensor):
        """Activation quantization: the Triton kernel on CUDA and for ``triton`` (interpreter) on CPU."""
        if x.device.type == "cuda" or self.backend == "triton" or self.deterministic:
            from tandem.engine.kernels.fp8_quant import quantize_activations

            return quantize_activations(x, layer.group_k, layer.input_scale)
        if layer.input_scale is not None:
            return quantize_static(x, layer.input_scale)
        return quantize_rows(x) if layer.group_k is None else quantize_row_groups(x, layer.group_k)

    def _scaled_mm(self, layer, x: torch.Tensor) -> torch.Tensor:
        xq, xs = self._quantize(layer, x)
        # torch's FP8 GEMM (cuBLASLt); the name the peers use, public as F.scaled_mm only from later torch.
        y = torch._scaled_mm(xq, layer.weight.t(), scale_a=xs,  # noqa: SLF001
                             scale_b=layer.weight_scale.view(1, -1), out_dtype=x.dtype)
        return y if layer.bias is None else y + layer.bias

    @staticmethod
    def _torch(layer, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear_ref(x, layer.weight, layer.weight_scale, layer.group_n, layer.group_k, layer.input_scale,
                              layer.bias)

    # ---- measurement -----------------------------------------------------------------------
    @staticmethod
    def _measure(key: tuple, cands: dict[str, Callable], layer, x: torch.Tensor) -> str:
        kernels = {n: fn for n, fn in cands.items() if n != "torch"}
        times = time_candidates(kernels, layer, x)
        if not times and "torch" in cands:  # no kernel ran here: the definition, slow but right
            log.warning("fp8 gemm N=%d K=%d: no kernel ran, using the torch definition", key[0], key[1])
            times = {"torch": float("nan")}
        if not times:
            raise RuntimeError(f"no FP8 GEMM kernel ran for N={key[0]} K={key[1]} (candidates {list(cands)})")
        name = min(times, key=times.get)
        _CHOICES[key], _TIMINGS[key] = name, times
        log.info("fp8 gemm N=%d K=%d batch<=%d: %s (%s)", key[0], key[1], key[7], name,
                 ", ".join(f"{n} {t:.4f} ms" for n, t in times.items()))
        return name


def time_candidates(cands: dict[str, Callable], layer, x: torch.Tensor, reps: int = 10) -> dict[str, float]:
    """Median milliseconds of each candidate (CUDA) over ``reps`` calls, L2 flushed before each: a decode
    step reads every layer's weight from HBM, not from the cache a repeated call would leave it in.
    Candidates that fail (a shape ``_scaled_mm`` rejects, a config Triton cannot compile) are left out."""
    times: dict[str, float] = {}
    flush = torch.empty(96 << 20, dtype=torch.int8, device=x.device)  # above H100/H200's 50 MB of L2
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for name, fn in cands.items():
        try:
            for _ in range(2):  # compile, then warm
                fn(layer, x)
            for start, end in events:
                flush.zero_()
                start.record()
                fn(layer, x)
                end.record()
            torch.cuda.synchronize(x.device)
            ms = sorted(start.elapsed_time(end) for start, end in events)
            times[name] = round(ms[len(ms) // 2], 5)
        except Exception as exc:  # noqa: BLE001 - any failure only removes this candidate
            log.info("fp8 gemm candidate %s unavailable for N=%d K=%d: %s", name, layer.out_features,
                     layer.in_features, exc)
    return times
