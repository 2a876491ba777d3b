"""proto: versioned gRPC contracts (reward/v1, policy/v1)."""
