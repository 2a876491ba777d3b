"""Conversations as a model reads them: rendered with that model's own tokenizer and chat template.

Part of the models base. A prompt or a response is plain text or a conversation (a list of
`{"role", "content"}` messages, the shape TRL's conversational datasets and OpenAI's chat API use).
Plain text is used as it is: it is already what the model reads. A conversation becomes text only
through the tokenizer of the model that reads it, because two models rarely share a template: a
reward model on another tokenizer than the policy must render the exchange with its own template,
or it scores text it was never trained on (TRL #6951, #6966, OpenRLHF #242). Every place that turns
a conversation into text (the trainer, the reward service's model rewards, the policy's search)
goes through these functions, so they all render the same way.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from jinja2.exceptions import TemplateError

from assay.data import Message, Text

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


log = logging.getLogger(__name__)
SYSTEM_ROLES = ("system", "developer")


class NoChatTemplate(ValueError):
    """A conversation was given to a model whose tokenizer has no chat template."""


class DroppedMessages(ValueError):
    """The chat template would render no trace of some of the messages (a role it has no place for)."""


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _apply(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], *, generation_prompt: bool, **options: Any
) -> str:
    if not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise NoChatTemplate(
            f"the tokenizer of {name!r} has no chat template, so a conversation cannot be rendered for it: "
            "send plain text, or use a checkpoint whose tokenizer_config.json has a chat_template"
        )
    text: Any = tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt, **options
    )
    assert isinstance(text, str), "tokenize=False renders text"
    return text


def _as_turns(response: Text) -> list[Message]:
    return [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Text) -> str:
    """The text a model is given to continue: plain text as it is, or the conversation with the
    generation prompt (the opening of the assistant's turn) appended."""
    if isinstance(prompt, str):
        return prompt
    return _apply(tokenizer, prompt, generation_prompt=True)


def render_exchange(tokenizer: PreTrainedTokenizerBase, prompt: Text, response: Text) -> str:
    """Prompt and response as the model reads them together. Plain text: concatenated, as the
    policy produced it. A conversation: the prompt's messages and the response as the assistant's
    turn (or turns), through the template."""
    if isinstance(prompt, str) and isinstance(response, str):
        return prompt + response
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return _apply(tokenizer, [*messages, *_as_turns(response)], generation_prompt=False)


def split_exchange(tokenizer: PreTrainedTokenizerBase, prompt: Text, response: Text) -> tuple[str, str]:
    """`render_exchange` cut where the response starts: (prompt text, response text), which add up
    to the whole. The prompt text is `render_prompt`'s, so training on the response part teaches
    exactly what generation continues from (with the template's end-of-turn token in the response).
    Raises ValueError for a template whose rendering of the prompt is not a prefix of the exchange."""
    whole = render_exchange(tokenizer, prompt, response)
    if isinstance(prompt, str) and isinstance(response, str):
        return prompt, response
    head = render_prompt(tokenizer, prompt if not isinstance(prompt, str) else [{"role": "user", "content": prompt}])
    if not whole.startswith(head):
        raise ValueError(
            "the chat template renders the prompt differently with and without the response, so the "
            "response cannot be cut off cleanly; use a template whose generation prompt is a prefix"
        )
    return head, whole[len(head) :]


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    template_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """An OpenAI chat request's messages as the model reads them, through its template, so that no
    message vanishes: a role the template renders nothing of (the embedded `Q: ... A: ` template
    knows only user and assistant) is found by rendering without it. System and developer messages
    are then folded into the first user turn (`system\n\nuser`, what Gemma's template does with
    them); any other such role raises `DroppedMessages`, as does a system message with no user turn
    to carry it. `template_kwargs` are more variables for the template (vLLM's
    `chat_template_kwargs`): a name that `apply_chat_template` itself takes (`tokenize`, ...) or a
    special token's (`eos_token`, ...) is ignored, logged at DEBUG, so they cannot change the rendering's
    own settings or break the template (vLLM passes on only what the template reads)."""
    reserved = {*inspect.signature(tokenizer.apply_chat_template).parameters, *tokenizer.special_tokens_map}
    options = {k: v for k, v in (template_kwargs or {}).items() if k not in reserved}
    if len(options) < len(template_kwargs or {}):
        log.debug("chat_template_kwargs: ignored %s", ", ".join(sorted(set(template_kwargs or {}) - set(options))))
    messages = _keep_every_role(tokenizer, list(messages), options)
    return _apply(
        tokenizer,
        messages,
        generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        **options,
    )


def _keep_every_role(tokenizer: PreTrainedTokenizerBase, messages: list[Message], options: dict) -> list[Message]:
    whole = _apply(tokenizer, messages, generation_prompt=False, **options)
    dropped = []
    for role in dict.fromkeys(m["role"] for m in messages):
        rest = [m for m in messages if m["role"] != role]
        try:
            if rest and _apply(tokenizer, rest, generation_prompt=False, **options) == whole:
                dropped.append(role)
        except TemplateError:  # the template refuses the conversation without that role: it renders it
            continue
    others = [role for role in dropped if role not in SYSTEM_ROLES]
    if others:
        raise DroppedMessages(f"the chat template renders no {' or '.join(map(repr, others))} messages")
    if not dropped:
        return messages
    system = "\n\n".join(m["content"] for m in messages if m["role"] in dropped)
    rest = [m for m in messages if m["role"] not in dropped]
    first = next((i for i, m in enumerate(rest) if m["role"] == "user"), None)
    if first is None:
        raise DroppedMessages("the chat template renders no system messages, and no user turn can carry them")
    rest[first] = {**rest[first], "content": f"{system}\n\n{rest[first]['content']}"}
    return rest
