"""The engine's selection rules, written again over the transformers reference
(bench/hf_blend.py), and the signals they and the quality diagnostics read.

Each rule is re-implemented from its description, not imported, so the diagnostics
built on it stay independent of the engine (tests/engine/test_blend_reference.py checks
that this infoflow picks the engine's tokens):

- none: nothing.
- random: torch.randperm over the T candidates with a generator seeded 0, the first k.
- epic: the first tokens of each candidate span (chunks and separators), the budget
  split by span size (floor).
- cacheblend: layer 0 recomputed for every context token (written into the cache), the
  candidates' layer-1 keys computed from it; the k whose keys deviate most (L2 over
  heads) from the loaded keys.
- infoflow: the question's attention to the context at 4 scoring layers from 69% depth
  (layers 21-24 of SmolLM2's 30): the question tokens, at their own positions, attend
  over the loaded context and over each other (not over the tokens between, such as
  "Question: "); per layer, per context column, the L2 norm over question rows of the
  head-averaged attention probability; averaged over the layers; top k.
- oracle-kv: the k whose reused K/V (all layers) are farthest, in summed squared L2,
  from full prefill's.
- ceiling: the k whose recompute a first-order estimate says lowers the answer's NLL
  most: the gradient of the teacher-forced NLL of the full-prefill answer with respect
  to the reused K/V (all layers), dotted with (K_full - K_reused, V_full - V_reused).

k = floor(rho * T); top-k ties go to the earlier position; the result is sorted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import torch

from vllm_kvflow.bench.hf_blend import KV, HFReference

SCORING_DEPTH = 0.69  # infoflow's default: the paper's layers 22-25 of 32, relatively
SCORING_LAYERS = 4


def default_scoring_layers(num_layers: int) -> list[int]:
    start = min(int(round(SCORING_DEPTH * num_layers)), max(num_layers - SCORING_LAYERS, 0))
    return list(range(start, min(start + SCORING_LAYERS, num_layers)))


def budget_for(num_candidates: int, ratio: float) -> int:
    return int(ratio * num_candidates + 1e-9)


def top_k(candidates: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest-scoring candidates (scores per candidate), sorted by position;
    ties to the earlier candidate."""
    if k >= candidates.numel():
        return candidates
    order = torch.sort(-scores.double(), stable=True).indices[:k]
    return torch.sort(candidates[order]).values


@dataclass
class Question:
    """One prompt with its blend, its full prefill and its reference answer; the signals
    are computed on first use and kept, so every selector of one question shares them
    (and the isolated chunk KV comes from `piece_cache`)."""

    ref: HFReference
    prompt: list[int]
    chunks: list[tuple[int, int]]
    question_span: tuple[int, int]
    max_tokens: int = 16
    eos: int | None = None
    piece_cache: dict | None = None
    answer: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.blend = self.ref.blend(self.prompt, self.chunks, cache=self.piece_cache)
        self.context_end = self.blend.context_end
        self.candidates = self.blend.candidates
        self.full_kv, _ = self.ref.prefill(self.prompt[:self.context_end])
        if not self.answer:
            self.answer = self.ref.greedy(self.prompt, self.full_kv, self.context_end,
                                          self.max_tokens, eos=self.eos) or [self.eos]
        self.nll_full = self.nll(self.full_kv)

    @property
    def num_candidates(self) -> int:
        return int(self.candidates.numel())

    # -- evaluation -------------------------------------------------------------------------
    @torch.no_grad()
    def nll(self, kv: KV) -> float:
        return float(self.ref.answer_nll(self.prompt, kv, self.context_end, self.answer))

    def recomputed(self, positions: torch.Tensor, base: KV | None = None) -> KV:
        """A copy of `base` (default: the plain blend) with `positions` recomputed."""
        kv = (base or self.blend.kv).clone()
        self.ref.recompute(self.prompt, kv, positions)
        return kv

    def nll_gap(self, positions: torch.Tensor, base: KV | None = None) -> float:
        return self.nll(self.recomputed(positions, base)) - self.nll_full

    def greedy(self, kv: KV) -> list[int]:
        return self.ref.greedy(self.prompt, kv, self.context_end, self.max_tokens, eos=self.eos)

    # -- signals ----------------------------------------------------------------------------
    def attention(self, query_positions: torch.Tensor, kv: KV | None = None) -> torch.Tensor:
        """question_attention() of this prompt's tokens at `query_positions` over kv
        (default: the plain blend)."""
        return question_attention(self.ref, self.prompt, self.blend.kv if kv is None else kv,
                                  self.context_end, query_positions)

    @cached_property
    def scoring_attention(self) -> torch.Tensor:
        """attention() of the raw question (the engine's scoring rows)."""
        q0, q1 = self.question_span
        return self.attention(torch.arange(q0, q1))

    @cached_property
    def infoflow_score(self) -> torch.Tensor:
        layers = default_scoring_layers(self.ref.num_layers)
        return attn_norm(self.scoring_attention, layers)

    @cached_property
    def _key_deviation(self) -> tuple[torch.Tensor, KV]:
        """CacheBlend's signal and cache: layer 0 of every context token recomputed
        (written), then ||K_recomputed - K_loaded|| per token at layer 1."""
        kv = self.blend.kv.clone()
        ctx = self.context_end
        loaded_k1 = self.blend.kv.keys[1][:ctx]
        got = {}

        def grab(layer, q, keys, mask):
            if layer == 1:
                got["k"] = keys[:ctx].clone()

        with torch.no_grad():
            self.ref.run(torch.tensor(self.prompt[:ctx]), torch.arange(ctx), kv, num_layers=2,
                         on_layer=grab)
        deviation = (got["k"] - loaded_k1).flatten(1).norm(dim=1)
        base = self.blend.kv.clone()
        base.keys[0], base.values[0] = kv.keys[0], kv.values[0]
        return deviation, base

    @property
    def key_deviation(self) -> torch.Tensor:
        return self._key_deviation[0]

    @property
    def cacheblend_base(self) -> KV:
        return self._key_deviation[1]

    @cached_property
    def kv_deviation(self) -> torch.Tensor:
        ctx = self.context_end
        dev = torch.zeros(ctx)
        for l in range(self.ref.num_layers):
            dev += (self.blend.kv.keys[l][:ctx] - self.full_kv.keys[l][:ctx]).flatten(1).square().sum(1)
            dev += (self.blend.kv.values[l][:ctx] - self.full_kv.values[l][:ctx]).flatten(1).square().sum(1)
        return dev

    @cached_property
    def nll_gradient_estimate(self) -> torch.Tensor:
        """Per context position, the first-order change of the answer's mean NLL if its
        reused K/V (all layers) became full prefill's: sum over layers of
        <dNLL/dK, K_full - K> + <dNLL/dV, V_full - V>, from one backward pass."""
        ctx = self.context_end
        keys = [k[:ctx].clone().requires_grad_(True) for k in self.blend.kv.keys]
        values = [v[:ctx].clone().requires_grad_(True) for v in self.blend.kv.values]
        nll = self.ref.answer_nll(self.prompt, KV(list(keys), list(values)), ctx, self.answer,
                                  grad=True)
        grads = torch.autograd.grad(nll, keys + values)
        est = torch.zeros(ctx)
        n = self.ref.num_layers
        for l in range(n):
            est += (grads[l] * (self.full_kv.keys[l][:ctx] - keys[l].detach())).flatten(1).sum(1)
            est += (grads[n + l] * (self.full_kv.values[l][:ctx] - values[l].detach())).flatten(1).sum(1)
        return est


@torch.no_grad()
def question_attention(ref: HFReference, prompt: list[int], kv: KV, context_end: int,
                       query_positions: torch.Tensor) -> torch.Tensor:
    """Attention probabilities [L, rows, H, context_end] of the prompt's tokens at
    `query_positions` (sorted, after the context) to the context, at every layer: the
    rows attend over the context's KV in kv and over each other only (the tokens between
    context and rows are not there). The softmax normalizes over all of that, the rows'
    own keys included."""
    end = int(query_positions.max()) + 1
    work = kv.clone(end)
    visible = torch.zeros(end, dtype=torch.bool)
    visible[:context_end] = True
    visible[query_positions] = True
    group = ref.num_heads // ref.kv_heads
    out = []

    def grab(layer, q, keys, mask):
        scores = torch.einsum("nhd,mhd->nhm", q, keys.repeat_interleave(group, dim=1)) * ref.scale
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        out.append(torch.softmax(scores, -1)[..., :context_end])

    ref.run(torch.tensor(prompt)[query_positions], query_positions, work, visible=visible, on_layer=grab)
    return torch.stack(out)


def attn_norm(attention: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """infoflow's score from attention [L, rows, H, ctx]: per layer the L2 norm over rows
    of the head-averaged probability, averaged over `layers`."""
    return attention[layers].mean(2).norm(dim=1).mean(0)


# -- the selectors ---------------------------------------------------------------------------
# A selector maps (question, budget k) to (positions, base cache or None for the plain
# blend): cacheblend's positions are recomputed over its layer-0-recomputed cache.
Selection = tuple[torch.Tensor, "KV | None"]
SELECTORS: dict[str, Callable[[Question, int], Selection]] = {}


def register(name: str):
    def deco(fn):
        SELECTORS[name] = fn
        return fn

    return deco


@register("none")
def _none(q: Question, k: int) -> Selection:
    return q.candidates[:0], None


@register("random")
def _random(q: Question, k: int, seed: int = 0) -> Selection:
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(q.num_candidates, generator=gen)[:k]
    return torch.sort(q.candidates[perm]).values, None


@register("epic")
def _epic(q: Question, k: int) -> Selection:
    spans = q.blend.candidate_spans
    total = sum(e - s for s, e in spans)
    picks = [torch.arange(s, s + min(e - s, (k * (e - s)) // total)) for s, e in spans]
    return torch.cat(picks), None


@register("cacheblend")
def _cacheblend(q: Question, k: int) -> Selection:
    return top_k(q.candidates, q.key_deviation[q.candidates], k), q.cacheblend_base


@register("infoflow")
def _infoflow(q: Question, k: int) -> Selection:
    return top_k(q.candidates, q.infoflow_score[q.candidates], k), None


@register("oracle-kv")
def _oracle_kv(q: Question, k: int) -> Selection:
    return top_k(q.candidates, q.kv_deviation[q.candidates], k), None


@register("ceiling")
def _ceiling(q: Question, k: int) -> Selection:
    # Most negative estimated change first: the largest predicted drop of the NLL.
    return top_k(q.candidates, -q.nll_gradient_estimate[q.candidates], k), None


def select(name: str, q: Question, ratio: float) -> Selection:
    k = budget_for(q.num_candidates, ratio)
    if k >= q.num_candidates:
        return q.candidates, None
    if k <= 0:
        return q.candidates[:0], None
    return SELECTORS[name](q, k)
