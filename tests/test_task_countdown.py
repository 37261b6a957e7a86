"""Countdown: generated problems are solvable and the verifier accepts exactly the valid answers."""

from __future__ import annotations

import json
import re
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pytest
from pydantic import ValidationError

from latentlab.errors import DataError
from latentlab.tasks import Example
from latentlab.tasks.countdown import CountdownConfig, CountdownTask, solve

STEP = re.compile(r"(\d+)([-+*/])(\d+)=(\d+)")


def task(**options: object) -> CountdownTask:
    return CountdownTask(CountdownConfig(**options))


def problem(numbers: list[int], target: int) -> Example:
    """An example to score against; the verifier only looks at the numbers and the target."""
    return Example(question="", steps=(), answer="", meta={"numbers": numbers, "target": target})


def expression_value(text: str, numbers: list[int]) -> Fraction:
    """Evaluate an expression of integers, + - * / and parentheses independently of the task:
    check its characters and literals, then let Python evaluate it over Fractions."""
    assert set(text) <= set("0123456789+-*/()"), text
    assert sorted(map(int, re.findall(r"\d+", text))) == sorted(numbers), text
    assert not re.search(r"(^|[-+*/(])-", text), f"unary minus in {text}"
    return eval(re.sub(r"\d+", lambda m: f"F({m.group()})", text), {"F": Fraction})


def replay_steps(steps: tuple[str, ...], numbers: list[int]) -> int:
    """Replay `a op b=c` steps with integer arithmetic; the one number left at the end."""
    pool = Counter(numbers)
    for step in steps:
        match = STEP.fullmatch(step)
        assert match, step
        a, op, b, c = int(match[1]), match[2], int(match[3]), int(match[4])
        if op == "/":
            assert b != 0, f"division by zero in {step}"
            exact = Fraction(a, b)
        else:
            exact = {"+": a + b, "-": a - b, "*": a * b}[op]
        assert exact == c and c >= 0, step  # default: non-negative integer intermediates
        used = Counter([a, b])
        assert all(pool[n] >= k for n, k in used.items()), f"{step} uses a number not available"
        pool.subtract(used)
        pool[c] += 1
    remaining = list(pool.elements())
    assert len(remaining) == 1, remaining
    return remaining[0]


@pytest.mark.parametrize("operands", [3, 4, 5])
def test_generated_examples_are_solved_by_their_reference(operands: int) -> None:
    t = task(operands=operands)
    examples = t.generate("train", 200, seed=1)
    assert len(examples) == 200
    for ex in examples:
        numbers, target = ex.meta["numbers"], ex.meta["target"]
        assert len(numbers) == operands and all(1 <= n <= 99 for n in numbers)
        assert 10 <= target <= 100
        assert ex.question == f"Numbers: {' '.join(map(str, numbers))}. Target: {target}."
        assert expression_value(ex.answer, numbers) == target
        assert replay_steps(ex.steps, numbers) == target
        assert len(ex.steps) == operands - 1
        assert t.score(ex.answer, ex)
        assert t.score("\n".join(ex.steps), ex)
        assert t.score(", ".join(ex.steps), ex)


def test_alternative_solutions_are_accepted() -> None:
    t = task()
    numbers, target = [1, 2, 3, 4], 10
    reference = solve(numbers, target)
    assert reference is not None
    ex = problem(numbers, target)
    alternatives = ["1+2+3+4", "4*3-2*1", "4*2+3-1", "(4*3-2*1)=10",
                    "4*3=12\n2*1=2\n12-2=10", "4 * 2 = 8; 8 + 3 = 11; 11 - 1 = 10"]
    for answer in alternatives:
        assert answer.replace(" ", "").replace(";", "\n").split("\n") != reference
        assert t.score(answer, ex), answer
    assert not t.score("4/2=2\n2*3=6\n6+1=7", ex)  # valid steps, but they reach 7
    # Rational intermediates are valid in an answer even though the generator avoids them.
    assert t.score("8/(3-8/3)", problem([3, 3, 8, 8], 24))
    assert t.score("8/3=(8/3)\n3-(8/3)=(1/3)\n8/(1/3)=24", problem([3, 3, 8, 8], 24))


def test_fraction_mode() -> None:
    assert solve([3, 3, 8, 8], 24) is None  # needs 8/3: not with integer intermediates
    steps = solve([3, 3, 8, 8], 24, allow_fractions=True)
    assert steps is not None and any("/3" in step for step in steps)
    assert task().score("\n".join(steps), problem([3, 3, 8, 8], 24))
    t = task(operands=3, allow_fractions=True)
    for ex in t.generate("train", 100, seed=0):
        assert expression_value(ex.answer, ex.meta["numbers"]) == ex.meta["target"]
        assert t.score("\n".join(ex.steps), ex)


@pytest.mark.parametrize("answer", [
    "25*4-5*4",                   # reuses 4
    "(25-5)*4*4",                 # reuses 4
    "25*4-20",                    # 20 is not given, 5 is unused
    "25*4",                       # omits 5
    "25+5*4",                     # wrong value (45)
    "(25+5)*4",                   # wrong value (120)
    "25-5=20\n20*4=81",           # wrong stated result
    "25-5=21\n21*4=84",           # wrong arithmetic
    "25-5=20\n20*5=100",          # 5 used twice
    "25-5=20",                    # does not finish
    "20*4=80\n25-5=20",           # consumes 20 before making it
    "(25-5)**4",                  # power
    "pow(25-5,1)*4",              # function call
    "abs(25-5)*4",                # function call
    "-(5-25)*4",                  # unary minus
    "(25-5)*4.0",                 # float literal
    "(25-5)//1*4",                # floor division
    "4*25//5*4",                  # floor division, reuse
    "4/(5-5)*25",                 # division by zero
    "5-5=0\n25/0=0\n0*4=80",      # division by zero in a step
    "__import__('os').getcwd()",  # code
    "", "   ", "80", "hello", "((", "25 5 4", "1+" * 500 + "1", "(25-5)*4=81",
])
def test_invalid_answers_are_rejected(answer: str) -> None:
    assert task().score(answer, problem([25, 5, 4], 80)) is False


def test_held_out_targets_are_disjoint_from_train() -> None:
    t = task(operands=3)
    train = {e.meta["target"] for e in t.generate("train", 400, seed=0)}
    held = {e.meta["target"] for s in ("valid", "test") for e in t.generate(s, 200, seed=3)}
    assert train.isdisjoint(held)
    assert len(held) >= 5 and len(train) >= 60  # both sides are really used
    # The held-out slice does not depend on the seed.
    assert held >= {e.meta["target"] for e in t.generate("valid", 50, seed=99)}


def test_generation_is_deterministic_per_seed() -> None:
    t = task()
    first = [e.to_json() for e in t.generate("train", 30, seed=5)]
    assert first == [e.to_json() for e in t.generate("train", 30, seed=5)]
    assert first != [e.to_json() for e in t.generate("train", 30, seed=6)]
    assert first != [e.to_json() for e in t.generate("valid", 30, seed=5)]


def test_write_read_round_trip(tmp_path: Path) -> None:
    t = task(operands=5)
    examples = t.generate("test", 50, seed=2)
    path = tmp_path / "countdown.jsonl"
    t.write(examples, path)
    back = t.read(path, "test")
    assert [e.to_json() for e in back] == [e.to_json() for e in examples]
    loaded = task(operands=5, test=str(path)).load("test")
    assert [e.meta for e in loaded] == [e.meta for e in examples]


def write_rows(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_unsolvable_row_raises(tmp_path: Path) -> None:
    good = {"question": "q", "steps": ["25-5=20", "20*4=80"], "answer": "(25-5)*4",
            "meta": {"numbers": [25, 5, 4], "target": 80}}
    bad = {"question": "q", "steps": [], "answer": "1+1+1",
           "meta": {"numbers": [1, 1, 1], "target": 100}}
    path = write_rows(tmp_path / "bad.jsonl", [good, bad])
    with pytest.raises(DataError, match=r"bad\.jsonl:2.*cannot make target 100"):
        task().read(path, "test")


@pytest.mark.parametrize(("row", "message"), [
    ({"question": "q", "steps": [], "answer": "(25-5)*4"}, r":1 has no field 'meta'"),
    ({"question": "q", "answer": "(25-5)*4", "meta": {"numbers": [25, 5, 4], "target": 80}},
     r":1 has no field 'steps'"),
    ({"question": "q", "steps": [], "answer": "(25-5)*4", "meta": {"numbers": [25, 5, 4]}},
     r":1 meta has no field 'target'"),
    ({"question": "q", "steps": [], "answer": "25+5+4", "meta": {"numbers": [25, 5, 4],
                                                                 "target": 80}},
     r":1: answer '25\+5\+4' does not make 80"),
])
def test_malformed_rows_raise(tmp_path: Path, row: dict[str, object], message: str) -> None:
    path = write_rows(tmp_path / "rows.jsonl", [row])
    with pytest.raises(DataError, match=message):
        task().read(path, "train")


def test_config_is_validated() -> None:
    with pytest.raises(ValidationError):
        CountdownConfig(min_operand=50, max_operand=10)
    with pytest.raises(ValidationError):
        CountdownConfig(min_target=100, max_target=10)
    with pytest.raises(ValidationError):
        CountdownConfig(operands=7)
    with pytest.raises(ValidationError):
        CountdownConfig(min_target=5, max_target=5, holdout_fraction=0.5)
    with pytest.raises(ValidationError):
        CountdownConfig(operand=4)  # a misspelt option is not silently ignored
