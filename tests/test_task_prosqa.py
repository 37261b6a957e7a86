"""ProsQA: Coconut's file loads and scores; generated graphs have exactly one reachable answer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from latentlab.errors import DataError
from latentlab.tasks import Example
from latentlab.tasks.base import write_jsonl
from latentlab.tasks.prosqa import (
    COCONUT_CONCEPTS,
    COCONUT_PERSONS,
    CONCEPTS,
    PERSONS,
    ProsQAConfig,
    ProsQATask,
)

COCONUT_KEYS = ["question", "answer", "steps", "idx_to_symbol", "edges", "root", "target",
                "neg_target"]


def task(**options: object) -> ProsQATask:
    return ProsQATask(ProsQAConfig(**options))


def reachable(edges: list[list[int]], start: int) -> set[int]:
    """Nodes reachable from start (including it), by a plain BFS over the edge list."""
    seen, frontier = {start}, [start]
    while frontier:
        frontier = [b for a, b in edges if a in frontier and b not in seen]
        seen.update(frontier)
    return seen


def sentence(names: list[str], parent: int, child: int) -> str:
    subject = names[parent] if names[parent][0].isupper() else f"Every {names[parent]}"
    return f"{subject} is a {names[child]}."


@pytest.fixture
def valid(shared_data: Path) -> list[Example]:
    return task().read(shared_data / "prosqa" / "prosqa_valid.json", "valid")


def test_coconut_valid_loads_and_gold_scores_100(valid: list[Example]) -> None:
    t = task()
    assert len(valid) == 300
    assert all(t.score(e.answer, e) for e in valid)
    for e in valid:
        names = e.meta["idx_to_symbol"]
        person, good, bad = (names[e.meta[k]] for k in ("root", "target", "neg_target"))
        assert e.answer == f"{person} is a {good}."
        assert not t.score(f"{person} is a {bad}.", e)
        assert t.score(good, e) and t.score(f"{person.lower()} is a {good}", e)
        assert t.score(f"  {person}   is a {good.capitalize()} ", e)
        assert not t.score(f"{person} is a {good} or {bad}.", e)  # names both candidates
        assert not t.score(f"{person} is a {good}pus.", e)  # not a whole-word match
        assert not t.score("", e)


def test_generated_graphs() -> None:
    examples = task().generate("train", 300, seed=0)
    for e in examples:
        names, edges = e.meta["idx_to_symbol"], e.meta["edges"]
        root, target, negative = e.meta["root"], e.meta["target"], e.meta["neg_target"]
        seen = reachable(edges, root)
        assert target in seen and negative not in seen
        assert names[root][0].isupper() and not names[target][0].isupper()
        # The steps walk edges from the person to the target.
        walk = [root]
        for step in e.steps:
            child = next(c for p, c in edges if p == walk[-1] and step == sentence(names, p, c))
            walk.append(child)
        assert walk[-1] == target and 3 <= len(e.steps) <= 6
        # Every edge is stated in the question, and nothing else but the final question.
        facts = [sentence(names, p, c) for p, c in edges]
        body, question = e.question.rsplit(". ", 1)
        assert sorted(s + "." for s in body.split(". ")) == sorted(facts)
        match = re.fullmatch(r"Is (\w+) a (\w+) or (\w+)\?", question)
        assert match and match[1] == names[root]
        assert {match[2], match[3]} == {names[target], names[negative]}
        assert e.answer == f"{names[root]} is a {names[target]}."
        assert len(set(names)) == len(names)
    # Which candidate comes first is random.
    firsts = {e.question.split(" or ")[-1].rstrip("?") == e.meta["idx_to_symbol"][e.meta["target"]]
              for e in examples}
    assert firsts == {True, False}


def test_grammar_names_vary_beyond_coconut(valid: list[Example]) -> None:
    coconut = {n for e in valid for n in e.meta["idx_to_symbol"]}
    assert coconut <= set(CONCEPTS) | set(PERSONS)  # the grammar can make all of them
    generated = {n for e in task(names="grammar").generate("train", 100, seed=1)
                 for n in e.meta["idx_to_symbol"]}
    new = generated - coconut
    assert len(new) > 300
    assert all(re.fullmatch(r"[a-z]+pus", n) for n in new if n[0].islower())


def test_coconut_names_are_those_of_coconut_files(valid: list[Example]) -> None:
    official = {n for e in valid for n in e.meta["idx_to_symbol"]}
    assert official == set(COCONUT_CONCEPTS) | set(COCONUT_PERSONS)
    generated = {n for e in task().generate("train", 300, seed=1)
                 for n in e.meta["idx_to_symbol"]}
    assert generated == official  # 300 graphs use every name of the set, and no other


def test_a_name_set_too_small_for_the_graphs_is_refused() -> None:
    with pytest.raises(ValueError, match="max_concepts is above the 38 concept names"):
        ProsQAConfig(max_concepts=39, min_concepts=15)
    ProsQAConfig(names="grammar", max_concepts=39)
    with pytest.raises(ValueError, match="max_persons is above the 17 person names"):
        ProsQAConfig(max_persons=18)


def test_step_metrics_on_hand_made_chains() -> None:
    # Tom -> wumpus -> yumpus -> zumpus; Tom -> rompus; Bob -> impus.
    names = ["Tom", "Bob", "wumpus", "yumpus", "zumpus", "rompus", "impus"]
    meta = {"idx_to_symbol": names, "edges": [[0, 2], [2, 3], [3, 4], [0, 5], [1, 6]],
            "root": 0, "target": 4, "neg_target": 6}
    example = Example("...", ("Tom is a wumpus.", "Every wumpus is a yumpus.",
                              "Every yumpus is a zumpus."), "Tom is a zumpus.", meta)
    metrics = task().step_metrics
    assert metrics(list(example.steps), example) == {"step_edges": 1.0, "path_valid": 1.0}
    # Real edges, but not a path from Tom: the second does not continue the first.
    assert metrics(["Tom is a rompus.", "Every yumpus is a zumpus."], example) == {
        "step_edges": 1.0, "path_valid": 0.0}
    # One invented edge of three (case and spacing are forgiven, as in scoring).
    assert metrics(["tom is a wumpus", "Every wumpus is a  zumpus.", "Every wumpus is a yumpus."],
                   example) == {"step_edges": pytest.approx(2 / 3), "path_valid": 0.0}
    assert metrics(["Bob is a impus."], example) == {"step_edges": 1.0, "path_valid": 0.0}
    assert metrics([], example) == {}
    # With the first step in latents, the written chain starts one edge from Tom: at wumpus
    # or rompus, not at Tom, and still has to be connected.
    assert metrics(list(example.steps[1:]), example, skipped=1)["path_valid"] == 1.0
    assert metrics(list(example.steps[2:]), example, skipped=2)["path_valid"] == 1.0
    assert metrics(list(example.steps[1:]), example)["path_valid"] == 0.0
    assert metrics(list(example.steps), example, skipped=1)["path_valid"] == 0.0
    assert metrics(["Every yumpus is a zumpus."], example, skipped=1)["path_valid"] == 0.0
    assert metrics(["Every wumpus is a yumpus.", "Every wumpus is a yumpus."], example,
                   skipped=1)["path_valid"] == 0.0


def test_statistics_are_close_to_coconut(valid: list[Example]) -> None:
    def mean(values: list[int]) -> float:
        return sum(values) / len(values)

    generated = task().generate("valid", 300, seed=0)
    for measure, tolerance in [(lambda e: len(e.meta["edges"]), 4.0),
                               (lambda e: len(e.meta["idx_to_symbol"]), 2.0),
                               (lambda e: len(e.steps), 0.5)]:
        assert abs(mean([measure(e) for e in generated])
                   - mean([measure(e) for e in valid])) < tolerance


def test_generation_is_deterministic_per_seed() -> None:
    t = task()
    first = [e.to_json() for e in t.generate("test", 20, seed=3)]
    assert first == [e.to_json() for e in t.generate("test", 20, seed=3)]
    assert first != [e.to_json() for e in t.generate("test", 20, seed=4)]


def test_write_read_round_trip(tmp_path: Path) -> None:
    t = task()
    examples = t.generate("train", 40, seed=2)
    path = tmp_path / "prosqa.json"
    t.write(examples, path)
    rows = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(rows, list) and len(rows) == 40
    assert all(list(row) == COCONUT_KEYS for row in rows)
    back = t.read(path, "train")
    assert [e.to_json() for e in back] == [e.to_json() for e in examples]
    # JSON lines of Example.to_json are read too.
    lines = tmp_path / "prosqa.jsonl"
    write_jsonl((e.to_json() for e in examples), lines)
    assert [e.to_json() for e in t.read(lines, "train")] == [e.to_json() for e in examples]


def test_coconut_file_round_trip(valid: list[Example], shared_data: Path,
                                 tmp_path: Path) -> None:
    path = tmp_path / "valid.json"
    task().write(valid, path)
    original = json.loads((shared_data / "prosqa" / "prosqa_valid.json").read_text("utf-8"))
    assert json.loads(path.read_text(encoding="utf-8")) == original


@pytest.mark.parametrize(("rows", "message"), [
    ('[{"question": "q", "answer": "a", "steps": []}]', r"item 0 has no field 'idx_to_symbol'"),
    ('[{"question": "q", "answer": "a", "steps": [], "idx_to_symbol": ["Tom", "wumpus"], '
     '"edges": [[0, 2]], "root": 0, "target": 1, "neg_target": 1}]', r"item 0: field 'edges'"),
    ('[{"question": "q", "answer": "a", "steps": "Tom is a wumpus.", "idx_to_symbol": '
     '["Tom", "wumpus"], "edges": [[0, 1]], "root": 0, "target": 1, "neg_target": 1}]',
     r"item 0: field 'steps'"),
    ('[{"question": "q",', r"is not valid JSON"),
    ('{"question": "q", "answer": "a", "steps": []}\n', r":1 meta has no field 'idx_to_symbol'"),
])
def test_malformed_files_raise(tmp_path: Path, rows: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(rows, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        task().read(path, "valid")
