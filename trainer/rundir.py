"""The run directory every training run writes: metrics, config, checkpoints, TensorBoard events.

    metrics.jsonl                one JSON line per step (`assay plot` reads it)
    config.json                  the run's config, with what the run found out at the start (reward id, rows skipped)
    events.out.tfevents.*        the same metrics for TensorBoard: `tensorboard --logdir runs/`
    checkpoints/step-NNNNNN/     resumable state (GRPO, PPO); of a LoRA model, its trainable tensors only
    merged/                      a LoRA run's final policy, its adapter merged: a plain Hugging Face checkpoint

`log` writes each line to both: metrics.jsonl stays the record the tests, `assay plot` and resume read,
and one TensorBoard writer per run gets every numeric value of the line as a scalar at the line's step
(`step`, or `round` for iterative DPO; a line with neither, such as DPO's before and after evaluations,
goes at the step after the last one logged). Nested values are flattened with `/` (`eval/correct/mean`),
which TensorBoard shows as one section per prefix. On resume, `load` drops metrics lines past the
checkpoint and the writer is reopened with `purge_step`, so TensorBoard hides the dropped steps too.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from assay.trainer import lora

EVENTS = "events.out.tfevents.*"  # the files TensorBoard's writer names in a log directory


class RunDir:
    """`metrics.jsonl` (one line per step), `config.json`, TensorBoard events, and `checkpoints/step-NNNNNN/`.

    A checkpoint is written to a temporary directory and renamed into place, so a kill leaves
    either the whole checkpoint or none; on resume, metrics lines past the checkpoint's step are
    dropped, so every step appears once however often the run was killed. A directory holds one
    run: a new one starts only in an empty directory or after `clear()`."""

    MARKS = ("metrics.jsonl", "config.json", "checkpoints")  # any of them: the directory holds a run
    # what a run writes here (DPO: the final policy; a LoRA run: its merged policy; `assay plot`: the
    # curves); clear() removes these and the event files only
    FILES = (*MARKS, "curves.png", "policy.safetensors", "merged")

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"
        self.ckpt_dir = self.path / "checkpoints"
        self._writer: Any = None  # torch's SummaryWriter, opened by the first line logged
        self._purge_step: int | None = None
        self._next_step = 0

    @staticmethod
    def found_in(path: str | Path) -> bool:
        """Whether `path` holds (part of) a run; creates nothing."""
        return any((Path(path) / name).exists() for name in RunDir.MARKS)

    def clear(self) -> None:
        """Remove the run's files (`FILES` and the TensorBoard events); anything else in the directory stays."""
        self.close()
        for target in [*(self.path / name for name in self.FILES), *self.path.glob(EVENTS)]:
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)

    def write_config(self, config: dict[str, Any]) -> None:
        (self.path / "config.json").write_text(json.dumps(config, indent=2, default=str))

    def log(self, metrics: dict[str, Any]) -> None:
        """Append one line to metrics.jsonl (on disk before this returns) and its numbers to TensorBoard."""
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
            f.flush()
            os.fsync(f.fileno())
        step = metrics.get("step", metrics.get("round"))
        step = self._next_step if not isinstance(step, int) else step
        self._next_step = step + 1
        writer = self._tensorboard()
        for tag, value in scalars(metrics):
            writer.add_scalar(tag, value, step)
        writer.flush()  # a line logged is a line TensorBoard can show, as metrics.jsonl's is on disk

    def close(self) -> None:
        """Close the TensorBoard writer (a later `log` opens a new one)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def save(
        self,
        step: int,
        modules: Mapping[str, torch.nn.Module],
        optimizers: Mapping[str, torch.optim.Optimizer],
        state: dict[str, Any],
        keep: int = 2,
    ) -> Path:
        final = self.ckpt_dir / f"step-{step:06d}"
        tmp = self.ckpt_dir / f".tmp-step-{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, module in modules.items():
            if lora.is_lora(module):  # the adapter (and a critic's head): the frozen base is the run's --model
                save_file(lora.trainable_state(module), str(tmp / f"{name}.safetensors"))
            else:  # save_model keeps one copy of tied weights (a chat model's lm_head is often its embeddings)
                save_model(module, str(tmp / f"{name}.safetensors"))
        for name, opt in optimizers.items():
            torch.save(opt.state_dict(), tmp / f"{name}.optimizer.pt")  # read back with weights_only=True
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(self.ckpt_dir.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def latest(self) -> Path | None:
        done = sorted(self.ckpt_dir.glob("step-*")) if self.ckpt_dir.exists() else []
        return done[-1] if done else None

    def load(
        self, ckpt: Path, modules: Mapping[str, torch.nn.Module], optimizers: Mapping[str, torch.optim.Optimizer]
    ) -> dict[str, Any]:
        """Restore modules and optimizers in place; the state dict, with "step"; drop later metrics."""
        for name, module in modules.items():
            path = ckpt / f"{name}.safetensors"
            if lora.is_lora(module):
                lora.load_trainable(module, load_file(path), str(path))
            else:
                load_model(module, str(path))
        for name, opt in optimizers.items():
            # read onto the CPU (a run saved on a GPU resumes anywhere); load_state_dict moves each
            # moment to its parameter's device
            opt.load_state_dict(torch.load(ckpt / f"{name}.optimizer.pt", map_location="cpu", weights_only=True))
        state = json.loads((ckpt / "state.json").read_text())
        kept = [m for m in self.metrics() if m.get("step", 0) <= state["step"]]
        self.metrics_path.write_text("".join(json.dumps(m) + "\n" for m in kept))
        # TensorBoard hides what earlier writers logged from here on, as the lines above were dropped
        self.close()
        self._purge_step = self._next_step = state["step"] + 1
        return state

    def _tensorboard(self) -> Any:
        if self._writer is None:
            # imported here: tensorboard takes seconds to import, and only a run that logs needs it
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.path), purge_step=self._purge_step)
            self._purge_step = None
        return self._writer


def scalars(metrics: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """(tag, value) for every number in a metrics line, nested mappings flattened with `/`.

    The step keys are the x axis, not a series; booleans, strings and None are not scalars."""
    for key, value in metrics.items():
        tag = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from scalars(value, f"{tag}/")
        elif _number(value) and key not in ("step", "round"):
            yield tag, float(value)


def _number(value: Any) -> bool:
    """A finite int or float (TensorBoard draws no NaN or infinity; a bool is no measurement)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
