"""Compile every Triton kernel for an H100/H200 (sm_90) without a GPU: Triton's front end and
ptxas run on CPU. Catches what the interpreter accepts but the compiler rejects (an if-block
that re-types a variable, a block shape that is not a power of two, ...). Run in a process
without TRITON_INTERPRET (test_kernels_compile.py does)."""
from __future__ import annotations

import triton
from tandem.engine.kernels import (
    activation,
    decode_attention,
    extend_attention,
    fused_moe,
    kv_transfer,
    norm,
    rope_kv,
    sampling,
)
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, signature: dict, constexprs: dict) -> None:
    sig = dict(signature, **{k: "constexpr" for k in constexprs})
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=TARGET)


def main() -> None:
    for dt in ("bf16", "fp32"):
        p = f"*{dt}"
        compile_kernel(rope_kv._rope_kv_kernel, {
            **{n: p for n in ("Q", "K", "V")}, "Positions": "*i64", "Cos": "*fp32", "Sin": "*fp32",
            "SlotMapping": "*i64", "KCache": p, "VCache": p,
            **{n: "i32" for n in ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                                  "stride_cos", "stride_cache_slot", "stride_cache_head")}},
            dict(NUM_HEADS=14, NUM_KV_HEADS=2, HEAD_DIM=64, ROT_HALF=16, BLOCK_H=16, BLOCK_KVH=2, BLOCK_HALF=16,
                 BLOCK_REST=32, BLOCK_D=64))
        for splits, group in ((1, 4), (8, 7)):
            compile_kernel(decode_attention._decode_partial_kernel, {
                "Q": p, "K": p, "V": p, "PageTable": "*i32", "SeqLens": "*i64", "PartialOut": "*fp32",
                "PartialLse": "*fp32", "Out": p, "sm_scale": "fp32",
                **{n: "i32" for n in ("stride_qb", "stride_qh", "stride_k_slot", "stride_k_head", "stride_v_slot",
                                      "stride_v_head", "stride_pt", "stride_ob", "stride_oh", "stride_os",
                                      "stride_lb", "stride_lh", "stride_out_b", "stride_out_h")}},
                dict(PAGE_SIZE=16, GROUP=group, HEAD_DIM=128, NUM_SPLITS=splits, BLOCK_H=16, BLOCK_D=128,
                     BLOCK_N=decode_attention.BLOCK_N, IEEE=dt == "fp32"))
        compile_kernel(extend_attention._extend_attention_kernel, {
            "Q": p, "K": p, "V": p, "Out": p, "PageTable": "*i32", "QStart": "*i64", "QLens": "*i64",
            "SeqLens": "*i64", "sm_scale": "fp32",
            **{n: "i32" for n in ("stride_qt", "stride_qh", "stride_k_slot", "stride_k_head", "stride_v_slot",
                                  "stride_v_head", "stride_pt", "stride_ot", "stride_oh")}},
            dict(PAGE_SIZE=16, GROUP=7, HEAD_DIM=64, BLOCK_M=extend_attention.BLOCK_M,
                 BLOCK_N=extend_attention.BLOCK_N, BLOCK_D=64, IEEE=dt == "fp32"))
        for mul_weight, rows in ((False, 8), (True, 1)):
            compile_kernel(fused_moe._moe_gemm_kernel, {
                "A": p, "B": p, "C": p, "SortedIds": "*i64", "BlockSlot": "*i64", "Weights": "*fp32",
                "N": "i32", "K": "i32", "num_entries": "i32",
                **{n: "i32" for n in ("stride_am", "stride_be", "stride_bn", "stride_cm")}},
                dict(ROWS_PER_TOKEN=rows, MUL_WEIGHT=mul_weight, NUM_SLOTS=72, BLOCK_M=fused_moe.BLOCK_M,
                     BLOCK_N=fused_moe.BLOCK_N, BLOCK_K=fused_moe.BLOCK_K, IEEE=dt == "fp32"))
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
    for word in ("*i32", "*i16", "*u8"):  # KV pages move as 32-bit words (16/8 when a page is odd-sized)
        for to_host in (False, True):
            compile_kernel(kv_transfer._kv_transfer_kernel, {
                "Dev": word, "DevOffsets": "*i64", "Host": word, "DevPages": "*i64", "HostPages": "*i64",
                "layer_start": "i32", "num_layers_here": "i32", "chunk": "i32", "host_page_stride": "i64",
                "host_kv_stride": "i64", "host_layer_stride": "i64"},
                dict(NUM_LAYERS=32, ALIGN=4, BLOCK=2048, TO_HOST=to_host))
    print("all kernels compiled for sm_90")


if __name__ == "__main__":
    main()
