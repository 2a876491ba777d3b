"""A typed client of the policy service: generation, search, weight updates.

    with PolicyClient.http("http://127.0.0.1:8001") as policy:
        reply = policy.complete(["Q: 2+3 A: "], n=8, max_tokens=32, seed=0, logprobs=True)
        reply.choices[0].text, reply.choices[0].weight_version
        policy.update_weights(model.state_dict())        # -> the new weight_version
        policy.search("Q: 2+3 A: ", strategy="best_of_n", n=16, reward="orm")

Deadlines and retries are the reward client's (`clients/retry.py`, one loop): transient failures
(refused, reset, 429 with its Retry-After, 503 with its Retry-After while the server loads) are
retried with capped, jittered backoff until the call's deadline. Generation with a `seed` is a
pure function of the request and the weights, so retrying it is safe. A weight update is retried
only when the connection was refused (nothing was sent) or the server answered that it did not
apply it (503, 429): after a lost answer (`err.unanswered`) the update may have been applied, so
the caller looks at `weight_version` before sending it again (`trainer.online.push_weights`).

Failures are `clients.errors` exceptions, mapped by the same table as the reward client's (a 404
here is `UnknownModel`, a 409 `Conflict`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Self, TypeVar

import httpx
from pydantic import BaseModel

from assay.clients.errors import POLICY_HTTP, Unavailable, UnknownModel, http_failure
from assay.clients.http import CaCert, auth_headers, base_url, json_body, reply, verify
from assay.clients.retry import Attempt, RetryPolicy
from assay.policy_server.protocol import (
    CompletionRequest,
    CompletionResponse,
    LoadWeightsRequest,
    ModelList,
    SearchRequest,
    SearchResponse,
    WeightUpdateResponse,
)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
UPLOAD_CHUNK = 1 << 20


def safetensors_chunks(
    tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None
) -> tuple[Iterator[bytes], int]:
    """`tensors` (name -> torch.Tensor) as safetensors bytes in chunks, and the total size;
    `metadata` goes in the header's `__metadata__`.

    Tensors sharing storage (tied embeddings) are sent once, under the first name: the server
    updates both. Serialised with the `safetensors` package, never pickle."""
    from safetensors.torch import save

    seen: set[tuple[int, int]] = set()
    unique = {}
    for name, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in seen:
            seen.add(key)
            unique[name] = t.detach().cpu().contiguous()
    blob = save(unique, metadata=dict(metadata) if metadata else None)
    view = memoryview(blob)
    return (bytes(view[i : i + UPLOAD_CHUNK]) for i in range(0, len(blob), UPLOAD_CHUNK)), len(blob)


class PolicyClient:
    """A blocking client of the policy service's HTTP API."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        ca_cert: CaCert = None,
        timeout_s: float = 120.0,
        max_retries: int | None = None,
        backoff_s: float = 0.2,
        max_backoff_s: float = 2.0,
    ) -> None:
        """A client of the HTTP API at base URL `url` (http:// or https://); `ca_cert`: a CA bundle (PEM
        file) to check an https:// server against, in place of httpx's default (SSL_CERT_FILE when set,
        else certifi's bundle)."""
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.url = base_url(url, "the policy service")
        self.timeout_s = timeout_s
        self.retry = RetryPolicy(max_retries, backoff_s, max_backoff_s)
        self._client = httpx.Client(base_url=self.url, headers=auth_headers(api_key), verify=verify(ca_cert))

    @classmethod
    def http(cls, url: str, **kw: Any) -> Self:
        """A client of the HTTP API at base URL `url`, e.g. "http://127.0.0.1:8001"."""
        return cls(url, **kw)

    # --- generation ------------------------------------------------------------------------

    def complete(
        self,
        prompt: str | list[str] | list[int] | list[list[int]],
        *,
        model: str = "policy",
        timeout_s: float | None = None,
        **sampling: Any,
    ) -> CompletionResponse:
        """`/v1/completions`: n, max_tokens, temperature, top_p, top_k, stop, seed, logprobs (int or
        True for the sampled tokens' only), return_token_ids... Choices come prompt by prompt, n each."""
        if sampling.get("logprobs") is True:
            sampling["logprobs"] = 0
        req = CompletionRequest(model=model, prompt=prompt, **sampling)
        return self._call(lambda left: self._send("POST", "/v1/completions", req, CompletionResponse, left), timeout_s)

    def search(
        self,
        prompt: str | Sequence[Mapping[str, Any]],
        *,
        strategy: str,
        n: int | None = None,
        reward: str | None = None,
        model: str = "policy",
        timeout_s: float | None = None,
        **options: Any,
    ) -> SearchResponse:
        """`/v1/search`: inference-time search over the served model, scored by rm_server's `reward`.

        `prompt` is text, or a conversation (`[{"role": "user", "content": ...}]`), which the server
        renders with the model's chat template and sends to the reward as it is."""
        task: dict[str, Any] = {"prompt": prompt} if isinstance(prompt, str) else {"messages": list(prompt)}
        req = SearchRequest(model=model, strategy=strategy, n=n, reward=reward, **task, **options)
        return self._call(lambda left: self._send("POST", "/v1/search", req, SearchResponse, left), timeout_s)

    def models(self, *, timeout_s: float | None = None) -> ModelList:
        return self._call(lambda left: self._send("GET", "/v1/models", None, ModelList, left), timeout_s)

    def weight_version(self, model: str = "policy", *, timeout_s: float | None = None) -> int:
        for card in self.models(timeout_s=timeout_s).data:
            if card.id == model:
                return card.weight_version
        raise UnknownModel(f"{self.url} serves no model {model!r}", status=404)

    # --- weights -----------------------------------------------------------------------------

    def update_weights(
        self,
        tensors: Mapping[str, Any],
        *,
        model: str = "policy",
        expect_version: int | None = None,
        version: int | None = None,
        timeout_s: float | None = None,
    ) -> WeightUpdateResponse:
        """Send a state dict (or any named subset of it) as safetensors; the server swaps it in
        between batches. `expect_version`: refuse (Conflict) unless the server is at that version;
        `version`: the weight_version it makes (Conflict unless above the server's)."""
        return self._upload("/v1/admin/weights", tensors, None, model, expect_version, version, timeout_s)

    def update_adapter(
        self,
        tensors: Mapping[str, Any],
        *,
        lora_alpha: float,
        r: int,
        fan_in_fan_out: bool = False,
        model: str = "policy",
        expect_version: int | None = None,
        version: int | None = None,
        timeout_s: float | None = None,
    ) -> WeightUpdateResponse:
        """Send a LoRA adapter, which the server merges into its base weights (W + lora_alpha / r * B @ A)
        and serves as a new weight version. `tensors`: `<module>.lora_A.weight` [r, in] and
        `<module>.lora_B.weight` [out, r] per adapted linear layer, named as in the served model
        (peft's adapter state dict without its `base_model.model.` prefix). It replaces the
        previous adapter; a later `update_weights` of a layer makes that the layer's new base."""
        meta = {"lora_alpha": str(lora_alpha), "r": str(r), "fan_in_fan_out": str(fan_in_fan_out).lower()}
        return self._upload("/v1/admin/adapter", tensors, meta, model, expect_version, version, timeout_s)

    def load_weights(
        self, path: str, *, model: str = "policy", expect_version: int | None = None, timeout_s: float | None = None
    ) -> WeightUpdateResponse:
        """Have the server load safetensors from `path` on its own disk (a file or a checkpoint directory),
        relative to a directory it was started with (`--weights-dir`), or absolute inside one.
        PermissionDenied when it has none; InvalidRequest, one message whatever the reason, for a path
        it will not read (its log says why)."""
        req = LoadWeightsRequest(model=model, path=path, expect_version=expect_version)
        return self._call(
            lambda left: self._send("POST", "/v1/admin/weights/load", req, WeightUpdateResponse, left, False), timeout_s
        )

    # --- health ------------------------------------------------------------------------------

    def health(self, *, timeout_s: float = 5.0) -> bool:
        return self._probe("/health", timeout_s)

    def ready(self, *, timeout_s: float = 5.0) -> bool:
        return self._probe("/ready", timeout_s)

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Block until the server answers ready (Unavailable after `timeout_s`)."""
        end = time.monotonic() + timeout_s
        while not self.ready(timeout_s=2.0):
            if time.monotonic() > end:
                raise Unavailable(f"{self.url} was not ready within {timeout_s:g}s")
            time.sleep(0.2)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ----------------------------------------------------------------------------

    def _upload(
        self,
        path: str,
        tensors: Mapping[str, Any],
        metadata: Mapping[str, str] | None,
        model: str,
        expect_version: int | None,
        version: int | None,
        timeout_s: float | None,
    ) -> WeightUpdateResponse:
        params: dict[str, Any] = {"model": model}
        if expect_version is not None:
            params["expect_version"] = expect_version
        if version is not None:
            params["version"] = version

        def attempt(left: float) -> WeightUpdateResponse:
            chunks, size = safetensors_chunks(tensors, metadata)
            headers = {"content-type": "application/octet-stream", "content-length": str(size)}
            return self._request(
                "POST",
                path,
                WeightUpdateResponse,
                left,
                content=chunks,
                params=params,
                headers=headers,
                resend_safe=False,
            )

        return self._call(attempt, timeout_s)

    def _call(self, attempt: Attempt[T], timeout_s: float | None) -> T:
        return self.retry.call(attempt, timeout_s or self.timeout_s)

    def _send(
        self, method: str, path: str, req: BaseModel | None, model: type[M], timeout: float, resend_safe: bool = True
    ) -> M:
        return self._request(method, path, model, timeout, json=json_body(req), resend_safe=resend_safe)

    def _request(self, method: str, path: str, model: type[M], timeout: float, *, resend_safe: bool, **kw: Any) -> M:
        try:
            r = self._client.request(method, path, timeout=timeout, **kw)
        except httpx.HTTPError as exc:
            err = http_failure(exc, f"{method} {self.url}{path}")
            if err.unanswered and not resend_safe:
                err.retryable = False  # it may have been applied: the caller must look (weight_version)
            raise err from None
        return reply(r, model, POLICY_HTTP)

    def _probe(self, path: str, timeout_s: float) -> bool:
        try:
            return self._client.get(path, timeout=timeout_s).status_code == 200
        except httpx.HTTPError:
            return False
