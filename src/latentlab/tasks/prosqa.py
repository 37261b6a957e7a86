"""ProsQA (Coconut): is Tom a X or a Y, given "Every A is a B." facts forming a random DAG?

Files use Coconut's JSON format, a list of objects with the fields `question`, `answer`, `steps`,
`idx_to_symbol`, `edges`, `root`, `target`, `neg_target`; the graph fields go to `Example.meta`.
The generator follows Coconut's recipe (appendix of Hao et al., 2024): persons are the roots of
a random DAG over made-up concepts; exactly one of the two candidates is reachable from the
person asked about; the CoT is the shortest path to it, one sentence per edge. Its default knobs
are matched to the statistics of Coconut's `prosqa_valid.json`.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from latentlab.errors import ConfigError, DataError, require_file
from latentlab.tasks.base import (
    Example,
    Split,
    Task,
    TaskConfig,
    atomic_text_file,
    example_from_row,
    read_jsonl,
    require,
)

GRAPH_FIELDS = ("idx_to_symbol", "edges", "root", "target", "neg_target")
COCONUT_FIELDS = ("question", "answer", "steps", *GRAPH_FIELDS)

# Concept names: onset + vowel + coda + "pus". The grammar covers every name in Coconut's files
# (shumpus, impus, quimpus, scrompus, boompus, ...) and about 1,200 more, so a model trained on
# generated data has to read the names rather than memorise them.
ONSETS = ("", "b", "bl", "br", "ch", "d", "dr", "f", "fl", "g", "gl", "gr", "gw", "h", "j", "k",
          "kl", "l", "m", "n", "p", "pl", "qu", "r", "s", "scr", "sh", "sk", "sl", "sn",
          "sp", "st", "str", "t", "th", "tr", "v", "w", "y", "z", "zh")
VOWELS = ("a", "e", "i", "o", "u", "oo")
CODAS = ("l", "m", "n", "r", "s")
CONCEPTS = tuple(onset + vowel + coda + "pus" for onset in ONSETS for vowel in VOWELS
                 for coda in CODAS)
# Person names: those in Coconut's files and as many others, short and common.
PERSONS = ("Alex", "Bob", "Carol", "Davis", "Eva", "Fae", "Gabriel", "Jack", "Max", "Oliver",
           "Polly", "Rex", "Sally", "Sam", "Stella", "Tom", "Wren", "Amy", "Ben", "Chloe", "Dan",
           "Ella", "Finn", "Grace", "Hugo", "Ivy", "Jane", "Kate", "Leo", "Lily", "Mia", "Nina",
           "Omar", "Paul", "Quinn", "Rose", "Ruth", "Theo", "Uma", "Vera", "Will", "Zoe", "Anna",
           "Emma", "Lucy", "Mark", "Nick", "Owen", "Peter", "Ray")

# The names of Coconut's own files (all 38 concepts and 17 persons of its ProsQA data): a model
# trained on graphs named from these reads the official files in distribution.
COCONUT_CONCEPTS = (
    "bompus", "boompus", "brimpus", "chorpus", "dumpus", "felpus", "fompus", "gerpus", "gorpus",
    "grimpus", "gwompus", "hilpus", "impus", "jelpus", "jompus", "kerpus", "lempus", "lorpus",
    "numpus", "quimpus", "rempus", "rompus", "rorpus", "scrompus", "shumpus", "sterpus",
    "storpus", "terpus", "timpus", "tumpus", "vumpus", "worpus", "wumpus", "yerpus", "yimpus",
    "yumpus", "zhorpus", "zumpus")
COCONUT_PERSONS = ("Alex", "Bob", "Carol", "Davis", "Eva", "Fae", "Gabriel", "Jack", "Max",
                   "Oliver", "Polly", "Rex", "Sally", "Sam", "Stella", "Tom", "Wren")
NAME_SETS = {"coconut": (COCONUT_CONCEPTS, COCONUT_PERSONS), "grammar": (CONCEPTS, PERSONS)}

_MAX_DRAWS = 1_000  # graphs per example before the configuration is declared infeasible


class ProsQAConfig(TaskConfig):
    """ProsQA, read from Coconut's files or generated (the train split is not published)."""

    name: Literal["prosqa"] = "prosqa"
    names: Literal["coconut", "grammar"] = Field(
        "coconut", description="names of generated graphs: 'coconut', the 38 concepts and 17 "
        "persons of Coconut's files (the official files are in distribution); 'grammar', "
        "about 1,200 concepts from a syllable grammar (covering Coconut's) and 50 persons, so "
        "that a model must copy names from the question rather than know them (harder)")
    min_concepts: int = Field(15, ge=3, description="fewest concept nodes in a graph")
    max_concepts: int = Field(25, ge=3, description="most concept nodes in a graph")
    extra_person_prob: float = Field(
        0.025, ge=0.0, lt=1.0,
        description="chance that a new node is one more person (a root) rather than a concept; "
                    "every graph has at least two persons")
    max_persons: int = Field(6, ge=2, description="most persons in a graph")
    parent_weights: tuple[float, ...] = Field(
        (0.46, 0.33, 0.15, 0.04, 0.02), min_length=1,
        description="relative chance that a concept has 1, 2, ... parents (incoming edges)")
    recency: float = Field(
        0.35, ge=0.0,
        description="parents are drawn with weight (index + 1) ** recency: higher values favour "
                    "recent nodes and so longer paths")
    reachable_prob: float = Field(
        0.6, gt=0.0, lt=1.0,
        description="chance that a new concept descends from the person asked about")
    min_hops: int = Field(3, ge=1, description="shortest path from the person to the target")
    max_hops: int = Field(6, ge=1, description="longest path from the person to the target")

    @model_validator(mode="after")
    def _check_ranges(self) -> ProsQAConfig:
        if self.min_concepts > self.max_concepts:
            raise ValueError(f"min_concepts ({self.min_concepts}) is above max_concepts "
                             f"({self.max_concepts})")
        if self.min_hops > self.max_hops:
            raise ValueError(f"min_hops ({self.min_hops}) is above max_hops ({self.max_hops})")
        if any(w < 0 for w in self.parent_weights) or sum(self.parent_weights) <= 0:
            raise ValueError("parent_weights must be non-negative with a positive sum")
        concepts, persons = NAME_SETS[self.names]
        if self.max_concepts > len(concepts):
            raise ValueError(f"max_concepts is above the {len(concepts)} concept names of "
                             f"names={self.names!r}")
        if self.max_persons > len(persons):
            raise ValueError(f"max_persons is above the {len(persons)} person names of "
                             f"names={self.names!r}")
        return self


# ----------------------------------------------------------------------------------- sentences


def _is_person(name: str) -> bool:
    return name[:1].isupper()


def edge_sentence(parent: str, child: str) -> str:
    return f"{parent} is a {child}." if _is_person(parent) else f"Every {parent} is a {child}."


def _normalise(sentence: str) -> str:
    """Whitespace collapsed, first letter lower-cased, trailing period dropped."""
    text = " ".join(sentence.split()).rstrip(".").rstrip()
    return text[:1].lower() + text[1:]


def _from_coconut(row: dict[str, Any], where: str) -> Example:
    """An Example from a Coconut row, the graph fields going to `meta`; checked."""
    require(row, COCONUT_FIELDS, where)
    _check_graph(row, where)
    return example_from_row({**row, "meta": {key: row[key] for key in GRAPH_FIELDS}}, where)


def _check_graph(meta: dict[str, Any], where: str) -> None:
    """Raise a DataError unless the graph fields are well-formed and consistent."""
    require(meta, GRAPH_FIELDS, where)
    names = meta["idx_to_symbol"]
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"{where}: field 'idx_to_symbol' is not a list of names",
                        fix="write 'idx_to_symbol' as a JSON list of strings")
    count = len(names)

    def is_index(value: Any) -> bool:
        return type(value) is int and 0 <= value < count

    edges = meta["edges"]
    if not isinstance(edges, list) or not all(
            isinstance(e, list) and len(e) == 2 and all(map(is_index, e)) for e in edges):
        raise DataError(f"{where}: field 'edges' is not a list of [parent, child] indices into "
                        f"idx_to_symbol ({count} names)", fix="repair or delete that row")
    for key in ("root", "target", "neg_target"):
        if not is_index(meta[key]):
            raise DataError(f"{where}: field {key!r} is not an index into idx_to_symbol "
                            f"({count} names)", fix="repair or delete that row")


# ----------------------------------------------------------------------------------- generator


def _graph(rng: random.Random, cfg: ProsQAConfig) -> dict[str, Any] | None:
    """One random graph with a target and a neg_target, as Coconut's fields; None on a dud.

    Nodes are added in topological order. Each concept either descends from the root (its first
    parent is such a node; further parents may be any node) or not (all its parents are
    non-descendants), so reachability is known by construction and exactly one candidate is
    reachable.
    """
    root = rng.randrange(2)  # nodes 0 and 1 are persons, one of them is asked about
    parents: list[list[int]] = [[], []]
    reachable = [root == 0, root == 1]
    persons, concepts = 2, rng.randint(cfg.min_concepts, cfg.max_concepts)
    counts = range(1, len(cfg.parent_weights) + 1)
    while len(parents) - persons < concepts:
        node = len(parents)
        if persons < cfg.max_persons and rng.random() < cfg.extra_person_prob:
            parents.append([])
            reachable.append(False)
            persons += 1
            continue
        side = rng.random() < cfg.reachable_prob
        pool = [j for j in range(node) if reachable[j] == side]
        first = _weighted_sample(rng, pool, 1, cfg.recency)
        others = [j for j in (range(node) if side else pool) if j != first[0]]
        wanted = rng.choices(counts, cfg.parent_weights)[0] - 1
        parents.append(first + _weighted_sample(rng, others, wanted, cfg.recency))
        reachable.append(side)

    children: list[list[int]] = [[] for _ in parents]
    for child, ps in enumerate(parents):
        for parent in ps:
            children[parent].append(child)
    distance, previous = _bfs(root, children)
    leaves = [n for n in range(len(parents)) if parents[n] and not children[n]]
    hits = [n for n in leaves if cfg.min_hops <= distance.get(n, -1) <= cfg.max_hops]
    misses = [n for n in leaves if not reachable[n]]
    if not hits or not misses:
        return None
    deepest = max(distance[n] for n in hits)  # as in Coconut's files: mostly the farthest leaf
    target = rng.choice([n for n in hits if distance[n] == deepest])
    path = [target]
    while path[-1] != root:
        path.append(previous[path[-1]])
    path.reverse()
    return {"parents": parents, "root": root, "target": target,
            "neg_target": rng.choice(misses), "path": path, "persons": persons}


def _weighted_sample(rng: random.Random, pool: Sequence[int], k: int, recency: float
                     ) -> list[int]:
    """Up to k distinct nodes of the pool, drawn with weight (index + 1) ** recency."""
    pool, chosen = list(pool), []
    for _ in range(min(k, len(pool))):
        pick = rng.choices(range(len(pool)), [(n + 1) ** recency for n in pool])[0]
        chosen.append(pool.pop(pick))
    return chosen


def _bfs(root: int, children: Sequence[Sequence[int]]) -> tuple[dict[int, int], dict[int, int]]:
    """Distances from the root and each reached node's predecessor on a shortest path."""
    distance, previous, queue = {root: 0}, {}, [root]
    for node in queue:
        for child in children[node]:
            if child not in distance:
                distance[child], previous[child] = distance[node] + 1, node
                queue.append(child)
    return distance, previous


def _coconut_row(rng: random.Random, graph: dict[str, Any], names: str) -> dict[str, Any]:
    """Name a graph's nodes from a name set (`NAME_SETS`) and write it out as Coconut's
    fields."""
    parents, root = graph["parents"], graph["root"]
    concepts, persons = NAME_SETS[names]
    people = iter(rng.sample(persons, graph["persons"]))
    words = iter(rng.sample(concepts, len(parents) - graph["persons"]))
    names = [next(words) if ps else next(people) for ps in parents]
    edges = [[p, child] for child, ps in enumerate(parents) for p in ps]
    sentences = [edge_sentence(names[p], names[c]) for p, c in edges]
    rng.shuffle(sentences)
    target, negative = names[graph["target"]], names[graph["neg_target"]]
    first, second = (target, negative) if rng.random() < 0.5 else (negative, target)
    path = graph["path"]
    return {
        "question": " ".join(sentences) + f" Is {names[root]} a {first} or {second}?",
        "answer": f"{names[root]} is a {target}.",
        "steps": [edge_sentence(names[a], names[b]) for a, b in pairwise(path)],
        "idx_to_symbol": names, "edges": edges, "root": root,
        "target": graph["target"], "neg_target": graph["neg_target"],
    }


# ------------------------------------------------------------------------------------ the task


class ProsQATask(Task):
    """ProsQA: Coconut's files or generated graphs; scored on the answer sentence or concept."""

    name = "prosqa"
    config_class = ProsQAConfig
    config: ProsQAConfig

    def generate_one(self, rng: random.Random, split: Split) -> Example:
        for _draw in range(_MAX_DRAWS):
            graph = _graph(rng, self.config)
            if graph is not None:
                row = _coconut_row(rng, graph, self.config.names)
                return _from_coconut(row, f"generated {split} row")
        raise ConfigError(
            f"no ProsQA graph with a target {self.config.min_hops}..{self.config.max_hops} "
            f"hops away in {_MAX_DRAWS} draws",
            fix="widen min_hops..max_hops, add concepts or raise task.recency")

    def read(self, path: Path, split: Split) -> list[Example]:
        """Coconut's JSON list, or JSON lines of `Example.to_json` with the graph in `meta`."""
        require_file(path, "data file", "check the path in the config", DataError)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not UTF-8 text (byte {exc.start})",
                            fix="re-encode the file as UTF-8") from None
        if not text.lstrip().startswith("["):
            examples = []
            for lineno, row in read_jsonl(path):
                example = example_from_row(row, f"{path}:{lineno}")
                _check_graph(example.meta, f"{path}:{lineno} meta")
                examples.append(example)
            return examples
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno} is not valid JSON ({exc.msg})",
                            fix="repair the file (Coconut's format is one JSON list)") from None
        examples = []
        for index, row in enumerate(rows):
            where = f"{path} item {index}"
            if not isinstance(row, dict):
                raise DataError(f"{where} is not a JSON object",
                                fix="each item of the list must be one object")
            examples.append(_from_coconut(row, where))
        return examples

    def write(self, examples: Iterable[Example], path: Path) -> None:
        """Coconut's format: one JSON list, graph fields at the top level of each object."""
        rows = [{"question": e.question, "answer": e.answer, "steps": list(e.steps),
                 **{key: e.meta[key] for key in GRAPH_FIELDS}} for e in examples]
        with atomic_text_file(path) as handle:
            handle.write(json.dumps(rows, ensure_ascii=False))

    def step_metrics(self, steps: list[str], example: Example,
                     skipped: int = 0) -> dict[str, float]:
        """`step_edges`: the share of generated steps that are edges of the question's graph;
        `path_valid`: 1 if the steps are edges forming a path from the person asked about
        (a chain that may end anywhere, so a wrong answer can still walk a real path). When
        latents stand for the first `skipped` steps (Coconut at stage k), the written path may
        start at any concept `skipped` edges from the person: the one the latents reached is
        not known."""
        if not steps:
            return {}
        meta = example.meta
        names = meta["idx_to_symbol"]
        edges = {_normalise(edge_sentence(names[p], names[c])): (p, c) for p, c in meta["edges"]}
        walked = [edges.get(_normalise(step)) for step in steps]
        starts = {meta["root"]}
        for _ in range(skipped):
            starts = {c for p, c in meta["edges"] if p in starts}
        connected = walked[0] is not None and walked[0][0] in starts
        for before, edge in pairwise(walked):
            connected = connected and before is not None and edge is not None \
                and edge[0] == before[1]
        return {"step_edges": sum(e is not None for e in walked) / len(walked),
                "path_valid": float(connected)}

    def score(self, prediction: str, example: Example) -> bool:
        if _normalise(prediction) == _normalise(example.answer):
            return True
        names = example.meta["idx_to_symbol"]
        target, negative = names[example.meta["target"]], names[example.meta["neg_target"]]
        named = {name for name in (target, negative)
                 if re.search(rf"\b{re.escape(name)}\b", prediction, re.IGNORECASE)}
        return named == {target}
