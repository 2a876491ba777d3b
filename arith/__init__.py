"""The embedded arithmetic world: problems, rule checkers, tokenizer and tiny checkpoints."""

from pathlib import Path

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"  # the four built checkpoints, installed with the package
