"""slime's remote reward client, copied from THUDM/slime (Apache-2.0) as it is, for the compat tests.

`_get_shared_session` and `remote_rm` from `slime/rollout/rm_hub/__init__.py` at commit
624b824a898ab0ec1fcb4d373004c7f3852bf515 (slime posts `{"prompt", "response", "label"}` to
`--rm-url` and keeps the JSON answer whole; `--reward-key score` then reads `reward["score"]`).
Why copied: slime is not on PyPI, and its package imports Megatron and SGLang at import.
Kept out of ruff (pyproject's extend-exclude): the code reads as upstream wrote it.
"""

import asyncio
import logging
import random

import aiohttp

logger = logging.getLogger(__name__)

Sample = object  # slime.utils.types.Sample: `remote_rm` reads its prompt, response and label

_shared_session: aiohttp.ClientSession | None = None


def _get_shared_session() -> aiohttp.ClientSession:
    global _shared_session
    if _shared_session is None or _shared_session.closed:
        connector = aiohttp.TCPConnector(
            limit=64,
            enable_cleanup_closed=True,
        )
        timeout = aiohttp.ClientTimeout(total=120)
        _shared_session = aiohttp.ClientSession(connector=connector, timeout=timeout)
    return _shared_session


async def remote_rm(args, sample: Sample, max_retries: int = 10):
    payload = {
        "prompt": sample.prompt,
        "response": sample.response,
        "label": sample.label,
    }
    session = _get_shared_session()
    for attempt in range(max_retries):
        try:
            async with session.post(args.rm_url, json=payload) as resp:
                resp.raise_for_status()
                return await resp.json()
        except Exception as e:
            if attempt + 1 >= max_retries:
                logger.warning(f"remote_rm failed after {attempt + 1} attempts: {e}")
                raise
            backoff = min(2**attempt, 30) + random.random()
            logger.info(f"remote_rm: {type(e).__name__}, retrying in {backoff:.1f}s ({attempt + 1}/{max_retries})")
            await asyncio.sleep(backoff)


