"""`python -m tandem.prefill`: a prefill worker of PD disaggregation."""
from __future__ import annotations

from tandem.config import PrefillConfig, load_or_exit
from tandem.prefill.servicer import PrefillServicer
from tandem.server import service_name, setup_logging
from tandem.v1 import prefill_pb2, prefill_pb2_grpc
from tandem.worker.prefill import PrefillWorker
from tandem.worker.process import build_worker
from tandem.worker.tp_transfer import ranked_sender
from tandem.worker.warmup import warmup_prefill, warmup_requests


def main(argv=None) -> None:
    config = load_or_exit(PrefillConfig, argv, prog="python -m tandem.prefill")
    setup_logging("prefill", config.log_level, config.log_format)
    wp = build_worker("prefill", config, engine_type="prefill", endpoint_name="prefill")
    # One sender per TP rank (each writes its KV heads), driven as one through the leader.
    sender = ranked_sender(config.disaggregation_transfer_backend, wp.kv_buffers(), wp.runtime.worker_id,
                           wp.fingerprint, leader=wp.tp_leader, timeout_s=config.disaggregation_transfer_timeout)
    worker = PrefillWorker(config, wp.loop, sender, wp.runtime.worker_id, wp.reporter)
    worker.transfers.start()
    wp.runtime.on_shutdown(worker.transfers.stop)
    wp.runtime.on_shutdown(sender.close)
    name = service_name(prefill_pb2, "Prefill")
    wp.runtime.add_service(prefill_pb2_grpc.add_PrefillServicer_to_server,
                           PrefillServicer(worker, wp.component_metrics), name)

    # Only the leader warms up (Dynamo's rule), through the real gRPC server, before SERVING.
    warmup = None
    if config.node_rank == 0:
        def warmup():
            chunk = min(wp.loop.info.chunked_prefill_size, wp.loop.info.context_length - 1)
            warmup_prefill(wp.runtime.address, config.warmup_timeout, warmup_requests(wp.loop.info, chunk),
                           tls=wp.runtime.tls)

    wp.serve(warmup, role="prefill")


if __name__ == "__main__":
    main()
