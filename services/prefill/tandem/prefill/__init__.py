"""tandem prefill service: a thin gRPC transport over tandem.worker."""
