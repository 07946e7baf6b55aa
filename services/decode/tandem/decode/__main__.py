"""`python -m tandem.decode`: a decode worker (PD disaggregation) or an aggregated worker."""
from __future__ import annotations

from tandem.config import DecodeConfig, load_or_exit
from tandem.decode.servicer import DecodeServicer, MoveSourceServicer
from tandem.engine.tokenizer import load_tokenizer
from tandem.server import service_name, setup_logging
from tandem.server.tls import etcd_client_tls
from tandem.transfer import make_sender
from tandem.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from tandem.worker.decode import DecodeWorker
from tandem.worker.embedding import EmbeddingWorker
from tandem.worker.kv_move import HeldMoves, KvMoves, moves_refused
from tandem.worker.prefill import KvSource
from tandem.worker.prefill_discovery import PrefillDiscovery
from tandem.worker.process import build_worker
from tandem.worker.remote_prefill import RemotePrefill
from tandem.worker.tp_transfer import ranked_receiver
from tandem.worker.warmup import warmup_requests


def main(argv=None) -> None:
    config = load_or_exit(DecodeConfig, argv, prog="python -m tandem.decode")
    setup_logging("decode", config.log_level, config.log_format)
    disagg = config.disaggregation_mode == "decode"
    wp = build_worker("decode", config, engine_type="decode" if disagg else "unified", endpoint_name="generate")
    remote = fetcher = None
    # KV moves (drain): one rank's pool only, so not with several ranks (--tp-size, --ep-size > 1):
    # such a worker drains by recomputing, and a request moved to it is recomputed here.
    no_moves = moves_refused(config)
    moves_on = no_moves is None
    if disagg or moves_on:
        # Decode mode: the remote prefills; aggregated: only the KV of requests moved off draining workers.
        # One receiver per TP rank (each holds its KV heads), driven as one through the leader.
        receiver = ranked_receiver(config.disaggregation_transfer_backend, wp.kv_buffers(), wp.runtime.worker_id,
                                   wp.fingerprint, leader=wp.tp_leader,
                                   bootstrap_timeout_s=config.disaggregation_bootstrap_timeout,
                                   waiting_timeout_s=config.disaggregation_waiting_timeout,
                                   transfer_timeout_s=config.disaggregation_transfer_timeout)
        follow_etcd = config.prefill_discovery == "etcd"
        fetcher = RemotePrefill(config, wp.loop, receiver, wp.runtime.worker_id, wp.reporter,
                                dynamic=follow_etcd or not disagg)
        fetcher.start()
        wp.runtime.on_shutdown(fetcher.stop)
        wp.runtime.on_shutdown(receiver.close)
        remote = fetcher if disagg else None
        if disagg and follow_etcd:
            discovery = PrefillDiscovery(remote.set_addresses, config.etcd_endpoint, config.etcd_prefix,
                                         wp.model_name, tls=etcd_client_tls(config))
            discovery.start()
            wp.runtime.on_shutdown(discovery.stop, first=True)
    held = None
    if config.drain_timeout > 0 and moves_on:
        # A drain's requests wait here with their KV; the workers their routers pick fetch it through this.
        held = HeldMoves()
        sender = make_sender(config.disaggregation_transfer_backend, wp.kv_buffers(),
                             name=f"{wp.runtime.worker_id}-moves", model_fingerprint=wp.fingerprint)
        source = KvSource(config, wp.loop, sender, wp.runtime.worker_id, wp.reporter, held=held)
        source.transfers.start()
        wp.runtime.on_shutdown(source.transfers.stop)
        wp.runtime.on_shutdown(sender.close)
        wp.runtime.add_service(prefill_pb2_grpc.add_PrefillServicer_to_server, MoveSourceServicer(source),
                               service_name(prefill_pb2, "Prefill"))
    moves = KvMoves(wp.runtime.advertised_address, fetcher if moves_on else None, held, wp.component_metrics,
                    refused=no_moves)
    worker = DecodeWorker(config, wp.loop, wp.runtime.worker_id, remote, moves)
    embedder = EmbeddingWorker(wp.loop, load_tokenizer(config.model_path)) if config.is_embedding else None
    role = "decode" if disagg else "agg"
    name = service_name(decode_pb2, "Decode")
    wp.runtime.add_service(decode_pb2_grpc.add_DecodeServicer_to_server,
                           DecodeServicer(worker, wp.component_metrics, wp.reporter, lambda: wp.info(role), embedder),
                           name)

    def drain(timeout_s: float):
        wp.runtime.set_not_serving()  # routers stop sending new requests
        report = worker.drain(timeout_s)
        wp.component_metrics.requests_drained(len(report.handed_back), report.moved, report.pages_moved)
        return report

    wp.control.serve_drain(drain)

    def warmup():
        if embedder is not None:
            embedder.warmup()
            return
        # Real steps through the engine (a prefill and a decode step each; on CUDA every sampler path and
        # a multi-page prompt), so the first user request does not pay for them.
        for ids, sampling in warmup_requests(wp.loop.info):
            req = decode_pb2.GenerateRequest(request_id="warmup", input_ids=ids, prefill_override="local",
                                             sampling=common_pb2.SamplingParams(max_tokens=2, ignore_eos=True,
                                                                                **sampling))
            for _ in worker.generate(req, lambda: True, lambda cb: None):
                pass
        if disagg:
            worker.warmup_remote(min(config.warmup_timeout, 120.0))

    wp.serve(warmup, role=role)


if __name__ == "__main__":
    main()
