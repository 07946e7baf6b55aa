"""Process runtime shared by services: gRPC server, health, reflection, system HTTP port."""
from tandem.server.logs import log_fields, setup_logging
from tandem.server.runtime import GRPC_OPTIONS, ServiceRuntime, service_name
from tandem.server.system_http import SystemHttpServer

__all__ = ["GRPC_OPTIONS", "ServiceRuntime", "SystemHttpServer", "log_fields", "service_name", "setup_logging"]
