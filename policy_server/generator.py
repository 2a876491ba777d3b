"""A served model behind `search.base.Generator`, so that `/v1/search` generates in-process.

Search strategies are blocking code, and `/v1/search` runs each on a worker thread. Their
generate calls come back to the server's event loop with `asyncio.run_coroutine_threadsafe`
and go into the backend's `generate`, exactly as a completions request does, rather than into the
model directly under its lock. Two reasons:

- batching: a search's sequences share decode batches with the other traffic, and neither
  stalls the other for the length of a whole search;
- weight versions: a weight update swaps weights between batches, and every output carries the
  version of the batch that produced it. A search reports the oldest version among its
  candidates, as a completions request does; a second path into the model could drift from that.

No torch here: the backend does the model work.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import threading
from collections.abc import Sequence

from assay.policy_server.backends import GenerationBackend, GenerationOutput, GenerationRequest
from assay.search.base import Generation, GenParams


class SearchCancelled(Exception):
    """The search was cancelled (its client went away, its deadline passed, the server is stopping)."""


class ContextFull(ValueError):
    """A text to continue leaves no room in the model's context."""


class TooManySequences(ValueError):
    """One generate call asks for more sequences than a request may."""


def sequence_seed(seed: int, text: int, sample: int) -> int:
    """The seed of sample `sample` of text `text` in a call with seed `seed`: a hash, not `seed + j`,
    so that calls whose seeds are consecutive (a search derives one per call) share no samples.
    The backend samples each sequence from its own generator, so batch-mates do not change it."""
    digest = hashlib.blake2b(f"{seed}:{text}:{sample}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def to_generation(out: GenerationOutput) -> Generation:
    """A backend output as the search sees it: a stop string is kept in the text (finish "step"),
    end of sequence is "stop", max_tokens (or the context's end) is "length"."""
    if out.finish_reason == "abort":
        raise SearchCancelled("the generation was aborted")
    if out.stop_reason is not None:
        return Generation(out.text + out.stop_reason, len(out.token_ids), "step")
    return Generation(out.text, len(out.token_ids), "stop" if out.finish_reason == "stop" else "length")


class BackendGenerator:
    """`Generator` over a `GenerationBackend` that runs on `loop`; call `generate` from any other thread.

    One instance per search: it remembers the weight versions of its samples (`versions`), and
    `cancel()` stops it, aborting the sequences in flight, from the loop or any thread.
    """

    def __init__(
        self,
        backend: GenerationBackend,
        loop: asyncio.AbstractEventLoop,
        *,
        max_sequences: int,
        add_special_tokens: bool = True,
    ) -> None:
        self.backend = backend
        self.loop = loop
        self.max_sequences = max_sequences
        # False for text a chat template rendered: it holds its specials (a second <s> would shift the model)
        self.add_special_tokens = add_special_tokens
        self.versions: set[int] = set()
        self._cancelled = False
        self._in_flight: concurrent.futures.Future | None = None
        self._lock = threading.Lock()

    @property
    def weight_version(self) -> str | None:
        """The oldest version that generated a sample so far (None before any)."""
        return None if not self.versions else str(min(self.versions))

    def requests(self, texts: Sequence[str], n: int, params: GenParams) -> list[GenerationRequest]:
        """n sequences per text, text by text. A text near the end of the context gets fewer tokens
        (its samples then finish "length"); one that fills the context is refused."""
        out = []
        for i, text in enumerate(texts):
            ids = self.backend.encode(text, add_special_tokens=self.add_special_tokens)
            room = self.backend.max_model_len - len(ids)
            if room < 1:
                raise ContextFull(
                    f"the prompt and the response so far take {len(ids)} tokens, the whole context "
                    f"of {self.backend.max_model_len}"
                )
            request = GenerationRequest(
                prompt_ids=ids,
                max_tokens=min(params.max_tokens, room),
                temperature=params.temperature,
                top_p=params.top_p,
                stop=tuple(params.stop),
            )
            out += [dataclasses.replace(request, seed=sequence_seed(params.seed, i, j)) for j in range(n)]
        return out

    def generate(self, texts: Sequence[str], n: int, params: GenParams) -> list[list[Generation]]:
        if len(texts) * n > self.max_sequences:
            raise TooManySequences(
                f"one generate call of {len(texts)} texts x n={n} is more than the limit of "
                f"{self.max_sequences} sequences; lower n or beam_width"
            )
        outputs = self._submit(self.requests(texts, n, params))
        self.versions.update(o.weight_version for o in outputs)
        flat = [to_generation(o) for o in outputs]
        return [flat[i * n : (i + 1) * n] for i in range(len(texts))]

    def _submit(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        """The backend's outputs, generated on the loop; raises what the backend raises (e.g. Overloaded)."""
        with self._lock:
            if self._cancelled:
                raise SearchCancelled("the search was cancelled")
            work = self.backend.generate(requests)
            try:
                future = asyncio.run_coroutine_threadsafe(work, self.loop)
            except RuntimeError:  # the loop is closed: the server is gone
                work.close()
                raise SearchCancelled("the server is stopping") from None
            self._in_flight = future
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise SearchCancelled("the search was cancelled") from None
        finally:
            with self._lock:
                self._in_flight = None

    def cancel(self) -> None:
        """Refuse further generate calls and abort the one in flight (its task is cancelled on the loop)."""
        with self._lock:
            self._cancelled = True
            if self._in_flight is not None:
                self._in_flight.cancel()
