"""Typed configuration schemas, one per service, composed from shared sections.

Field names are SGLang's flag names with dashes turned into underscores, so
``--page-size`` sets ``page_size``. Every field carries a description: it is the
``--help`` text.
"""
from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ServerConfig(_Section):
    host: str = Field("127.0.0.1", description="Address the gRPC server binds to.")
    port: int = Field(0, ge=0, le=65535, description="gRPC port (0 = pick a free port).")
    system_port: int = Field(
        0, ge=0, le=65535, description="HTTP port for /health, /metrics and /engine/* (0 = free port)."
    )
    advertise_host: str | None = Field(
        None, description="Host other processes reach this one at, registered in etcd (default --host; set it, "
        "e.g. to the pod IP, when --host is 0.0.0.0)."
    )
    worker_id: str | None = Field(None, description="Unique id of this process (default advertised host:port).")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_format: Literal["text", "json"] = Field("text", description="Log line format.")
    node_rank: int = Field(0, ge=0, description="Rank of this node in a multi-node worker (0 = leader).")
    shutdown_grace_period: float = Field(
        5.0, gt=0, description="Seconds to drain in-flight requests on SIGTERM before exiting."
    )
    ready_file: str | None = Field(
        None, description="Write the bound ports as JSON to this file once serving (used by deploy-local)."
    )
    ssl_certfile: str | None = Field(
        None, description="PEM certificate of this process: serve gRPC and HTTP over TLS and present it to the "
        "services it calls (needs --ssl-keyfile). Reloaded on SIGHUP (gRPC also when the file changes)."
    )
    ssl_keyfile: str | None = Field(None, description="PEM private key of --ssl-certfile.")
    ssl_ca_certs: str | None = Field(
        None, description="PEM CA bundle: mutual TLS. Servers require client certificates chaining to it; clients "
        "accept only servers (workers, prefill, planner) whose certificate chains to it."
    )
    admin_token: str | None = Field(
        None, description="Require this bearer token on the system port's admin routes (profiling, expert "
        "recorder, EPLB status) and on gRPC EngineControl (authorization metadata); /health and /metrics stay open."
    )
    admin_token_file: str | None = Field(None, description="Read --admin-token from this file (first line).")

    @model_validator(mode="after")
    def _check_tls(self):
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError(f"ssl_certfile={self.ssl_certfile!r}, ssl_keyfile={self.ssl_keyfile!r}: "
                             "give both or neither")
        if self.ssl_ca_certs and not self.ssl_certfile:
            raise ValueError(f"ssl_ca_certs={self.ssl_ca_certs!r}: mutual TLS needs this process's own "
                             "--ssl-certfile and --ssl-keyfile")
        for name in ("ssl_certfile", "ssl_keyfile", "ssl_ca_certs", "admin_token_file"):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ValueError(f"{name}={path!r}: no such file")
        if self.admin_token and self.admin_token_file:
            raise ValueError("admin_token and admin_token_file: give one")
        return self


class EngineConfig(_Section):
    model_path: str | None = Field(None, description="Hugging Face checkpoint directory.")
    served_model_name: str | None = Field(None, description="Model name in APIs (default: directory name).")
    load_format: Literal["auto", "dummy"] = Field(
        "auto", description="auto: read the checkpoint's safetensors; dummy: random weights of the checkpoint's "
        "shape (config.json only), created on the device (benchmarks of shapes without their weights)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype, and KV dtype unless --kv-cache-dtype says otherwise (auto = float32 on "
        "CPU, bfloat16 on CUDA)."
    )
    kv_cache_dtype: Literal["auto", "fp8_e4m3", "fp8_e5m2"] = Field(
        "auto", description="KV cache element type (SGLang's flag): auto = --dtype; fp8_e4m3 or fp8_e5m2 store one "
        "byte per element (twice the tokens in the same memory) with a K and a V scale per layer, read from the "
        "checkpoint (k_scale/v_scale) when present, else 1.0 with a warning, or measured by --kv-cache-calibrate."
    )
    kv_cache_calibrate: int = Field(
        0, ge=0, le=4096, description="tandem's own flag (SGLang has none): with an FP8 --kv-cache-dtype, measure "
        "the per-layer K/V scales at start on this many built-in prompts (512 tokens each) instead of reading "
        "them from the checkpoint: the power of two at or above 2 x the largest |K| (|V|) / the FP8 maximum "
        "(0 = off). Prefill and decode workers must use the same value. Not with --ep-size > 1 (the passes run "
        "before the expert-parallel group forms: give the checkpoint k_scale/v_scale there)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Device to run on.")
    quantization: Literal["fp8"] | None = Field(
        None, description="fp8: FP8 E4M3 weights for the dense linear layers (lm_head and embeddings stay in "
        "--dtype). A bf16/fp32 checkpoint is quantized at load time (per-channel weight scales, dynamic per-token "
        "activation scales); an FP8 checkpoint (config.json quantization_config.quant_method fp8: block-scaled "
        "weight_block_size or per-tensor) is recognised without this flag. MoE checkpoints: not yet."
    )
    fp8_gemm_backend: Literal["auto", "scaled_mm", "triton", "torch"] = Field(
        "auto", description="FP8 GEMMs: auto (on CUDA, the fastest of torch._scaled_mm and the Triton kernels, "
        "measured once per layer shape and batch-size bucket at first use; on CPU, torch), scaled_mm "
        "(torch._scaled_mm; per-channel layouts only), triton (the Triton kernels; CPU needs TRITON_INTERPRET=1) "
        "or torch (dequantize and matmul: the reference)."
    )
    page_size: int = Field(16, ge=1, le=4096, description="Tokens per KV page (16 on CPU, 128 suggested on GPU).")
    max_total_tokens: int | None = Field(
        None, ge=1, description="KV pool size in tokens (overrides --mem-fraction-static)."
    )
    mem_fraction_static: float = Field(
        0.8, gt=0, le=1, description="Fraction of free device memory for weights + KV pool (CUDA)."
    )
    context_length: int | None = Field(None, ge=1, description="Override the model's context length.")
    chunked_prefill_size: int | None = Field(
        None, ge=1, description="Maximum prompt tokens computed in one step (default: 512 on CPU; on CUDA "
        "by device memory, as SGLang: 2048 below 35 GB, 4096 below 60 GB, else 8192)."
    )
    max_running_requests: int = Field(64, ge=1, description="Maximum requests in the running batch.")
    max_prefill_tokens: int = Field(8192, ge=1, description="Maximum new prompt tokens admitted per step.")
    disable_radix_cache: bool = Field(False, description="Disable the radix prefix cache.")
    enable_mixed_chunk: bool = Field(
        True, description="Running decodes join each prefill chunk's step, so a long prompt delays them by "
        "one chunk at most (--no-enable-mixed-chunk: decodes wait until no prefill work is left)."
    )
    attention_backend: Literal["torch_native", "triton"] | None = Field(
        None, description="Attention kernels: triton (paged Triton kernels, the default on CUDA) or "
        "torch_native (the torch reference, the default on CPU; triton on CPU needs TRITON_INTERPRET=1)."
    )
    cuda_graph_max_bs: int | None = Field(
        None, ge=1, le=1024, description="Largest decode batch run as a captured CUDA graph (CUDA + triton "
        "backend; default: --max-running-requests); larger batches run eagerly."
    )
    disable_cuda_graph: bool = Field(False, description="Run decode eagerly instead of replaying CUDA graphs.")
    enable_deterministic_inference: bool = Field(False, description=(
        "Batch-invariant computation (SGLang's flag), so that a greedy or seeded request gets the same tokens "
        "and logprobs alone or in any batch, with or without prefix-cache hits and chunked prefill, aggregated "
        "or disaggregated, in bf16 too (checked on CPU in float32; on the GPU by benchmarks/gpu_engine_check.py "
        "--only deterministic). Every linear layer (LM head, MoE router) runs a GEMM whose tiles do not "
        "depend on the batch size, and every attention row (prompt, decode, mixed) the same kernel over its "
        "context in a fixed order; LoRA deltas (--enable-lora) run the per-row SGMV kernels with one fixed "
        "row tile; CUDA graphs and overlap scheduling stay on. Costs decode speed "
        "(benchmarks/engine_bench.py --deterministic measures it). Needs the triton attention backend (on CPU: "
        "TRITON_INTERPRET=1, for tests)."))
    disable_overlap_schedule: bool = Field(False, description=(
        "Wait for each step's sampled tokens before scheduling the next step. By default the next "
        "step is scheduled and launched while the device still samples (overlap scheduling); steps "
        "with grammar-constrained or prefill-only requests, and expert parallelism, always wait."))
    random_seed: int = Field(0, description="Seed for weight-independent randomness (sampling without seed).")
    skip_warmup: bool = Field(False, description="Skip the warmup request before reporting healthy.")
    warmup_timeout: float = Field(1800.0, gt=0, description="Seconds the warmup request may take.")
    profile_dir: str = Field("/tmp/tandem-profiles", description="Default output folder of the torch profiler.")
    torch_num_threads: int = Field(
        0, ge=0, description="torch intra-op threads (0 = torch's default); 1 suits several workers per host."
    )
    # HiCache
    enable_hierarchical_cache: bool = Field(
        False, description="Enable HiCache: KV pages evicted from the device pool go to a host-memory pool "
        "(and to --hicache-storage-backend) and are loaded back when a request reuses the prefix."
    )
    hicache_ratio: float = Field(2.0, ge=2.0, description="Host KV pool size as a multiple of the device pool.")
    hicache_size: int = Field(0, ge=0, description="Host KV pool size in GB (overrides --hicache-ratio).")
    hicache_write_policy: Literal["write_through", "write_through_selective", "write_back"] = Field(
        "write_through", description="When device pages are copied to host: write_through as they are computed, "
        "write_through_selective once a prefix is hit twice, write_back only on device eviction."
    )
    hicache_mem_layout: Literal["layer_first", "page_first"] = Field(
        "layer_first", description="Host pool layout: layer_first (per layer buffers, like the device pool) or "
        "page_first (all layers of a page contiguous: one copy per page to the device or storage)."
    )
    hicache_io_backend: Literal["direct", "kernel"] = Field(
        "kernel", description="Host<->device page copies: kernel (on CUDA a Triton kernel moves any set of pages "
        "over all layers in one launch, a load-back one launch per layer; on CPU indexed copies) or direct (a DMA "
        "copy per run of consecutive pages, layer and K/V)."
    )
    hicache_storage_backend: Literal["file", "nixl"] | None = Field(
        None, description="Third KV tier under the host pool: file (one checked file per page under "
        "--hicache-storage-dir, keyed by the block hash chain, checked on read; survives restarts) or nixl (the same "
        "files, page bytes moved by NIXL's POSIX plugin)."
    )
    hicache_storage_dir: str = Field("/tmp/tandem-hicache", description="Folder of the file storage backend.")
    hicache_storage_prefetch_policy: Literal["best_effort", "wait_complete", "timeout"] = Field(
        "best_effort", description="How long a request waits for its prefix pages read from storage: "
        "best_effort (never: uses what was read), wait_complete (until read), timeout (at most "
        "--hicache-storage-prefetch-timeout seconds)."
    )
    hicache_storage_prefetch_timeout: float = Field(
        1.0, gt=0, description="Seconds a request waits for storage pages with --hicache-storage-prefetch-policy timeout."
    )
    hicache_storage_max_bytes: int = Field(
        0, ge=0, description="Largest size of the storage folder's pages in bytes (0: no limit); beyond it the "
        "least recently used chains are removed, from their last page."
    )
    # LoRA adapters (tandem.engine.lora)
    enable_lora: bool = Field(
        False, description="Serve LoRA adapters chosen per request (OpenAI model 'base:adapter'); on by itself when "
        "--lora-paths is given. Not with --is-embedding nor --tp-size > 1.")
    lora_paths: list[str] = Field(
        default_factory=list, description="Adapters loaded at start, each NAME=PATH (a PEFT folder with "
        "adapter_config.json and adapter_model.safetensors).")
    max_loras_per_batch: int = Field(
        8, ge=1, description="Adapters one batch may mix (device slots of static buffers; a request waits while "
        "every slot serves another adapter).")
    max_lora_rank: int | None = Field(
        None, ge=1, description="Largest adapter rank the slots hold (default: the largest rank of --lora-paths).")
    max_loaded_loras: int | None = Field(
        None, ge=1, description="Adapters kept in host memory, least recently used dropped and read again from disk "
        "when next used (default: all).")
    # Embeddings
    is_embedding: bool = Field(
        False, description="Serve embeddings (SGLang's flag): the worker answers Embed (the router's "
        "/v1/embeddings) instead of Generate; one forward pass per batch of inputs, no decode, KV pages freed "
        "after the pass, prefix cache off. Aggregated workers only (--disaggregation-mode null)."
    )
    pooling: Literal["last", "mean", "cls"] | None = Field(
        None, description="--is-embedding: how a sequence's final hidden states become its vector: last (the last "
        "token, Qwen3-Embedding), mean (all tokens) or cls (the first token). Default: the checkpoint's "
        "sentence-transformers files (modules.json, 1_Pooling/config.json), else last."
    )
    embedding_normalize: Literal["auto", "on", "off"] = Field(
        "auto", description="--is-embedding: L2-normalise each vector (after --pooling and the request's "
        "dimensions truncation). auto = when the checkpoint's modules.json has a Normalize module (a checkpoint "
        "without sentence-transformers files: on)."
    )
    # Tensor / expert parallelism, EPLB
    tp_size: int = Field(
        1, ge=1, json_schema_extra={"flag_aliases": ["--tensor-parallel-size"]},
        description="Tensor-parallel ranks, one process each (rank 0 serves, ranks 1.. follow it): attention "
        "heads, MLP and vocabulary sharded over them (NCCL on CUDA, gloo on CPU). The model's attention heads "
        "must divide by it (KV heads too, or it by them: then KV heads are replicated). On prefill and decode "
        "workers each rank moves its own KV heads; prefill and decode may differ in TP size."
    )
    disable_custom_all_reduce: bool = Field(
        False, description="With --tp-size > 1 on CUDA: NCCL for every TP all-reduce. By default the small ones "
        "(up to 512 KiB: decode's) go through a one-shot all-reduce over peer-to-peer device buffers (CUDA IPC) "
        "when all ranks are on one host with peer access; NCCL otherwise and for larger messages."
    )
    dist_timeout: float = Field(
        600.0, gt=0, description="Seconds any collective between a worker's ranks may take (--tp-size / --ep-size > 1): "
        "past it a rank that hangs fails the worker instead of blocking it (a rank that dies fails it at once)."
    )
    ep_size: int = Field(1, ge=1, description="Expert-parallel ranks. With --tp-size > 1: 1 (experts sharded "
                         "over the TP ranks along their intermediate size) or equal to --tp-size (each rank "
                         "holds whole experts, placed as EPLB says).")
    enable_eplb: bool = Field(False, description="Rebalance expert placement from recorded load.")
    ep_num_redundant_experts: int = Field(0, ge=0, description="Extra physical expert slots per layer.")
    ep_dispatch_algorithm: Literal["static", "dynamic", "random"] = Field(
        "static", description="How a token picks among replicas of its expert."
    )
    expert_distribution_recorder_mode: Literal["per_token", "per_pass", "stat", "stat_approx"] | None = Field(
        None, description="Expert-distribution recorder mode (None = off unless EPLB is on, then stat)."
    )
    expert_distribution_recorder_buffer_size: int = Field(
        1000, ge=1, description="Forward passes kept by the stat recorder's sliding window."
    )
    eplb_rebalance_num_iterations: int = Field(1000, ge=1, description="Forward passes between rebalances.")
    init_expert_location: str = Field(
        "trivial", description="Initial placement: trivial, a .json/.pt file, or inline JSON."
    )
    eplb_planner_address: str | None = Field(None, description="EPLB planner gRPC address (host:port).")

    @property
    def world_size(self) -> int:
        """Processes of one worker: the TP ranks (EP shares them), or the EP ranks without TP."""
        return max(self.tp_size, self.ep_size)

    @model_validator(mode="after")
    def _check_lora(self):
        seen = set()
        for item in self.lora_paths:
            name, sep, path = item.partition("=")
            if not sep or not name or not path or ":" in name:
                raise ValueError(f"lora_paths item {item!r}: expected NAME=PATH (NAME without ':')")
            if name in seen:
                raise ValueError(f"lora_paths: adapter name {name!r} given twice")
            seen.add(name)
        if self.lora_enabled and self.is_embedding:
            raise ValueError("enable_lora / lora_paths: not with is_embedding=true (an embedding worker serves the "
                             "base model only: Embed requests name no adapter)")
        if self.lora_enabled and self.tp_size > 1:
            # Column-parallel layers (QKV, gate/up) would need each adapter's B sliced like their output,
            # row-parallel ones (o_proj, down_proj) its A sliced like their input and the shrink summed
            # over the ranks before the expand: not built.
            raise ValueError(f"enable_lora / lora_paths: not with tp_size={self.tp_size} (the adapters' LoRA "
                             "weights are not sharded over tensor-parallel ranks); use tp_size=1")
        if self.lora_enabled and not self.lora_paths and self.max_lora_rank is None:
            raise ValueError("max_lora_rank: required with enable_lora when no lora_paths are given "
                             "(adapters loaded later must fit it)")
        return self

    @property
    def lora_enabled(self) -> bool:
        """``enable_lora``, or adapters given with ``lora_paths``."""
        return self.enable_lora or bool(self.lora_paths)

    @property
    def lora_path_map(self) -> dict[str, str]:
        """``lora_paths`` as {name: path}."""
        return dict(item.partition("=")[::2] for item in self.lora_paths)

    @model_validator(mode="after")
    def _check_deterministic(self):
        if self.enable_deterministic_inference and self.attention_backend == "torch_native":
            raise ValueError("enable_deterministic_inference needs attention_backend='triton' (torch_native's "
                             "padded dense attention and cuBLAS GEMMs depend on the batch)")
        return self

    @model_validator(mode="after")
    def _check_embedding(self):
        if not self.is_embedding:
            if self.pooling is not None or self.embedding_normalize != "auto":
                raise ValueError("pooling / embedding_normalize: only with is_embedding=true")
            return self
        refused = {"tp_size": self.tp_size > 1, "ep_size": self.ep_size > 1, "enable_hierarchical_cache": self.enable_hierarchical_cache,
                   "enable_eplb": self.enable_eplb, "kv_cache_calibrate": self.kv_cache_calibrate > 0}
        bad = [k for k, on in refused.items() if on]
        if bad:
            raise ValueError(f"is_embedding=true: not with {', '.join(bad)} (an embedding worker runs one "
                             "rank, keeps no KV and samples nothing)")
        return self

    @model_validator(mode="after")
    def _check_redundancy(self):
        if self.tp_size > 1 and self.ep_size not in (1, self.tp_size):
            raise ValueError(
                f"ep_size={self.ep_size} with tp_size={self.tp_size}: allowed are ep_size=1 (experts sharded over "
                f"the TP ranks) or ep_size={self.tp_size} (whole experts per rank); ep_size < tp_size is not "
                "supported yet"
            )
        if self.ep_num_redundant_experts and self.ep_num_redundant_experts % self.ep_size:
            raise ValueError(
                f"ep_num_redundant_experts={self.ep_num_redundant_experts}: must be a multiple of "
                f"ep_size={self.ep_size} so every rank gets the same number of slots"
            )
        if self.tp_size > 1 and self.quantization is not None:
            raise ValueError(
                f"quantization={self.quantization!r} with tp_size={self.tp_size}: FP8 weights are not sharded yet; "
                "use tp_size=1 or bf16 weights"
            )
        if self.world_size > 1 and self.kv_cache_calibrate:
            # The calibration passes run while the engine is built, before the followers join it,
            # and an MoE layer needs every rank's experts.
            raise ValueError(
                f"kv_cache_calibrate={self.kv_cache_calibrate}: not supported with tp_size={self.tp_size}, "
                f"ep_size={self.ep_size}; "
                "give the checkpoint's k_scale/v_scale (or calibrate on a single-rank worker and write its "
                "scales into the checkpoint)"
            )
        return self


class DisaggregationConfig(_Section):
    disaggregation_mode: Literal["null", "prefill", "decode"] = Field(
        "null", description="null = aggregated worker; prefill or decode = one side of PD disaggregation."
    )
    disaggregation_transfer_backend: Literal["nixl", "grpc"] = Field(
        "nixl", description="How KV pages move from prefill to decode."
    )
    disaggregation_bootstrap_timeout: float = Field(
        300.0, gt=0, description="Seconds a room may stay Bootstrapping: until its decode pages are allocated "
        "(SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT)."
    )
    disaggregation_waiting_timeout: float = Field(
        300.0, gt=0, description="Seconds a room may stay WaitingForInput: pages allocated, nothing of prefill "
        "arrived yet (SGLANG_DISAGGREGATION_WAITING_TIMEOUT)."
    )
    disaggregation_transfer_timeout: float = Field(
        300.0, gt=0, description="Seconds a room may stay Transferring, from its first KV data to done (decode); "
        "seconds prefill waits for its writes to finish (prefill)."
    )


class EtcdClientConfig(_Section):
    """Where etcd is, and TLS towards it: client certificate and CA of an https:// --etcd-endpoint
    (etcdctl's --cert, --key, --cacert). Each defaults to the process's own --ssl-* file; an https
    endpoint needs both."""

    etcd_endpoint: str | None = Field(None, description="etcd's v3 JSON gateway URL, http:// or https://.")
    etcd_prefix: str = Field("/tandem/workers/", description="etcd key prefix workers register under.")
    etcd_ssl_certfile: str | None = Field(
        None, description="PEM client certificate presented to an https:// --etcd-endpoint (etcd run with "
        "--client-cert-auth); default --ssl-certfile. Reread when the file changes."
    )
    etcd_ssl_keyfile: str | None = Field(None, description="PEM private key of --etcd-ssl-certfile; default "
                                         "--ssl-keyfile.")
    etcd_ssl_ca_certs: str | None = Field(
        None, description="PEM CA bundle that etcd's server certificate must chain to; default --ssl-ca-certs."
    )

    def uses_etcd(self) -> bool:
        return bool(self.etcd_endpoint)

    def etcd_tls_paths(self) -> tuple[str, str, str] | None:
        """(client certificate, its key, CA bundle) for etcd, or None for a plaintext endpoint."""
        if not self.uses_etcd() or not self.etcd_endpoint.startswith("https://"):
            return None
        certfile = self.etcd_ssl_certfile or getattr(self, "ssl_certfile", None)
        keyfile = self.etcd_ssl_keyfile or getattr(self, "ssl_keyfile", None)
        ca_certs = self.etcd_ssl_ca_certs or getattr(self, "ssl_ca_certs", None)
        return certfile, keyfile, ca_certs

    @model_validator(mode="after")
    def _check_etcd_tls(self):
        given = {n: getattr(self, n) for n in ("etcd_ssl_certfile", "etcd_ssl_keyfile", "etcd_ssl_ca_certs")}
        if bool(given["etcd_ssl_certfile"]) != bool(given["etcd_ssl_keyfile"]):
            raise ValueError(f"etcd_ssl_certfile={given['etcd_ssl_certfile']!r}, "
                             f"etcd_ssl_keyfile={given['etcd_ssl_keyfile']!r}: give both or neither")
        endpoint = self.etcd_endpoint
        if endpoint and not endpoint.startswith(("http://", "https://")):
            raise ValueError(f"etcd_endpoint={endpoint!r}: must be an http:// or https:// URL")
        named = ", ".join(n for n, v in given.items() if v)
        if named and not self.uses_etcd():
            raise ValueError(f"{named}: etcd TLS files, but this process does not use etcd (set --etcd-endpoint; "
                             "the router also --discovery etcd)")
        if named and not endpoint.startswith("https://"):
            raise ValueError(f"{named}: etcd TLS files need an https:// etcd_endpoint, not {endpoint!r}")
        for name, path in given.items():
            if path and not os.path.isfile(path):
                raise ValueError(f"{name}={path!r}: no such file")
        paths = self.etcd_tls_paths()
        if paths and not paths[2]:
            raise ValueError(f"etcd_endpoint={endpoint!r}: https needs the CA of etcd's server certificate "
                             "(--etcd-ssl-ca-certs or --ssl-ca-certs)")
        if paths and not paths[0]:
            raise ValueError(f"etcd_endpoint={endpoint!r}: https needs a client certificate for etcd's "
                             "--client-cert-auth (--etcd-ssl-certfile/--etcd-ssl-keyfile or --ssl-certfile/--ssl-keyfile)")
        return self


class DiscoveryConfig(EtcdClientConfig):
    etcd_endpoint: str | None = Field(
        None, description="Register this worker in etcd (v3 JSON gateway URL, http:// or https://) so routers "
        "discover it."
    )
    etcd_ttl: float = Field(5.0, gt=0, description="Lease TTL in seconds; the key vanishes this long after a crash.")


class PrefillConfig(ServerConfig, EngineConfig, DisaggregationConfig, DiscoveryConfig):
    """`python -m tandem.prefill`"""

    port: int = Field(50061, ge=0, le=65535, description="gRPC port (0 = pick a free port).")
    system_port: int = Field(8061, ge=0, le=65535, description="HTTP port for /health, /metrics, /engine/*.")
    disaggregation_mode: Literal["prefill"] = Field("prefill", description="Always prefill for this service.")

    @model_validator(mode="after")
    def _check_not_embedding(self):
        if self.is_embedding:
            raise ValueError("is_embedding=true: embedding workers are aggregated (python -m tandem.decode "
                             "--disaggregation-mode null), not prefill workers")
        return self


class DecodeConfig(ServerConfig, EngineConfig, DisaggregationConfig, DiscoveryConfig):
    """`python -m tandem.decode` (also the aggregated worker with --disaggregation-mode null)."""

    port: int = Field(50071, ge=0, le=65535, description="gRPC port (0 = pick a free port).")
    system_port: int = Field(8071, ge=0, le=65535, description="HTTP port for /health, /metrics, /engine/*.")
    disaggregation_mode: Literal["null", "decode"] = Field(
        "null", description="null = aggregated worker (prefill and decode here); decode = use prefill workers."
    )
    prefill_addresses: list[str] = Field(default_factory=list, description="Prefill workers' gRPC addresses.")
    prefill_discovery: Literal["static", "etcd"] = Field(
        "static", description="static = --prefill-addresses; etcd = follow the prefill workers of this model "
        "registered under --etcd-prefix at --etcd-endpoint (they come and go as they scale)."
    )
    prefill_selection: Literal["round_robin", "kv_aware"] = Field(
        "round_robin", description="How decode picks a prefill worker."
    )
    max_local_prefill_length: int = Field(
        0, ge=0, description="Prompts shorter than this many tokens are prefilled locally (with "
        "--disaggregation-decode-enable-radix-cache: the part not in this worker's prefix cache)."
    )
    disaggregation_decode_enable_radix_cache: bool = Field(
        False, description="Decode-side prefix reuse for PD (SGLang's flag): the leading pages of a prompt that "
        "this worker's prefix cache holds (e.g. an earlier turn of a chat) are shared instead of transferred; "
        "prefill writes only the pages after them.")
    prefill_retries: int = Field(1, ge=0, description="Retries on another prefill worker after a failure.")
    max_queued_requests: int | None = Field(
        None, ge=0, description="Requests waiting beyond the running batch (--max-running-requests); more are "
        "refused with RESOURCE_EXHAUSTED (None = unbounded).")
    drain_timeout: float = Field(
        30.0, ge=0, description="EngineControl.Drain moves each decoding request's KV to the worker its router "
        "picks (the PD page-write path, --disaggregation-transfer-backend); a request not fetched within this "
        "many seconds is given up and recomputed there, as one whose stream broke (--migration-limit). "
        "0 = never move KV: a drain hands every request back to be recomputed. Workers of several ranks "
        "(--tp-size/--ep-size > 1) never move KV.")

    @model_validator(mode="after")
    def _check_prefills(self):
        if self.disaggregation_mode != "decode":
            return self
        if self.is_embedding:
            raise ValueError("is_embedding=true: embedding workers are aggregated (--disaggregation-mode null)")
        if self.prefill_discovery == "etcd" and not self.etcd_endpoint:
            raise ValueError("prefill_discovery='etcd': needs --etcd-endpoint")
        if self.prefill_discovery == "static" and not self.prefill_addresses:
            raise ValueError("prefill_addresses=[]: decode mode needs at least one prefill worker address "
                             "(or --prefill-discovery etcd)")
        return self


class RouterConfig(ServerConfig, EtcdClientConfig):
    """`python -m tandem.router`"""

    port: int = Field(50051, ge=0, le=65535, description="gRPC port of the Router service.")
    system_port: int = Field(8051, ge=0, le=65535, description="HTTP port for /health and /metrics.")
    http_port: int = Field(8000, ge=0, le=65535, description="OpenAI-compatible HTTP port.")
    model_path: str | None = Field(None, description="Checkpoint directory (tokenizer + chat template).")
    served_model_name: str | None = Field(None, description="Model name in the API (default: directory name).")
    workers: list[str] = Field(default_factory=list, description="Worker gRPC addresses (static discovery).")
    discovery: Literal["static", "etcd"] = Field("static", description="How workers are found.")
    etcd_endpoint: str = Field(
        "http://127.0.0.1:2379", description="etcd endpoint, v3 JSON gateway URL: http:// or https:// (etcd discovery).")
    routing_policy: Literal["round_robin", "random", "least_loaded", "kv_aware"] = Field(
        "round_robin", description="How the router picks a worker."
    )
    kv_overlap_weight: float = Field(1.0, ge=0, description="kv_aware: weight of prefix overlap vs load.")
    kv_host_hit_weight: float = Field(
        0.5, ge=0, le=1, description="kv_aware: a prefix block a worker holds only in its host tier (HiCache) "
        "counts as this fraction of a block on its device (it needs a load-back copy)."
    )
    api_key: str | None = Field(
        None, description="Require this bearer token on the OpenAI HTTP API and on gRPC Router.Generate "
        "(`authorization: Bearer <key>` metadata).")
    api_key_file: str | None = Field(None, description="Read --api-key from this file (first line).")
    max_request_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest request body (HTTP, 413) and Router.Generate message "
        "(gRPC, RESOURCE_EXHAUSTED) accepted.")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Longest prompt in tokens (400 / INVALID_ARGUMENT; default: the context length).")
    max_output_tokens: int | None = Field(
        None, ge=1, description="Largest max_tokens (400 / INVALID_ARGUMENT); a request without max_tokens is "
        "capped to it (default: the rest of the context).")
    max_n: int = Field(16, ge=1, le=16, description="Most samples per request (n).")
    max_stop_strings: int = Field(16, ge=0, description="Most stop strings per request.")
    max_stop_string_length: int = Field(256, ge=1, description="Longest stop string in characters.")
    max_logit_bias: int = Field(300, ge=0, description="Most logit_bias entries per request.")
    max_concurrent_requests: int = Field(
        0, ge=0, description="Requests in flight on this router; more are refused with 429 / RESOURCE_EXHAUSTED "
        "and Retry-After (0 = unlimited).")
    max_concurrent_requests_per_key: int = Field(
        0, ge=0, description="Requests in flight per client key (its bearer token, else its address); more get "
        "429 / RESOURCE_EXHAUSTED (0 = unlimited).")
    stream_stall_timeout: float = Field(
        60.0, ge=0, description="Seconds a client may take no data while the router has output waiting for it "
        "(HTTP: its socket takes no byte; gRPC: no message send completes); then its stream is dropped and the "
        "worker's request cancelled, freeing its KV pages. A slow client that keeps reading is never dropped "
        "(0 = never drop).")
    health_check_interval: float = Field(0.5, gt=0, description="Seconds between worker health checks.")
    health_check_failures: int = Field(
        2, ge=1, description="Timed-out health checks in a row that take a worker out of rotation (a refused "
        "connection or NOT_SERVING takes it out at the first check).")
    request_retries: int = Field(1, ge=0, description="Retries on another worker when one fails before output.")
    migration_limit: int = Field(
        0, ge=0, description="Request migration (Dynamo's name): when a worker's stream ends without finishing a "
        "request that has already streamed output (connection lost, UNAVAILABLE, worker gone), send it to another "
        "worker with the tokens so far (GenerateRequest.output_ids), at most this many times; the client's stream "
        "goes on with no gap and no repeated token. 0 = off: the client gets the error.")
    tool_call_parser: Literal["qwen25", "hermes", "llama3"] | None = Field(
        None, description="Parse tool calls out of the output (tool_choice auto): qwen25/hermes = <tool_call> JSON "
        "(Qwen2.5, Qwen3, Hermes), llama3 = Llama-3 JSON. Forced calls (required / a named tool) need none.")
    reasoning_parser: Literal["deepseek-r1", "qwen3"] | None = Field(
        None, description="Split the <think> part of reasoning models' output into reasoning_content.")

    def uses_etcd(self) -> bool:
        return self.discovery == "etcd"

    @model_validator(mode="after")
    def _check_api_key(self):
        if self.api_key and self.api_key_file:
            raise ValueError("api_key and api_key_file: give one")
        if self.api_key_file and not os.path.isfile(self.api_key_file):
            raise ValueError(f"api_key_file={self.api_key_file!r}: no such file")
        return self


class EplbPlannerConfig(ServerConfig):
    """`python -m tandem.eplb_planner`"""

    port: int = Field(50081, ge=0, le=65535, description="gRPC port of the EplbPlanner service.")
    system_port: int = Field(8081, ge=0, le=65535, description="HTTP port for /health and /metrics.")
    model_path: str | None = Field(None, description="MoE checkpoint directory (expert counts, groups).")
    eplb_algorithm: Literal["auto", "hierarchical", "global", "move_aware"] = Field(
        "auto", description="auto = hierarchical when groups divide by nodes, else global."
    )
    ep_size: int = Field(1, ge=1, description="Expert-parallel ranks (GPUs) the plan spreads over.")
    nnodes: int = Field(1, ge=1, description="Nodes the EP ranks are spread over.")
    ep_num_redundant_experts: int = Field(0, ge=0, description="Extra physical expert slots per layer.")
    eplb_rebalance_num_iterations: int = Field(1000, ge=1, description="Forward passes between plans.")
    eplb_rebalance_interval_s: float = Field(0.0, ge=0, description="Also replan every N seconds (0 = off).")
    eplb_max_moves_per_layer: int | None = Field(
        None, ge=0, description="move_aware: at most this many expert copies per layer per plan."
    )
    init_expert_location: str = Field("trivial", description="Initial placement: trivial, a file, or inline JSON.")


SERVICE_SCHEMAS = {
    "prefill": PrefillConfig,
    "decode": DecodeConfig,
    "router": RouterConfig,
    "eplb": EplbPlannerConfig,
}
