"""TLS on both listeners, with Assay's own clients: HTTPS and gRPC over TLS, and what is refused.

A throwaway CA (trustme) signs a certificate for 127.0.0.1 and localhost; the reward server
(rules only, in-process) serves HTTP and gRPC with it (`--tls-cert`, `--tls-key`). Promised
(README, "Operating the services"): `RewardClient.http("https://...", ca_cert=...)`, `AsyncRewardClient` and
`RewardClient.grpc(target, ca_cert=...)` score over TLS; plain HTTP or a plaintext gRPC channel to
the TLS ports gets no answer; a certificate from another CA is refused (`CertificateRefused` over
HTTP and gRPC, at once, no retries); the connection bounds hold over TLS (a connection that sends no
request after its handshake is closed within the header timeout, a slow body gets 408, a
connection past the cap gets the typed 503); a
certificate and key that are not a pair, or half of one, are refused at start in one sentence.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import sys
import time

import httpx
import openai
import pytest
import trustme

from assay.base.connections import Connections
from assay.checkpoints import EMBEDDED
from assay.clients import AsyncRewardClient, CertificateRefused, PolicyClient, RewardClient, ServiceError
from assay.policy_server.config import ServerConfig as PolicyConfig
from assay.policy_server.server import BackgroundServer as PolicyServer
from assay.rm_server.config import ServerConfig
from assay.rm_server.server import BackgroundServer

pytestmark = [pytest.mark.reliability, pytest.mark.service]

RULES = 'rewards:\n  format: {type: rule.regex, pattern: "#### -?\\\\d+$"}\n'
ITEM = {"id": "a", "prompt": "Q: 1+1 A: ", "response": "1+1=2 #### 2"}
HEADER_S = 1.0
LIMITS = Connections(header_timeout_s=HEADER_S, body_timeout_s=2.0)


@pytest.fixture(scope="module")
def ca():
    return trustme.CA()


@pytest.fixture(scope="module")
def pki(tmp_path_factory, ca):
    """The files: the CA's certificate, the server's certificate chain and key, a spec."""
    d = tmp_path_factory.mktemp("tls")
    ca.cert_pem.write_to_path(d / "ca.pem")
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(d / "key.pem")
    cert.cert_chain_pems[0].write_to_path(d / "cert.pem")
    (d / "rules.yaml").write_text(RULES)
    return d


@pytest.fixture(scope="module")
def server(pki):
    config = ServerConfig(
        spec=pki / "rules.yaml",
        port=0,
        grpc_port=0,
        tls_cert=pki / "cert.pem",
        tls_key=pki / "key.pem",
        connections=LIMITS,
    )
    with BackgroundServer(config) as s:
        yield s


def test_https_and_grpc_over_tls_score_with_the_ca_trusted(server, pki):
    assert server.http_url.startswith("https://127.0.0.1:")
    with RewardClient.http(server.http_url, ca_cert=pki / "ca.pem") as rm:
        assert rm.score("format", [ITEM]).results[0].score == 1.0
        assert rm.ready()
    with RewardClient.grpc(server.grpc_target, ca_cert=pki / "ca.pem") as rm:
        assert rm.score("format", [ITEM]).results[0].score == 1.0
        assert rm.ready()

    async def both() -> list[float | None]:
        http = AsyncRewardClient.http(server.http_url, ca_cert=pki / "ca.pem")
        grpc = AsyncRewardClient.grpc(server.grpc_target, ca_cert=pki / "ca.pem")
        try:
            replies = [await http.score("format", [ITEM]), await grpc.score("format", [ITEM])]
        finally:
            await http.close()
            await grpc.close()
        return [r.results[0].score for r in replies]

    assert asyncio.run(both()) == [1.0, 1.0]


def test_plain_http_and_plaintext_grpc_to_the_tls_ports_get_no_answer(server, pki):
    plain = server.http_url.replace("https://", "http://")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{plain}/health", timeout=10)
    with RewardClient.grpc(server.grpc_target, timeout_s=2) as rm, pytest.raises(ServiceError) as err:
        rm.score("format", [ITEM])
    assert err.value.status in ("UNAVAILABLE", "DEADLINE_EXCEEDED", None)


def test_a_certificate_from_another_ca_is_refused(server, tmp_path):
    trustme.CA().cert_pem.write_to_path(tmp_path / "other.pem")
    start = time.monotonic()
    with RewardClient.http(server.http_url, ca_cert=tmp_path / "other.pem", timeout_s=60) as rm:
        with pytest.raises(CertificateRefused, match="did not verify"):
            rm.score("format", [ITEM])
        assert not rm.health()
    assert time.monotonic() - start < 30  # refused at once, not retried until the 60 s deadline
    with (
        RewardClient.grpc(server.grpc_target, ca_cert=tmp_path / "other.pem", timeout_s=60) as rm,
        pytest.raises(CertificateRefused, match="CERTIFICATE_VERIFY_FAILED"),
    ):
        rm.score("format", [ITEM])
    assert time.monotonic() - start < 45  # over gRPC as well


def _tls_connect(server, pki) -> ssl.SSLSocket:
    host, port = server.http_url.removeprefix("https://").rsplit(":", 1)
    context = ssl.create_default_context(cafile=pki / "ca.pem")
    return context.wrap_socket(socket.create_connection((host, int(port)), timeout=30), server_hostname=host)


def test_the_header_and_body_timeouts_hold_over_tls(server, pki):
    with _tls_connect(server, pki) as idle:  # handshake done, then nothing
        idle.settimeout(HEADER_S * 10)
        assert idle.recv(1024) == b""  # closed by the server within the header timeout
    with _tls_connect(server, pki) as slow:
        body = b'{"reward": "format", "items": []}'
        slow.sendall(
            b"POST /v1/score HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % (len(body) + 10) + body
        )
        slow.settimeout(30)
        assert slow.recv(65536).startswith(b"HTTP/1.1 408")


def test_the_connection_cap_holds_over_tls(pki):
    """Counted once a connection's handshake is done: past the cap the next one gets the typed 503."""
    config = ServerConfig(
        spec=pki / "rules.yaml",
        port=0,
        grpc_port=None,
        tls_cert=pki / "cert.pem",
        tls_key=pki / "key.pem",
        connections=Connections(max_connections=2),
    )
    with BackgroundServer(config) as capped, _tls_connect(capped, pki), _tls_connect(capped, pki):
        with _tls_connect(capped, pki) as third:
            answer = b""
            while chunk := third.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in answer.lower(), answer


@pytest.mark.parametrize(
    ("files", "refusal"),
    [
        (("cert.pem", None), "both --tls-cert and --tls-key"),
        (("cert.pem", "missing.pem"), "no such file"),
        (("cert.pem", "ca.pem"), "do not load as a PEM certificate and its private key"),
    ],
)
def test_a_certificate_and_key_that_are_not_a_pair_are_refused_at_start(pki, files, refusal):
    cert, key = files
    argv = [sys.executable, "-m", "assay.rm_server", "--spec", str(pki / "rules.yaml"), "--port", "0"]
    argv += ["--grpc-port", "none", "--tls-cert", str(pki / cert)]
    if key is not None:
        argv += ["--tls-key", str(pki / key)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert refusal in done.stderr and done.stderr.count("\n") <= 2, done.stderr


def test_the_policy_server_over_tls_searches_with_a_reward_service_trusted_through_ssl_cert_file(
    server, pki, monkeypatch
):
    """Both services over TLS: `--rm-url https://...` trusts the CA in SSL_CERT_FILE (httpx's way), so
    /ready reports the reward service ok and a search is scored over HTTPS; PolicyClient and the
    official openai client reach the policy server over HTTPS."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pki / "ca.pem"))
    config = PolicyConfig(
        port=0,
        models={"policy": EMBEDDED["policy"][1]},
        rm_url=server.http_url,
        tls_cert=pki / "cert.pem",
        tls_key=pki / "key.pem",
    )
    with PolicyServer(config) as policy:
        assert policy.http_url.startswith("https://")
        assert httpx.get(
            f"{policy.http_url}/ready", verify=ssl.create_default_context(cafile=pki / "ca.pem")
        ).json() == {
            "status": "ok",
            "dependencies": {"rm": "ok"},
        }
        monkeypatch.delenv("SSL_CERT_FILE")  # the client below trusts the CA by its own option
        with PolicyClient(policy.http_url, ca_cert=pki / "ca.pem") as client:
            found = client.search("Q: 1+1 A: ", strategy="best_of_n", n=2, reward="format", max_tokens=12)
        assert len(found.candidates) == 2
        # the official client, unchanged, given the CA the way httpx takes it
        trusted = httpx.Client(verify=ssl.create_default_context(cafile=pki / "ca.pem"))
        sdk = openai.OpenAI(base_url=f"{policy.http_url}/v1", api_key="unused", http_client=trusted, max_retries=0)
        assert sdk.completions.create(model="policy", prompt="Q: 1+1 A: ", max_tokens=4).choices[0].text
        trusted.close()
