"""Which chunk tokens to recompute: one small function per method, in a registry.

Every selector gets the candidate positions (tokens of the non-exact chunks, sorted),
the chunk spans and the budget k = floor(ratio * #candidates), and returns at most k
sorted positions. Signals that cost model compute (attention-norm scores, K deviation)
come in through `SelectionInput.signal`, computed only for the selectors that ask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class SelectionInput:
    candidates: torch.Tensor  # int64 [T], sorted positions
    chunks: list[tuple[int, int]]  # candidate chunk spans, sorted
    budget: int
    seed: int = 0
    # Per-position score over [0, context_end), for selectors with needs_signal (a
    # tuple of them, in the order named, for "a+b" signals).
    signal: torch.Tensor | tuple[torch.Tensor, ...] | None = None


@dataclass(frozen=True)
class Selector:
    fn: Callable[[SelectionInput], torch.Tensor]
    needs_signal: str | None = None  # "attn_norm" | "k_deviation" | "a+b" | None


SELECTORS: dict[str, Selector] = {}


def register(name: str, needs_signal: str | None = None):
    def deco(fn):
        SELECTORS[name] = Selector(fn, needs_signal)
        return fn

    return deco


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


@register("none")
def select_none(inp: SelectionInput) -> torch.Tensor:
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
    """Top-k candidates by the per-position signal the selector asked for."""
    return top_k_positions(inp.candidates, inp.signal[inp.candidates], inp.budget)


# infoflow: the question's attention norm (InfoFlow KV); infoflow-reorder selects the
# same way after reordering the chunks.
register("infoflow", needs_signal="attn_norm")(select_top_signal)
register("infoflow-reorder", needs_signal="attn_norm")(select_top_signal)
# cacheblend: the deviation of cached from recomputed keys at layer 1 (CacheBlend).
register("cacheblend", needs_signal="k_deviation")(select_top_signal)
# oracle-kv: a diagnostic, not a method. How far each reused token's K/V (all layers)
# are from full prefill's, which it computes first (so it costs a full prefill): shows
# how much of the gap any selector of that budget could close on given data.
register("oracle-kv", needs_signal="exact_kv_deviation")(select_top_signal)


def candidate_ranks(values: torch.Tensor) -> torch.Tensor:
    """Rank of each value among its tensor, 0 = smallest, ties by position (stable)."""
    order = torch.sort(values.double(), stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), device=order.device)
    return ranks


@register("infoflow-kdev", needs_signal="attn_norm+k_deviation")
def select_infoflow_kdev(inp: SelectionInput) -> torch.Tensor:
    """Top-k by the mean of two ranks: the question's attention norm (which tokens the
    answer reads) and CacheBlend's layer-1 key deviation (which cached tokens are most
    wrong). A variant of this package, not the paper's method."""
    attn, kdev = inp.signal
    c = inp.candidates
    score = candidate_ranks(attn[c]) + candidate_ranks(kdev[c])
    return top_k_positions(c, score, inp.budget)


def select(method: str, inp: SelectionInput) -> torch.Tensor:
    if inp.budget >= inp.candidates.numel():
        return inp.candidates  # the exact limit: every candidate, whatever the method
    if inp.budget <= 0:
        # Nothing to pick (few candidates left after a prefix-cache hit): the pipeline
        # computes no signal in this case, so signal-based selectors must not run.
        return inp.candidates[:0]
    if method not in SELECTORS:
        raise ValueError(f"unknown selection method {method!r}; known: {sorted(SELECTORS)}")
    return SELECTORS[method].fn(inp)
