"""Policy service contract, version 1 (generated code: see proto/generate.py)."""
