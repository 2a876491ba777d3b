"""search: inference-time search strategies, one per file (issue 4)."""
