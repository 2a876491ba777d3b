"""Several replicas behind one client, the pure parts (clients/replicas.py, clients/reward_replicas.py):
address strings, service addresses, which replica a call goes to, failover, and batch shards.

The failover tests drive `Replicas` with the clients' own exceptions (`Unavailable`, `Overloaded`,
`InvalidRequest`) and the retry loop (`RetryPolicy.wait`) with no server: the servers' side is in
tests/clients/test_several_servers.py.
"""

from __future__ import annotations

import socket

import pytest

from assay.clients import InvalidRequest, Overloaded, RetryPolicy, ServerError, Unavailable
from assay.clients.replicas import Address, Replicas, Source, split
from assay.clients.reward_replicas import merged, shards
from assay.rm_server.protocol import ItemResult, ScoreItem, ScoreRequest, ScoreResponse

pytestmark = pytest.mark.unit


def pool(*urls: str) -> Replicas[str]:
    return Replicas.of(list(urls), "http", lambda address: address.url, "the reward service")


class Forever:
    def remaining(self) -> float:
        return 60.0


def test_one_string_of_comma_separated_addresses_or_a_list_name_the_same_replicas():
    assert split("http://a:1, http://b:2,") == ["http://a:1", "http://b:2"]
    assert split(["http://a:1", "http://b:2,http://c:3"]) == ["http://a:1", "http://b:2", "http://c:3"]
    assert split("127.0.0.1:50051") == ["127.0.0.1:50051"]
    with pytest.raises(ValueError, match="no address"):
        split(" , ")


def test_a_service_address_names_every_address_of_its_name_and_asks_each_for_the_name():
    http = Source.parse("dns+https://localhost:8443", "http")
    assert (http.host, http.port, http.scheme) == ("localhost", 8443, "https")
    found = [info[4][0] for info in socket.getaddrinfo("localhost", 8443, type=socket.SOCK_STREAM)]
    addresses = http.addresses()
    assert [a.url for a in addresses] == [f"https://{ip if ':' not in ip else f'[{ip}]'}:8443" for ip in found]
    assert {(a.name, a.server_name) for a in addresses} == {("localhost:8443", "localhost")}
    grpc = Source.parse("dns:///localhost:50051", "grpc").addresses()
    assert grpc[0].url.endswith(":50051") and grpc[0].name == "localhost:50051"
    assert Source.parse("http://10.0.0.5:8000", "http").addresses() == [Address("http://10.0.0.5:8000")]
    with pytest.raises(ValueError, match="dns:///NAME:PORT"):
        Source.parse("dns:///nameonly", "grpc")
    with pytest.raises(ValueError, match="NAME:PORT"):
        Source.parse("dns+http://name:80/v1?x=1", "http")
    routed = Source.parse("dns+http://localhost:8000/rm/", "http").addresses()  # a route prefix stays on
    assert routed[0].url.endswith(":8000/rm")


def test_sequential_calls_go_round_robin_and_concurrent_ones_to_the_least_busy():
    replicas = pool("http://a", "http://b", "http://c")
    order = []
    for _ in range(6):
        with replicas.use() as r:
            order.append(r.url)
    assert sorted(order) == sorted(["http://a", "http://b", "http://c"] * 2)
    held = [replicas.pick() for _ in range(3)]  # three calls in flight: one on each
    assert sorted(r.url for r in held) == ["http://a", "http://b", "http://c"]
    for r in held[1:]:
        replicas.release(r, None)
    assert replicas.pick() is not held[0]  # a still has a call in flight


def test_a_transient_failure_fails_over_at_once_and_the_replica_is_avoided():
    replicas = pool("http://a", "http://b")
    err = Unavailable("refused")
    with pytest.raises(Unavailable), replicas.use() as first:
        raise err
    assert err.failover and replicas.live() == 1
    assert RetryPolicy().wait(0, err, Forever()) == 0.0  # the next attempt goes now
    for _ in range(4):  # while avoided, every call goes to the other one
        with replicas.use() as r:
            assert r is not first
    # the other one fails too: nothing to fail over to, so the retry loop backs off as with one server
    both = Unavailable("refused")
    with pytest.raises(Unavailable), replicas.use():
        raise both
    assert not both.failover
    assert replicas.pick() is first  # every replica avoided: the one that comes back first


def test_only_transient_failures_count_against_a_replica_and_an_answer_clears_its_record():
    replicas = pool("http://a", "http://b")
    bad = InvalidRequest("the request's own fault")
    with pytest.raises(InvalidRequest), replicas.use():
        raise bad
    assert not bad.failover and replicas.live() == 2
    busy = Overloaded("queue full", retry_after_s=30.0)
    with pytest.raises(Overloaded), replicas.use() as r:
        raise busy
    assert busy.failover and r.avoid_until > 0 and replicas.live() == 1  # avoided at least its Retry-After
    replicas.release(replicas._hold(r), None)
    assert r.avoid_until == 0.0 and r.failures == 0 and replicas.live() == 2


def test_a_call_bound_to_one_replica_never_fails_over():
    replicas = pool("http://a", "http://b")
    err = Unavailable("refused")
    target = replicas.all()[1]
    with pytest.raises(Unavailable), replicas.use(target):
        raise err
    assert not err.failover  # a weight push to b must be retried on b, not sent to a


def test_a_name_that_resolves_to_nothing_is_unavailable_and_retryable():
    replicas = Replicas.of("dns+http://no-such-host.invalid:80", "http", lambda a: a.url, "the reward service")
    assert replicas.urls() == []
    with pytest.raises(Unavailable, match="resolves to no address") as caught:
        replicas.pick()
    assert caught.value.retryable


def request(n: int) -> ScoreRequest:
    items = [ScoreItem(id=f"i{k}", prompt="p", response=str(k)) for k in range(n)]
    return ScoreRequest(reward="format", items=items)


def test_a_batch_is_split_in_contiguous_shards_and_merged_back_in_item_order():
    req = request(10)
    parts = shards(req, 3)
    assert [[i.id for i in p.items] for p in parts] == [
        ["i0", "i1", "i2", "i3"],
        ["i4", "i5", "i6"],
        ["i7", "i8", "i9"],
    ]
    replies = [
        ScoreResponse(reward="format", reward_id="sha256:x", results=[ItemResult(id=i.id, score=1.0) for i in p.items])
        for p in parts
    ]
    assert [r.id for r in merged(req, replies).results] == [i.id for i in req.items]
    replies[2] = replies[2].model_copy(update={"reward_id": "sha256:y"})
    with pytest.raises(ServerError, match="different rewards"):
        merged(req, replies)
