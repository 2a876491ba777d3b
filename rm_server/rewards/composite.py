"""Composite rewards: arithmetic over other rewards by name, behind optional gates.

    final: {type: composite, expr: "0.8*correct + 0.2*orm", gate: format}

The expression grammar is numbers, reward names, + - * /, unary minus, parentheses and
min(...)/max(...). It is parsed with `ast` and walked by hand; nothing is ever `eval`-ed.
Gates are scored first: an item whose gate scores below `gate_threshold` gets 0 (a real score:
the gate said no), and its parts are not computed. An item whose gate or part failed fails too,
with `dependency_failed` naming the part, never a made-up number.
"""

from __future__ import annotations

import ast
import asyncio
import operator
from collections.abc import Callable, Sequence

from assay.rm_server.protocol import ErrorType, Granularity
from assay.rm_server.rewards.base import Item, ItemFailure, Outcome, Reward, Scored
from assay.rm_server.spec import CompositeSpec

_BINARY: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_CALLS: dict[str, Callable[..., float]] = {"min": min, "max": max}


def _parse(expr: str) -> tuple[ast.expr, set[str]]:
    """The expression's tree and the reward names it uses; ValueError if it is not allowed."""
    try:
        tree = ast.parse(expr, mode="eval").body
    except SyntaxError as exc:
        raise ValueError(f"expression {expr!r} does not parse: {exc.msg}") from None
    names: set[str] = set()

    def check(node: ast.expr) -> None:
        match node:
            case ast.Constant(value=v) if isinstance(v, int | float) and not isinstance(v, bool):
                pass
            case ast.Name(id=name):
                names.add(name)
            case ast.UnaryOp(op=ast.USub() | ast.UAdd(), operand=x):
                check(x)
            case ast.BinOp(op=op, left=left, right=right) if type(op) in _BINARY:
                check(left)
                check(right)
            case ast.Call(func=ast.Name(id=f), args=args, keywords=[]) if f in _CALLS and args:
                for a in args:
                    check(a)
            case _:
                raise ValueError(
                    f"expression {expr!r} may only use numbers, reward names, + - * /, parentheses, min() and max()"
                )

    check(tree)
    return tree, names


def expression_names(expr: str) -> set[str]:
    """Reward names an expression uses; ValueError if the expression is not allowed."""
    return _parse(expr)[1]


def evaluate(tree: ast.expr, values: dict[str, float]) -> float:
    """Walk a parsed expression with reward values bound to names."""
    if isinstance(tree, ast.Constant) and isinstance(tree.value, int | float):  # the only constants _parse allows
        return float(tree.value)
    if isinstance(tree, ast.Name):
        return values[tree.id]
    if isinstance(tree, ast.UnaryOp):
        v = evaluate(tree.operand, values)
        return -v if isinstance(tree.op, ast.USub) else v
    if isinstance(tree, ast.BinOp):
        return _BINARY[type(tree.op)](evaluate(tree.left, values), evaluate(tree.right, values))
    assert isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name)
    return _CALLS[tree.func.id](*(evaluate(a, values) for a in tree.args))


class CompositeReward(Reward):
    type = "composite"

    def __init__(self, name: str, reward_id: str, spec: CompositeSpec, parts: dict[str, Reward]) -> None:
        super().__init__(name, reward_id)
        self.spec = spec
        self.tree, names = _parse(spec.expr)
        self.gates = [parts[g] for g in spec.gate]
        self.parts = {n: parts[n] for n in sorted(names)}
        self.needs_reference = any(r.needs_reference for r in [*self.gates, *self.parts.values()])
        self.pinned = all(r.pinned for r in [*self.gates, *self.parts.values()])  # its id has the parts' ids

    async def score(self, items: Sequence[Item], granularity: Granularity) -> list[Outcome]:
        results: dict[int, Outcome] = {}  # item index -> outcome, a gate's or the expression's
        gate_outcomes = await asyncio.gather(*(g.score(items, Granularity.outcome) for g in self.gates))
        for gate, outcomes in zip(self.gates, gate_outcomes, strict=True):
            for i, o in enumerate(outcomes):
                if i in results:
                    continue
                if isinstance(o, ItemFailure):
                    results[i] = _failed(gate.name, o)
                elif o.value < self.spec.gate_threshold:
                    results[i] = Scored(0.0)
        todo = [i for i in range(len(items)) if i not in results]
        if todo:
            sub = [items[i] for i in todo]
            part_outcomes = await asyncio.gather(*(p.score(sub, Granularity.outcome) for p in self.parts.values()))
            for k, i in enumerate(todo):
                values: dict[str, float] = {}
                for (name, _), outcomes in zip(self.parts.items(), part_outcomes, strict=True):
                    o = outcomes[k]
                    if isinstance(o, ItemFailure):
                        results[i] = _failed(name, o)
                        break
                    values[name] = o.value
                else:
                    try:
                        results[i] = Scored(evaluate(self.tree, values))
                    except (ZeroDivisionError, ValueError) as exc:
                        results[i] = ItemFailure(ErrorType.internal, f"reward {self.name!r}: {self.spec.expr}: {exc}")
        return [results[i] for i in range(len(items))]


def _failed(part: str, o: ItemFailure) -> ItemFailure:
    # A retryable failure of a part stays retryable for the whole; any other is the part's fault.
    retryable = (ErrorType.timeout, ErrorType.judge_unavailable, ErrorType.remote_unavailable)
    kind = o.type if o.type in retryable else ErrorType.dependency_failed
    return ItemFailure(kind, f"part {part!r} failed: {o.message}")
