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

Several replicas (`url` a list, a comma-separated string, or `dns+http://NAME:PORT`; see
`clients/replicas.py`). Generation, search and `models` go to one replica each call (least
outstanding, failing over at once on a transient failure). Weights go to every replica, at once,
under one deadline, and need a target version: `update_weights(state, version=V)` returns once
every replica serves V. A replica that answers 409 while it serves V already counts as done (a
push of V landed there: an earlier try whose answer was lost, or another pusher of the same V), so
the caller that lost an answer pushes the same V again and only the replicas without it load it
(`trainer.online.push_weights`); the client itself still never resends an update whose answer was
lost. `weight_versions()` reads each replica's version, `weight_version()` the lowest: the version
every replica serves. With one URL and no `version`, a push is what it always was.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Self, TypeVar

import httpx
from pydantic import BaseModel

from assay.clients.errors import POLICY_HTTP, Conflict, Unavailable, UnknownModel, http_failure
from assay.clients.http import CaCert, base_url, client_headers, extensions, json_body, reply, verify
from assay.clients.replicas import Address, Replica, Replicas
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
    """A blocking client of the policy service's HTTP API, over one replica or several."""

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        api_key: str | None = None,
        ca_cert: CaCert = None,
        timeout_s: float = 120.0,
        max_retries: int | None = None,
        backoff_s: float = 0.2,
        max_backoff_s: float = 2.0,
    ) -> None:
        """A client of the HTTP API at base URL `url` (http:// or https://), or of several replicas (a list,
        "http://a:8001,http://b:8001", or "dns+http://NAME:8001"); `ca_cert`: a CA bundle (PEM file) to check
        an https:// server against, in place of httpx's default (SSL_CERT_FILE when set, else certifi's)."""
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.retry = RetryPolicy(max_retries, backoff_s, max_backoff_s)
        checked = verify(ca_cert)

        def connect(address: Address) -> httpx.Client:
            where = base_url(address.url, "the policy service")
            return httpx.Client(base_url=where, headers=client_headers(address, api_key), verify=checked)

        self._replicas = Replicas.of(url, "http", connect, "the policy service")

    @classmethod
    def http(cls, url: str | Sequence[str], **kw: Any) -> Self:
        """A client of the HTTP API at base URL `url`, e.g. "http://127.0.0.1:8001" (or several, as above)."""
        return cls(url, **kw)

    @property
    def urls(self) -> list[str]:
        """The base URLs of the replicas in use."""
        return self._replicas.urls()

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
        """`/v1/models` of one replica."""
        return self._call(lambda left: self._send("GET", "/v1/models", None, ModelList, left), timeout_s)

    def weight_version(self, model: str = "policy", *, timeout_s: float | None = None) -> int:
        """The version `model` is served at: with several replicas the lowest, the one every replica serves."""
        if len(self._replicas) == 1 and not self._replicas.resolves:
            return _version_of(self.models(timeout_s=timeout_s), model, self.urls[0])
        return min(self.weight_versions(model, timeout_s=timeout_s).values())

    def weight_versions(self, model: str = "policy", *, timeout_s: float | None = None) -> dict[str, int]:
        """Each replica's version of `model`, by its base URL (asked at once, under one deadline)."""

        def version(replica: Replica[httpx.Client], left: float) -> int:
            return _version_of(
                self._send("GET", "/v1/models", None, ModelList, left, replica=replica), model, replica.url
            )

        return self._each(version, timeout_s)

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
        between batches. `expect_version`: refuse (Conflict) unless the server is at that version.
        `version`: the version the weights are served as (above the current one, else Conflict),
        needed with several replicas: every replica gets them, and the call returns once each serves
        `version` (see the module docstring for what the answer then holds)."""
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
        previous adapter; a later `update_weights` of a layer makes that the layer's new base.
        `version`: as for `update_weights`."""
        meta = {"lora_alpha": str(lora_alpha), "r": str(r), "fan_in_fan_out": str(fan_in_fan_out).lower()}
        return self._upload("/v1/admin/adapter", tensors, meta, model, expect_version, version, timeout_s)

    def load_weights(
        self,
        path: str,
        *,
        model: str = "policy",
        expect_version: int | None = None,
        version: int | None = None,
        timeout_s: float | None = None,
    ) -> WeightUpdateResponse:
        """Have the server load safetensors from `path` on its own disk (a file or a checkpoint directory),
        relative to a directory it was started with (`--weights-dir`), or absolute inside one.
        PermissionDenied when it has none; InvalidRequest, one message whatever the reason, for a path
        it will not read (its log says why). `version`: as for `update_weights` (every replica loads
        `path` from its own disk)."""
        req = LoadWeightsRequest(model=model, path=path, expect_version=expect_version, version=version)

        def send(replica: Replica[httpx.Client], left: float) -> WeightUpdateResponse:
            path = "/v1/admin/weights/load"
            return self._send("POST", path, req, WeightUpdateResponse, left, False, replica=replica)

        return self._to_every(send, model, version, timeout_s)

    # --- health ------------------------------------------------------------------------------

    def health(self, *, timeout_s: float = 5.0) -> bool:
        """Whether a replica answers (any: a call then has somewhere to go)."""
        return any(self._probe(r, "/health", timeout_s) for r in self._replicas.all())

    def ready(self, *, timeout_s: float = 5.0) -> bool:
        """Whether a replica is ready (any)."""
        return any(self._probe(r, "/ready", timeout_s) for r in self._replicas.all())

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Block until a replica answers ready (Unavailable after `timeout_s`)."""
        end = time.monotonic() + timeout_s
        while not self.ready(timeout_s=2.0):
            if time.monotonic() > end:
                raise Unavailable(f"{', '.join(self.urls)} was not ready within {timeout_s:g}s")
            time.sleep(0.2)

    def close(self) -> None:
        for client in [r.conn for r in self._replicas.all()] + self._replicas.take_dropped():
            client.close()

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

        def send(replica: Replica[httpx.Client], left: float) -> WeightUpdateResponse:
            chunks, size = safetensors_chunks(tensors, metadata)
            headers = {"content-type": "application/octet-stream", "content-length": str(size)}
            return self._request(
                replica,
                "POST",
                path,
                WeightUpdateResponse,
                left,
                content=chunks,
                params=params,
                headers=headers,
                resend_safe=False,
            )

        return self._to_every(send, model, version, timeout_s)

    def _to_every(
        self,
        send: Callable[[Replica[httpx.Client], float], WeightUpdateResponse],
        model: str,
        version: int | None,
        timeout_s: float | None,
    ) -> WeightUpdateResponse:
        """A weight update `send`s to every replica, under one deadline. With a target `version` a
        replica at it already counts as done; without one (one URL only) it is the update it always was."""
        if version is None:
            if len(self._replicas) > 1 or self._replicas.resolves:
                raise ValueError("a weight update of several replicas needs version=V, the version each then serves")
            only = self._replicas.all()[0]
            return self._call(lambda left: send(only, left), timeout_s)

        def update(replica: Replica[httpx.Client], left: float) -> WeightUpdateResponse | None:
            """The replica's answer; None when it serves `version` already (its 409: an update to it landed)."""
            try:
                return send(replica, left)
            except Conflict:
                if self._version_at(replica, model, left) != version:
                    raise
                return None

        began = time.monotonic()
        answers = self._each(update, timeout_s)
        return _summary(model, version, answers, time.monotonic() - began)

    def _version_at(self, replica: Replica[httpx.Client], model: str, timeout: float) -> int:
        return _version_of(
            self._send("GET", "/v1/models", None, ModelList, timeout, replica=replica), model, replica.url
        )

    def _each(self, fn: Callable[[Replica[httpx.Client], float], T], timeout_s: float | None) -> dict[str, T]:
        """`fn(replica, seconds_left)` on every replica at once, each retried (never failing over: it is
        that replica's) under the one deadline; by replica URL. The first failure fails the call."""
        self._refresh()
        replicas = self._replicas.all()
        if not replicas:
            raise Unavailable(
                f"the policy service: {', '.join(s.given for s in self._replicas.sources)} has no address"
            )
        end = time.monotonic() + (timeout_s or self.timeout_s)

        def on(replica: Replica[httpx.Client]) -> T:
            return self._call(lambda left: fn(replica, left), max(1e-3, end - time.monotonic()))

        with ThreadPoolExecutor(len(replicas), thread_name_prefix="assay-replica") as pool:
            return dict(zip([r.url for r in replicas], pool.map(on, replicas), strict=True))

    def _call(self, attempt: Attempt[T], timeout_s: float | None) -> T:
        self._refresh()
        return self.retry.call(attempt, timeout_s or self.timeout_s)

    def _refresh(self) -> None:
        """Resolve a service address again when it is due, closing the clients of replicas gone."""
        self._replicas.refresh_if_due()
        for client in self._replicas.take_dropped():
            client.close()

    def _send(
        self,
        method: str,
        path: str,
        req: BaseModel | None,
        model: type[M],
        timeout: float,
        resend_safe: bool = True,
        *,
        replica: Replica[httpx.Client] | None = None,
    ) -> M:
        return self._request(replica, method, path, model, timeout, json=json_body(req), resend_safe=resend_safe)

    def _request(
        self,
        replica: Replica[httpx.Client] | None,
        method: str,
        path: str,
        model: type[M],
        timeout: float,
        *,
        resend_safe: bool,
        **kw: Any,
    ) -> M:
        """One request to `replica`, or to the one `Replicas.pick` gives (failing over when it fails)."""
        with self._replicas.use(replica) as chosen:
            try:
                r = chosen.conn.request(method, path, timeout=timeout, extensions=extensions(chosen.address), **kw)
            except httpx.HTTPError as exc:
                err = http_failure(exc, f"{method} {chosen.url}{path}")
            else:
                try:
                    return reply(r, model, POLICY_HTTP)
                except Unavailable as lost:  # a proxy's 500: the replica died with the request
                    if not lost.unanswered:
                        raise
                    err = lost
            if err.unanswered and not resend_safe:
                err.retryable = False  # it may have been applied: the caller must look (weight_version)
            raise err from None

    def _probe(self, replica: Replica[httpx.Client], path: str, timeout_s: float) -> bool:
        try:
            return replica.conn.get(path, timeout=timeout_s, extensions=extensions(replica.address)).status_code == 200
        except httpx.HTTPError:
            return False


def _version_of(models: ModelList, model: str, url: str) -> int:
    for card in models.data:
        if card.id == model:
            return card.weight_version
    raise UnknownModel(f"{url} serves no model {model!r}", status=404)


def _summary(
    model: str, version: int, answers: dict[str, WeightUpdateResponse | None], seconds: float
) -> WeightUpdateResponse:
    """One answer for an update to `version` of every replica: the replica's own when there is one and it
    took the update; else `previous_version` the lowest a replica had (`version` for one at it already),
    the size of one push (0 when no replica needed it), and the whole update's wall time."""
    took = [a for a in answers.values() if a is not None]
    if len(answers) == 1 and took:
        return took[0]
    return WeightUpdateResponse(
        model=model,
        previous_version=min((a.previous_version for a in took), default=version),
        weight_version=version,
        tensors=took[0].tensors if took else 0,
        bytes=took[0].bytes if took else 0,
        seconds=seconds,
    )
