"""An independent reference of the blend, in Hugging Face transformers (float32, CPU).

It shares no code with the engine's blend (vllm_kvflow.blend, the connector, the
kernels): it is what the engine is tested against (tests/engine/test_blend_reference.py)
and the fast evaluator of the quality diagnostics (bench/ceiling.py, the selection
experiments under benchmarks/). The model's own modules (embedding, norms, the q/k/v/o
projections, the rotary frequencies, the MLP, the head) are called step by step; the
KV cache, the attention with its mask and the blend are written here.

The blend of a prompt whose context [0, context_end) is cut into chunks and glue:
- a chunk is computed in isolation behind the sink (the BOS token) at positions
  0..len(sink)+n-1 and its keys are re-rotated to the chunk's place in the prompt
  (RoPE composes: rotating by the position delta moves a key to the new position);
- glue (the tokens before, between the chunks: chat header, separators) at the
  prompt's start is computed with nothing before it, which is exact; elsewhere it is
  computed behind the sink like a chunk;
- every reused token whose KV is not exact (a candidate) may be recomputed: the chosen
  positions run through the layers one layer at a time, each writing its new K/V into
  the mixed cache and attending over it with the mask key_pos <= query_pos;
- the rest of the prompt (question, generation prompt) is then prefilled over that cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class KV:
    """Per-layer keys and values by absolute position: keys[l] is [N, Hkv, D], RoPE applied."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def empty(cls, num_layers: int, length: int, kv_heads: int, head_dim: int) -> "KV":
        z = lambda: torch.zeros(length, kv_heads, head_dim)  # noqa: E731
        return cls([z() for _ in range(num_layers)], [z() for _ in range(num_layers)])

    @property
    def length(self) -> int:
        return self.keys[0].shape[0]

    def clone(self, length: int | None = None) -> "KV":
        """A copy holding `length` positions (the first ones, zero-padded if longer)."""
        n = self.length if length is None else length

        def cut(t):
            if n <= t.shape[0]:
                return t[:n].clone()
            return torch.cat([t, t.new_zeros(n - t.shape[0], *t.shape[1:])])

        return KV([cut(k) for k in self.keys], [cut(v) for v in self.values])


@dataclass
class Segment:
    """A piece of the context: [start, end) and how its KV was made."""

    start: int
    end: int
    is_chunk: bool
    exact: bool  # computed exactly where it sits (glue at the prompt's start)


@dataclass
class Blend:
    """The mixed cache of one prompt before any recompute, and its candidates."""

    kv: KV  # positions [0, context_end)
    segments: list[Segment]
    context_end: int

    @property
    def candidate_spans(self) -> list[tuple[int, int]]:
        return [(s.start, s.end) for s in self.segments if not s.exact]

    @property
    def candidates(self) -> torch.Tensor:
        spans = self.candidate_spans
        if not spans:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([torch.arange(a, b) for a, b in spans])


def context_segments(chunks: list[tuple[int, int]]) -> list[tuple[int, int, bool]]:
    """[0, end of the last chunk) as (start, end, is_chunk): the chunks and the glue
    runs before and between them."""
    out, cursor = [], 0
    for c0, c1 in chunks:
        if not cursor <= c0 < c1:
            raise ValueError(f"chunk spans must be sorted, non-empty and disjoint: {chunks}")
        if cursor < c0:
            out.append((cursor, c0, False))
        out.append((c0, c1, True))
        cursor = c1
    return out


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class HFReference:
    """SmolLM2 (or any Llama-family checkpoint without q/k norms) in transformers, with a
    position-addressed KV cache and the blend on top."""

    def __init__(self, model=None):
        """model: a LlamaForCausalLM, or the path of one (default: the embedded
        SmolLM2-135M-Instruct); run in float32."""
        from transformers import LlamaForCausalLM

        if model is None:
            from vllm_kvflow.model import default_model_path

            model = str(default_model_path())
        if isinstance(model, str):
            model = LlamaForCausalLM.from_pretrained(model, dtype=torch.float32)
        self.model = model.float().eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        cfg = self.model.config
        self.config = cfg
        self.layers = self.model.model.layers
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim ** -0.5
        self.bos = cfg.bos_token_id

    # -- primitives -----------------------------------------------------------------------
    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n, 1, D] of RoPE at `positions` (any integers, negative too)."""
        rotary = self.model.model.rotary_emb
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions[None].float())
        return cos[0, :, None], sin[0, :, None]

    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [n, H, D] rotated to `positions` (neox style: the halves pair up)."""
        cos, sin = self.cos_sin(positions)
        return x * cos + rotate_half(x) * sin

    def empty_kv(self, length: int) -> KV:
        return KV.empty(self.num_layers, length, self.kv_heads, self.head_dim)

    def run(self, ids: torch.Tensor, positions: torch.Tensor, kv: KV, *, visible=None,
            num_layers: int | None = None, on_layer=None, in_place: bool = True) -> torch.Tensor:
        """Run tokens `ids` at `positions` (sorted) through the layers, each layer writing
        their K/V into kv at those positions and attending over kv's positions
        [0, max(positions)] with the mask key_pos <= query_pos (and `visible`, a bool
        [N] of key positions that exist, when given). Every position below the largest
        one must hold valid KV or be among `positions`.

        in_place=False replaces kv's tensors with written copies instead of writing into
        them (autograd through the cache). on_layer(l, q, keys, mask) sees each layer's
        rotated queries [n, H, D], keys [N', Hkv, D] and mask [n, N'].
        Returns the final-norm hidden states [n, hidden]."""
        n_layers = self.num_layers if num_layers is None else num_layers
        hidden = self.model.model.embed_tokens(ids)
        end = int(positions.max()) + 1
        key_pos = torch.arange(end)
        mask = key_pos[None, :] <= positions[:, None]
        if visible is not None:
            mask = mask & visible[None, :end]
        cos, sin = self.cos_sin(positions)
        n = ids.numel()
        for l in range(n_layers):
            layer = self.layers[l]
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(n, self.num_heads, self.head_dim)
            k = attn.k_proj(x).view(n, self.kv_heads, self.head_dim)
            v = attn.v_proj(x).view(n, self.kv_heads, self.head_dim)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            if in_place:
                kv.keys[l].index_copy_(0, positions, k)
                kv.values[l].index_copy_(0, positions, v)
            else:
                kv.keys[l] = kv.keys[l].index_copy(0, positions, k)
                kv.values[l] = kv.values[l].index_copy(0, positions, v)
            keys, values = kv.keys[l][:end], kv.values[l][:end]
            if on_layer is not None:
                on_layer(l, q, keys, mask)
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                attn_mask=mask, scale=self.scale, enable_gqa=True)
            hidden = hidden + attn.o_proj(out[0].transpose(0, 1).reshape(n, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.model.model.norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)

    # -- full prefill and isolated pieces ---------------------------------------------------
    @torch.no_grad()
    def prefill(self, ids: list[int], length: int | None = None) -> tuple[KV, torch.Tensor]:
        """Plain prefill of `ids` at positions 0..: (KV, final hidden states)."""
        n = len(ids)
        kv = self.empty_kv(max(n, length or 0))
        hidden = self.run(torch.tensor(ids), torch.arange(n), kv)
        return kv, hidden

    @torch.no_grad()
    def isolated(self, ids: list[int], prefix: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [L, n, Hkv, D] of `ids` computed behind `prefix` at positions 0..,
        keys rotated to their local positions len(prefix)..len(prefix)+n-1."""
        kv, _ = self.prefill(list(prefix) + list(ids))
        s = len(prefix)
        return torch.stack([k[s:] for k in kv.keys]), torch.stack([v[s:] for v in kv.values])

    @torch.no_grad()
    def at_shifted_positions(self, ids: list[int], prefix: tuple[int, ...],
                             start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [L, n, Hkv, D] of `ids` computed directly at positions start.., behind
        `prefix` placed just before them (nothing else visible): what re-rotating the
        isolated KV by start - len(prefix) must give, RoPE being relative."""
        first = start - len(prefix)
        if first < 0:
            raise ValueError(f"prefix of {len(prefix)} tokens does not fit before {start}")
        total = start + len(ids)
        kv = self.empty_kv(total)
        self.run(torch.tensor(list(prefix) + list(ids)), torch.arange(first, total), kv,
                 visible=torch.arange(total) >= first)
        return torch.stack([k[start:] for k in kv.keys]), torch.stack([v[start:] for v in kv.values])

    def pieces_at_shifted_positions(self, prompt: list[int], chunks: list[tuple[int, int]],
                                    sink: tuple[int, ...] | None = None):
        """(start, end, K, V) of each piece of the context computed where it sits in the
        prompt, behind the sink (glue at the prompt's start: behind nothing)."""
        sink = (self.bos,) if sink is None else tuple(sink)
        for c0, c1, is_chunk in context_segments(chunks):
            prefix = () if c0 == 0 and not is_chunk else sink
            keys, values = self.at_shifted_positions(prompt[c0:c1], prefix, c0)
            yield c0, c1, keys, values

    def rerotate(self, keys: torch.Tensor, delta: int) -> torch.Tensor:
        """Keys [L, n, Hkv, D] moved by `delta` positions: R(p + delta) = R(delta) R(p)."""
        cos, sin = self.cos_sin(torch.tensor([delta]))
        return keys * cos + rotate_half(keys) * sin

    # -- the blend --------------------------------------------------------------------------
    def blend(self, prompt: list[int], chunks: list[tuple[int, int]], sink: tuple[int, ...] | None = None,
              cache: dict | None = None, rerotate: bool = True) -> Blend:
        """The mixed cache of [0, end of the last chunk): each piece's isolated KV, keys
        re-rotated to its place. `cache` (a dict) keeps isolated KV by (prefix, tokens)
        across calls, as the engine's store and glue cache do. rerotate=False leaves the
        keys at their isolated positions (a deliberately wrong blend, for tests)."""
        sink = (self.bos,) if sink is None else tuple(sink)
        context_end = chunks[-1][1]
        kv = self.empty_kv(context_end)
        segments = []
        for c0, c1, is_chunk in context_segments(chunks):
            at_start = c0 == 0 and not is_chunk
            prefix = () if at_start else sink
            # Exact where it sits where it was computed: glue at the prompt's start, or a
            # chunk right after a prompt prefix equal to the sink.
            exact = at_start or (is_chunk and tuple(prompt[:c0]) == sink)
            key = (prefix, tuple(prompt[c0:c1]))
            got = None if cache is None else cache.get(key)
            if got is None:
                got = self.isolated(prompt[c0:c1], prefix)
                if cache is not None:
                    cache[key] = got
            keys, values = got
            if rerotate:
                keys = self.rerotate(keys, c0 - len(prefix))
            for l in range(self.num_layers):
                kv.keys[l][c0:c1] = keys[l]
                kv.values[l][c0:c1] = values[l]
            segments.append(Segment(c0, c1, is_chunk, exact))
        return Blend(kv, segments, context_end)

    @torch.no_grad()
    def recompute(self, prompt: list[int], kv: KV, positions: torch.Tensor) -> None:
        """Recompute the tokens at `positions` (sorted) layer by layer over kv, in place."""
        if positions.numel():
            self.run(torch.tensor(prompt)[positions], positions, kv)

    # -- what the prompt's tail sees ----------------------------------------------------------
    def tail_logits(self, prompt: list[int], kv: KV, context_end: int, answer: list[int] = (),
                    grad: bool = False) -> torch.Tensor:
        """Logits of the prompt's tail [context_end, len(prompt)) plus `answer`, prefilled
        over kv's context: rows predict the token after each tail token. kv is not
        changed (grad=True: differentiable in kv's tensors, which may require grad)."""
        ids = list(prompt[context_end:]) + list(answer)
        total = context_end + len(ids)
        work = KV([_extend(k, total) for k in kv.keys], [_extend(v, total) for v in kv.values])
        with torch.set_grad_enabled(grad):
            hidden = self.run(torch.tensor(ids), torch.arange(context_end, total), work,
                              in_place=False)
            return self.logits(hidden)

    def answer_nll(self, prompt: list[int], kv: KV, context_end: int, answer: list[int],
                   grad: bool = False) -> torch.Tensor:
        """Mean NLL of `answer` teacher-forced after the prompt, over kv's context."""
        logits = self.tail_logits(prompt, kv, context_end, answer[:-1], grad=grad)
        tail = len(prompt) - context_end
        rows = logits[tail - 1: tail - 1 + len(answer)]
        return F.cross_entropy(rows, torch.tensor(answer))

    @torch.no_grad()
    def greedy(self, prompt: list[int], kv: KV, context_end: int, max_tokens: int,
               eos: int | None = None) -> list[int]:
        """Greedy tokens after the prompt over kv's context (kv is not changed); stops
        after `eos` (kept in the answer, as vLLM reports it)."""
        total = len(prompt) + max_tokens
        work = kv.clone(total)
        ids = list(prompt[context_end:])
        positions = torch.arange(context_end, len(prompt))
        out: list[int] = []
        for _ in range(max_tokens):
            hidden = self.run(torch.tensor(ids), positions, work)
            token = int(self.logits(hidden[-1]).argmax())
            out.append(token)
            if token == eos:
                break
            ids, positions = [token], positions[-1:] + 1
        return out


def _extend(t: torch.Tensor, length: int) -> torch.Tensor:
    if t.shape[0] >= length:
        return t[:length]
    return torch.cat([t, t.new_zeros(length - t.shape[0], *t.shape[1:])])
