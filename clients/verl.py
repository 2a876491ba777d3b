"""veRL's function reward over rm_server: `compute_score(data_source, solution_str, ground_truth, extra_info)`.

veRL calls a custom reward function once per sample from its reward workers (Ray actors), binding
`custom_reward_function.reward_kwargs` as keyword arguments. The whole configuration is one line:

    custom_reward_function.path=pkg://assay.clients.verl custom_reward_function.name=compute_score
    +custom_reward_function.reward_kwargs.reward=final

- **Settings**: the keyword arguments `url`, `reward`, `api_key`, `prompt_key`, `timeout_s`, or the
  environment of the worker: `ASSAY_RM_URL` (default http://127.0.0.1:8000), `ASSAY_REWARD`,
  `ASSAY_API_KEY` (a key is better there than in a config file that the trainer logs).
- **One client per process, made on first use.** A client (its connection pool) cannot be pickled,
  and Ray pickles the function into each worker: nothing is created at import, and the function
  carries no client. When veRL loads this file by its path (not `pkg://`), the module has another
  name and cloudpickle pickles its functions by value, the globals they read included: so the
  clients are looked up in `assay.clients.verl` itself, imported at the call, and never travel.
  A forked worker makes its own (the clients are kept per process id).
- **What is sent**: `solution_str` is the response (veRL decodes it without special tokens),
  `ground_truth` the reference (a number as its text). veRL passes no prompt: with `prompt_key`,
  `extra_info[prompt_key]` is the prompt (text, or a conversation sent as `messages`); without it
  the prompt is empty, which suits rules and not a model reward (that reads prompt and response).
- **A failed item raises `RewardFailed`** (its type, message and the reward id); a failed call
  raises the client's typed errors after its retries (`assay.clients.errors`). Never a 0.

veRL's reward-model router (`reward_model.enable`) needs none of this: it calls `/classify` or
`/v1/embeddings` on rm_server directly (`rm_server/compat.py`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

from assay.clients.reward import RewardClient
from assay.rm_server.protocol import ErrorType

DEFAULT_URL = "http://127.0.0.1:8000"

_lock = threading.Lock()
_clients: dict[tuple[int, str, str | None, float], RewardClient] = {}  # (pid, url, key, timeout) -> client


class RewardFailed(Exception):
    """The reward could not score this sample (its `ErrorType` says why); it has no score, not 0."""

    def __init__(self, type: ErrorType, message: str, reward_id: str) -> None:
        super().__init__(f"{type.value}: {message} (reward {reward_id})")
        self.type, self.message, self.reward_id = type, message, reward_id


def client(url: str, api_key: str | None, timeout_s: float) -> RewardClient:
    """This process's client for `url` (made on first use)."""
    key = (os.getpid(), url, api_key, timeout_s)
    with _lock:
        if key not in _clients:
            _clients[key] = RewardClient.http(url, api_key=api_key, timeout_s=timeout_s)
        return _clients[key]


def compute_score(
    data_source: Any,
    solution_str: str,
    ground_truth: Any,
    extra_info: Mapping[str, Any] | None = None,
    *,
    url: str | None = None,
    reward: str | None = None,
    api_key: str | None = None,
    prompt_key: str | None = None,
    timeout_s: float = 60.0,
    **kwargs: Any,
) -> float:
    """The served reward's score of one sample (veRL's signature; the module docstring says how).
    Other keyword arguments veRL passes (`reward_router_address`, ...) are not used."""
    # Looked up in the importable module, not in this one's globals: see the module docstring.
    import assay.clients.verl as home

    url = url or os.environ.get("ASSAY_RM_URL") or DEFAULT_URL
    reward = reward or os.environ.get("ASSAY_REWARD")
    if not reward:
        raise ValueError("name the reward: custom_reward_function.reward_kwargs.reward, or ASSAY_REWARD")
    item: dict[str, Any] = {"id": "0", "response": solution_str}
    prompt: Any = ""
    if prompt_key is not None:
        if not extra_info or prompt_key not in extra_info:
            raise ValueError(f"extra_info has no {prompt_key!r} (prompt_key); it has {sorted(extra_info or {})}")
        prompt = extra_info[prompt_key]
    item["prompt" if isinstance(prompt, str) else "messages"] = prompt if isinstance(prompt, str) else list(prompt)
    if ground_truth is not None:
        item["reference"] = ground_truth if isinstance(ground_truth, str) else str(ground_truth)
    rm = home.client(url, api_key or os.environ.get("ASSAY_API_KEY"), timeout_s)
    out = rm.score(reward, [item])
    result = out.results[0]
    if result.error is not None:
        raise RewardFailed(result.error.type, result.error.message, out.reward_id)
    assert result.score is not None, "a result without an error has a score"
    return result.score
