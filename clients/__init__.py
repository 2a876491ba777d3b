"""clients: typed Python clients for rm_server and policy_server (issues 3 and 4).

RewardClient / AsyncRewardClient   the reward service, over HTTP (`.http(url)`) or gRPC
                                   (`.grpc(target)`); `.as_reward_fn(name)` gives a TRL reward function
PolicyClient                       the policy service over HTTP: complete, search, update_weights,
                                   load_weights, models, weight_version
clients.errors                     typed failures: what happened, and whether a retry can help
"""

from assay.clients.errors import (
    Conflict,
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    PermissionDenied,
    RewardServiceError,
    ServerError,
    Unauthenticated,
    Unavailable,
    UnknownModel,
    UnknownReward,
)
from assay.clients.policy import PolicyClient
from assay.clients.reward import AsyncRewardClient, RetryPolicy, RewardClient

__all__ = [
    "Conflict",
    "PolicyClient",
    "UnknownModel",
    "AsyncRewardClient",
    "DeadlineExceeded",
    "InvalidRequest",
    "Overloaded",
    "PermissionDenied",
    "RetryPolicy",
    "RewardClient",
    "RewardServiceError",
    "ServerError",
    "Unauthenticated",
    "Unavailable",
    "UnknownReward",
]
