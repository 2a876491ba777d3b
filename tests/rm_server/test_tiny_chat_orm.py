"""A reward model whose tokenizer and template are not the policy's scores conversations right.

On the tiny-chat fixture the policy renders with ChatML and the ORM with its own (Zephyr-style)
template and byte-level BPE. Served with `chat_template: true` (the fixture's `rm.yaml`), the ORM
given a conversation scores exactly its own template's rendering of it, scored here in-process,
and not the policy's rendering: the bug class of TRL #6951, #6966 and OpenRLHF #242, where the
reward model is handed text in the policy's template.
"""

from __future__ import annotations

import json

import pytest
import torch

from assay.chat import render_exchange
from assay.rm_server.config import ServerConfig
from assay.rm_server.server import BackgroundServer

pytestmark = [pytest.mark.service, pytest.mark.slow]  # the fixture's build, once per session


def test_the_orm_scores_a_conversation_as_its_own_template_renders_it_not_as_the_policys(tiny_chat):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from assay.clients import RewardClient

    rows = [json.loads(line) for line in (tiny_chat / "eval_preferences.jsonl").read_text().splitlines()[:4]]
    exchanges = [(row["prompt"], row[side][-1]["content"]) for row in rows for side in ("chosen", "rejected")]
    orm_tok = AutoTokenizer.from_pretrained(tiny_chat / "orm")
    policy_tok = AutoTokenizer.from_pretrained(tiny_chat / "policy")
    orm = AutoModelForSequenceClassification.from_pretrained(tiny_chat / "orm").eval()

    @torch.inference_mode()
    def direct(text: str) -> float:
        ids = orm_tok(text, add_special_tokens=False, return_tensors="pt")  # the template wrote its specials
        return float(torch.sigmoid(orm(**ids).logits[0, 0]))

    own = [direct(render_exchange(orm_tok, prompt, response)) for prompt, response in exchanges]
    policys = [direct(render_exchange(policy_tok, prompt, response)) for prompt, response in exchanges]
    config = ServerConfig(spec=tiny_chat / "rm.yaml", port=0, grpc_port=None)
    with BackgroundServer(config) as server, RewardClient.http(server.http_url) as rm:
        reply = rm.score("orm", [{"messages": prompt, "response": response} for prompt, response in exchanges])
    served = [r.score for r in reply.results]
    assert all(s is not None for s in served), reply.results
    assert served == pytest.approx(own, abs=1e-4)  # batched with padding vs one at a time
    # the policy's template is another text to the ORM, and another score
    assert max(abs(s - p) for s, p in zip(served, policys, strict=True)) > 1e-3
    assert render_exchange(orm_tok, *exchanges[0]) != render_exchange(policy_tok, *exchanges[0])
