"""Worker-side logic shared by the prefill and decode services (no gRPC servers here:
services are thin transports over these classes)."""
