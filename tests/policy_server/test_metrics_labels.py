"""/metrics labels only the models the server serves: a request's `model` text never becomes a label."""

from __future__ import annotations

import grpc
import httpx
import pytest

from assay.proto.policy.v1 import policy_pb2 as pb
from assay.proto.policy.v1 import policy_pb2_grpc

pytestmark = pytest.mark.service


def test_unknown_model_names_share_one_label_and_never_reach_metrics(server):
    names = [f"client-text-{k}" for k in range(100)] + ["client-text-" + "x" * (1 << 20)]
    with httpx.Client(base_url=server.http_url, timeout=60) as http:
        before = http.get("/metrics").text
        for name in names:
            assert http.post("/v1/completions", json={"model": name, "prompt": "Q: 1+1 A: "}).status_code == 404
            chat = {"model": name, "messages": [{"role": "user", "content": "hi"}]}
            assert http.post("/v1/chat/completions", json=chat).status_code == 404
            search = {"model": name, "prompt": "Q: 1+1 A: ", "strategy": "majority"}
            assert http.post("/v1/search", json=search).status_code == 404
        with grpc.insecure_channel(server.grpc_target) as ch:
            stub = policy_pb2_grpc.PolicyServiceStub(ch)
            for name in names[:20]:
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Generate(pb.GenerateRequest(model=name, prompt="Q: 1+1 A: "), timeout=60)
                assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        after = http.get("/metrics").text
    assert "client-text" not in after
    assert len(after) < len(before) + 20_000, (len(before), len(after))
