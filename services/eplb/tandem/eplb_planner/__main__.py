"""`python -m tandem.eplb_planner`: the EPLB planner service (its logic: tandem.eplb.planner)."""
from __future__ import annotations

from tandem.config import EplbPlannerConfig, load_or_exit
from tandem.eplb.planner import expert_weight_bytes, model_moe_shape
from tandem.eplb_planner.servicer import EplbPlannerServicer
from tandem.server import ServiceRuntime, service_name, setup_logging
from tandem.v1 import eplb_pb2, eplb_pb2_grpc


def main(argv=None) -> None:
    config = load_or_exit(EplbPlannerConfig, argv, prog="python -m tandem.eplb_planner")
    setup_logging("eplb", config.log_level, config.log_format)
    if not config.model_path:
        raise SystemExit("config error: model_path=None: the planner needs the MoE checkpoint (--model-path)")
    try:
        num_layers, num_experts, num_groups = model_moe_shape(config.model_path)
    except ValueError as exc:
        raise SystemExit(f"config error: model_path={config.model_path!r}: {exc}") from None
    runtime = ServiceRuntime("eplb", config)
    servicer = EplbPlannerServicer(config, num_layers, num_experts, num_groups, registry=runtime.registry,
                                   expert_bytes=expert_weight_bytes(config.model_path))
    runtime.add_service(eplb_pb2_grpc.add_EplbPlannerServicer_to_server, servicer,
                        service_name(eplb_pb2, "EplbPlanner"))
    runtime.on_shutdown(servicer.close)
    runtime.start()
    runtime.set_ready()
    runtime.wait()


if __name__ == "__main__":
    main()
