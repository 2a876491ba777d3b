"""optillm's best-of-N (`bon.py`) and self-consistency (`self_consistency.py`), copied from optillm
0.4.0 (PyPI wheel optillm-0.4.0-py3-none-any.whl, github:algorithmicsuperintelligence/optillm).

Why copied: `import optillm.bon` runs optillm's package `__init__`, which imports its whole proxy
server (flask, cerebras-cloud-sdk, z3, spacy, gradio, presidio, selenium, ...), and optillm 0.4.0
requires transformers<5.13 while Assay needs >=5.16: it cannot be installed beside Assay, with or
without its dependencies. The two approaches themselves only call `client.chat.completions.create`
on the `openai.OpenAI` client they are given. The functions below are the upstream code unchanged
but for: the imports (`optillm.conversation_logger`, used only when a `request_id` is given, which
these tests never give, is a stand-in that is never called), the formatting (ruff format, which
this repository's lint runs on every file); the lint rules upstream's code breaks are waived for
this file (the `ruff: noqa` line) rather than the code changed.
"""
# ruff: noqa: G004, BLE001, UP006, UP035, RUF010, RUF013, E501

import logging
from difflib import SequenceMatcher
from types import SimpleNamespace
from typing import Dict, List

optillm = SimpleNamespace(conversation_logger=None)  # upstream: `import optillm`
conversation_logger = optillm.conversation_logger  # upstream: `from optillm import conversation_logger`

logger = logging.getLogger(__name__)

# --- optillm/bon.py ----------------------------------------------------------------------------


def best_of_n_sampling(
    system_prompt: str,
    initial_query: str,
    client,
    model: str,
    n: int = 3,
    request_config: dict = None,
    request_id: str = None,
) -> str:
    bon_completion_tokens = 0

    # Extract max_tokens from request_config with default
    max_tokens = 4096
    if request_config:
        max_tokens = request_config.get("max_tokens", max_tokens)

    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": initial_query}]

    completions = []

    try:
        # Try to generate n completions in a single API call using n parameter
        provider_request = {"model": model, "messages": messages, "max_tokens": max_tokens, "n": n, "temperature": 1}
        response = client.chat.completions.create(**provider_request)

        # Log provider call
        if request_id:
            response_dict = response.model_dump() if hasattr(response, "model_dump") else response
            conversation_logger.log_provider_call(request_id, provider_request, response_dict)

        # Check for valid response with None-checking
        if response is None or not response.choices:
            raise Exception("Response is None or has no choices")

        completions = [choice.message.content for choice in response.choices if choice.message.content is not None]
        logger.info(
            f"Generated {len(completions)} initial completions using n parameter. Tokens used: {response.usage.completion_tokens}"
        )
        bon_completion_tokens += response.usage.completion_tokens

        # Check if any valid completions were generated
        if not completions:
            raise Exception("No valid completions generated (all were None)")

    except Exception as e:
        logger.warning(f"n parameter not supported by provider: {str(e)}")
        logger.info(f"Falling back to generating {n} completions one by one")

        # Fallback: Generate completions one by one in a loop
        for i in range(n):
            try:
                provider_request = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 1}
                response = client.chat.completions.create(**provider_request)

                # Log provider call
                if request_id:
                    response_dict = response.model_dump() if hasattr(response, "model_dump") else response
                    conversation_logger.log_provider_call(request_id, provider_request, response_dict)

                # Check for valid response with None-checking
                if (
                    response is None
                    or not response.choices
                    or response.choices[0].message.content is None
                    or response.choices[0].finish_reason == "length"
                ):
                    logger.warning(f"Completion {i + 1}/{n} truncated or empty, skipping")
                    continue

                completions.append(response.choices[0].message.content)
                bon_completion_tokens += response.usage.completion_tokens
                logger.debug(f"Generated completion {i + 1}/{n}")

            except Exception as fallback_error:
                logger.error(f"Error generating completion {i + 1}: {str(fallback_error)}")
                continue

        if not completions:
            logger.error("Failed to generate any completions")
            return "Error: Could not generate any completions", 0

        logger.info(
            f"Generated {len(completions)} completions using fallback method. Total tokens used: {bon_completion_tokens}"
        )

    # Double-check we have completions before rating
    if not completions:
        logger.error("No completions available for rating")
        return "Error: Could not generate any completions", bon_completion_tokens

    # Rate the completions
    rating_messages = messages.copy()
    rating_messages.append(
        {
            "role": "system",
            "content": "Rate the following responses on a scale from 0 to 10, where 0 is poor and 10 is excellent. Consider factors such as relevance, coherence, and helpfulness. Respond with only a number.",
        }
    )

    ratings = []
    for completion in completions:
        rating_messages.append({"role": "assistant", "content": completion})
        rating_messages.append({"role": "user", "content": "Rate the above response:"})

        provider_request = {"model": model, "messages": rating_messages, "max_tokens": 256, "n": 1, "temperature": 0.1}
        rating_response = client.chat.completions.create(**provider_request)

        # Log provider call
        if request_id:
            response_dict = rating_response.model_dump() if hasattr(rating_response, "model_dump") else rating_response
            conversation_logger.log_provider_call(request_id, provider_request, response_dict)

        bon_completion_tokens += rating_response.usage.completion_tokens

        # Check for valid response with None-checking
        if (
            rating_response is None
            or not rating_response.choices
            or rating_response.choices[0].message.content is None
            or rating_response.choices[0].finish_reason == "length"
        ):
            logger.warning("Rating response truncated or empty, using default rating of 0")
            ratings.append(0)
        else:
            try:
                rating = float(rating_response.choices[0].message.content.strip())
                ratings.append(rating)
            except ValueError:
                ratings.append(0)

        rating_messages = rating_messages[:-2]

    best_index = ratings.index(max(ratings))
    return completions[best_index], bon_completion_tokens


# --- optillm/self_consistency.py -------------------------------------------------------------


class AdvancedSelfConsistency:
    def __init__(
        self,
        client,
        model: str,
        num_samples: int = 5,
        similarity_threshold: float = 0.8,
        request_config: dict = None,
        request_id: str = None,
    ):
        self.client = client
        self.model = model
        self.num_samples = num_samples
        self.similarity_threshold = similarity_threshold
        self.self_consistency_completion_tokens = 0
        self.request_id = request_id

        # Extract max_tokens from request_config with default
        self.max_tokens = 4096
        if request_config:
            self.max_tokens = request_config.get("max_tokens", self.max_tokens)

    def generate_responses(self, system_prompt: str, user_prompt: str) -> List[str]:
        responses = []
        for _ in range(self.num_samples):
            provider_request = {
                "model": self.model,
                "messages": [{"role": "system", "content": system_prompt}, {"role": "user", "content": user_prompt}],
                "temperature": 1,
                "max_tokens": self.max_tokens,
            }
            response = self.client.chat.completions.create(**provider_request)

            # Log provider call
            if hasattr(optillm, "conversation_logger") and optillm.conversation_logger and self.request_id:
                response_dict = response.model_dump() if hasattr(response, "model_dump") else response
                optillm.conversation_logger.log_provider_call(self.request_id, provider_request, response_dict)

            # Skip empty, None, or length-truncated samples so they do not flow
            # into similarity clustering (a None content crashes SequenceMatcher).
            if (
                response is None
                or not response.choices
                or response.choices[0].message.content is None
                or response.choices[0].finish_reason == "length"
            ):
                logger.warning("Self-consistency sample was empty, None, or truncated, skipping")
                continue

            self.self_consistency_completion_tokens += response.usage.completion_tokens
            responses.append(response.choices[0].message.content)
        return responses

    def calculate_similarity(self, a: str, b: str) -> float:
        return SequenceMatcher(None, a, b).ratio()

    def cluster_similar_responses(self, responses: List[str]) -> List[List[str]]:
        clusters = []
        for response in responses:
            added_to_cluster = False
            for cluster in clusters:
                if self.calculate_similarity(response, cluster[0]) >= self.similarity_threshold:
                    cluster.append(response)
                    added_to_cluster = True
                    break
            if not added_to_cluster:
                clusters.append([response])
        return clusters

    def aggregate_results(self, responses: List[str]) -> Dict[str, any]:
        final_answers = responses
        clusters = self.cluster_similar_responses(final_answers)

        cluster_info = []
        for cluster in clusters:
            cluster_info.append({"answer": cluster[0], "frequency": len(cluster), "variants": cluster})

        cluster_info.sort(key=lambda x: x["frequency"], reverse=True)

        return {"clusters": cluster_info, "total_responses": len(responses), "num_unique_clusters": len(clusters)}

    def evaluate(self, system_prompt: str, user_prompt: str) -> Dict[str, any]:
        responses = self.generate_responses(system_prompt, user_prompt)
        aggregated_result = self.aggregate_results(responses)

        return {"individual_responses": responses, "aggregated_result": aggregated_result}


def advanced_self_consistency_approach(
    system_prompt: str, initial_query: str, client, model: str, request_config: dict = None, request_id: str = None
) -> str:
    self_consistency = AdvancedSelfConsistency(client, model, request_config=request_config, request_id=request_id)
    result = self_consistency.evaluate(system_prompt, initial_query)

    logger.info("Advanced Self-Consistency Results:")
    logger.info(f"Total responses: {result['aggregated_result']['total_responses']}")
    logger.info(f"Number of unique clusters: {result['aggregated_result']['num_unique_clusters']}")
    for i, cluster in enumerate(result["aggregated_result"]["clusters"], 1):
        logger.debug(f"\nCluster {i}:")
        logger.debug(f"  Representative answer: {cluster['answer']}")
        logger.debug(f"  Frequency: {cluster['frequency']}")
        logger.debug(f"  Variants: {cluster['variants']}")

    if result["aggregated_result"]["clusters"]:
        return result["aggregated_result"]["clusters"][0]["answer"], self_consistency.self_consistency_completion_tokens
    else:
        return "No consistent answer found.", self_consistency.self_consistency_completion_tokens
