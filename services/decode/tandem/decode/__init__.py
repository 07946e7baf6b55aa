"""tandem decode service: a thin gRPC transport over tandem.worker."""
