"""`python -m tandem.router`: OpenAI HTTP frontend + gRPC Router."""
from __future__ import annotations

from tandem.config import RouterConfig, load_or_exit
from tandem.router.app import build_router
from tandem.server import ServiceRuntime, service_name, setup_logging
from tandem.v1 import router_pb2, router_pb2_grpc


def main(argv=None) -> None:
    config = load_or_exit(RouterConfig, argv, prog="python -m tandem.router")
    setup_logging("router", config.log_level, config.log_format)
    # The gRPC Router is served by a grpc.aio server on the runtime's loop, where the router runs.
    runtime = ServiceRuntime("router", config, max_receive_message_bytes=config.max_request_bytes, aio=True)
    try:
        app = build_router(config, registry=runtime.registry)
    except ValueError as exc:
        raise SystemExit(f"config error: {exc}") from None
    runtime.add_service(router_pb2_grpc.add_RouterServicer_to_server, app.servicer,
                        service_name(router_pb2, "Router"))
    if runtime.tls_reloader:
        app.reload_tls_on(runtime.tls_reloader)
    runtime.on_shutdown(app.stop)
    runtime.install_signal_handlers()
    runtime.start()
    app.start(runtime.loop)
    runtime.set_ready(http=app.http_address)
    runtime.wait()


if __name__ == "__main__":
    main()
