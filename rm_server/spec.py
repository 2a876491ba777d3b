"""Reward spec files (YAML) and the content-addressed reward id.

A spec file names rewards and says what each one is:

    rewards:
      correct: {type: rule.math_equal, answer_pattern: "####\\s*(-?\\d+)\\s*$"}
      orm:     {type: model.outcome, path: ../arith/checkpoints/orm, activation: sigmoid}
      final:   {type: composite, expr: "0.8*correct + 0.2*orm", gate: format}

Relative checkpoint paths resolve against the spec file's folder.

The reward id is a sha256 over what decides the score: the spec's defining fields with all
defaults filled in, every file of a model checkpoint (weights, config, tokenizer, chat
template), the judge's prompt, and for a composite the ids of its parts. A judge's or a remote
reward's id covers what names the server (URL, model, template, ...), never the weights behind it:
those are not pinned (`RewardInfo.pinned`). Fields that only say how the score is computed
(backend, batching, timeouts, concurrency, retries) are left out, so the same reward on the
transformers and the vLLM backend has one id. So are `device` and `dtype`: the same checkpoint in
bfloat16 on a GPU is the same reward as in float32 on the CPU, its scores
differing by rounding only.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from assay.answers import Extract

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
EMBEDDED_SPEC = Path(__file__).with_name("embedded.yaml")
# A model reward's default padded-token budget per forward (`max_batch_tokens`). On a CPU a forward
# gains little from batching past a few thousand tokens, and a smaller budget keeps mixed lengths in
# tighter batches: served mixed-length traffic went from 0.70x to 0.95x length-sorted at 4096 (bench/README.md,
# "Mixed lengths"). A GPU wants big batches: 16384 there, to raise to what its memory holds.
CPU_BATCH_TOKENS, DEVICE_BATCH_TOKENS = 4096, 16384


class SpecError(ValueError):
    """A spec file that cannot be used; the message names the reward and what to change."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    # Runtime-only fields: excluded from the reward id (see module docstring).
    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset()

    def defining(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude=set(self.RUNTIME_FIELDS))


# --- rules -----------------------------------------------------------------------------------


class MathEqualSpec(_Spec):
    """1.0 when the response's answer is mathematically equal to the reference (math-verify).

    The reference is the bare answer (`51`, `\\frac{1}{2}`), not a worked solution. `answer`
    says how the answer is found (`assay.answers`: `{how: boxed}`, `{how: last_number}`,
    `{how: hashes}`, `{how: regex, pattern: ...}`); `answer_pattern: P`, the older spelling, is
    `{how: regex, pattern: P}` and has the same reward id. With neither, math-verify finds the
    answer in the whole response itself."""

    type: Literal["rule.math_equal"]
    answer: Extract | None = Field(
        default=None, description="How the answer is found (assay.answers); default: math-verify extracts it."
    )
    answer_pattern: str | None = Field(
        default=None, description="Regex whose group 1 is the answer: short for answer: {how: regex, pattern: ...}."
    )
    timeout_s: float = Field(
        default=5.0, gt=0, description="Per-item limit for parsing and comparing (whole seconds, rounded up)."
    )
    RUNTIME_FIELDS = frozenset({"timeout_s"})

    @model_validator(mode="after")
    def _one_way(self) -> MathEqualSpec:
        if self.answer is not None and self.answer_pattern is not None:
            raise ValueError(
                "give `answer` or `answer_pattern` (the same as answer: {how: regex, pattern: ...}), not both"
            )
        return self

    @property
    def extraction(self) -> Extract | None:
        """How the answer is found; None: math-verify looks at the whole response."""
        if self.answer_pattern is not None:
            return Extract("regex", self.answer_pattern)
        return self.answer

    def defining(self) -> dict[str, Any]:
        # One spelling per extraction in the id: a regex `answer` as `answer_pattern` (the spelling
        # spec files used before `answer`), and no `answer` key at all when it is left out, so the
        # ids of those files stay what they were.
        out = super().defining()
        del out["answer"]
        how = self.extraction
        if how is not None and how.how == "regex":
            out["answer_pattern"] = how.pattern
        elif how is not None:
            out["answer"] = how.how
        return out


class ExactMatchSpec(_Spec):
    """1.0 when the (extracted) answer equals the reference string."""

    type: Literal["rule.exact_match"]
    answer_pattern: str | None = None
    case_sensitive: bool = True
    strip: bool = True


class RegexSpec(_Spec):
    """1.0 when the pattern is found in (or, with fullmatch, is) the response."""

    type: Literal["rule.regex"]
    pattern: str
    mode: Literal["search", "fullmatch"] = "search"


class LengthPenaltySpec(_Spec):
    """0 up to max_length - buffer, then falling linearly to -penalty at max_length (DAPO's soft
    overlong penalty), -penalty beyond."""

    type: Literal["rule.length_penalty"]
    max_length: int = Field(gt=0)
    buffer: int = Field(default=0, ge=0)
    unit: Literal["chars", "words"] = "chars"
    penalty: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _buffer_fits(self) -> LengthPenaltySpec:
        if self.buffer > self.max_length:
            raise ValueError(f"buffer ({self.buffer}) must not exceed max_length ({self.max_length})")
        return self


class JsonSchemaSpec(_Spec):
    """1.0 when the response parses as JSON and validates against the schema, else 0.0."""

    type: Literal["rule.json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema")


class ArithStepsSpec(_Spec):
    """Per-step correctness of an arithmetic-world solution; outcome 1.0 only if every step is right."""

    type: Literal["rule.arith_steps"]


# --- models ----------------------------------------------------------------------------------


class _ModelSpec(_Spec):
    path: str = Field(description="Local Hugging Face checkpoint folder.")
    backend: Literal["transformers", "vllm"] = "transformers"
    template: str = Field(
        default="{prompt}{response}",
        description="How prompt and response become the model's text; the same string training used.",
    )
    chat_template: bool = Field(
        default=False, description="Render [user: prompt, assistant: response] with the tokenizer's chat template."
    )
    max_tokens: int = Field(default=2048, gt=0)
    truncation: Literal["error", "left"] = Field(
        default="error", description="Over max_tokens: refuse the request, or keep the last max_tokens tokens."
    )
    max_batch_tokens: int | None = Field(
        default=None,
        gt=0,
        description="Padded tokens per forward: items x the longest item. Items of similar length batch together. "
        "Default: 4096 on a CPU (batching gains little beyond it there, and smaller batches keep mixed lengths "
        "apart), 16384 on other devices (raise it to what the GPU's memory holds).",
    )
    max_batch_items: int = Field(default=128, gt=0)
    max_wait_ms: float = Field(default=5.0, ge=0)
    max_queue: int = Field(default=4096, gt=0, description="Items waiting before the service answers 429.")
    device: str = Field(default="cpu", description="torch device of the model: cpu, cuda, cuda:1, ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="float32",
        description="Weights and compute: float32 (the default: scores as the checkpoint's own arithmetic gives "
        "them), bfloat16 or float16 (half the memory, faster on a GPU; scores move by rounding), auto (the "
        "checkpoint's own dtype). Scores are returned as float32 whatever it is.",
    )

    def batch_tokens(self) -> int:
        """`max_batch_tokens`, or its default for the spec's device."""
        if self.max_batch_tokens is not None:
            return self.max_batch_tokens
        return CPU_BATCH_TOKENS if self.device == "cpu" else DEVICE_BATCH_TOKENS

    RUNTIME_FIELDS = frozenset(
        {"path", "backend", "max_batch_tokens", "max_batch_items", "max_wait_ms", "max_queue", "device", "dtype"}
    )


class OutcomeModelSpec(_ModelSpec):
    """A sequence-classification checkpoint: one scalar per response."""

    type: Literal["model.outcome"]
    activation: Literal["none", "sigmoid"] = "none"


class ProcessModelSpec(_ModelSpec):
    """A token-classification checkpoint scored at the last token of each step."""

    type: Literal["model.process"]
    steps: Literal["arith", "lines", "paragraphs"] = "lines"
    aggregate: Literal["min", "prod", "last", "mean"] = "min"


# --- judge and composite ---------------------------------------------------------------------

CONTROL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|begin_of_text|>",
    "[INST]",
    "[/INST]",
    "<<SYS>>",
    "<</SYS>>",
    "<s>",
    "</s>",
    "<pad>",
    "<unk>",
)


class JudgeSpec(_Spec):
    """An LLM behind an OpenAI-compatible endpoint (completions or chat), asked about the response."""

    type: Literal["judge"]
    endpoint: str = Field(description="Base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8001/v1")
    model: str
    api: Literal["completions", "chat"] = Field(
        default="completions",
        description="completions: one prompt to /completions; chat: a system rubric and a user message to "
        "/chat/completions.",
    )
    mode: Literal["yes_prob", "verdict", "expected_score", "text_score", "pairwise", "pairwise_verdict"] = "yes_prob"
    template: str | None = Field(
        default=None,
        description="Prompt (chat: the user message) with {prompt} and {response} (pairwise: {response_a}, "
        "{response_b}); default per mode and api.",
    )
    system: str | None = Field(
        default=None, description='Chat only: the system message (the rubric); default per mode, "" for none.'
    )
    yes: str = "yes"
    no: str = "no"
    score_min: int = 1
    score_max: int = 10
    max_tokens: int = Field(
        default=16, gt=0, description="text_score, verdict, pairwise_verdict: tokens the judge may write."
    )
    top_logprobs: int = Field(default=20, gt=0, le=20)
    strip_tokens: tuple[str, ...] = CONTROL_TOKENS
    one_line: bool = Field(default=True, description="Collapse newlines in judged text so it cannot forge markers.")
    api_key_env: str | None = Field(default=None, description="Environment variable holding the endpoint's key.")
    timeout_s: float = Field(default=30.0, gt=0, description="Per attempt, and never past the request's deadline.")
    max_concurrency: int = Field(default=16, gt=0)
    retries: int = Field(
        default=2,
        ge=0,
        description="Tries again after a refused connection, 429, 502, 503, 504 (Retry-After honoured).",
    )
    RUNTIME_FIELDS = frozenset({"api_key_env", "timeout_s", "max_concurrency", "retries"})

    @field_validator("endpoint")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"endpoint must be an http(s) URL, got {v!r}")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _system_is_for_chat(self) -> JudgeSpec:
        if self.system is not None and self.api != "chat":
            raise ValueError("`system` is the chat API's system message: set `api: chat`, or leave `system` out")
        return self


# --- rewards another server computes ----------------------------------------------------------


class _RemoteSpec(_Spec):
    """A reward served by someone else: where, how to reach it, and how its items are batched."""

    url: str = Field(description="The server's URL (remote.vllm_classify: its base; remote.openrlhf: the route).")
    api_key_env: str | None = Field(default=None, description="Environment variable holding the server's key.")
    timeout_s: float = Field(default=30.0, gt=0, description="Per attempt, and never past the request's deadline.")
    retries: int = Field(
        default=2,
        ge=0,
        description="Tries again after a refused connection, 429, 502, 503, 504 (Retry-After honoured).",
    )
    max_concurrency: int = Field(default=4, gt=0, description="Requests (batches) in flight to the server at once.")
    max_batch_items: int = Field(default=32, gt=0, description="Items per request to the server.")
    max_wait_ms: float = Field(default=5.0, ge=0, description="How long an item waits for company before it is sent.")
    max_queue: int = Field(default=4096, gt=0, description="Items waiting before the service answers 429.")
    template: str = Field(
        default="{prompt}{response}", description="How prompt and response become the text the server reads."
    )
    RUNTIME_FIELDS = frozenset(
        {"api_key_env", "timeout_s", "retries", "max_concurrency", "max_batch_items", "max_wait_ms", "max_queue"}
    )

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"url must be an http(s) URL, got {v!r}")
        return v.rstrip("/")


class VllmClassifySpec(_RemoteSpec):
    """A classifier behind vLLM's (or SGLang's) pooling API: one `POST {url}/classify` per batch."""

    type: Literal["remote.vllm_classify"]
    model: str = Field(description="The served model's name, as the server's `model` field takes it.")
    chat_template: bool = Field(
        default=False,
        description="Send [prompt turns, assistant: response] as `messages`, for the server to render with its "
        "model's chat template (one request per item); else the `template`'s text as `input`.",
    )
    use_activation: bool = Field(
        default=True,
        description="vLLM's: true, the class probability (sigmoid for one class, softmax for several: a local "
        "model.outcome's activation: sigmoid); false, the raw logit (activation: none).",
    )
    index: int = Field(default=0, ge=0, description="Which class's value is the score (`probs[index]`).")


class OpenRLHFSpec(_RemoteSpec):
    """A server speaking OpenRLHF's remote reward protocol: `{"query", "prompts", "labels"}` in,
    `{"rewards", ...}` out; `query` is the template's text, `labels` the references."""

    type: Literal["remote.openrlhf"]
    key: Literal["rewards", "scores"] = Field(
        default="rewards", description="Which list of the answer is the score (OpenRLHF: rewards, for advantages)."
    )


RemoteSpec = VllmClassifySpec | OpenRLHFSpec


class CompositeSpec(_Spec):
    """An expression over other rewards by name (+ - * /, numbers, min(), max()), with gates."""

    type: Literal["composite"]
    expr: str
    gate: list[str] = Field(default_factory=list, description="Rewards that must pass, else the score is 0.")
    gate_threshold: float = 0.5

    @field_validator("gate", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


RewardSpec = Annotated[
    MathEqualSpec
    | ExactMatchSpec
    | RegexSpec
    | LengthPenaltySpec
    | JsonSchemaSpec
    | ArithStepsSpec
    | OutcomeModelSpec
    | ProcessModelSpec
    | JudgeSpec
    | VllmClassifySpec
    | OpenRLHFSpec
    | CompositeSpec,
    Field(discriminator="type"),
]


class SpecFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rewards: dict[str, RewardSpec]
    base_dir: Path = Field(default=Path("."), exclude=True)

    @field_validator("rewards")
    @classmethod
    def _names(cls, v: dict[str, Any]) -> dict[str, Any]:
        if not v:
            raise ValueError("a spec file declares at least one reward")
        for name in v:
            if not NAME.match(name):
                raise ValueError(f"reward name {name!r} must be an identifier (letters, digits, _)")
        return v

    def model_path(self, name: str) -> Path:
        spec = self.rewards[name]
        assert isinstance(spec, _ModelSpec)
        path = Path(spec.path).expanduser()
        return path if path.is_absolute() else (self.base_dir / path).resolve()


def load_spec(path: str | Path | None = None) -> SpecFile:
    """Read and validate a spec file; None reads the embedded arithmetic world's spec."""
    path = Path(path) if path is not None else EMBEDDED_SPEC
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"spec file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"spec file {path} is not valid YAML: {exc}") from None
    return parse_spec(raw, base_dir=path.resolve().parent, source=str(path))


def check_devices(spec: SpecFile) -> None:
    """Refuse a model reward whose `device` this process cannot use (`cuda` on a CPU-only build), in one
    sentence naming the reward: before the server starts. Torch is imported only for a device that is
    not the CPU, so a CPU spec is still checked without it."""
    for name, reward in spec.rewards.items():
        if isinstance(reward, _ModelSpec) and reward.device != "cpu":
            from assay.checkpoints import check_device

            try:
                check_device(reward.device)
            except ValueError as exc:
                raise SpecError(f"reward {name!r}: {exc}") from None


def parse_spec(raw: Any, base_dir: Path = Path("."), source: str = "spec") -> SpecFile:
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: expected a mapping with a `rewards:` key")
    try:
        spec = SpecFile(rewards=raw.get("rewards") or {}, base_dir=base_dir)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False))
        raise SpecError(f"{source}: {problems}") from None
    extra = set(raw) - {"rewards", "version"}
    if extra:
        raise SpecError(f"{source}: unknown top-level keys {sorted(extra)}; only `rewards` (and `version`)")
    _check_composites(spec, source)
    return spec


def _check_composites(spec: SpecFile, source: str) -> None:
    from assay.rm_server.rewards.composite import expression_names  # the parser owns the grammar

    for name, r in spec.rewards.items():
        if not isinstance(r, CompositeSpec):
            continue
        try:
            names = expression_names(r.expr) | set(r.gate)
        except ValueError as exc:
            raise SpecError(f"{source}: reward {name!r}: {exc}") from None
        for dep in sorted(names):
            if dep not in spec.rewards:
                raise SpecError(f"{source}: reward {name!r} uses {dep!r}, which the spec does not declare")
    order_rewards(spec, source)


def dependencies(spec: SpecFile, name: str) -> set[str]:
    from assay.rm_server.rewards.composite import expression_names

    r = spec.rewards[name]
    return expression_names(r.expr) | set(r.gate) if isinstance(r, CompositeSpec) else set()


def order_rewards(spec: SpecFile, source: str = "spec") -> list[str]:
    """Reward names with every composite after its parts; a cycle is a SpecError."""
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise SpecError(f"{source}: composite rewards form a cycle: {' -> '.join([*path, name])}")
        state[name] = "visiting"
        for dep in sorted(dependencies(spec, name)):
            visit(dep, [*path, name])
        state[name] = "done"
        order.append(name)

    for name in spec.rewards:
        visit(name, [])
    return order


# --- reward ids ------------------------------------------------------------------------------


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def checkpoint_digest(path: Path) -> str:
    """sha256 over every file of a checkpoint folder (names and bytes), hidden files excepted."""
    if not path.is_dir():
        raise SpecError(f"checkpoint {path} is not a folder")
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        h.update(rel.encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def reward_ids(spec: SpecFile) -> dict[str, str]:
    """The content-addressed id of every reward in the spec, `sha256:<hex>`."""
    from assay.rm_server.rewards.judge_prompts import resolved_system, resolved_template  # prompts are in the id

    ids: dict[str, str] = {}
    digests: dict[Path, str] = {}
    for name in order_rewards(spec):
        r = spec.rewards[name]
        content: dict[str, Any] = {"spec": r.defining()}
        if isinstance(r, _ModelSpec):
            path = spec.model_path(name)
            if path not in digests:
                digests[path] = checkpoint_digest(path)
            content["checkpoint"] = digests[path]
        elif isinstance(r, JudgeSpec):
            content["prompt"] = resolved_template(r)
            if r.api == "chat":
                content["system"] = resolved_system(r)
        elif isinstance(r, CompositeSpec):
            content["parts"] = {dep: ids[dep] for dep in sorted(dependencies(spec, name))}
        ids[name] = "sha256:" + _digest(content)
    return ids
