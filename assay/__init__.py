"""Assay: shared pieces (checkpoint loading, generation, scoring, evaluation) and the CLI."""
