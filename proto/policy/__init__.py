"""Policy service contracts."""
