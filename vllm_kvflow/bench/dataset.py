"""Fictional multi-passage QA, generated offline (no model can know the answers).

Each item is LongBench-style: {"id", "question", "answers", "passages": [{"title",
"text"}], "hops"}. Single-hop questions ask one fact of one entity; two-hop questions
chain two passages. Distractor passages describe other entities in the same style.
`kvflow bench dataset` writes a JSONL file.

Two template families (`--style`), so that a finding on one can be checked on text of
another shape:
- `cities` (the default; benchmarks/fictional_qa_300.jsonl): prose about cities, their
  main export and founder; two-hop: the founder's home town.
- `specs` (benchmarks/specs_qa_300.jsonl): product specification sheets, one
  "Field: value" line per fact, and company profiles; single-hop: one field of one
  product; two-hop: where the maker of a product is headquartered.
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


def load_items(path: str, limit: int | None = None) -> list[dict]:
    """A QA set's first `limit` items (all with None), each checked for the keys the
    benchmarks read; raises ValueError naming the line otherwise, or on an empty set."""
    items = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            item = json.loads(line)
            missing = {"question", "answers", "passages"} - set(item)
            if missing:
                raise ValueError(f"{path}:{line_no}: missing keys {sorted(missing)}")
            items.append(item)
            if limit and len(items) >= limit:
                break
    if not items:
        raise ValueError(f"{path}: no items")
    return items


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


_PRODUCTS = ["drill", "kettle", "lantern", "loom", "pump", "scanner", "telescope", "radio",
             "sewing machine", "bicycle", "compass", "heater"]
_COLOURS = ["slate grey", "ochre", "teal", "crimson", "ivory", "olive", "cobalt blue", "amber"]
_MATERIALS = ["brass", "walnut", "aluminium", "cast iron", "bamboo", "ceramic", "steel", "oak"]
_SUFFIX = ["Works", "Instruments", "Foundry", "Labs", "Manufacturing", "Tools"]
_SPEC_NOTES = [
    "Spare parts are sold separately through licensed dealers.",
    "The unit ships with a printed manual in four languages.",
    "Early batches had a slightly different handle design.",
    "Cleaning with water is not recommended by the maker.",
    "Reviewers praised its quiet operation and sturdy build.",
    "A carrying case is included with every unit.",
]
_COMPANY_NOTES = [
    "The firm employs a few hundred people across two workshops.",
    "Its catalogue has grown steadily since the first decade.",
    "Apprentices there train for three years before joining a team.",
    "The company publishes a yearly report on its suppliers.",
]
# Single-hop questions: (field, question template).
_SPEC_FIELDS = [
    ("Colour", "What colour is the {p}?"),
    ("Housing material", "What is the housing of the {p} made of?"),
    ("First released", "In which year was the {p} first released?"),
    ("Designer", "Who designed the {p}?"),
    ("Warranty", "How long is the warranty of the {p}?"),
]


def _spec_sheet(rng: random.Random, product: str, maker: str, words: int) -> tuple[dict, dict]:
    facts = {
        "Manufacturer": maker,
        "Colour": rng.choice(_COLOURS),
        "Housing material": rng.choice(_MATERIALS),
        "First released": str(rng.randint(1950, 2020)),
        "Designer": f"{rng.choice(_FIRST)} {_name(rng)}",
        "Warranty": f"{rng.randint(2, 9)} years",
    }
    lines = [f"{k}: {v}" for k, v in facts.items()]
    notes = _fill(rng, _SPEC_NOTES, words - sum(len(x.split()) for x in lines))
    text = "Specification sheet.\n" + "\n".join(lines) + "\nNotes: " + " ".join(notes)
    return {"title": product, "text": text}, facts


def _company(rng: random.Random, name: str, city: str, words: int) -> dict:
    sentences = [f"{name} is an engineering company headquartered in {city}.",
                 f"It was founded in {rng.randint(1850, 1990)} by {rng.choice(_FIRST)} {_name(rng)}."]
    sentences += _fill(rng, _COMPANY_NOTES, words - sum(len(x.split()) for x in sentences))
    return {"title": name, "text": " ".join(sentences)}


def _fill(rng: random.Random, pool: list[str], words: int) -> list[str]:
    """Sentences of the pool in random order, none twice while others are left, until
    they hold at least `words` words."""
    out: list[str] = []
    order: list[str] = []
    while sum(len(x.split()) for x in out) < words:
        if not order:
            order = rng.sample(pool, len(pool))
        out.append(order.pop())
    return out


def make_spec_item(rng: random.Random, idx: int, num_passages: int, passage_words: int,
                   two_hop: bool) -> dict:
    used: set[str] = set()
    kinds = rng.sample(_PRODUCTS, k=min(num_passages, len(_PRODUCTS)))
    products = [f"{_city(rng, used)} {kinds[i % len(kinds)]}" for i in range(num_passages)]
    makers = [f"{_city(rng, used)} {rng.choice(_SUFFIX)}" for _ in range(num_passages)]
    sheets = [_spec_sheet(rng, p, m, passage_words) for p, m in zip(products, makers)]
    passages = [sheet for sheet, _ in sheets]
    target = rng.randrange(num_passages)
    product = products[target]
    if two_hop and num_passages >= 2:
        city = _city(rng, used)
        bridge = rng.choice([j for j in range(num_passages) if j != target])
        passages[bridge] = _company(rng, makers[target], city, passage_words)
        question = f"In which city is the maker of the {product} headquartered?"
        answer = city
    else:
        field, template = rng.choice(_SPEC_FIELDS)
        question, answer = template.format(p=product), sheets[target][1][field]
    return {"id": f"specs-{idx}", "question": question, "answers": [answer],
            "passages": passages, "hops": 2 if two_hop else 1}


# Template families: one item maker each (see the module docstring).
STYLES = {"cities": make_item, "specs": make_spec_item}


def generate(n: int, num_passages: int = 4, passage_words: int = 60, two_hop_share: float = 0.3,
             seed: int = 0, style: str = "cities") -> list[dict]:
    if n < 0 or num_passages < 1 or passage_words < 1:
        raise ValueError("n >= 0, num_passages >= 1 and passage_words >= 1 are required")
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; known: {sorted(STYLES)}")
    rng = random.Random(seed)
    make = STYLES[style]
    return [make(rng, i, num_passages, passage_words, rng.random() < two_hop_share)
            for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvflow bench dataset", description=__doc__)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--passages", type=int, default=4)
    p.add_argument("--passage-words", type=int, default=60)
    p.add_argument("--two-hop-share", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--style", choices=sorted(STYLES), default="cities",
                   help="template family: prose about cities, or product specification sheets")
    p.add_argument("--out", default="-", help="JSONL file, or - for stdout")
    a = p.parse_args(argv)
    items = generate(a.n, a.passages, a.passage_words, a.two_hop_share, a.seed, a.style)
    out = sys.stdout if a.out == "-" else open(a.out, "w")
    with out if a.out != "-" else open(1, "w", closefd=False) as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    return 0
