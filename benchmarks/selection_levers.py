"""Selection levers for infoflow, measured in the transformers reference of the blend.

Each variant picks floor(rho*T) of the T candidate tokens of a question (or, for the
adaptive "auto" budget, as many as its rule says) and is judged like `kvflow bench
ceiling` judges a selector: the teacher-forced NLL of full prefill's greedy answer after
recomputing the picks, minus full prefill's (nll_gap); "closed" is the share of none's
gap recovered; intervals are 95% paired bootstrap over questions against cacheblend.
Nothing here changes the engine: the variants are written over bench/hf_select.py.

Variants (`--variants`, comma list of names or families; `all` runs every one):
  baselines     none, cacheblend, infoflow (the engine's rule), ceiling (the gradient
                estimate of bench/ceiling.py)
  span-wW       spans around selected tokens: take tokens by infoflow score, each with
                its W candidate neighbours on either side, until the budget is spent
  smooth-wW     spans by score: each candidate's score is the max over +-W candidates
  floor-F       per-chunk floor: every candidate span gets floor(F * k * len/T) of its own
                top tokens first, the rest goes by the global top score
  refine-S      layer-wise refinement in S stages: pick k/S, recompute them, score again
                over the refined cache, pick the next k/S, ...; the picks are
                recomputed stage by stage (no token twice)
  refsel-S      the same stages choose the tokens, then all of them are recomputed in
                one pass over the loaded cache (the earlier stages' tokens twice: it
                separates the better choice from the staging)
  layerwise-C   refinement inside the recompute: C*k tokens recomputed at the first third
                of the layers, k at the middle third, (2-C)*k at the last (the same
                token-layers as k through all layers); at each third's start the
                question, carried through the same pass, re-ranks the tokens still in
  qgen          scoring rows: the question and the generation prompt after it
  tail          scoring rows: every token after the context ("Question: ", question,
                generation prompt)
  layers-A-B    scoring layers A..B-1 instead of the default 21-24
  agg-mass      score: attention mass (sum over rows) instead of the L2 norm over rows
  agg-maxhead   score: max over heads of the per-head L2 norm over rows
  kdev-prod     score: infoflow's times cacheblend's layer-1 key deviation
  kdev-rank     mean of the two ranks (the engine's infoflow-kdev)
  dev-tok-G     score: infoflow's times the token's layer-1 key deviation to the power G
  dev-chunk-G   score: infoflow's times the mean layer-1 key deviation of the token's
                span (chunk or separator) to the power G: how wrong the span is as a whole
  dev-pos-G     score: infoflow's times the span's start position to the power G (the
                context a span missed grows with it)
  posbudget-G   per-chunk budget: each candidate span gets a share of k in proportion to
                its length times its start position to the power G (a late chunk missed
                the most context), filled by the span's own top scores
  posfloor-G-S  the same quotas for a share S of the budget, the rest by the global top
                score
  poscap-G-C    the same quotas for at most floor(C*T) tokens, the rest by the global top
                score (all quotas up to rho = C, the score beyond)
  first-N       the first N tokens of every chunk first (the tokens next to the sink in
                isolation), the rest by infoflow score
  lead-F        EPIC's first tokens for a share F of the budget (split over the chunks by
                their length, as EPIC splits it), the rest by infoflow score
  auto-TAU      adaptive budget: candidates by infoflow score until they hold TAU of the
                candidates' share of the question's attention mass, at most 0.3*T (one
                run, not per rho)
Combinations: `a+b` applies both where they compose, e.g. qgen+span-w1 or
qgen+floor-0.5 (scoring rows from one, selection rule from the other).

    nice -n 19 taskset -c 1 python benchmarks/selection_levers.py \\
        --dataset benchmarks/fictional_qa_300.jsonl --limit 100 --variants all \\
        --out benchmarks/results/levers_fictional_n100.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from vllm_kvflow.bench import metrics as M
from vllm_kvflow.bench.ceiling import Checkpoint, build_question, dataset_digest, environment
from vllm_kvflow.bench.dataset import load_items
from vllm_kvflow.bench.hf_select import (
    Question,
    attn_norm,
    budget_for,
    default_scoring_layers,
    question_attention,
    select,
    top_k,
)
from vllm_kvflow.blend.selection import span_quotas

AUTO_CAP = 0.3
# `all`: one setting per lever (the machine is small: every variant costs a recompute
# and a teacher-forced pass per question and rho); others by name.
VARIANTS = ["none", "cacheblend", "infoflow", "ceiling",
            "span-w1", "floor-0.5", "refine-2", "layerwise-1.5", "qgen",
            "layers-0-30", "agg-maxhead", "kdev-prod", "dev-chunk-2", "dev-pos-1",
            "auto-0.5", "auto-0.6", "auto-0.7", "auto-0.8"]


# -- scores ------------------------------------------------------------------------------------
def rows_for(q: Question, kind: str) -> torch.Tensor:
    q0, q1 = q.question_span
    if kind == "question":
        return torch.arange(q0, q1)
    if kind == "qgen":
        return torch.arange(q0, len(q.prompt))
    if kind == "tail":
        return torch.arange(q.context_end, len(q.prompt))
    raise ValueError(kind)


def attention_for(q: Question, rows: str) -> torch.Tensor:
    cache = q.__dict__.setdefault("_lever_attention", {})
    if rows not in cache:
        cache[rows] = q.attention(rows_for(q, rows))
    return cache[rows]


def score_for(q: Question, spec: dict) -> torch.Tensor:
    att = attention_for(q, spec["rows"])
    layers = spec["layers"] or default_scoring_layers(q.ref.num_layers)
    a = att[layers]
    if spec["agg"] == "l2":
        score = attn_norm(att, layers)
    elif spec["agg"] == "mass":
        score = a.mean(2).sum(1).mean(0)
    elif spec["agg"] == "maxhead":
        score = a.norm(dim=1).max(dim=1).values.mean(0)
    else:
        raise ValueError(spec["agg"])
    if spec["dev"] is not None:
        score = score * deviation_weight(q, *spec["dev"])
    if spec["kdev"] == "rank":
        c = q.candidates
        mixed = torch.zeros_like(score)
        mixed[c] = (_ranks(score[c]) + _ranks(q.key_deviation[c])).float()
        score = mixed
    return score


def deviation_weight(q: Question, kind: str, power: float) -> torch.Tensor:
    """Per context position, how wrong its reused KV is likely to be, from what a
    request has before recomputing anything."""
    if kind == "tok":
        return q.key_deviation ** power
    weight = torch.ones(q.context_end)
    for s, e in q.blend.candidate_spans:
        if kind == "chunk":
            weight[s:e] = q.key_deviation[s:e].mean() ** power
        elif kind == "pos":
            weight[s:e] = float(s) ** power
        else:
            raise ValueError(kind)
    return weight


def _ranks(values: torch.Tensor) -> torch.Tensor:
    order = torch.sort(values.double(), stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel())
    return ranks


def attention_mass(q: Question, spec: dict) -> torch.Tensor:
    att = attention_for(q, spec["rows"])
    return att[spec["layers"] or default_scoring_layers(q.ref.num_layers)].mean(2).sum(1).mean(0)


# -- selection rules ---------------------------------------------------------------------------
def pick_top(q: Question, score: torch.Tensor, k: int) -> torch.Tensor:
    return top_k(q.candidates, score[q.candidates], k)


def pick_spans(q: Question, score: torch.Tensor, k: int, width: int) -> torch.Tensor:
    cand = q.candidates.tolist()
    is_cand = set(cand)
    order = torch.sort(-score[q.candidates].double(), stable=True).indices.tolist()
    chosen: list[int] = []
    taken = set()
    for idx in order:
        center = cand[idx]
        for d in [0] + [s * j for j in range(1, width + 1) for s in (-1, 1)]:
            p = center + d
            if p in is_cand and p not in taken:
                taken.add(p)
                chosen.append(p)
                if len(chosen) == k:
                    return torch.tensor(sorted(chosen))
    return torch.tensor(sorted(chosen))


def smoothed(q: Question, score: torch.Tensor, width: int) -> torch.Tensor:
    masked = torch.zeros_like(score)
    masked[q.candidates] = score[q.candidates]
    pooled = torch.nn.functional.max_pool1d(masked[None, None], 2 * width + 1, stride=1,
                                            padding=width)[0, 0]
    return pooled


def pick_by_quotas(q: Question, score: torch.Tensor, k: int, quotas: list[int]) -> torch.Tensor:
    """Each candidate span's top scores up to its quota, then the rest of k by the
    global top score."""
    chosen = set()
    for (s, e), n in zip(q.blend.candidate_spans, quotas):
        if n:
            span = torch.arange(s, e)
            chosen.update(top_k(span, score[span], n).tolist())
    rest = torch.tensor([p for p in q.candidates.tolist() if p not in chosen], dtype=torch.long)
    chosen.update(top_k(rest, score[rest], k - len(chosen)).tolist())
    return torch.tensor(sorted(chosen))


def pick_floor(q: Question, score: torch.Tensor, k: int, share: float) -> torch.Tensor:
    T = q.num_candidates
    return pick_by_quotas(q, score, k, [int(share * k * (e - s) / T) for s, e in q.blend.candidate_spans])


def pick_position_budget(q: Question, score: torch.Tensor, k: int, power: float,
                         quota_tokens: int) -> torch.Tensor:
    """Split min(quota_tokens, k) over the candidate spans by length * start**power
    (blend/selection.span_quotas), take each span's top scores up to its quota, the rest
    of k by the global top score: the position weight decides how many per chunk, the
    score which ones. Written as loops: the engine's sort-only version
    (selection.select_by_position_quotas) is tested against the same rule."""
    spans = q.blend.candidate_spans
    return pick_by_quotas(q, score, k, span_quotas([e - s for s, e in spans],
                                                   [float(s) ** power for s, _ in spans],
                                                   min(quota_tokens, k)))


def pick_first(q: Question, score: torch.Tensor, k: int, first: int) -> torch.Tensor:
    chosen = set()
    for s, e in q.blend.candidate_spans:
        if e - s > first:  # chunks, not separators
            chosen.update(range(s, s + first))
    chosen = set(sorted(chosen)[:k])
    rest = torch.tensor([p for p in q.candidates.tolist() if p not in chosen], dtype=torch.long)
    chosen.update(top_k(rest, score[rest], k - len(chosen)).tolist())
    return torch.tensor(sorted(chosen))


def pick_lead(q: Question, score: torch.Tensor, k: int, share: float) -> torch.Tensor:
    """EPIC's rule for int(share * k) tokens: each candidate span's first tokens, in
    proportion to its length; the rest of the budget by the score."""
    lead = int(share * k)
    spans = q.blend.candidate_spans
    total = sum(e - s for s, e in spans)
    chosen = set()
    for s, e in spans:
        chosen.update(range(s, s + min(e - s, lead * (e - s) // total)))
    rest = torch.tensor([p for p in q.candidates.tolist() if p not in chosen], dtype=torch.long)
    chosen.update(top_k(rest, score[rest], k - len(chosen)).tolist())
    return torch.tensor(sorted(chosen))


def refine(q: Question, spec: dict, k: int, stages: int):
    """Staged: returns the recomputed cache itself (no token is recomputed twice)."""
    kv = q.blend.kv.clone()
    rows = rows_for(q, spec["rows"])
    layers = spec["layers"] or default_scoring_layers(q.ref.num_layers)
    chosen = torch.zeros(0, dtype=torch.long)
    for stage in range(stages):
        n = k * (stage + 1) // stages - chosen.numel()
        if stage == 0:
            score = score_for(q, spec)
        else:
            score = attn_norm(question_attention(q.ref, q.prompt, kv, q.context_end, rows), layers)
        score = score.clone()
        score[chosen] = -float("inf")
        picks = pick_top(q, score, n)
        q.ref.recompute(q.prompt, kv, picks)
        chosen = torch.sort(torch.cat([chosen, picks])).values
    return chosen, kv


@torch.no_grad()
def layerwise(q: Question, spec: dict, k: int, wide: float):
    """Recompute with the set shrinking over three thirds of the layers (wide*k, k,
    (2-wide)*k tokens), re-ranked at each third's start by the question's attention at
    that layer, the question carried through the same pass over the refined cache.
    Returns (token-layer-weighted count, the cache)."""
    ref, prompt, ctx = q.ref, q.prompt, q.context_end
    L = ref.num_layers
    bounds = [0, L // 3, 2 * L // 3, L]
    sizes = [min(int(wide * k), q.num_candidates), k, max(int((2 - wide) * k), 0)]
    kv = q.blend.kv.clone()
    rows = rows_for(q, spec["rows"])
    # One pass over [candidates in the set] + [question rows]: rows see the context and
    # each other; the set's new K/V go into kv, the rows' K/V into a scratch copy.
    current = pick_top(q, score_for(q, spec), sizes[0])
    ids = torch.tensor(prompt)
    emb = ref.model.model.embed_tokens
    h_set, h_rows = emb(ids[current]), emb(ids[rows])
    end = int(rows.max()) + 1
    scratch = kv.clone(end)
    visible = torch.zeros(end, dtype=torch.bool)
    visible[:ctx] = True
    visible[rows] = True
    token_layers = 0
    for third in range(3):
        for l in range(bounds[third], bounds[third + 1]):
            if l == bounds[third] and third > 0:
                # Re-rank the set by the rows' attention at this layer over the cache as it
                # is now (the set's own K/V at this layer still the loaded ones).
                current, h_set = _rerank(ref, l, h_rows, rows, kv, ctx, current, h_set, sizes[third])
            if current.numel():
                h_set = _layer(ref, l, h_set, current, kv, None)
            token_layers += current.numel()
            if l < bounds[2]:  # the rows are read up to the last re-rank
                scratch.keys[l][:ctx] = kv.keys[l][:ctx]
                scratch.values[l][:ctx] = kv.values[l][:ctx]
                h_rows = _layer(ref, l, h_rows, rows, scratch, visible)
    return token_layers / L, kv


def _rerank(ref, l, h_rows, rows, kv, ctx, current, h_set, size):
    layer = ref.layers[l]
    attn = layer.self_attn
    x = layer.input_layernorm(h_rows)
    n = rows.numel()
    qr = ref.rope(attn.q_proj(x).view(n, ref.num_heads, ref.head_dim), rows)
    kr = ref.rope(attn.k_proj(x).view(n, ref.kv_heads, ref.head_dim), rows)
    keys = torch.cat([kv.keys[l][:ctx], kr])  # context, then the rows' own keys
    key_pos = torch.cat([torch.arange(ctx), rows])
    group = ref.num_heads // ref.kv_heads
    s = torch.einsum("nhd,mhd->nhm", qr, keys.repeat_interleave(group, 1)) * ref.scale
    mask = key_pos[None] <= rows[:, None]
    probs = s.masked_fill(~mask[:, None], float("-inf")).softmax(-1)[..., :ctx]
    score = probs.mean(1).norm(dim=0)
    keep = top_k(current, score[current], size)
    return keep, h_set[torch.searchsorted(current, keep)]


def _layer(ref, l, hidden, positions, kv, visible):
    """One decoder layer for tokens at `positions`, writing their K/V into kv."""
    layer = ref.layers[l]
    attn = layer.self_attn
    n = positions.numel()
    x = layer.input_layernorm(hidden)
    q = ref.rope(attn.q_proj(x).view(n, ref.num_heads, ref.head_dim), positions)
    k = ref.rope(attn.k_proj(x).view(n, ref.kv_heads, ref.head_dim), positions)
    v = attn.v_proj(x).view(n, ref.kv_heads, ref.head_dim)
    kv.keys[l].index_copy_(0, positions, k)
    kv.values[l].index_copy_(0, positions, v)
    end = int(positions.max()) + 1
    mask = torch.arange(end)[None] <= positions[:, None]
    if visible is not None:
        mask = mask & visible[None, :end]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1)[None], kv.keys[l][:end].transpose(0, 1)[None],
        kv.values[l][:end].transpose(0, 1)[None], attn_mask=mask, scale=ref.scale, enable_gqa=True)
    hidden = hidden + attn.o_proj(out[0].transpose(0, 1).reshape(n, -1))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


# -- variants ----------------------------------------------------------------------------------
def parse(name: str) -> dict:
    """A variant name (parts joined by '+') -> its scoring spec and selection rule."""
    spec = {"rows": "question", "layers": None, "agg": "l2", "kdev": None, "dev": None,
            "rule": ("top",)}
    for part in name.split("+"):
        if part in ("qgen", "tail"):
            spec["rows"] = part
        elif part.startswith("layers-"):
            a, b = part[len("layers-"):].split("-")
            spec["layers"] = list(range(int(a), int(b)))
        elif part.startswith("agg-"):
            spec["agg"] = part[len("agg-"):]
        elif part == "kdev-prod":
            spec["dev"] = ("tok", 1.0)
        elif part == "kdev-rank":
            spec["kdev"] = "rank"
        elif part.startswith("dev-"):
            kind, power = part[len("dev-"):].split("-")
            spec["dev"] = (kind, float(power))
        elif part.startswith("posbudget-"):
            spec["rule"] = ("posbudget", float(part[len("posbudget-"):]), "share", 1.0)
        elif part.startswith("posfloor-"):
            power, share = part[len("posfloor-"):].split("-")
            spec["rule"] = ("posbudget", float(power), "share", float(share))
        elif part.startswith("poscap-"):
            power, cap = part[len("poscap-"):].split("-")
            spec["rule"] = ("posbudget", float(power), "cap", float(cap))
        elif part.startswith("first-"):
            spec["rule"] = ("first", int(part[len("first-"):]))
        elif part.startswith("lead-"):
            spec["rule"] = ("lead", float(part[len("lead-"):]))
        elif part.startswith("span-w"):
            spec["rule"] = ("span", int(part[len("span-w"):]))
        elif part.startswith("smooth-w"):
            spec["rule"] = ("smooth", int(part[len("smooth-w"):]))
        elif part.startswith("floor-"):
            spec["rule"] = ("floor", float(part[len("floor-"):]))
        elif part.startswith("refine-"):
            spec["rule"] = ("refine", int(part[len("refine-"):]))
        elif part.startswith("refsel-"):
            spec["rule"] = ("refsel", int(part[len("refsel-"):]))
        elif part.startswith("layerwise-"):
            spec["rule"] = ("layerwise", float(part[len("layerwise-"):]))
        elif part.startswith("auto-"):
            spec["rule"] = ("auto", float(part[len("auto-"):]))
        elif part == "infoflow":
            pass
        else:
            raise ValueError(f"unknown variant part {part!r} in {name!r}")
    return spec


BASELINES = ("none", "cacheblend", "infoflow", "ceiling", "oracle-kv", "random", "epic")


def run_variant(q: Question, name: str, ratio: float, answers: list[str] | None = None) -> dict:
    """nll_gap and the recompute count (ratio of T) of one variant at one rho; with the
    gold `answers`, also the accuracy of its greedy answer."""
    kv, recomputed = variant_cache(q, name, ratio)
    out = {"gap": q.nll(kv) - q.nll_full, "ratio": recomputed / q.num_candidates}
    if answers is not None:
        out["acc"] = M.contains_answer(q.ref_tokenizer.decode(q.greedy(kv)), answers)
    return out


def variant_cache(q: Question, name: str, ratio: float):
    """The cache a variant leaves (its picks recomputed), and how many tokens it
    recomputed (token-layers / layers for layerwise)."""
    T = q.num_candidates
    if name in BASELINES:
        positions, base = select(name, q, ratio)
        return q.recomputed(positions, base), positions.numel()
    spec = parse(name)
    rule = spec["rule"]
    k = budget_for(T, AUTO_CAP if rule[0] == "auto" else ratio)
    if k <= 0:
        return q.blend.kv, 0
    if rule[0] == "refine":
        positions, kv = refine(q, spec, k, rule[1])
        return kv, positions.numel()
    if rule[0] == "refsel":
        positions, _ = refine(q, spec, k, rule[1])
        return q.recomputed(positions), positions.numel()
    if rule[0] == "layerwise":
        token_layers, kv = layerwise(q, spec, k, rule[1])
        return kv, token_layers
    score = score_for(q, spec)
    if rule[0] == "top":
        positions = pick_top(q, score, k)
    elif rule[0] == "span":
        positions = pick_spans(q, score, k, rule[1])
    elif rule[0] == "smooth":
        positions = pick_top(q, smoothed(q, score, rule[1]), k)
    elif rule[0] == "floor":
        positions = pick_floor(q, score, k, rule[1])
    elif rule[0] == "posbudget":
        _, power, kind, x = rule
        quota = int(x * k) if kind == "share" else budget_for(T, x)
        positions = pick_position_budget(q, score, k, power, quota)
    elif rule[0] == "first":
        positions = pick_first(q, score, k, rule[1])
    elif rule[0] == "lead":
        positions = pick_lead(q, score, k, rule[1])
    elif rule[0] == "auto":
        c = q.candidates
        mass = attention_mass(q, spec)[c]
        order = torch.sort(-score[c].double(), stable=True).indices
        held = torch.cumsum(mass[order], 0) / mass.sum()
        n = min(int(torch.searchsorted(held, torch.tensor(rule[1], dtype=held.dtype))) + 1, k)
        positions = torch.sort(c[order[:n]]).values
    else:
        raise ValueError(rule)
    uses_kdev = spec["kdev"] or (spec["dev"] is not None and spec["dev"][0] != "pos")
    base = q.cacheblend_base if uses_kdev else None  # the layer-0 pass was paid for
    return q.recomputed(positions, base), positions.numel()


def ratios_of(name: str, ratios: list[float]) -> list[float]:
    if name == "none" or name.startswith("auto-") or "+auto-" in name:
        return [0.0]
    return ratios


# -- driver ------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--start", type=int, default=0,
                   help="first item: a development split apart from the reported questions")
    p.add_argument("--ratio", default="0.05,0.15,0.3")
    p.add_argument("--variants", default="all")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--baselines", default=None,
                   help="per-question records of a `kvflow bench ceiling` run on the same dataset "
                        "(its JSON or .partial.jsonl): none, cacheblend, infoflow and ceiling are "
                        "taken from there where present instead of computed again (same code, "
                        "same numbers)")
    p.add_argument("--accuracy", action="store_true",
                   help="also decode each variant's greedy answer and score it against the gold "
                        "answers (16 decode steps per variant and rho; baselines then computed here)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = VARIANTS if args.variants == "all" else [v for v in args.variants.split(",") if v]
    for v in ["none", "cacheblend", "infoflow"]:
        if v not in variants:
            variants.insert(0, v)
    for v in variants:
        if v not in BASELINES:
            parse(v)  # fail early on a typo
    ratios = [float(r) for r in args.ratio.split(",")]
    items = load_items(args.dataset, args.start + args.limit)[args.start:]
    from transformers import AutoTokenizer
    from tqdm import tqdm

    from vllm_kvflow.bench.ceiling import _default_model
    from vllm_kvflow.bench.hf_blend import HFReference

    ref = HFReference()
    tok = AutoTokenizer.from_pretrained(_default_model())
    key = {"dataset": dataset_digest(args.dataset), "ratios": ratios, "max_tokens": args.max_tokens,
           "version": LEVERS_VERSION, "accuracy": args.accuracy}
    ckpt = Checkpoint(args.out, key)
    t0 = time.perf_counter()
    for i, item in enumerate(tqdm(items, desc="levers", unit="question", file=sys.stderr)):
        qid = str(item.get("id", args.start + i))
        done = dict(ckpt.records.get(qid, {}).get("runs", {}))
        if args.baselines and not args.accuracy:
            done.update({k: v for k, v in baseline_runs(args.baselines, args.dataset).get(qid, {}).items()
                         if k.split("@")[0] in variants and k not in done})
        todo = [(v, r) for v in variants for r in ratios_of(v, ratios) if f"{v}@{r}" not in done]
        if not todo and qid in ckpt.records:
            continue
        q = build_question(ref, tok, item, args.max_tokens, piece_cache={})
        q.ref_tokenizer = tok
        runs = dict(done)
        for v, r in todo:
            runs[f"{v}@{r}"] = run_variant(q, v, r, item["answers"] if args.accuracy else None)
        record = {"id": qid, "T": q.num_candidates, "runs": runs}
        if args.accuracy:
            record["full_acc"] = M.contains_answer(tok.decode(q.answer), item["answers"])
        ckpt.add(record)
    records = [ckpt.records[str(it.get("id", args.start + i))] for i, it in enumerate(items)]
    report = summarize(records, variants, ratios)
    if args.accuracy:
        acc, lo, hi = M.mean_ci([r["full_acc"] for r in records])
        report["full_accuracy"], report["full_accuracy_ci"] = acc, [lo, hi]
    report.update(environment())
    report.update({"dataset": args.dataset, "n": len(records), "seconds": time.perf_counter() - t0,
                   "command": "python benchmarks/selection_levers.py " + " ".join(sys.argv[1:] if argv is None else argv),
                   "per_question": records})
    print_table(report)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    return 0


def baseline_runs(path: str, dataset: str) -> dict[str, dict]:
    """{question id: {"method@rho": {"gap", "ratio"}}} from a ceiling run's records (read
    again on every call: the ceiling run may still be adding to them; none yet: empty)."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        if path.endswith(".jsonl"):
            lines = [json.loads(x) for x in f if x.strip()]
            key, records = lines[0]["key"], lines[1:]
            digest = key["dataset"]
        else:
            report = json.load(f)
            records, digest = report["per_question"], dataset_digest(report["dataset"])
    if digest != dataset_digest(dataset):
        raise ValueError(f"{path} was made on another dataset than {dataset}")
    return {r["id"]: {k: {"gap": v["gap"], "ratio": v["k"] / r["T"]} for k, v in r["runs"].items()}
            for r in records}


# Bump when a variant's results change; checkpoints of an older version are redone.
LEVERS_VERSION = 2


def summarize(records, variants, ratios) -> dict:
    def arr(name, key="gap"):
        return np.array([r["runs"][name][key] for r in records])

    none = arr("none@0.0")
    rows = []
    for v in variants:
        for r in ratios_of(v, ratios):
            name = f"{v}@{r}"
            if name not in records[0]["runs"]:
                continue
            g = arr(name)
            mean, lo, hi = M.mean_ci(g)
            row = {"variant": v, "ratio": r, "nll_gap": mean, "nll_gap_ci": [lo, hi],
                   "closed": 1 - mean / none.mean(), "recompute_ratio": float(arr(name, "ratio").mean())}
            if "acc" in records[0]["runs"][name]:
                acc, alo, ahi = M.mean_ci(arr(name, "acc"))
                row["accuracy"], row["accuracy_ci"] = acc, [alo, ahi]
            for base in ("cacheblend", "infoflow", "ceiling"):
                # auto is compared with each fixed rho of the base
                for br in ([r] if r else ratios):
                    bname = f"{base}@{br}"
                    if base == v or bname not in records[0]["runs"]:
                        continue
                    suffix = "" if r else f"@{br}"
                    row[f"vs_{base}{suffix}"] = list(M.paired_diff_ci(g, arr(bname)))
            rows.append(row)
    return {"none_nll_gap": float(none.mean()), "results": rows}


def print_table(report) -> None:
    print(f"\nlevers on {report['dataset']} ({report['card']}, torch {report['torch']}, "
          f"transformers {report['transformers']}), n={report['n']}, none nll_gap {report['none_nll_gap']:.4f}")
    print(f"{'variant':<24}{'rho':>5}{'recomp':>8}{'nll_gap':>9}{'closed':>8}"
          f"{'vs cacheblend [95% CI]':>30}{'vs infoflow [95% CI]':>30}")
    for r in report["results"]:
        cells = []
        for base in ("vs_cacheblend", "vs_infoflow"):
            d = r.get(base) or r.get(f"{base}@0.15")
            cells.append("" if d is None else f"{d[0]:+.4f} [{d[1]:+.4f},{d[2]:+.4f}]")
        acc = f"  acc {r['accuracy']:.3f}" if "accuracy" in r else ""
        print(f"{r['variant']:<24}{r['ratio']:>5.2f}{r['recompute_ratio']:>8.3f}{r['nll_gap']:>9.4f}"
              f"{r['closed']:>8.1%}{cells[0]:>30}{cells[1]:>30}{acc}")


if __name__ == "__main__":
    sys.exit(main())
