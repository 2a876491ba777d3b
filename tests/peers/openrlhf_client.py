"""OpenRLHF's remote reward client, copied from OpenRLHF (Apache-2.0) as it is, for the compat tests.

Why copied: `pip install openrlhf` pulls deepspeed, flash-attn, ray and a pinned transformers (far
too heavy for CI), and even with --no-deps `openrlhf.utils` imports its strategy module at import.

- `SingleTurnAgentExecutor.__init__` (the endpoint part) and `_fetch_rewards_via_http`: the
  released wheel openrlhf==0.11.2, `openrlhf/utils/agent.py` (one call per sample: the executor
  calls it with `[query], [prompt], [label]`, query = `hf_tokenizer.decode(prompt and response
  token ids, skip_special_tokens=False)`). The class keeps only what that method reads.
- `OldShardingClient.fetch`: OpenRLHF before 0.10 (commit 591b148cc5a829c710078553cc490f178bb4a4af,
  `openrlhf/utils/remote_rm_utils.py`: `request_api_wrapper`, and `RemoteRewardModel.get_rewards`'s
  sharding, which sends an empty shard to every URL after the first when a batch is smaller than
  the number of URLs), with ray's `.remote` calls made in place.
Kept out of ruff (pyproject's extend-exclude): the code reads as upstream wrote it.
"""

import asyncio
import logging
import time
from itertools import cycle

import aiohttp
import requests

logger = logging.getLogger(__name__)


class SingleTurnAgentExecutor:
    def __init__(self, remote_rm_url=None):
        reward_endpoints = [remote_rm_url] if isinstance(remote_rm_url, str) else remote_rm_url
        self.reward_endpoints = reward_endpoints or []
        self._reward_endpoint_cycle = cycle(self.reward_endpoints)

    async def _fetch_rewards_via_http(self, queries_list, prompts_list, labels_list):
        """HTTP fallback: shard requests across servers."""
        num_servers = len(self.reward_endpoints)
        batch_size = (len(queries_list) + num_servers - 1) // num_servers
        timeout = aiohttp.ClientTimeout(total=180)

        tasks = []
        for i in range(num_servers):
            start_idx = i * batch_size
            if start_idx >= len(queries_list):
                break
            # Rollouts usually send one query, so rotate across calls as well as shards.
            rm = next(self._reward_endpoint_cycle)
            end_idx = min((i + 1) * batch_size, len(queries_list))
            payload = {
                "query": queries_list[start_idx:end_idx],
                "prompts": prompts_list[start_idx:end_idx],
                "labels": labels_list[start_idx:end_idx],
            }

            async def _post_request(url, data, try_max_times=5):
                for _ in range(try_max_times):
                    try:
                        async with aiohttp.ClientSession(timeout=timeout) as session:
                            async with session.post(url, json=data) as response:
                                response.raise_for_status()
                                return await response.json()
                    except aiohttp.ClientError as e:
                        logger.info(f"Request error, please check: {e}")
                    except Exception as e:  # pragma: no cover - defensive
                        logger.info(f"Unexpected error, please check: {e}")
                    await asyncio.sleep(1)

                raise RuntimeError(
                    f"Request error for {try_max_times} times, returning None. Please check the API server."
                )

            tasks.append(asyncio.create_task(_post_request(rm, payload)))
        return await asyncio.gather(*tasks)


# --- OpenRLHF before 0.10: openrlhf/utils/remote_rm_utils.py at 591b148cc5a8 -----------------------

def request_api_wrapper(url, data, try_max_times=5):
    """Synchronous request API wrapper"""
    headers = {
        "Content-Type": "application/json",
    }
    for _ in range(try_max_times):
        try:
            response = requests.post(url=url, json=data, headers=headers, timeout=180)
            response.raise_for_status()  # Raise an HTTPError for bad responses
            response = response.json()
            return response
        except requests.RequestException as e:
            logger.info(f"Request error, please check: {e}")
        except Exception as e:
            logger.info(f"Unexpected error, please check: {e}")
        time.sleep(1)

    raise Exception(f"Request error for {try_max_times} times, returning None. Please check the API server.")


def remote_rm_fn(api_url, queries, prompts, labels):
    return request_api_wrapper(api_url, {"query": queries, "prompts": prompts, "labels": labels})


class OldShardingClient:
    def __init__(self, remote_rm_url):
        self.remote_rm_url = [remote_rm_url] if isinstance(remote_rm_url, str) else remote_rm_url

    def get_rewards(self, queries_list, prompts_list, labels_list):
        # Distribute data across different remote reward function servers
        num_servers = len(self.remote_rm_url)
        batch_size = (len(queries_list) + num_servers - 1) // num_servers
        r_refs = []
        for i in range(num_servers):
            start_idx = i * batch_size
            end_idx = min((i + 1) * batch_size, len(queries_list))
            rm = self.remote_rm_url[i]
            r = remote_rm_fn(
                rm,
                queries=queries_list[start_idx:end_idx],
                prompts=prompts_list[start_idx:end_idx],
                labels=labels_list[start_idx:end_idx],
            )
            r_refs.append(r)

        return r_refs
