"""LoRA (Hu et al. 2021) through `peft`: the adapter the trainer trains in place of the full weights.

    W' = W + (alpha / r) * B @ A        A: [r, in], B: [out, r], B starts at zero (W' = W at step 0)

`wrap` puts an adapter on every targeted linear layer of a policy (`peft.get_peft_model`; peft's own
"all-linear" wraps every linear layer but the output head), `wrap_backbone` on a PPO critic's
backbone (its value head stays fully trainable). What follows from it:

- The reference policy is the same model with its adapter disabled (`Reference`): a LoRA run
  holds one copy of the base weights, not two.
- The optimizer takes the trainable tensors only (`trainable`): the adapter, and a critic's head.
- A checkpoint holds the trainable tensors only (`trainable_state`, `load_trainable`): resume
  rebuilds the wrapped model from the same base (the run's `--model`) and loads them back.
- A run's first push sends the base weights in full (`base_state`), so that the server merges
  into exactly the trainer's base whatever it served before; every later push sends the adapter
  only (`adapter`): A and B of each wrapped layer, under peft's saved-adapter names without the
  `base_model.model.` prefix (`model.layers.0.self_attn.q_proj.lora_A.weight`), with alpha and
  r; the policy server merges them into the weights it serves (`policy_server/adapters.py`).
- The run's last weights are also written merged (`save_merged`): a plain Hugging Face checkpoint
  that `assay policy serve --model` takes as it is.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import torch

from assay.trainer.config import LoRA

PREFIX = "base_model.model."  # peft's prefix of the wrapped model's names in an adapter's state dict


def wrap(model: torch.nn.Module, config: LoRA) -> Any:
    """`model` (a transformers model, already on its device and dtype) as a `peft.PeftModel`, in place:
    the base weights are frozen, the adapter's trainable. Gradient checkpointing, when on, needs the
    embeddings' output to require grad (frozen embeddings would cut the recomputed graph)."""
    from peft import get_peft_model

    wrapped = get_peft_model(model, _peft_config(config))
    if getattr(model, "is_gradient_checkpointing", False):
        wrapped.enable_input_require_grads()
    return wrapped


def wrap_backbone(critic: Any, config: LoRA) -> Any:
    """A PPO critic (`ppo.Critic`) whose backbone carries a LoRA adapter; its scalar head stays whole
    and trainable (a new head has nothing to adapt from)."""
    from peft import get_peft_model

    critic.backbone = get_peft_model(critic.backbone, _peft_config(config))
    return critic


def _peft_config(config: LoRA) -> Any:
    from peft import LoraConfig

    targets = "all-linear" if "all-linear" in config.target_modules else list(config.target_modules)
    # plain LoRA only (no rsLoRA, DoRA or per-layer ranks): the policy server merges alpha / r * B @ A.
    # peft annotates lora_alpha as int and scales by lora_alpha / r, which a float alpha serves as well.
    alpha: Any = config.alpha
    return LoraConfig(r=config.r, lora_alpha=alpha, lora_dropout=config.dropout, target_modules=targets)


def is_lora(module: torch.nn.Module) -> bool:
    """Whether `module` holds LoRA layers (a wrapped policy, or a critic with a wrapped backbone)."""
    if "peft" not in sys.modules:  # nothing was wrapped: a full run need not import peft to know it
        return False
    from peft.tuners.lora import LoraLayer

    return any(isinstance(m, LoraLayer) for m in module.modules())


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the optimizer steps: all of a full model's, the adapter's (and a critic's head) under LoRA."""
    return [p for p in module.parameters() if p.requires_grad]


class Reference(torch.nn.Module):
    """The reference policy of a LoRA run: the policy with its adapter disabled, called like the model
    (`token_logprobs(Reference(model), batch)`). No second copy of the weights: the base is frozen,
    so it is exactly the model the run started from. The policy is its submodule (its device and
    parameters are the policy's): a checkpoint leaves it out, and `eval()` on it would reach the policy."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: Any) -> Any:
        with self.model.disable_adapter():
            return self.model(**inputs)


# --- checkpoints -----------------------------------------------------------------------------------


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint of a LoRA module holds: its trainable tensors, by their names in `module`, on the CPU."""
    return {name: p.detach().cpu() for name, p in module.named_parameters() if p.requires_grad}


def load_trainable(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Load `trainable_state`'s tensors back into `module`, wrapped as the run wrapped it; ValueError
    when they do not fit it (another rank or other targets than the checkpoint's run)."""
    expected = trainable_state(module)
    differ = sorted(set(expected) ^ set(tensors))
    differ += sorted(n for n in set(expected) & set(tensors) if expected[n].shape != tensors[n].shape)
    if differ:
        raise ValueError(
            f"{where} holds another adapter than this run trains ({len(differ)} tensors differ, e.g. {differ[0]}): "
            "resume with the run's own --lora-r, --lora-target and --model"
        )
    module.load_state_dict(tensors, strict=False)


def merged(model: Any) -> Any:
    """A copy of the policy with its adapter merged into the base weights: a plain transformers model."""
    return copy.deepcopy(model).merge_and_unload()


def save_merged(model: Any, tokenizer: Any, path: Path) -> Path:
    """The policy with its adapter merged (`merged`), as a Hugging Face checkpoint at `path`."""
    merged(model).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


# --- pushes ----------------------------------------------------------------------------------------


def base_state(model: Any) -> dict[str, torch.Tensor]:
    """The frozen base weights of a wrapped policy, on the CPU, under the names of the model before
    wrapping (peft's `<layer>.base_layer.weight` back to `<layer>.weight`): what a server must hold
    for adapter pushes to give the trainer's weights."""
    state = model.get_base_model().state_dict()
    return {name.replace(".base_layer.", "."): t.detach().cpu() for name, t in state.items() if ".lora_" not in name}


def adapter(model: Any) -> tuple[dict[str, torch.Tensor], float, int, bool]:
    """The adapter as the policy server takes it (`PolicyClient.update_adapter`): (name -> A or B,
    lora_alpha, r, fan_in_fan_out), the tensors on the CPU. Names are the served model's module names +
    `.lora_A.weight` / `.lora_B.weight`."""
    from peft import get_peft_model_state_dict

    config = model.peft_config["default"]
    tensors = {name.removeprefix(PREFIX): t.detach().cpu() for name, t in get_peft_model_state_dict(model).items()}
    return tensors, float(config.lora_alpha), int(config.r), bool(config.fan_in_fan_out)
