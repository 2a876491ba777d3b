"""trainer: SFT and reward-model training here; GRPO, PPO and DPO follow (issue 5)."""
