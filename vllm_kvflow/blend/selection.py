"""The blend methods: one registered `Method` each, with the signal it needs and how it
selects which chunk tokens to recompute. The pipeline asks the method and never names
one; adding a method touches this file only.

Every selector gets the candidate positions (reused tokens whose KV is not exact, sorted),
the candidate spans and the budget k = floor(ratio * #candidates), and returns at most k
sorted positions. Signals that cost model compute (attention-norm scores, key deviation;
blend/signals.py) come in through `SelectionInput.signal`, computed only for the
methods that name them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from vllm_kvflow.blend.host_ints import device_ints


@dataclass
class SelectionInput:
    candidates: torch.Tensor  # int64 [T], sorted positions
    chunks: list[tuple[int, int]]  # candidate spans, sorted
    budget: int
    seed: int = 0
    # Per-position score over [0, context_end) for methods with signals: one tensor, or
    # a tuple of them in the order the method names its signals.
    signal: torch.Tensor | tuple[torch.Tensor, ...] | None = None


Selector = Callable[[SelectionInput], torch.Tensor]


@dataclass(frozen=True)
class Method:
    """name: what requests and settings say; select: the selector (None: `full`, which
    never reaches the worker); signals: names in blend/signals.py, computed before
    selecting; reuses: False for plain prefill; recomputes: False for pure reuse (the
    ratio is then ignored); reorders: lay the chunks out by their selected share, most
    relevant nearest the question, before the final selection."""

    name: str
    select: Selector | None
    signals: tuple[str, ...] = ()
    reuses: bool = True
    recomputes: bool = True
    reorders: bool = False


METHODS: dict[str, Method] = {}


def register(name: str, *signals: str, reuses: bool = True, recomputes: bool = True,
             reorders: bool = False):
    """Decorator registering a selector as the method `name`."""
    def deco(fn: Selector | None) -> Selector | None:
        METHODS[name] = Method(name, fn, tuple(signals), reuses, recomputes, reorders)
        return fn

    return deco


def method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]


def budget_for(num_candidates: int, ratio: float) -> int:
    return int(ratio * num_candidates + 1e-9)  # floor; ratio 1.0 takes every candidate


def top_k_positions(candidates: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest-scoring candidates, sorted by position; ties go to the earlier one."""
    if k >= candidates.numel():
        return candidates
    s = scores.double()
    # Stable descending sort breaks ties by position, deterministically.
    order = torch.sort(-s, stable=True).indices[:k]
    return torch.sort(candidates[order]).values


def candidate_ranks(values: torch.Tensor) -> torch.Tensor:
    """Rank of each value among its tensor, 0 = smallest, ties by position (stable)."""
    order = torch.sort(values.double(), stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), device=order.device)
    return ranks


# -- the methods ----------------------------------------------------------------------------
# full: ordinary prefill (the quality reference); the scheduler never hands it a load.
register("full", reuses=False)(None)


@register("none", recomputes=False)
def select_none(inp: SelectionInput) -> torch.Tensor:
    """Pure reuse: chunks loaded at their global positions, nothing recomputed."""
    return inp.candidates[:0]


@register("random")
def select_random(inp: SelectionInput) -> torch.Tensor:
    gen = torch.Generator().manual_seed(inp.seed)
    perm = torch.randperm(inp.candidates.numel(), generator=gen)[: inp.budget]
    return torch.sort(inp.candidates[perm.to(inp.candidates.device)]).values


@register("epic")
def select_epic(inp: SelectionInput) -> torch.Tensor:
    """EPIC's LegoLink: the first tokens of each chunk, the budget split by chunk size."""
    total = sum(e - s for s, e in inp.chunks)
    if total == 0 or inp.budget == 0:
        return inp.candidates[:0]
    picks = []
    for s, e in inp.chunks:
        k = min(e - s, (inp.budget * (e - s)) // total)
        picks.append(torch.arange(s, s + k, device=inp.candidates.device))
    return torch.cat(picks)


def select_top_signal(inp: SelectionInput) -> torch.Tensor:
    """Top-k candidates by the per-position signal the method asked for."""
    return top_k_positions(inp.candidates, inp.signal[inp.candidates], inp.budget)


# infoflow: the question's attention norm at the scoring layers (InfoFlow KV, the default).
register("infoflow", "attn_norm")(select_top_signal)
# infoflow-reorder: the same selection after laying the chunks out by selected share.
register("infoflow-reorder", "attn_norm", reorders=True)(select_top_signal)
# cacheblend: deviation of cached from recomputed keys at layer 1 (CacheBlend).
register("cacheblend", "k_deviation")(select_top_signal)
# oracle-kv: a diagnostic, not a method. How far each reused token's K/V (all layers)
# are from full prefill's, which it computes first (so it costs a full prefill): shows
# how much of the gap any selector of that budget could close on given data.
register("oracle-kv", "exact_kv_deviation")(select_top_signal)


@register("infoflow-kdev", "attn_norm", "k_deviation")
def select_infoflow_kdev(inp: SelectionInput) -> torch.Tensor:
    """Top-k by the mean of two ranks: the question's attention norm (which tokens the
    answer reads) and CacheBlend's layer-1 key deviation (which cached tokens are most
    wrong). A variant of this package, not the paper's method."""
    attn, kdev = inp.signal
    c = inp.candidates
    score = candidate_ranks(attn[c]) + candidate_ranks(kdev[c])
    return top_k_positions(c, score, inp.budget)


@register("infoflow-dev", "attn_norm", "k_deviation")
def select_infoflow_dev(inp: SelectionInput) -> torch.Tensor:
    """Top-k by the product of the question's attention norm and the layer-1 key
    deviation: a token is worth recomputing when the answer reads it *and* its cached KV
    is wrong; either factor near zero makes recomputing it useless. A variant of this
    package (benchmarks/QUALITY_NOTES.md has its measurements)."""
    attn, kdev = inp.signal
    c = inp.candidates
    return top_k_positions(c, attn[c].double() * kdev[c].double(), inp.budget)


@register("infoflow-pos", "attn_norm")
def select_infoflow_pos(inp: SelectionInput) -> torch.Tensor:
    """Top-k by the attention norm times the start position of the token's span: a
    span computed in isolation missed all the context before it, so the later it sits,
    the more its cached KV deviates. No signal beyond infoflow's. A variant of this
    package (benchmarks/QUALITY_NOTES.md)."""
    c = inp.candidates
    return top_k_positions(c, inp.signal[c].double() * span_starts(inp).double(), inp.budget)


# infoflow-quota's quotas cover at most this share of the candidates: up to rho = 0.15
# the whole budget goes by quota, beyond it the rest by the signal alone (fixed quotas
# at rho = 0.3 recomputed low-scoring tokens of late chunks and lost to CacheBlend on one
# question set; benchmarks/QUALITY_NOTES.md).
QUOTA_SHARE = 0.15


@register("infoflow-quota", "attn_norm")
def select_infoflow_quota(inp: SelectionInput) -> torch.Tensor:
    """infoflow's signal, with the budget split over the chunks by position first: each
    chunk gets a share in proportion to its length times its start position, filled by
    its own top scores. A variant of this package (benchmarks/QUALITY_NOTES.md)."""
    return select_by_position_quotas(inp, 1.0, budget_for(inp.candidates.numel(), QUOTA_SHARE))


def select_by_position_quotas(inp: SelectionInput, power: float, quota_tokens: int) -> torch.Tensor:
    """quota_tokens of the budget (at most all of it) split over the candidate spans in
    proportion to length x start**power, each span's quota filled by its own top signal;
    the rest of the budget by the global top signal. A span computed in isolation missed
    all the context before it, so later spans need more of the budget; which of their
    tokens is still the signal's choice. Sorts only (no host read of device values)."""
    c = inp.candidates
    score = inp.signal[c].double()
    lengths = [e - s for s, e in inp.chunks]  # the candidates are the spans' positions
    quota = span_quotas(lengths, [float(s) ** power for s, _ in inp.chunks],
                        min(quota_tokens, inp.budget))
    _, which = _spans_of_candidates(inp)
    by_score = torch.sort(-score, stable=True).indices
    # Each candidate's rank by score within its span: regroup the score order by span
    # (stable, so each span keeps its score order), then count from the span's start.
    grouped = by_score[torch.sort(which[by_score], stable=True).indices]
    span_offset = device_ints(np.cumsum([0] + lengths[:-1]), c.device)
    rank = torch.empty_like(which)
    rank[grouped] = torch.arange(c.numel(), device=c.device) - span_offset[which[grouped]]
    in_quota = rank < device_ints(quota, c.device)[which]
    # The quota picks first, then everything else in score order.
    order = by_score[torch.sort((~in_quota[by_score]).to(torch.uint8), stable=True).indices]
    return torch.sort(c[order[:inp.budget]]).values


def span_quotas(lengths: list[int], weights: list[float], k: int) -> list[int]:
    """Integer quotas summing to min(k, sum(lengths)), each at most its span's length, in
    proportion to length x weight: floors, then the largest remainders one token each;
    what a full span cannot take goes round again to the others."""
    quota = [0] * len(lengths)
    open_spans = [i for i, n in enumerate(lengths) if n > 0]
    left = min(k, sum(lengths))
    while left > 0 and open_spans:
        mass = sum(lengths[i] * weights[i] for i in open_spans)
        share = {i: left * (lengths[i] * weights[i] / mass if mass > 0 else 1 / len(open_spans))
                 for i in open_spans}
        give = {i: min(int(share[i]), lengths[i] - quota[i]) for i in open_spans}
        rest = left - sum(give.values())
        for i in sorted(open_spans, key=lambda i: share[i] - int(share[i]), reverse=True):
            if rest == 0:
                break
            if quota[i] + give[i] < lengths[i]:
                give[i] += 1
                rest -= 1
        for i, n in give.items():
            quota[i] += n
        left -= sum(give.values())
        open_spans = [i for i in open_spans if quota[i] < lengths[i]]
    return quota


def _spans_of_candidates(inp: SelectionInput) -> tuple[torch.Tensor, torch.Tensor]:
    """The spans' start positions on the device, and for each candidate the index of the
    span holding it."""
    starts = device_ints([s for s, _ in inp.chunks], inp.candidates.device)  # no host wait
    return starts, (torch.searchsorted(starts, inp.candidates, right=True) - 1).clamp(min=0)


def span_starts(inp: SelectionInput) -> torch.Tensor:
    """For each candidate, the start position of the candidate span holding it."""
    starts, which = _spans_of_candidates(inp)
    return starts[which]


def select(name: str, inp: SelectionInput) -> torch.Tensor:
    """The positions method `name` recomputes, given its signal(s) where it needs any."""
    if inp.budget >= inp.candidates.numel():
        return inp.candidates  # the exact limit: every candidate, whatever the method
    if inp.budget <= 0:
        # Nothing to pick (few candidates left after a prefix-cache hit): the pipeline
        # computes no signal in this case, so signal-based selectors must not run.
        return inp.candidates[:0]
    m = method(name)
    if m.select is None:
        raise ValueError(f"method {name!r} selects nothing: it does not reuse KV")
    return m.select(inp)
