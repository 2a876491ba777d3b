"""clients: typed Python clients for rm_server and policy_server (issues 3 and 4).

RewardClient / AsyncRewardClient   the reward service, over HTTP (`.http(url)`) or gRPC
                                   (`.grpc(target)`), or any `RewardTransport`;
                                   `.as_reward_fn(name)` gives a TRL reward function
PolicyClient                       the policy service over HTTP: complete, search, update_weights,
                                   load_weights, models, weight_version
clients.errors                     typed failures: what happened, and whether a retry can help;
                                   the one table from HTTP statuses and gRPC codes to them
clients.retry                      deadlines and the one retry loop both clients run
clients.replicas                   several replicas behind one client: URL lists, service
                                   addresses (dns+http://NAME:PORT, dns:///NAME:PORT), least
                                   outstanding, failover at once

The light install (`pip install assay`) is enough for all of it: these modules import the
services' wire types (`protocol`, `grpc_convert`) and `assay.proto`, never torch, transformers
or fastapi (tests/clients/test_light.py checks).
"""

from assay.clients.errors import (
    CertificateRefused,
    Conflict,
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    PermissionDenied,
    RewardServiceError,
    ServerError,
    ServiceError,
    Unauthenticated,
    Unavailable,
    UnknownModel,
    UnknownReward,
)
from assay.clients.policy import PolicyClient
from assay.clients.retry import RetryPolicy
from assay.clients.reward import AsyncRewardClient, RewardClient
from assay.clients.reward_transport import AsyncRewardTransport, RewardTransport

__all__ = [
    "AsyncRewardClient",
    "AsyncRewardTransport",
    "CertificateRefused",
    "Conflict",
    "DeadlineExceeded",
    "InvalidRequest",
    "Overloaded",
    "PermissionDenied",
    "PolicyClient",
    "RetryPolicy",
    "RewardClient",
    "RewardServiceError",
    "RewardTransport",
    "ServerError",
    "ServiceError",
    "Unauthenticated",
    "Unavailable",
    "UnknownModel",
    "UnknownReward",
]
