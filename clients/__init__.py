"""clients: typed Python clients for rm_server and policy_server (issues 3 and 4).

RewardClient / AsyncRewardClient   the reward service, over HTTP (`.http(url)`) or gRPC
                                   (`.grpc(target)`); `.as_reward_fn(name)` gives a TRL reward function
clients.errors                     typed failures: what happened, and whether a retry can help
"""

from clients.errors import (
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    PermissionDenied,
    RewardServiceError,
    ServerError,
    Unauthenticated,
    Unavailable,
    UnknownReward,
)
from clients.reward import AsyncRewardClient, RetryPolicy, RewardClient

__all__ = [
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
