"""Fictional multi-passage QA, generated offline (no model can know the answers).

Each item is LongBench-style: {"id", "question", "answers", "passages": [{"title",
"text"}], "hops"}. Single-hop questions ask one fact of one entity; two-hop questions
chain two passages (the founder of X's home town). Distractor passages describe other
entities in the same style. `kvflow bench dataset` writes a JSONL file.
"""
from __future__ import annotations

import argparse
import json
import random
import sys

_SYL = ["ka", "lo", "mi", "ra", "ven", "tor", "el", "qua", "dri", "sol", "nym", "bar",
        "zel", "fen", "oth", "ul", "pra", "gis", "mor", "tal"]
_FIRST = ["Ada", "Bram", "Cora", "Dov", "Esme", "Finn", "Greta", "Hale", "Ines", "Jory",
          "Kira", "Lorn", "Mira", "Nils", "Orla", "Pell", "Quin", "Rhea", "Soren", "Tova"]
_ITEMS = ["copper", "salt", "amber", "wool", "glass", "tea", "silk", "cedar", "pearls", "iron"]
_FILLER = [
    "Travelers describe its markets as crowded from dawn until late evening.",
    "The winters there are long, and the summers are short but bright.",
    "Local festivals celebrate the harvest with music and long processions.",
    "Its old quarter is known for narrow streets and painted doors.",
    "Historians still debate the origin of its name.",
    "A small museum keeps maps drawn by early surveyors of the region.",
]


def _name(rng: random.Random, parts: int = 2) -> str:
    return "".join(rng.choice(_SYL) for _ in range(parts)).capitalize()


def _city(rng, used):
    while True:
        name = _name(rng, rng.choice([2, 3]))
        if name not in used:
            used.add(name)
            return name


def _passage(rng, title, facts, words):
    sentences = list(facts)
    while sum(len(s.split()) for s in sentences) < words:
        sentences.append(rng.choice(_FILLER))
    return {"title": title, "text": " ".join(sentences)}


def make_item(rng: random.Random, idx: int, num_passages: int, passage_words: int,
              two_hop: bool) -> dict:
    used: set[str] = set()
    cities = [_city(rng, used) for _ in range(num_passages)]
    people = rng.sample(_FIRST, k=min(num_passages, len(_FIRST)))
    passages = []
    for i, city in enumerate(cities):
        facts = [f"{city} is a city whose main export is {rng.choice(_ITEMS)}.",
                 f"{city} was founded by {people[i % len(people)]} {_name(rng)} in "
                 f"{rng.randint(1200, 1900)}."]
        passages.append(_passage(rng, city, facts, passage_words))
    target = rng.randrange(num_passages)
    city = cities[target]
    if two_hop and num_passages >= 2:
        person = f"{_FIRST[rng.randrange(len(_FIRST))]} {_name(rng)}"
        home = _city(rng, used)
        bridge = rng.choice([j for j in range(num_passages) if j != target])
        passages[bridge] = _passage(
            rng, person, [f"{person} was born in {home}.", f"{person} later founded {city}."],
            passage_words)
        passages[target]["text"] = passages[target]["text"].replace(
            passages[target]["text"].split(".")[1] + ".", "", 1).strip()
        question, answer = f"In which city was the founder of {city} born?", home
    else:
        export = passages[target]["text"].split("main export is ")[1].split(".")[0]
        question, answer = f"What is the main export of {city}?", export
    return {"id": f"fictional-{idx}", "question": question, "answers": [answer],
            "passages": passages, "hops": 2 if two_hop else 1}


def generate(n: int, num_passages: int = 4, passage_words: int = 60, two_hop_share: float = 0.3,
             seed: int = 0) -> list[dict]:
    if n < 0 or num_passages < 1 or passage_words < 1:
        raise ValueError("n >= 0, num_passages >= 1 and passage_words >= 1 are required")
    rng = random.Random(seed)
    return [make_item(rng, i, num_passages, passage_words, rng.random() < two_hop_share)
            for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvflow bench dataset", description=__doc__)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--passages", type=int, default=4)
    p.add_argument("--passage-words", type=int, default=60)
    p.add_argument("--two-hop-share", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="-", help="JSONL file, or - for stdout")
    a = p.parse_args(argv)
    items = generate(a.n, a.passages, a.passage_words, a.two_hop_share, a.seed)
    out = sys.stdout if a.out == "-" else open(a.out, "w")
    with out if a.out != "-" else open(1, "w", closefd=False) as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    return 0
