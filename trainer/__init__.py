"""trainer: SFT, reward-model training, and online GRPO, PPO and DPO against the services (through the clients)."""
