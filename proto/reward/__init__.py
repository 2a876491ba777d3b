"""Reward service contracts."""
