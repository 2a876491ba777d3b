"""Reward families, one module each, and the one place that turns a spec into rewards.

rules.py      rule.math_equal, rule.exact_match, rule.regex, rule.length_penalty,
              rule.json_schema, rule.arith_steps
model.py      model.outcome, model.process (transformers or vLLM backend)
judge.py      judge (any OpenAI-compatible completions or chat endpoint; its prompts: judge_prompts.py)
remote.py     remote.vllm_classify, remote.openrlhf (rewards another server computes)
endpoint.py   what the judge and the remote rewards share: key, start-up check, deadlines, retries, failures
composite.py  composite (expressions and gates over the others)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from assay.rm_server.rewards.base import Compared, Item, ItemFailure, Outcome, Reward, Scored
from assay.rm_server.spec import (
    CompositeSpec,
    JudgeSpec,
    OpenRLHFSpec,
    SpecError,
    SpecFile,
    VllmClassifySpec,
    _ModelSpec,
    order_rewards,
    reward_ids,
)

if TYPE_CHECKING:
    from assay.rm_server.config import ModelRuntime

__all__ = ["Compared", "Item", "ItemFailure", "Outcome", "Reward", "Scored", "build_rewards"]


def build_rewards(
    spec: SpecFile, ids: dict[str, str] | None = None, runtime: ModelRuntime | None = None
) -> dict[str, Reward]:
    """Construct (not start) every reward of a spec, parts before the composites using them.

    `runtime`: where model rewards compute (the server's `--model-workers`, `--torch-threads`);
    None: on a thread of this process, at its torch threads (the in-process reward's way)."""
    from assay.rm_server.rewards.composite import CompositeReward
    from assay.rm_server.rewards.judge import JudgeReward
    from assay.rm_server.rewards.model import ModelReward
    from assay.rm_server.rewards.remote import OpenRLHFReward, VllmClassifyReward
    from assay.rm_server.rewards.rules import RULES

    ids = ids if ids is not None else reward_ids(spec)
    models = [name for name, r in spec.rewards.items() if isinstance(r, _ModelSpec)]
    threads = runtime.threads(len(models)) if runtime is not None and runtime.model_workers else None
    built: dict[str, Reward] = {}
    for name in order_rewards(spec):
        r = spec.rewards[name]
        try:
            if isinstance(r, CompositeSpec):
                built[name] = CompositeReward(name, ids[name], r, built)
            elif isinstance(r, JudgeSpec):
                built[name] = JudgeReward(name, ids[name], r)
            elif isinstance(r, VllmClassifySpec):
                built[name] = VllmClassifyReward(name, ids[name], r)
            elif isinstance(r, OpenRLHFSpec):
                built[name] = OpenRLHFReward(name, ids[name], r)
            elif isinstance(r, _ModelSpec):
                built[name] = ModelReward(name, ids[name], r, spec.model_path(name), worker_threads=threads)
            else:
                built[name] = RULES[r.type](name, ids[name], r)
        except ValueError as exc:
            raise SpecError(f"reward {name!r}: {exc}") from None
    return {name: built[name] for name in spec.rewards}
