"""`python -m tandem.router`: OpenAI HTTP frontend + gRPC Router."""
from __future__ import annotations

from tandem.config import RouterConfig, load_or_exit
from tandem.server import ServiceRuntime, service_name, setup_logging
from tandem.server.unimplemented import unimplemented_servicer
from tandem.v1 import router_pb2, router_pb2_grpc


def main(argv=None) -> None:
    config = load_or_exit(RouterConfig, argv, prog="python -m tandem.router")
    setup_logging("router", config.log_level, config.log_format)
    runtime = ServiceRuntime("router", config)
    name = service_name(router_pb2, "Router")
    servicer = unimplemented_servicer(router_pb2_grpc.RouterServicer, name, "routing lands with the router issue")
    runtime.add_service(router_pb2_grpc.add_RouterServicer_to_server, servicer, name)
    runtime.start()
    runtime.set_ready()
    runtime.wait()


if __name__ == "__main__":
    main()
