"""`python -m tandem.prefill`: a prefill worker of PD disaggregation."""
from __future__ import annotations

from tandem.config import PrefillConfig, load_or_exit
from tandem.server import ServiceRuntime, service_name, setup_logging
from tandem.server.unimplemented import unimplemented_servicer
from tandem.v1 import engine_control_pb2, engine_control_pb2_grpc, prefill_pb2, prefill_pb2_grpc


def main(argv=None) -> None:
    config = load_or_exit(PrefillConfig, argv, prog="python -m tandem.prefill")
    setup_logging("prefill", config.log_level, config.log_format)
    runtime = ServiceRuntime("prefill", config)
    name = service_name(prefill_pb2, "Prefill")
    runtime.add_service(
        prefill_pb2_grpc.add_PrefillServicer_to_server,
        unimplemented_servicer(prefill_pb2_grpc.PrefillServicer, name, "prefill lands with the disaggregation issue"),
        name,
    )
    ctl = service_name(engine_control_pb2, "EngineControl")
    runtime.add_service(
        engine_control_pb2_grpc.add_EngineControlServicer_to_server,
        unimplemented_servicer(engine_control_pb2_grpc.EngineControlServicer, ctl, "lands with the engine"),
        ctl,
    )
    runtime.start()
    runtime.set_ready()
    runtime.wait()


if __name__ == "__main__":
    main()
