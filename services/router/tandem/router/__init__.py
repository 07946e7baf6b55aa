"""tandem router service: OpenAI HTTP frontend + gRPC Router over decode/aggregated workers."""
