"""Throughput of TRL's GRPOTrainer on this machine with Assay's GRPO setting, for the ratio.

    python -m venv /tmp/venv_trl && /tmp/venv_trl/bin/pip install torch==2.13.0 \\
        transformers==5.19.0 trl accelerate datasets
    /tmp/venv_trl/bin/pip install --no-deps -e . && /tmp/venv_trl/bin/python bench/trl_grpo_bench.py [--steps 12]

The embedded policy, 16 training prompts x 8 completions per step (128 samples), at most 48
new tokens, T = 1.0, beta 0.04, lr 1e-4, one optimisation pass per batch, 1 torch thread (--threads), CPU;
generation by TRL's own transformers path (`model.generate`; no vLLM here). The reward is the
arithmetic world's answer check in TRL's process (`arith.checks.is_correct`, the same 0/1 that
Assay's `correct` reward gives), so TRL pays no reward-service cost at all: the comparison is
conservative for Assay. Prints the median seconds per step (after 2 warm-up steps) and samples/s.
Assay's side of the ratio is the `samples_per_s` of `assay train grpo` with the same settings.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from assay.arith import world
    from assay.arith.checks import is_correct

    torch.set_num_threads(args.threads)
    path = ROOT / "arith" / "checkpoints" / "policy"
    problems = world.take("train", 16 * (args.steps + 2), seed=0)
    by_prompt = {p.prompt: p for p in problems}

    def correct(prompts, completions, **kw):
        return [float(is_correct(by_prompt[p], c)) for p, c in zip(prompts, completions)]

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    config = GRPOConfig(
        output_dir="/tmp/trl-grpo-bench",
        per_device_train_batch_size=128,
        num_generations=8,
        max_completion_length=48,
        temperature=1.0,
        beta=0.04,
        learning_rate=1e-4,
        num_iterations=1,
        loss_type="grpo",
        scale_rewards="group",
        max_steps=args.steps + 2,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        seed=0,
        shuffle_dataset=False,
    )
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=correct,
        args=config,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list([{"prompt": p.prompt} for p in problems]),
        callbacks=[Clock()],
    )
    trainer.train()
    counted = times[2:]
    step_s = statistics.median(counted)
    print(
        f"TRL {__import__('trl').__version__} GRPOTrainer: {len(counted)} steps counted, median {step_s:.2f} s/step, "
        f"{128 / step_s:.1f} samples/s (runs: {' '.join(f'{t:.2f}' for t in counted)})"
    )


if __name__ == "__main__":
    main()
