"""Countdown: combine the given numbers with `+ - * /` to reach a target (stream-of-search style).

A generated example looks like::

    question  Numbers: 25 5 4. Target: 80.
    steps     25-5=20 | 20*4=80          (one operation per step, larger operand first)
    answer    (25-5)*4                   (one infix expression using every number once)

The verifier accepts any valid solution, as an expression or as a step list, not just the
reference.
"""

from __future__ import annotations

import ast
import functools
import operator
import random
import re
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from itertools import combinations
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from latentlab.errors import ConfigError, DataError
from latentlab.tasks.base import (
    Example,
    Split,
    Task,
    TaskConfig,
    example_from_row,
    read_jsonl,
    require,
)

Number = int | Fraction
# One operation of a solution: left operand, operator, right operand, result.
Move = tuple[Number, str, Number, Number]

# The operators a prediction may use, by their `ast` node.
_OPS: dict[type[ast.operator], Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
}
# Binding strength of an expression's top operator (atoms bind tightest), for minimal parentheses.
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3
# Characters a prediction may contain at all; this also rules out literals that `ast` would
# otherwise accept (`1_000`, `0x10`, `1e3`, non-ASCII digits).
_ALLOWED_TEXT = re.compile(r"[0-9+\-*/()=,;\s]*")
_MAX_PREDICTION_CHARS = 500  # far above any real answer; bounds the work spent on garbage
_STEP_SEPARATORS = re.compile(r"[\n,;]")
_MAX_DRAWS = 10_000  # number draws per example before the configuration is declared infeasible
_HOLDOUT_SEED = "countdown-holdout"  # fixed, so every run holds out the same targets


class CountdownConfig(TaskConfig):
    """Countdown problems, generated on the fly (or read from files written by `write`)."""

    name: Literal["countdown"] = "countdown"
    operands: int = Field(4, ge=2, le=6, description="how many numbers each problem gives")
    min_operand: int = Field(1, ge=1, description="smallest number drawn")
    max_operand: int = Field(99, ge=1, description="largest number drawn")
    min_target: int = Field(10, ge=1, description="smallest target")
    max_target: int = Field(100, ge=1, description="largest target")
    holdout_fraction: float = Field(
        0.1, ge=0.0, lt=1.0,
        description="share of the targets used only by valid and test (0: all splits share all "
                    "targets)")
    allow_fractions: bool = Field(
        False, description="let generated solutions use negative or fractional intermediates; "
                           "by default every intermediate is a non-negative integer")

    @model_validator(mode="after")
    def _check_ranges(self) -> CountdownConfig:
        if self.min_operand > self.max_operand:
            raise ValueError(f"min_operand ({self.min_operand}) is above max_operand "
                             f"({self.max_operand})")
        if self.min_target > self.max_target:
            raise ValueError(f"min_target ({self.min_target}) is above max_target "
                             f"({self.max_target})")
        held, kept = split_targets(self)
        if held and not kept:
            raise ValueError(f"holdout_fraction {self.holdout_fraction} leaves no target for "
                             "train; lower it or widen min_target..max_target")
        return self


def split_targets(config: CountdownConfig) -> tuple[list[int], list[int]]:
    """(held-out targets for valid/test, targets for train); independent of the run's seed."""
    targets = list(range(config.min_target, config.max_target + 1))
    count = round(len(targets) * config.holdout_fraction)
    if config.holdout_fraction > 0:
        count = max(count, 1)  # a positive fraction of a short range still holds one out
    held = set(random.Random(_HOLDOUT_SEED).sample(targets, min(count, len(targets))))
    return sorted(held), [t for t in targets if t not in held]


# ---------------------------------------------------------------------------------- the solver


def _quotient(a: Number, b: Number) -> Number:
    """a / b exactly, as an int when whole: int arithmetic is far faster than Fraction's."""
    quotient = Fraction(a, b)
    return quotient.numerator if quotient.denominator == 1 else quotient


def _moves(a: Number, b: Number, free: bool) -> Iterator[Move]:
    """Every way to combine a and b; with `free` False only non-negative integer results."""
    hi, lo = (a, b) if a >= b else (b, a)
    yield hi, "+", lo, hi + lo
    yield hi, "*", lo, hi * lo
    yield hi, "-", lo, hi - lo
    if free:
        yield lo, "-", hi, lo - hi
        if lo:
            yield hi, "/", lo, _quotient(hi, lo)
        if hi:
            yield lo, "/", hi, _quotient(lo, hi)
    elif lo and hi % lo == 0:
        yield hi, "/", lo, hi // lo


def _last_move(a: Number, b: Number, target: int, free: bool) -> Move | None:
    """The operation turning a and b into the target, if any: the search's innermost level,
    done with plain arithmetic because nearly all the search's time is spent here."""
    if free and (type(a) is Fraction) != (type(b) is Fraction):
        return _last_move_mixed(a, b, target)
    hi, lo = (a, b) if a >= b else (b, a)
    if hi + lo == target:
        return hi, "+", lo, target
    if hi * lo == target:
        return hi, "*", lo, target
    if hi - lo == target:
        return hi, "-", lo, target
    if lo and hi == target * lo:
        return hi, "/", lo, target
    if free and lo - hi == target:
        return lo, "-", hi, target
    if free and hi and lo == target * hi:
        return lo, "/", hi, target
    return None


def _last_move_mixed(a: Number, b: Number, target: int) -> Move | None:
    """`_last_move` for a non-integer fraction and an integer, in integer arithmetic (Fractions
    are slow): their sum or difference is never an integer, nor is fraction / integer."""
    fraction, whole = (a, b) if type(a) is Fraction else (b, a)
    top, bottom = fraction.numerator, fraction.denominator
    if top * whole == target * bottom:
        return fraction, "*", whole, target
    if whole * bottom == target * top:
        return whole, "/", fraction, target
    return None


def _children(state: tuple[Number, ...], free: bool
              ) -> Iterator[tuple[tuple[Number, ...], Move]]:
    """Every move on two numbers of a sorted state, with the numbers it leaves; a pair of
    values is tried once (equal numbers give the same moves)."""
    tried: set[tuple[Number, Number]] = set()
    for i, j in combinations(range(len(state)), 2):
        if (state[i], state[j]) in tried:
            continue
        tried.add((state[i], state[j]))
        rest = state[:i] + state[i + 1:j] + state[j + 1:]
        for move in _moves(state[i], state[j], free):
            yield rest, move


def _search(numbers: Sequence[int], target: int, free: bool) -> list[Move] | None:
    """Depth-first search over pairwise combinations; the first solution found, else None.

    States are sorted tuples, so states reached in different orders share one entry of the
    dead-end memo; the search stops at the first solution.
    """
    dead: set[tuple[Number, ...]] = set()

    def visit(state: tuple[Number, ...]) -> list[Move] | None:  # at least three numbers
        if state in dead:
            return None
        for rest, move in _children(state, free):
            if len(rest) == 1:  # two numbers left: no state to build, just compare
                last = _last_move(move[3], rest[0], target, free)
                found = None if last is None else [last]
            else:
                found = visit(tuple(sorted((*rest, move[3]))))
            if found is not None:
                return [move, *found]
        if len(state) > 3:  # three-number states almost never recur: not worth remembering
            dead.add(state)
        return None

    if len(numbers) == 1:
        return [] if numbers[0] == target else None
    if len(numbers) == 2:
        move = _last_move(*numbers, target, free)
        return None if move is None else [move]
    return visit(tuple(sorted(numbers)))


def _number_text(value: Number) -> str:
    """An operand as a step writes it; negatives and fractions in parentheses so they parse."""
    value = Fraction(value)
    text = str(value.numerator) if value.denominator == 1 else str(value)
    return f"({text})" if value < 0 or value.denominator != 1 else text


def _step_text(move: Move) -> str:
    left, op, right, result = move
    return f"{_number_text(left)}{op}{_number_text(right)}={_number_text(result)}"


def all_solutions(numbers: Sequence[int], target: int, *, allow_fractions: bool = False
                        ) -> list[tuple[str, ...]]:
    """Every distinct step list (`a op b=c`, one operation per step, every number used once)
    that reaches `target`, under the generator's rules (without `allow_fractions`: only
    non-negative integer intermediates). Orders of independent steps are distinct paths (their
    text differs); step lists repeated through equal numbers are listed once."""
    found: set[tuple[str, ...]] = set()

    def visit(pool: tuple[Number, ...], done: tuple[Move, ...]) -> None:
        if len(pool) == 1:
            if pool[0] == target:
                found.add(tuple(_step_text(m) for m in done))
            return
        for rest, move in _children(pool, allow_fractions):
            visit(tuple(sorted((*rest, move[3]))), (*done, move))

    visit(tuple(sorted(Fraction(n) if allow_fractions else n for n in numbers)), ())
    return sorted(found)


def solve(numbers: Sequence[int], target: int, *, allow_fractions: bool = False
          ) -> list[str] | None:
    """Steps (`a op b=c`) that reach `target` using every number once, or None if none exist.

    Without `allow_fractions` every intermediate is a non-negative integer (the generator's
    default); with it, any rational intermediate is allowed (what the verifier accepts).
    """
    moves = _search(numbers, target, allow_fractions)
    return None if moves is None else [_step_text(m) for m in moves]


def _expression(numbers: Sequence[int], moves: Sequence[Move]) -> str:
    """Replay a solution into one infix expression with minimal parentheses."""
    pool: list[tuple[Number, str, int]] = [(n, str(n), _ATOM) for n in numbers]

    def take(value: Number) -> tuple[str, int]:
        index = next(i for i, item in enumerate(pool) if item[0] == value)
        _, text, precedence = pool.pop(index)
        return text, precedence

    for left, op, right, result in moves:
        (ltext, lprec), (rtext, rprec) = take(left), take(right)
        prec = _PRECEDENCE[op]
        # The left operand needs parentheses if it binds more loosely; the right one also if it
        # binds equally and the operator is not associative (a-(b-c), a/(b*c)).
        if lprec < prec:
            ltext = f"({ltext})"
        if rprec < prec or (rprec == prec and op in "-/"):
            rtext = f"({rtext})"
        pool.append((result, f"{ltext}{op}{rtext}", prec))
    return pool[0][1]


# -------------------------------------------------------------------------------- the verifier


class _Reject(Exception):
    """A prediction that is not a valid solution."""


def _int_literal(node: ast.expr) -> int | None:
    """An integer written as `7` or `-7`."""
    negative = isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
    if negative:
        node = node.operand
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return -node.value if negative else node.value
    return None


def _literal(node: ast.expr) -> Fraction:
    """A number as a step may write it: `7`, `-7`, or a reduced fraction `7/2`, `-7/2`."""
    value = _int_literal(node)
    if value is not None:
        return Fraction(value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        top, bottom = _int_literal(node.left), _int_literal(node.right)
        if top is not None and bottom is not None and bottom > 1:
            value = Fraction(top, bottom)
            if value.denominator == bottom:  # reduced: `6/2` is an operation, not a literal
                return value
    raise _Reject


def _parse(text: str) -> ast.expr:
    try:
        return ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise _Reject from None


def _evaluate(node: ast.expr, leaves: list[int]) -> Fraction:
    """The exact value of an expression of integer literals and `+ - * /`; collects the literals."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        leaves.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _evaluate(node.left, leaves), _evaluate(node.right, leaves)
        if isinstance(node.op, ast.Div) and right == 0:
            raise _Reject
        return _OPS[type(node.op)](left, right)
    raise _Reject  # unary minus, calls, names, floats, powers, ...


def _check_expression(text: str, numbers: Sequence[int], target: int) -> None:
    """An infix expression using each number once and equal to the target, optionally `= target`."""
    expression, equals, claimed = text.partition("=")
    leaves: list[int] = []
    value = _evaluate(_parse(expression), leaves)
    if sorted(leaves) != sorted(numbers) or value != target:
        raise _Reject
    if equals and _literal(_parse(claimed)) != value:
        raise _Reject


def _check_steps(items: Sequence[str], numbers: Sequence[int], target: int) -> None:
    """Steps `a op b=c`, each consuming two available numbers, that end at the target alone."""
    pool = [Fraction(n) for n in numbers]
    for item in items:
        left, equals, right = item.partition("=")
        node = _parse(left)
        if not equals or not isinstance(node, ast.BinOp) or type(node.op) not in _OPS:
            raise _Reject
        a, b, stated = _literal(node.left), _literal(node.right), _literal(_parse(right))
        if isinstance(node.op, ast.Div) and b == 0:
            raise _Reject
        if _OPS[type(node.op)](a, b) != stated:
            raise _Reject
        for operand in (a, b):
            if operand not in pool:
                raise _Reject
            pool.remove(operand)
        pool.append(stated)
    if pool != [target]:
        raise _Reject


def verify(prediction: str, numbers: Sequence[int], target: int) -> bool:
    """Whether a prediction (an expression or a step list) is any valid solution."""
    text = prediction.strip().rstrip(".").strip()
    if not text or len(text) > _MAX_PREDICTION_CHARS or not _ALLOWED_TEXT.fullmatch(text):
        return False
    items = [item.strip() for item in _STEP_SEPARATORS.split(text) if item.strip()]
    try:
        if len(items) == 1 and "=" not in items[0]:
            _check_expression(items[0], numbers, target)
            return True
        try:
            _check_steps(items, numbers, target)
        except _Reject:
            if len(items) != 1:
                raise
            _check_expression(items[0], numbers, target)  # `(25-5)*4=80`
        return True
    except _Reject:
        return False


# ------------------------------------------------------------------------------------ the task


def _example(numbers: Sequence[int], target: int, moves: Sequence[Move]) -> Example:
    """The example of a solved problem: question, the solution's steps and expression."""
    return Example(
        question=f"Numbers: {' '.join(map(str, numbers))}. Target: {target}.",
        steps=tuple(_step_text(m) for m in moves),
        answer=_expression(numbers, moves),
        meta={"numbers": list(numbers), "target": target},
    )


class CountdownTask(Task):
    """Generated Countdown problems, scored by a verifier that accepts any valid solution."""

    name = "countdown"
    config_class = CountdownConfig
    config: CountdownConfig

    def generate_one(self, rng: random.Random, split: Split) -> Example:
        cfg = self.config
        held, kept = self._targets
        target = rng.choice(kept if split == "train" else held or kept)
        # Keep the target and redraw the numbers, so targets stay uniform over the split's set.
        for _draw in range(_MAX_DRAWS):
            numbers = [rng.randint(cfg.min_operand, cfg.max_operand) for _ in range(cfg.operands)]
            moves = _search(numbers, target, cfg.allow_fractions)
            if moves is not None:
                return _example(numbers, target, moves)
        raise ConfigError(
            f"no solvable countdown problem for target {target} in {_MAX_DRAWS} draws of "
            f"{cfg.operands} numbers from {cfg.min_operand}..{cfg.max_operand}",
            fix="widen the operand range, add operands or narrow the target range")

    @functools.cached_property
    def _targets(self) -> tuple[list[int], list[int]]:
        return split_targets(self.config)

    def read(self, path: Path, split: Split) -> list[Example]:
        examples = []
        for lineno, row in read_jsonl(path):
            where = f"{path}:{lineno}"
            example = example_from_row(row, where)
            require(row, ("meta",), where)
            require(example.meta, ("numbers", "target"), f"{where} meta")
            numbers, target = example.meta["numbers"], example.meta["target"]
            if (not isinstance(numbers, list) or len(numbers) < 2
                    or not all(type(x) is int for x in numbers) or type(target) is not int):
                raise DataError(f"{where}: meta needs 'numbers' (a list of at least two integers) "
                                "and 'target' (an integer)", fix="repair or delete that row")
            if not verify(example.answer, numbers, target):
                if solve(numbers, target, allow_fractions=True) is None:
                    raise DataError(f"{where}: numbers {numbers} cannot make target {target}",
                                    fix="delete that row; every problem must have a solution")
                raise DataError(f"{where}: answer {example.answer!r} does not make {target} "
                                f"from {numbers}",
                                fix="repair that row's answer or regenerate the file")
            examples.append(example)
        return examples

    def score(self, prediction: str, example: Example) -> bool:
        return verify(prediction, example.meta["numbers"], example.meta["target"])

    def solutions(self, example: Example) -> list[tuple[str, ...]]:
        return all_solutions(example.meta["numbers"], example.meta["target"],
                             allow_fractions=self.config.allow_fractions)
