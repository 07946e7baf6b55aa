"""Compile every Triton kernel for an H100/H200 (sm_90) without a GPU: Triton's front end and
ptxas run on CPU. Catches what the interpreter accepts but the compiler rejects (an if-block
that re-types a variable, a block shape that is not a power of two, ...). Run in a process
without TRITON_INTERPRET (test_kernels_compile.py does)."""
from __future__ import annotations

import torch
import triton
from tandem.engine.kernels import (
    activation,
    all_reduce,
    decode_attention,
    extend_attention,
    fp8_gemm,
    fp8_quant,
    fused_moe,
    kv_transfer,
    moe_align,
    moe_routing,
    norm,
    rope_kv,
    sampling,
)
from tandem.engine.lora import kernels as lora
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, signature: dict, constexprs: dict, aligned: tuple = (), **options) -> None:
    """``aligned``: arguments a launch would specialize as divisible by 16 (pointers, shapes and strides
    that are multiples of 16), as Triton's JIT does; the FP8 kernels' loads vectorize and pipeline on it."""
    sig = dict(signature, **{k: "constexpr" for k in constexprs})
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs), target=TARGET,
                   options=options or None)


def compile_fp8_kernels() -> None:
    """The FP8 kernels in the forms the engine's kernel choice compiles (quantization/gemm.py): each
    activation mode, per-channel and 128x128 block scales, the narrowest and widest tiles."""
    ints = {n: "i32" for n in ("M", "N", "K")}
    fp8 = dict(FP8_MAX=448.0, EPS=1e-10)
    for static in (False, True):
        compile_kernel(fp8_quant._quant_kernel, {"X": "*bf16", "Q": "*fp8e4nv", "S": "*fp32", "Static": "*fp32",
                                                 "K": "i32", "group": "i32", "stride_xm": "i32", "stride_qm": "i32",
                                                 "stride_sm": "i32"}, dict(STATIC=static, BLOCK=2048, **fp8),
                       aligned=("X", "Q", "K", "stride_xm", "stride_qm"), num_warps=8)
    for cfg, group_n, group_k in ((fp8_gemm.GemmConfig(16, 32, 128, 4, 4), 1, 128),
                                  (fp8_gemm.GemmConfig(128, 128, 128, 8, 3), 128, 128)):
        compile_kernel(fp8_gemm._fp8_gemm_kernel, {
            "A": "*fp8e4nv", "B": "*fp8e4nv", "C": "*bf16", "AS": "*fp32", "BS": "*fp32", "Bias": "*bf16", **ints,
            **{n: "i32" for n in ("stride_am", "stride_bn", "stride_cm", "stride_as_m", "stride_as_k", "stride_bs_n",
                                  "stride_bs_k")}},
            dict(GROUP_N=group_n, GROUP_K=group_k, HAS_BIAS=group_n == 1, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                 BLOCK_K=cfg.block_k, SWIZZLE=8), aligned=("A", "B", "C", "N", "K", "stride_am", "stride_bn", "stride_cm"),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    common = {"X": "*bf16", "W": "*fp8e4nv", "WS": "*fp32", "Static": "*fp32", "Bias": "*bf16", "Y": "*bf16"}
    for act, group_n, block_k in ((0, 1, 256), (1, 128, 128)):
        compile_kernel(fp8_gemm._fp8_gemm_small_m_kernel, {
            **common, **ints, **{n: "i32" for n in ("stride_xm", "stride_wn", "stride_ym", "stride_ws_n",
                                                    "stride_ws_k")}},
            dict(ACT=act, GROUP_N=group_n, GROUP_K=block_k, HAS_BIAS=act == 0, BLOCK_M=16, BLOCK_N=16 * (2 - act),
                 BLOCK_K=block_k, PRE_K=256, **fp8), aligned=("X", "W", "Y", "N", "K", "stride_xm", "stride_wn", "stride_ym"),
            num_warps=2, num_stages=4)
    for act, group_n, block_k, stages, unroll in ((1, 128, 128, 1, 4), (2, 1, 256, 3, 1)):
        compile_kernel(fp8_gemm._fp8_gemv_kernel, {
            **common, "N": "i32", "K": "i32", **{n: "i32" for n in ("stride_wn", "stride_ws_n", "stride_ws_k")}},
            dict(ACT=act, GROUP_N=group_n, GROUP_K=block_k, HAS_BIAS=act == 2, BLOCK_N=16, BLOCK_K=block_k,
                 PRE_K=4096, STAGES=stages, UNROLL=unroll, **fp8), aligned=("X", "W", "Y", "N", "K", "stride_wn"),
            num_warps=4)


def compile_invariant_gemm() -> None:
    """--enable-deterministic-inference's GEMM: bf16 (and the router's bf16 activations times a float32
    weight), with and without split-K and bias, in the H100 configurations ``gemm_config`` picks."""
    from tandem.engine.kernels import invariant_gemm as G

    for a, b, c in (("*bf16", "*bf16", "*bf16"), ("*bf16", "*fp32", "*fp32"), ("*fp32", "*fp32", "*fp32")):
        ieee = b == "*fp32"
        cfg = G.gemm_config(4096, 14336, torch.float32 if ieee else torch.bfloat16, 132)
        for split, bias in ((False, True), (True, False)):
            compile_kernel(G._gemm_kernel, {
                "A": a, "B": b, "C": "*fp32" if split else c, "Bias": b, "M": "i32", "N": "i32", "K": "i32",
                "k_per_split": "i32", "stride_am": "i32", "stride_bn": "i32", "stride_cs": "i32", "stride_cm": "i32"},
                dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=8, SPLIT=split,
                     HAS_BIAS=bias, IEEE=ieee), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        compile_kernel(G._split_sum_kernel, {"P": "*fp32", "Bias": b, "C": c, "N": "i32", "stride_ps": "i32",
                                             "stride_pm": "i32", "stride_cm": "i32"},
                       dict(SPLIT_K=4, HAS_BIAS=True, BLOCK=G.SPLIT_SUM_BLOCK), num_warps=4)


def moe_kernels(p: str, dt: str) -> None:
    """The MoE kernels for the benchmark shapes' parameters (Qwen2-MoE, Qwen3-MoE, GLM-4-MoE)."""
    i32 = "i32"
    for ks, slots, fuse in ((8, 64 + 4, True), (8, 128, False)):
        compile_kernel(fused_moe._up_tokens_kernel, {
            "X": p, "W13": p, "Act": p, "Slots": "*i32", **{n: i32 for n in ("H", "inter", "stride_x", "stride_we",
                                                                             "stride_wn", "stride_act")}},
            dict(KS=ks, NUM_SLOTS=slots, BLOCK_N=16, BLOCK_K=256))
        compile_kernel(fused_moe._down_tokens_kernel, {
            "Act": p, "W2": p, "Out": p, "Slots": "*i32", "Weights": "*fp32",
            **{n: i32 for n in ("H", "inter", "stride_act", "stride_we", "stride_wn", "stride_out")}},
            dict(KS=ks, NUM_SLOTS=slots, FUSE_COMBINE=fuse, BLOCK_N=16, BLOCK_K=256))
        compile_kernel(fused_moe._up_blocks_kernel, {
            "X": p, "W13": p, "Act": p, "SortedIds": "*i32", "BlockSlot": "*i32",
            **{n: i32 for n in ("num_entries", "H", "inter", "stride_x", "stride_we", "stride_wn", "stride_act")}},
            dict(KS=ks, NUM_SLOTS=slots, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, IEEE=dt == "fp32"))
        compile_kernel(fused_moe._down_blocks_kernel, {
            "Act": p, "W2": p, "Rows": p, "SortedIds": "*i32", "BlockSlot": "*i32", "Weights": "*fp32",
            **{n: i32 for n in ("num_entries", "H", "inter", "stride_act", "stride_we", "stride_wn", "stride_rows")}},
            dict(NUM_SLOTS=slots, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, IEEE=dt == "fp32"))
        compile_kernel(fused_moe._combine_kernel, {"Rows": p, "Out": p, "H": i32, "stride_rows": i32,
                                                   "stride_out": i32}, dict(KS=ks, BLOCK=fused_moe.COMBINE_BLOCK))
    compile_kernel(moe_routing._router_kernel, {"X": p, "W": "*fp32", "Out": "*fp32", "H": i32, "stride_x": i32,
                                                "stride_w": i32, "stride_o": i32},
                   dict(ROWS=129, BLOCK_E=8, BLOCK_K=256))
    if dt != "bf16":
        return
    for slots in (68, 129):
        compile_kernel(moe_align._align_kernel, {"Slots": "*i32", "SortedIds": "*i32", "BlockSlot": "*i32",
                                                 "n": i32, "num_rows": i32},
                       dict(NUM_SLOTS=slots, BLOCK_M=16, BLOCK_E=256, CHUNK=16, CHUNK_P=1024))
    routing = {"Logits": "*fp32", "Bias": "*fp32", "Log2Phy": "*i32", "LogCnt": "*i32", "Positions": "*i64",
               "SeqLens": "*i64", "Counts": "*i32", "Ids": "*i32", "Slots": "*i32", "Weights": "*fp32",
               **{n: i32 for n in ("T", "stride_l", "stride_tab", "seed", "layer", "local_start", "num_local")},
               "scaling": "fp32"}
    for e, k, s, softmax, bias, groups, algo, count in (
            (60, 4, 4, True, False, (1, 1), moe_routing.ALGO_IDENTITY, False),     # Qwen2-MoE
            (128, 8, 0, True, False, (1, 1), moe_routing.ALGO_STATIC, True),       # Qwen3-MoE + EPLB, recording
            (160, 8, 1, False, True, (8, 4), moe_routing.ALGO_RANDOM, True),       # GLM-4-MoE style
            (64, 6, 2, False, True, (8, 3), moe_routing.ALGO_NONE, False)):        # dynamic dispatch
        compile_kernel(moe_routing._route_kernel, routing, dict(
            E=e, TOP_K=k, NUM_SHARED=s, SHARED_GATED=s == 4, SHARED_HERE=True, SOFTMAX=softmax, HAS_BIAS=bias,
            RENORM=not softmax, N_GROUP=groups[0], TOPK_GROUP=groups[1], ALGO=algo, COUNT=count,
            COUNT_PHYSICAL=algo == moe_routing.ALGO_STATIC, HAS_SEQLENS=count, BLOCK_T=16,
            BLOCK_E=1 << (e - 1).bit_length(), BLOCK_S=max(1, 1 << (max(s, 1) - 1).bit_length())))


def main() -> None:
    # KV pool element type per model dtype: the model's own, and the FP8 formats (--kv-cache-dtype)
    # for bf16 (the rotary + K/V write stores FP8 pools as their bytes, *u8).
    kv_types = {"bf16": ["bf16", "fp8e4nv", "fp8e5"], "fp32": ["fp32"]}
    for dt in ("bf16", "fp32"):
        p = f"*{dt}"
        for kv in kv_types[dt]:
            fp8 = kv != dt
            cache = "*u8" if fp8 else p
            compile_kernel(rope_kv._rope_kv_kernel, {
                **{n: p for n in ("Q", "K", "V")}, "Positions": "*i64", "Cos": "*fp32", "Sin": "*fp32",
                "SlotMapping": "*i64", "KCache": cache, "VCache": cache, "KVScale": "*fp32",
                **{n: "i32" for n in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                                      "stride_cos", "stride_cache_slot", "stride_cache_head")}},
                dict(NUM_HEADS=14, NUM_KV_HEADS=2, HEAD_DIM=64, ROT_HALF=16, BLOCK_H=16, BLOCK_KVH=2, BLOCK_HALF=16,
                     BLOCK_REST=32, BLOCK_D=64, KV_FP8=fp8, E4M3=kv == "fp8e4nv"))
            block_n = decode_attention.BLOCK_N
            for splits, group, bn in ((1, 4, block_n), (8, 7, block_n), *([(8, 4, 2 * block_n)] if fp8 else [])):
                compile_kernel(decode_attention._decode_partial_kernel, {
                    "Q": p, "K": f"*{kv}", "V": f"*{kv}", "PageTable": "*i32", "SeqLens": "*i64",
                    "PartialOut": "*fp32", "PartialLse": "*fp32", "Out": p, "KVScale": "*fp32", "sm_scale": "fp32",
                    **{n: "i32" for n in ("stride_qb", "stride_qh", "stride_k_slot", "stride_k_head",
                                          "stride_v_slot", "stride_v_head", "stride_pt", "stride_ob", "stride_oh",
                                          "stride_os", "stride_lb", "stride_lh", "stride_out_b", "stride_out_h")}},
                    dict(PAGE_SIZE=16, GROUP=group, HEAD_DIM=128, NUM_SPLITS=splits, BLOCK_H=16, BLOCK_D=128,
                         BLOCK_N=bn, IEEE=dt == "fp32", KV_FP8=fp8))
            for rows_of_one, cfg in ((False, extend_attention.DEFAULT_CONFIG), (True, extend_attention.DEFAULT_CONFIG),
                                     (False, extend_attention.ExtendConfig(128, 32, 8, 3))):
                compile_kernel(extend_attention._extend_attention_kernel, {
                    "Q": p, "K": f"*{kv}", "V": f"*{kv}", "Out": p, "PageTable": "*i32", "QStart": "*i64",
                    "QLens": "*i64", "SeqLens": "*i64", "KVScale": "*fp32", "sm_scale": "fp32",
                    **{n: "i32" for n in ("stride_qt", "stride_qh", "stride_k_slot", "stride_k_head", "stride_v_slot",
                                          "stride_v_head", "stride_pt", "stride_ot", "stride_oh")}},
                    dict(PAGE_SIZE=16, GROUP=7, HEAD_DIM=64, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=64,
                         IEEE=dt == "fp32", KV_FP8=fp8, ROWS_OF_ONE=rows_of_one),
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        moe_kernels(p, dt)
        compile_kernel(decode_attention._decode_merge_kernel, {
            "PartialOut": "*fp32", "PartialLse": "*fp32", "Out": p,
            **{n: "i32" for n in ("stride_ob", "stride_oh", "stride_os", "stride_lb", "stride_lh", "stride_out_b",
                                  "stride_out_h")}},
            dict(HEAD_DIM=128, NUM_SPLITS=8, BLOCK_S=8, BLOCK_D=128))
        for res in (False, True):
            compile_kernel(norm._rms_norm_kernel, {"X": p, "Residual": p, "W": p, "Out": p, "stride_x": "i32",
                                                   "stride_r": "i32", "stride_o": "i32", "N": "i32", "eps": "fp32"},
                           dict(HAS_RESIDUAL=res, BLOCK=1024))
        compile_kernel(activation._silu_and_mul_kernel, {"X": p, "Out": p, "stride_x": "i32", "stride_o": "i32",
                                                         "inter": "i32"}, dict(BLOCK=activation.BLOCK))
    compile_kernel(sampling._gumbel_argmax_kernel, {"Scores": "*fp32", "Seeds": "*i64", "Positions": "*i64",
                                                    "Out": "*i64", "stride_s": "i32", "V": "i32"},
                   dict(BLOCK=sampling.BLOCK))
    compile_fp8_kernels()
    compile_invariant_gemm()
    for word in ("*i32", "*i16", "*u8"):  # KV pages move as 32-bit words (16/8 when a page is odd-sized)
        for to_host in (False, True):
            compile_kernel(kv_transfer._kv_transfer_kernel, {
                "Dev": word, "DevOffsets": "*i64", "Host": word, "DevPages": "*i64", "HostPages": "*i64",
                "layer_start": "i32", "num_layers_here": "i32", "chunk": "i32", "host_page_stride": "i64",
                "host_kv_stride": "i64", "host_layer_stride": "i64"},
                dict(NUM_LAYERS=32, ALIGN=4, BLOCK=2048, TO_HOST=to_host))
    for dt in ("bf16", "fp32"):  # the custom all-reduce (2 and 8 ranks): system-scope atomics, spin loops
        for world in (2, all_reduce.MAX_RANKS):
            compile_kernel(all_reduce._one_shot_kernel, {
                "out": f"*{dt}", **{f"b{r}": f"*{dt}" for r in range(8)}, "me": "*i32",
                **{f"s{r}": "*i32" for r in range(8)}, "n": "i32", "rank": "i32"},
                dict(WORLD=world, BLOCK_SIZE=all_reduce.BLOCK, MAX_SPIN=all_reduce.DEFAULT_MAX_SPIN,
                     NUM_BLOCKS=all_reduce.MAX_BLOCKS, NUM_RANKS=all_reduce.MAX_RANKS, FLAG_BASE=all_reduce.FLAGS,
                     STATUS=all_reduce.STATUS_WORD),
                aligned=("out", "n", *(f"b{r}" for r in range(8))), num_warps=4)
    compile_lora_kernels()
    print("all kernels compiled for sm_90")


def compile_lora_kernels() -> None:
    """The LoRA matmuls (SGMV shrink/expand; the stacked form's expand) at the decode and prefill row
    tiles, in both dtypes; the stacked expand with 1 and 8 slots."""
    seg = {"SegStart": "*i32", "SegLen": "*i32", "SegSlot": "*i32"}
    for dt in ("bf16", "fp32"):
        p, ieee = f"*{dt}", dt == "fp32"
        for bm in (16, 64):
            compile_kernel(lora._shrink_kernel, {
                "X": p, "W": p, "Out": "*fp32", **seg,
                **{n: "i32" for n in ("K", "R", "stride_x", "stride_ws", "stride_wr", "stride_op", "stride_o")}},
                dict(SPLITS=8, K_PER_SPLIT=lora.K_PER_SPLIT, BLOCK_M=bm, BLOCK_R=16, BLOCK_K=64, IEEE=ieee),
                num_warps=4)
            compile_kernel(lora._expand_kernel, {
                "XA": "*fp32", "W": p, "Y": p, **seg,
                **{n: "i32" for n in ("N", "R", "stride_xp", "stride_xa", "stride_ws", "stride_wn", "stride_y")}},
                dict(PARTS=8, BLOCK_M=bm, BLOCK_N=64, BLOCK_R=32, IEEE=ieee), num_warps=4)
            for slots in (1, 8):
                compile_kernel(lora._expand_stacked_kernel, {
                    "YS": p, "W": p, "Out": p, "RowSlot": "*i32",
                    **{n: "i32" for n in ("T", "N", "R", "stride_ys", "stride_ws", "stride_wn", "stride_o")}},
                    dict(NUM_SLOTS=slots, BLOCK_M=bm, BLOCK_N=64, BLOCK_R=16, IEEE=ieee), num_warps=4)


if __name__ == "__main__":
    main()
