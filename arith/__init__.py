"""The embedded arithmetic world: problems, rule checkers, tokenizer and tiny checkpoints."""
