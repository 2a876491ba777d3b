"""Inference-time search: one strategy per file, one signature, one dict to dispatch them.

    from assay.search import STRATEGIES, SearchConfig
    result = STRATEGIES["weighted_best_of_n"](prompt, generator, scorer, SearchConfig(n=16))
    result.answer, result.candidates, result.usage, result.reward_id

Every strategy is `run(prompt, generator, scorer, config, *, reference=None) -> SearchResult`;
the generator and scorer protocols are in `search.base`, in-process adapters in `search.local`,
adapters over the services in `search.remote`. This package imports no torch.
"""

from collections.abc import Callable

from assay.search import beam_search, best_of_n, dvts, majority, refine, weighted_best_of_n
from assay.search.base import (
    Budget,
    Candidate,
    Generation,
    Generator,
    GenParams,
    Score,
    Scorer,
    SearchConfig,
    SearchResult,
    Usage,
)
from assay.search.tracker import SearchError

Strategy = Callable[..., SearchResult]

STRATEGIES: dict[str, Strategy] = {
    "best_of_n": best_of_n.run,
    "weighted_best_of_n": weighted_best_of_n.run,
    "majority": majority.run,
    "refine": refine.run,
    "beam_search": beam_search.run,
    "dvts": dvts.run,
}

__all__ = [
    "STRATEGIES",
    "Budget",
    "Candidate",
    "GenParams",
    "Generation",
    "Generator",
    "Score",
    "Scorer",
    "SearchConfig",
    "SearchError",
    "SearchResult",
    "Strategy",
    "Usage",
]
