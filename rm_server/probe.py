"""Bias probe: how much do non-content features move each reward?

Each held-out problem contributes its correct worked solution and a wrong one (the final answer
off by one). Every response is then perturbed in ways that leave its content alone: padding,
an emoji, bold, exclamation marks, a list layout, a link, an affirmative opener. All versions are
scored through the same serving layer the service uses, and the probe reports, per reward and
perturbation, the mean change in score and that change in units of the reward's spread over
the unperturbed responses (so rewards on different scales compare). A reward that ignores
presentation shows zeros; a reward model that learnt a length or style bias shows it here.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Callable
from dataclasses import dataclass

from assay.arith.world import ANSWER_MARK, eval_problems
from assay.rm_server.protocol import Granularity, ScoreItem, ScoreRequest
from assay.rm_server.serving import RewardService


def _as_list(response: str) -> str:
    mark = response.find(ANSWER_MARK)
    steps = response[:mark].split() if mark >= 0 else response.split()
    tail = response[mark:] if mark >= 0 else ""
    return "\n".join(f"- {s}" for s in steps) + (f"\n{tail}" if tail else "")


def _bold_answer(response: str) -> str:
    mark = response.find(ANSWER_MARK)
    return response if mark < 0 else f"{response[:mark]}**{response[mark:]}**"


PERTURBATIONS: dict[str, Callable[[str], str]] = {
    "length padding": lambda r: r + " " + "Let me double-check each step carefully. " * 3,
    "emoji": lambda r: r + " \N{PARTY POPPER}\N{SPARKLES}",
    "bold": _bold_answer,
    "exclamation": lambda r: r + "!!!",
    "list": _as_list,
    "link": lambda r: r + " (see https://example.com/arithmetic)",
    "affirmative opener": lambda r: "Sure! Great question. " + r,
}


@dataclass(frozen=True)
class ProbeCell:
    mean_delta: float  # mean(perturbed - original) over items both scored
    effect: float | None  # mean_delta / std of the original scores (None when they do not vary)
    scored: int  # item pairs that both got a score
    failed: int  # items where the original or the perturbed version failed


def probe_items(problems: int) -> list[tuple[str, str, str]]:
    """(prompt, response, reference): a right and a wrong solution per held-out problem."""
    out = []
    for p in eval_problems(problems):
        out.append((p.prompt, p.solution, str(p.answer)))
        mark = p.solution.rfind(ANSWER_MARK)
        out.append((p.prompt, f"{p.solution[:mark]}{ANSWER_MARK} {p.answer + 1}", str(p.answer)))
    return out


async def _scores(service: RewardService, reward: str, rows: list[tuple[str, str, str]]) -> list[float | None]:
    items = [ScoreItem(id=str(k), prompt=p, response=r, reference=ref) for k, (p, r, ref) in enumerate(rows)]
    resp = await service.score(ScoreRequest(reward=reward, items=items, granularity=Granularity.outcome))
    return [x.score for x in resp.results]


def probe_size(rewards: int, problems: int) -> int:
    """Responses the probe scores: a right and a wrong one per problem, as they are and perturbed, per reward."""
    return rewards * 2 * problems * (1 + len(PERTURBATIONS))


async def run_probe(
    service: RewardService, rewards: list[str], problems: int = 64, progress: Callable[[int], None] | None = None
) -> dict[str, dict[str, ProbeCell]]:
    """{reward: {perturbation: cell}} for rewards scored on an already started service; `progress(n)`
    hears of each `n` responses scored (`probe_size` in all)."""
    base_rows = probe_items(problems)
    advance = progress or (lambda n: None)
    table: dict[str, dict[str, ProbeCell]] = {}
    for reward in rewards:
        base = await _scores(service, reward, base_rows)
        advance(len(base_rows))
        ok = [b for b in base if b is not None]
        spread = statistics.pstdev(ok) if len(ok) > 1 else 0.0
        table[reward] = {}
        for name, perturb in PERTURBATIONS.items():
            moved = await _scores(service, reward, [(p, perturb(r), ref) for p, r, ref in base_rows])
            advance(len(base_rows))
            deltas = [m - b for b, m in zip(base, moved, strict=True) if b is not None and m is not None]
            mean = statistics.fmean(deltas) if deltas else float("nan")
            table[reward][name] = ProbeCell(
                mean_delta=mean,
                effect=mean / spread if spread > 0 else None,
                scored=len(deltas),
                failed=len(base) - len(deltas),
            )
    return table


def probe_spec(
    spec_path,
    rewards: list[str] | None,
    problems: int,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, dict[str, ProbeCell]], dict[str, str]]:
    """Build and start the spec's rewards in-process, probe them, and return (table, reward ids);
    `progress(n, total)` hears of each `n` of the `total` responses scored."""
    from assay.rm_server.rewards import build_rewards
    from assay.rm_server.spec import load_spec

    spec = load_spec(spec_path)
    built = build_rewards(spec)
    names = rewards or [n for n, r in built.items() if not r.pairwise]
    unknown = [n for n in names if n not in built]
    if unknown:
        raise ValueError(f"unknown reward(s) {', '.join(unknown)}; the spec has {', '.join(built)}")

    async def go():
        service = RewardService({n: built[n] for n in built})
        await service.start()
        try:
            total = probe_size(len(names), problems)
            return await run_probe(service, names, problems, progress and (lambda n: progress(n, total)))
        finally:
            await service.close()

    return asyncio.run(go()), {n: built[n].reward_id for n in names}
