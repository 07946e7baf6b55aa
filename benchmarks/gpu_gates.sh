#!/usr/bin/env bash
# Every GPU gate of the open issues, in parts that each fit one lent-device call (< 10 minutes).
#
#   OUT=/path/to/results benchmarks/gpu_gates.sh PART...
#       PART: check check-demo moe fp8 fp8gemm kv hicache ab deterministic dense8b dense05b embed lora tp allreduce pd
#
# Run from the repository root on the GPU machine (the device tool copies the working tree; name
# gen, .whl and the A/B base tree in its `carry`; the pd part needs nixl: carry .whl-nixl alone in a call
# before, it is installed into /tmp/site-nixl, which lasts while the machine is held). Every script writes its own results file
# (commit and dirty flag from .git-state.json: run build-support/git-state.sh before the copy;
# card, versions, command) into $OUT as <script>_<what>_<card>.json; copy them whole into
# benchmarks/results/gpu/. Checkpoints are built once per machine into $TANDEM_GPU_MODELS
# (default /tmp/models; they survive between back-to-back calls). Each step has its own time
# limit, so one slow step leaves the others' results.
#
#   check    gpu_engine_check.py: every correctness check (kernels, graphs, sampler, MoE, EPLB,
#            FP8 weights with the 8B shape, FP8 KV, HiCache), the 8B bf16 logits included
#   moe      tune_fused_moe.py for both MoE shapes (configs copied to $OUT), then the gpu-moe gates
#            (issue 26) on each shape with the transformers baseline at batch 1
#   fp8gemm  fp8_gemm_bench.py: the FP8 GEMM candidates per 8B layer shape and batch (issue 30)
#   fp8      engine_bench --quantization fp8 --compare-bf16 with the block-scaled
#            checkpoint, gates fp8 (issue 30)
#   kv       kv_cache_bench.py --gates on the 32k Llama-3-8B shape (issue 31)
#   hicache  hicache_bench.py on the 8B shape (issue 27)
#   lora     engine_bench --lora on the 8B shape (random weights, nothing built): 4 rank-16 adapters
#            mixed in a batch of 64 >= 0.85x base tok/s, batch 1 >= 0.9x (issue 36)
#   deterministic  gpu_engine_check.py --only deterministic (both demo models and the 8B shape in bf16, with
#            --enable-deterministic-inference and without as the negative control), then the flag's decode
#            step cost at batch 1 and 64, 3 alternating rounds (issue 28)
#   dense8b  the dense engine's 8B gates, each the median of 3 alternating rounds: batch 64 vs transformers
#            static cache (batch 1 vs roofline too), 8k prefill TTFT vs SDPA; the extend kernel's tile
#            candidates vs SDPA flash (issue 29)
#   dense05b 0.5B batch-1 overlap speedup, 3 alternating rounds; first TTFT with warmup in PD vs steady,
#            3 rounds of fresh pairs (issue 29)
#   ab       ab_alternate.py vs the base tree $AB_BASE (default .gpu-base): 0.5B batch 1 tok/s with
#            overlap scheduling, 8B batch 1 and 64 tok/s (issue 25: >= 0.97x the commit before)
#   embed    gpu_engine_check --only embedding (demo embedding model vs transformers, float32, triton), then
#            engine_bench --embedding on the Qwen3-Embedding-0.6B shape (random weights on the device):
#            inputs/s vs transformers SDPA, same batch of 128, uniform 512 (>= 1.1x) and [32, 512] (>= 2x)
#            (issue 35)
#   tp       one GPU: gpu_engine_check.py --only tp-graph (issue 32: a world-size-1 NCCL all-reduce captured in
#            a CUDA graph replays correctly; the demo dense model with its collectives forced on captures them in
#            its decode graphs, replay == eager == one rank), ~1 min. With $TP GPUs (default 2; issue 37's
#            machine) also gpu_engine_check.py --only tp (TP N over NCCL == TP 1 on the demo models, float32),
#            then engine_bench --tp-size on the 8B shape (TP 1 vs TP N tok/s, dummy weights); skipped with
#            fewer GPUs. NCCL with NVLink multicast off (set here and in every rank)
#   allreduce  custom_allreduce_check.py (issue 32): the custom all-reduce of 2 processes on ONE GPU over CUDA IPC,
#            eager and captured in a CUDA graph replayed on new inputs, bitwise == the rank-order sum on every rank;
#            times vs gloo (one GPU: time-shared, not a speed measure), < 1 min. With 2+ GPUs also --spread (one
#            rank a GPU, timed against NCCL)
#   pd       pd_check.py on the demo dense model, bf16, nixl (KV in VRAM): disaggregated vs aggregated tokens,
#            then TTFT of a 1k-token prompt, 15 alternating pairs: disagg p50 <= agg p50 + 5 ms (issue 33).
#            Needs the nixl and grpc wheels in .whl
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the results folder}
M=${TANDEM_GPU_MODELS:-/tmp/models}
AB_BASE=${AB_BASE:-.gpu-base}
mkdir -p "$OUT" "$M"

if [ -d .whl ] && [ ! -d /tmp/site/pydantic ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
if [ -d .whl-nixl ] && [ ! -d /tmp/site-nixl/nixl ]; then  # 57 MB: carried in a call of its own (64 MiB a call)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-nixl .whl-nixl/*.whl
fi
export PYTHONPATH=/tmp/site:/tmp/site-nixl:$PWD/gen/python:$PWD/libs:$PWD/services/router:$PWD/services/prefill:$PWD/services/decode:$PWD/services/eplb:$PWD
[ -f .git-state.json ] && export TANDEM_GIT_STATE=$PWD/.git-state.json
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o 'H[0-9]\+' | tr 'A-Z' 'a-z')
card=${card:-gpu}
py=python3

step() {  # step NAME LIMIT_S CMD...: run with a time limit, log to $OUT/NAME.log, report its time
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "=== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name: rc $rc in $((SECONDS - t0)) s"; tail -n 25 "$OUT/$name.log"
}

build() {  # build SHAPE: a random-weight checkpoint in $M/SHAPE (once per machine)
    [ -f "$M/$1/config.json" ] || step "build_$1" 240 $py benchmarks/engine_bench.py --build "$1" "$M/$1" --no-tokenizer
}

for part in "$@"; do
    case $part in
    check-demo)  # the checks on the demo models only (no 8B build): kernels, graphs, sampler, MoE, EPLB, FP8, KV, HiCache
        step engine_check 300 $py benchmarks/gpu_engine_check.py --out "$OUT/engine_check_demo_$card.json" ;;
    check)
        build llama8b
        step engine_check 330 $py benchmarks/gpu_engine_check.py --bf16-model "$M/llama8b" --fp8-model "$M/llama8b" \
            --out "$OUT/engine_check_$card.json" ;;
    moe)
        step tune_fused_moe 150 $py benchmarks/tune_fused_moe.py --batch-sizes 1 64 --out "$OUT/tune_fused_moe_$card.json"
        mkdir -p "$OUT/moe_configs" && cp libs/tandem/engine/kernels/configs/*.json "$OUT/moe_configs/" 2>/dev/null
        for s in qwen2moe-a2.7b qwen3moe-30b-a3b; do
            step "moe_$s" 170 $py benchmarks/engine_bench.py --shape "$s" --device cuda --dtype bfloat16 \
                --batch-sizes 1 64 --hf-batch-sizes 1 --output-len 32 --gates gpu-moe \
                --out "$OUT/engine_bench_${s}_$card.json"
        done ;;
    fp8)
        build llama8b
        [ -f "$M/llama8b-fp8-block/config.json" ] || step fp8_convert 120 $py -m benchmarks.common.fp8_checkpoint \
            "$M/llama8b" "$M/llama8b-fp8-block" --layout block
        step engine_fp8 240 $py benchmarks/engine_bench.py --model "$M/llama8b" --device cuda --dtype bfloat16 \
            --batch-sizes 1 64 --output-len 64 --quantization fp8 --compare-bf16 \
            --fp8-checkpoint "$M/llama8b-fp8-block" --gates fp8 --out "$OUT/engine_fp8_llama8b_$card.json" ;;
    kv)
        build llama8b_32k
        step kv_cache 200 $py benchmarks/kv_cache_bench.py --model "$M/llama8b_32k" --device cuda --dtype bfloat16 \
            --gates --out "$OUT/kv_cache_bench_llama8b_32k_$card.json" ;;
    hicache)
        build llama8b
        TANDEM_BENCH_STORAGE_DIR=${TANDEM_BENCH_STORAGE_DIR:-/tmp/hicache-storage} \
            step hicache 200 $py benchmarks/hicache_bench.py --model "$M/llama8b" --device cuda --dtype bfloat16 \
            --out "$OUT/hicache_bench_llama8b_$card.json" ;;
    ab)
        build qwen05b
        build llama8b
        step ab_qwen05b 150 $py benchmarks/ab_alternate.py --base-dir "$AB_BASE" --rounds 3 \
            --metric rows.0.tandem_tok_s --out "$OUT/ab_engine_bench_qwen05b_$card.json" -- \
            python3 benchmarks/engine_bench.py --model "$M/qwen05b" --device cuda --dtype bfloat16 --no-hf \
            --batch-sizes 1 --output-len 128 --out '{out}'
        step ab_llama8b 300 $py benchmarks/ab_alternate.py --base-dir "$AB_BASE" --rounds 2 \
            --metric rows.0.tandem_tok_s --metric rows.1.tandem_tok_s --out "$OUT/ab_engine_bench_llama8b_$card.json" -- \
            python3 benchmarks/engine_bench.py --model "$M/llama8b" --device cuda --dtype bfloat16 --no-hf \
            --batch-sizes 1 64 --output-len 64 --out '{out}' ;;
    lora)
        step engine_lora 300 $py benchmarks/engine_bench.py --lora --shape llama8b --device cuda --dtype bfloat16 \
            --batch-sizes 1 64 --input-len 128 --output-len 64 --out "$OUT/engine_lora_llama8b_$card.json" ;;
    tp)
        export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
        step tp_graph_check 150 $py benchmarks/gpu_engine_check.py --only tp-graph \
            --out "$OUT/engine_check_tp_graph_$card.json"
        gpus=$(nvidia-smi -L | wc -l)
        if [ "$gpus" -lt "${TP:-2}" ]; then
            echo "=== tp: $gpus GPU(s), TP ${TP:-2} needs ${TP:-2}: the multi-GPU steps are skipped"
            continue
        fi
        step tp_check 240 $py benchmarks/gpu_engine_check.py --only tp --tp-size "${TP:-2}" \
            --out "$OUT/engine_check_tp${TP:-2}_$card.json"
        step engine_tp 300 $py benchmarks/engine_bench.py --tp-size "${TP:-2}" --shape llama8b --device cuda \
            --dtype bfloat16 --batch-sizes 1 64 --output-len 64 --out "$OUT/engine_tp${TP:-2}_llama8b_$card.json" ;;
    allreduce)
        export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
        step custom_allreduce 110 $py benchmarks/custom_allreduce_check.py --timeout 100 \
            --out "$OUT/custom_allreduce_check_$card.json"
        if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
            step custom_allreduce_spread 110 $py benchmarks/custom_allreduce_check.py --spread --timeout 100 \
                --out "$OUT/custom_allreduce_check_spread2_$card.json"
        fi ;;
    embed)
        step engine_check_embedding 150 $py benchmarks/gpu_engine_check.py --only embedding \
            --out "$OUT/engine_check_embedding_$card.json"
        step engine_embedding 240 $py benchmarks/engine_bench.py --embedding --shape qwen3-embedding-0.6b --device cuda \
            --dtype bfloat16 --embedding-batch 128 --gates embedding \
            --out "$OUT/engine_embedding_qwen3emb06b_$card.json" ;;
    fp8gemm)
        step fp8_gemm 150 $py benchmarks/fp8_gemm_bench.py --out "$OUT/fp8_gemm_bench_$card.json" ;;
    deterministic)
        build llama8b
        step deterministic_check 300 $py benchmarks/gpu_engine_check.py --only deterministic --bf16-model "$M/llama8b" \
            --out "$OUT/deterministic_check_$card.json"
        step deterministic_cost 240 $py benchmarks/engine_bench.py --model "$M/llama8b" --device cuda --dtype bfloat16 \
            --no-hf --batch-sizes 1 64 --output-len 64 --deterministic --rounds 3 --gates deterministic \
            --out "$OUT/engine_bench_deterministic_llama8b_$card.json" ;;
    dense8b)
        build llama8b
        step dense_llama8b 240 $py benchmarks/engine_bench.py --model "$M/llama8b" --device cuda --dtype bfloat16 \
            --batch-sizes 1 64 --hf-batch-sizes 64 --output-len 64 --rounds 3 --gates gpu-part1 \
            --out "$OUT/engine_bench_dense_llama8b_$card.json"
        step extend_attention 90 $py benchmarks/extend_attention_bench.py --out "$OUT/extend_attention_$card.json"
        step dense_prefill_llama8b 200 $py benchmarks/engine_bench.py --phase prefill --model "$M/llama8b" \
            --device cuda --dtype bfloat16 --prefill-lengths 8192 --rounds 3 --gates gpu-part2 \
            --out "$OUT/engine_prefill_llama8b_$card.json" ;;
    dense05b)
        build qwen05b
        step dense_overlap_qwen05b 150 $py benchmarks/engine_bench.py --model "$M/qwen05b" --device cuda \
            --dtype bfloat16 --no-hf --batch-sizes 1 --output-len 128 --overlap-ab --rounds 3 --gates gpu-part1 \
            --out "$OUT/engine_bench_overlap_qwen05b_$card.json"
        step dense_warmup 400 $py benchmarks/warmup_bench.py --rounds 3 --steady 6 \
            --out "$OUT/warmup_bench_$card.json" ;;
    pd)
        step pd_check 420 $py benchmarks/pd_check.py --device cuda --dtype bfloat16 --backends nixl \
            --long-prompt 1024 --ttft-samples 15 --out "$OUT/pd_check_demo_dense_$card.json" ;;
    *) echo "unknown part $part (check check-demo moe fp8 fp8gemm kv hicache ab deterministic dense8b dense05b embed lora tp allreduce pd)"
       exit 2 ;;
    esac
done
