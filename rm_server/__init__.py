"""rm_server: the reward service over HTTP and gRPC (issue 3)."""
