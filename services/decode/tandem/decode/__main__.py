"""`python -m tandem.decode`: a decode (or aggregated) worker."""
from __future__ import annotations

from tandem.config import DecodeConfig, load_or_exit
from tandem.server import ServiceRuntime, service_name, setup_logging
from tandem.server.unimplemented import unimplemented_servicer
from tandem.v1 import engine_control_pb2, engine_control_pb2_grpc, decode_pb2, decode_pb2_grpc


def main(argv=None) -> None:
    config = load_or_exit(DecodeConfig, argv, prog="python -m tandem.decode")
    setup_logging("decode", config.log_level, config.log_format)
    runtime = ServiceRuntime("decode", config)
    name = service_name(decode_pb2, "Decode")
    runtime.add_service(
        decode_pb2_grpc.add_DecodeServicer_to_server,
        unimplemented_servicer(decode_pb2_grpc.DecodeServicer, name, "decode lands with the engine and disaggregation issues"),
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
