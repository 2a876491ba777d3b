"""policy_server: the generation service with an OpenAI-compatible API (issue 4)."""
