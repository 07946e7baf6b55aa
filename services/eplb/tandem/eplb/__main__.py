"""`python -m tandem.eplb`: the EPLB planner service."""
from __future__ import annotations

from tandem.config import EplbPlannerConfig, load_or_exit
from tandem.server import ServiceRuntime, service_name, setup_logging
from tandem.server.unimplemented import unimplemented_servicer
from tandem.v1 import eplb_pb2, eplb_pb2_grpc


def main(argv=None) -> None:
    config = load_or_exit(EplbPlannerConfig, argv, prog="python -m tandem.eplb")
    setup_logging("eplb", config.log_level, config.log_format)
    runtime = ServiceRuntime("eplb", config)
    name = service_name(eplb_pb2, "EplbPlanner")
    servicer = unimplemented_servicer(eplb_pb2_grpc.EplbPlannerServicer, name, "planner lands with the EPLB issue")
    runtime.add_service(eplb_pb2_grpc.add_EplbPlannerServicer_to_server, servicer, name)
    runtime.start()
    runtime.set_ready()
    runtime.wait()


if __name__ == "__main__":
    main()
