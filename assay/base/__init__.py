"""The neutral base both services stand on; it imports neither service, nor trainer, clients or search.

    errors       the error base: a refused request's HTTP status (and so its gRPC code), message, retry-after
    auth         API keys with scopes (sha256 digests, constant-time compare)
    batcher      dynamic batching: a bounded queue per model, a batch cap, a token budget, a wait deadline
    metrics      what both services record per request, and the one `Timer` (499 for a cancelled request)
    server       a service's HTTP and gRPC listeners on one loop: start order, keys required beyond loopback, drain
    serve        binding, uvicorn, signals, the drain, a background mode for tests
    connections  the bounds on clients' HTTP connections (settings), enforced by http_bounds
    http_bounds  the connection cap, header/body timeouts and the body limit
    http_guard   Host and cross-site checks; the key checked before the body is read
    disconnect   work whose HTTP client hung up is cancelled
    grpc_serve   gRPC auth and error interceptor, health, reflection
    logs         the servers' log records: text or JSON lines, each with its request's id; one traceback per site
    access       request ids (taken or made, echoed in X-Request-Id / gRPC metadata) and one access line per request

Each service brings its wire shapes (its error body, its error types) to these; nothing here
knows a service's protocol.
"""
