"""Assembly of a worker process: engine + loop + metrics + profiler on a ServiceRuntime.

Shared by `python -m tandem.prefill` and `python -m tandem.decode`, which then add
their own servicer on top.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tandem.config import EngineConfig
from tandem.engine import EngineCore
from tandem.metrics import ComponentMetrics, EngineMetrics, MetricsPublisher, default_stats_endpoint
from tandem.server import ServiceRuntime, service_name
from tandem.transfer import KvBuffers
from tandem.transfer.ucx_binding import bind_ucx_to_host
from tandem.v1 import common_pb2, engine_control_pb2, engine_control_pb2_grpc
from tandem.worker.control import EngineControlServicer, add_profile_routes
from tandem.worker.engine_loop import EngineLoop, LoopHook, wait_until
from tandem.worker.lora_control import LoraControl
from tandem.worker.profiler import EngineProfiler
from tandem.worker.stats_reporter import StatsReporter
from tandem.worker.tp_transfer import kv_buffers_of

log = logging.getLogger(__name__)


def engine_config_of(config) -> EngineConfig:
    return EngineConfig(**{k: getattr(config, k) for k in EngineConfig.model_fields})


def model_fingerprint(model_path: str, dtype) -> str:
    """Identity of the weights' shape and dtype: workers of different models never exchange KV."""
    with open(os.path.join(model_path, "config.json"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    return f"{os.path.basename(os.path.normpath(model_path))}:{digest}:{str(dtype).replace('torch.', '')}"


class _Keepalive(LoopHook):
    """The parallel leader's no-op broadcasts while idle, on the loop thread; a broken group (a rank
    died, a collective failed or timed out) takes the worker out: ``on_failure`` once (health turns
    NOT_SERVING, the in-flight requests have already failed with the step's error)."""

    def __init__(self, ep, on_failure: Callable[[str], None]) -> None:
        self.ep, self.on_failure, self.reported = ep, on_failure, False

    def poll(self) -> None:
        self.ep.keepalive()
        if self.ep.failure is not None and not self.reported:
            self.reported = True
            self.on_failure(self.ep.failure)


@dataclass
class WorkerProcess:
    kind: str
    runtime: ServiceRuntime
    engine: EngineCore
    loop: EngineLoop
    profiler: EngineProfiler
    reporter: StatsReporter
    publisher: MetricsPublisher
    component_metrics: ComponentMetrics
    model_name: str
    fingerprint: str
    control: EngineControlServicer
    eplb: object = None  # tandem.worker.eplb.WorkerEplb on MoE workers with EPLB or recording on

    parallel: object = None  # tandem.engine.parallel.ParallelLeader with several ranks

    def kv_buffers(self) -> KvBuffers:
        """The engine's KV pool as the transfer library sees it (before the loop starts)."""
        return kv_buffers_of(self.engine.pool, self.engine.model)

    @property
    def tp_leader(self):
        """The ParallelLeader whose followers hold other KV heads (TP > 1: they get a transfer
        agent each, ``tandem.worker.tp_transfer``), else None (one rank, or EP alone: every rank
        holds the same KV, rank 0's pool is the one that moves)."""
        return self.parallel if self.parallel is not None and self.engine.model.tp.size > 1 else None

    def serve(self, warmup, role: str) -> None:
        """Start serving, run `warmup()` before health turns SERVING, register in etcd when
        configured, then block until SIGTERM."""
        config = self.runtime.config
        self.runtime.install_signal_handlers()
        self.runtime.start()
        self.loop.start()
        if warmup is not None and not config.skip_warmup:
            t0 = time.monotonic()
            warmup()
            log.info("%s warmup done in %.2fs", self.kind, time.monotonic() - t0)
        if config.etcd_endpoint:
            self._register_in_etcd(role)  # routers still wait for health to turn SERVING
        self.runtime.set_ready()
        self.runtime.wait()

    def info(self, role: str) -> common_pb2.WorkerInfo:
        """This worker's identity, as registered in etcd and answered by GetInfo."""
        return common_pb2.WorkerInfo(worker_id=self.runtime.worker_id, address=self.runtime.advertised_address,
                                     role=role, model=self.model_name,
                                     system_address=self.runtime.advertised_system_address,
                                     is_embedding=getattr(self.runtime.config, "is_embedding", False))

    def _register_in_etcd(self, role: str) -> None:
        from tandem.routing.discovery import register_worker
        from tandem.server.tls import etcd_client_tls

        cfg = self.runtime.config
        info = self.info(role)
        registration = register_worker(cfg.etcd_endpoint, cfg.etcd_prefix, info, cfg.etcd_ttl, tls=etcd_client_tls(cfg))
        # First hook: the router stops sending new work before the worker drains.
        self.runtime.on_shutdown(registration.close, first=True)
        log.info("registered in etcd at %s%s as %s", cfg.etcd_prefix, info.worker_id, role)


def build_worker(kind: str, config, engine_type: str, endpoint_name: str) -> WorkerProcess:
    runtime = ServiceRuntime(kind, config)
    if getattr(config, "disaggregation_transfer_backend", None) == "nixl":
        bind_ucx_to_host(config.advertise_host or config.host)  # before any NIXL agent starts
    if config.torch_num_threads:
        torch.set_num_threads(config.torch_num_threads)
    t0 = time.time()
    ep = None
    if config.world_size > 1:
        from tandem.engine.parallel import start_parallel

        mode = getattr(config, "disaggregation_mode", "null")
        if mode == "decode" and config.tp_size == 1:
            raise SystemExit(f"config error: ep_size={config.ep_size} with tp_size=1 and disaggregation_mode='decode': "
                             "expert parallelism alone on a decode worker is not supported (every rank would need "
                             "the whole KV written from prefill); use --tp-size > 1 (each rank receives its KV "
                             "heads) or EP on aggregated and prefill workers")
        # The followers and the group come first: every rank's layers are built for their shard.
        ep = start_parallel(engine_config_of(config), num_threads=config.torch_num_threads or None)
        engine = ep.engine
    else:
        engine = EngineCore(config=engine_config_of(config))
    load_s = time.time() - t0
    model_name = config.served_model_name or os.path.basename(os.path.normpath(config.model_path))
    log.info("%s loaded %s in %.2fs: %d KV pages x %d tokens on %s/%s", kind, model_name, load_s,
             engine.pool.num_pages, engine.page_size, engine.device, engine.dtype)
    loop = EngineLoop(engine, kind)
    if ep is not None:
        def rank_failed(why: str) -> None:
            log.error("%s: a rank of this worker failed (%s); shutting down", kind, why)
            runtime.request_stop()

        loop.add_hook(_Keepalive(ep, rank_failed))
    worker_id = runtime.worker_id
    engine_metrics = EngineMetrics(runtime.registry, model_name=model_name, engine_type=engine_type,
                                   worker_id=worker_id)
    component = ComponentMetrics(runtime.registry, component=kind, endpoint=endpoint_name, model=model_name,
                                 worker_id=worker_id)
    component.set_model_load_time(load_s)
    component.init_series()
    endpoint = default_stats_endpoint(f"{kind}-{os.getpid()}-{runtime.port}")
    publisher = MetricsPublisher(endpoint, engine_metrics, component_metrics=component).start()
    reporter = StatsReporter(endpoint, engine.page_size, stats=lambda: loop.stats)
    reporter.startup = {"engine_startup_time": time.time() - runtime.started_at, "engine_load_weights_time": load_s}
    loop.add_hook(reporter)
    profiler = EngineProfiler(config.profile_dir, f"{kind}-{runtime.port}")
    loop.add_hook(profiler)
    add_profile_routes(runtime.system, profiler)
    eplb = None
    if config.enable_eplb or config.expert_distribution_recorder_mode:
        from tandem.worker.eplb import WorkerEplb

        eplb = WorkerEplb(config, loop, worker_id)
        eplb.add_routes(runtime.system)
        if config.enable_eplb and config.eplb_planner_address:
            eplb.start_planner_client(config.eplb_planner_address, tls=runtime.tls)
        runtime.on_shutdown(eplb.close)
    loras = LoraControl(loop)
    loras.add_routes(runtime.system)
    ctl = service_name(engine_control_pb2, "EngineControl")
    control = EngineControlServicer(profiler, eplb.control if eplb else None, loras)
    runtime.add_service(engine_control_pb2_grpc.add_EngineControlServicer_to_server, control, ctl)

    def shutdown():
        # Drain: in-flight requests get the grace period to finish before the loop stops.
        wait_until(lambda: loop.num_streams == 0, max(0.0, config.shutdown_grace_period - 1.5))
        loop.stop()
        reporter.close()
        publisher.stop()

    runtime.on_shutdown(shutdown)
    if ep is not None:
        runtime.on_shutdown(ep.close)  # after the loop stopped: followers exit with the leader
    return WorkerProcess(kind, runtime, engine, loop, profiler, reporter, publisher, component, model_name,
                         model_fingerprint(config.model_path, engine.dtype), control, eplb, parallel=ep)
