import pytest
import torch

from vllm_kvflow.blend.selection import (SelectionInput, budget_for, select,
                                         select_by_position_quotas, span_quotas, span_starts,
                                         top_k_positions)
from vllm_kvflow.config import KVFlowConfig, resolve_layers
from vllm_kvflow.request import RequestError, find_subsequence, parse_request

PROMPT = list(range(100, 140))
# A 40-token toy prompt with chunks of 1-10 tokens; the minimum chunk length is tested
# in test_declaration_limits.py.
CFG = KVFlowConfig(min_chunk_tokens=1)


def test_spans_texts_and_token_ids_are_located_in_order():
    tokenize = lambda text: [int(x) for x in text.split()]
    spec = parse_request({"chunks": [{"span": [2, 5]}, {"token_ids": [110, 111]}, {"text": "120 121 122"}],
                          "method": "none"}, PROMPT, CFG, tokenize)
    assert spec.chunks == [(2, 5), (10, 12), (20, 23)]
    assert spec.question == (23, 40) and spec.method == "none" and spec.ratio == CFG.recompute_ratio


def test_unlocatable_chunks_are_reported_not_dropped_silently():
    spec = parse_request({"chunks": [{"token_ids": [101]}, {"token_ids": [7, 8]}]}, PROMPT, CFG)
    assert spec.chunks == [(1, 2)] and spec.unlocatable == [1]


@pytest.mark.parametrize("bad", [
    {"chunks": [{"span": [5, 3]}]}, {"chunks": [{"span": [0, 41]}]}, {"chunks": [[1, 4], [3, 6]]},
    {"chunks": []}, {"chunks": [{"text": ""}]}, {"chunks": [{"span": [1, 2]}], "ratio": -0.1},
    {"chunks": [{"span": [1, 2]}], "method": "best"}, {"chunks": [{"span": [1, 2]}], "x": 1},
    {"chunks": [{"token_ids": [999]}]}, "not a dict", {"chunks": [{"span": [True, 3]}]},
    {"chunks": [{"span": [1, 2]}], "question": {"span": [0, 1]}},
])
def test_malformed_declarations_raise_request_error(bad):
    with pytest.raises(RequestError):
        parse_request(bad, PROMPT, CFG, tokenize=lambda t: [])


def test_flat_chunk_spans_equal_span_chunks():
    flat = parse_request({"chunk_spans": [2, 5, 10, 12, 20, 23]}, PROMPT, CFG)
    spans = parse_request({"chunks": [{"span": [2, 5]}, [10, 12], {"span": [20, 23]}]}, PROMPT, CFG)
    assert flat == spans and flat.chunks == [(2, 5), (10, 12), (20, 23)]


@pytest.mark.parametrize("bad", [
    {"chunk_spans": [2, 5, 10]}, {"chunk_spans": []}, {"chunk_spans": [[2, 5]]},
    {"chunk_spans": [5, 2]}, {"chunk_spans": [2, 5], "chunks": [{"span": [7, 9]}]},
    {"chunk_spans": [2, 5, 4, 8]}, {"chunk_spans": "2 5"}, {"method": "none"},
])
def test_malformed_chunk_spans_raise_request_error(bad):
    with pytest.raises(RequestError):
        parse_request(bad, PROMPT, CFG)


def test_chunk_covering_the_last_token_is_clipped():
    spec = parse_request({"chunks": [{"span": [30, 40]}]}, PROMPT, CFG)
    assert spec.chunks == [(30, 39)]


def test_find_subsequence():
    assert find_subsequence([1, 2, 3, 2, 3], [2, 3], 2) == 3
    assert find_subsequence([1, 2], [3]) == -1 and find_subsequence([1], []) == -1


def test_config_rejects_unknown_and_invalid_settings():
    with pytest.raises(ValueError, match="unknown"):
        KVFlowConfig.from_extra_config({"ratio": 0.2})
    with pytest.raises(ValueError):
        KVFlowConfig(recompute_ratio=1.5)
    with pytest.raises(ValueError, match="debug_selection"):
        KVFlowConfig(debug_selection="yes")
    assert KVFlowConfig.from_extra_config({"debug_selection": True}).debug_selection
    assert KVFlowConfig.from_extra_config(KVFlowConfig(sink_token_ids=[1, 2]).to_extra_config()) \
        == KVFlowConfig(sink_token_ids=(1, 2))


def test_scoring_layers_default_and_fractions():
    assert resolve_layers(None, 30) == [21, 22, 23, 24]
    assert resolve_layers(None, 32) == [22, 23, 24, 25]  # the paper's default
    assert resolve_layers((0.5, 10), 30) == [10, 15]
    with pytest.raises(ValueError):
        resolve_layers((30,), 30)


def _inp(budget, signal=None):
    cand = torch.cat([torch.arange(10, 20), torch.arange(30, 40)])
    return SelectionInput(cand, [(10, 20), (30, 40)], budget, seed=3, signal=signal)


@pytest.mark.parametrize("method", ["none", "random", "epic", "infoflow", "cacheblend"])
def test_ratio_one_selects_every_candidate(method):
    inp = _inp(budget_for(20, 1.0), signal=torch.rand(40))
    assert torch.equal(select(method, inp), inp.candidates)


@pytest.mark.parametrize("method", ["infoflow", "cacheblend", "random", "epic"])
def test_zero_budget_selects_nothing_without_a_signal(method):
    # A prefix-cache hit can leave fewer than 1/ratio candidates: budget 0, no scoring
    # ran (signal None). Seen under load through the server: infoflow raised TypeError.
    inp = SelectionInput(torch.arange(10, 15), [(10, 15)], budget_for(5, 0.15))
    assert inp.budget == 0 and select(method, inp).numel() == 0


def test_budget_is_a_floor():
    assert budget_for(20, 0.15) == 3 and budget_for(7, 1.0) == 7 and budget_for(3, 0.0) == 0


def test_infoflow_takes_top_scores_sorted_by_position_with_deterministic_ties():
    signal = torch.zeros(40)
    signal[[35, 12, 18]] = torch.tensor([3.0, 2.0, 2.0])
    assert select("infoflow", _inp(3, signal)).tolist() == [12, 18, 35]
    tie = top_k_positions(torch.arange(5), torch.ones(5), 2)
    assert tie.tolist() == [0, 1]


def test_infoflow_kdev_ranks_both_signals_among_candidates():
    attn, kdev = torch.zeros(40), torch.zeros(40)
    attn[[11, 12, 33]] = torch.tensor([5.0, 4.0, 9.0])  # attention alone: 33, 11, 12
    kdev[[12, 31, 33]] = torch.tensor([7.0, 9.0, 1.0])  # deviation alone: 31, 12, 33
    attn[0] = 1e9  # not a candidate: must not shift the candidates' ranks
    # Rank sums (of 20 candidates, 0 = smallest): 12 -> 17+18, 33 -> 19+17, 11 -> 18+...
    assert select("infoflow-kdev", _inp(2, (attn, kdev))).tolist() == [12, 33]
    assert select("infoflow-kdev", _inp(20, (attn, kdev))).numel() == 20  # exact limit


def test_infoflow_dev_needs_both_attention_and_deviation():
    attn, kdev = torch.zeros(40), torch.zeros(40)
    attn[[11, 12, 33]] = torch.tensor([5.0, 4.0, 9.0])
    kdev[[12, 31, 33]] = torch.tensor([7.0, 9.0, 1.0])
    # Products: 12 -> 28, 33 -> 9, 11 -> 0, 31 -> 0. The largest attention (33) loses to a
    # token that is both read and wrong; one read but exact (11) or wrong but unread (31)
    # is worth nothing.
    assert select("infoflow-dev", _inp(2, (attn, kdev))).tolist() == [12, 33]
    assert select("infoflow-dev", _inp(1, (attn, kdev))).tolist() == [12]
    assert select("infoflow-dev", _inp(20, (attn, kdev))).numel() == 20  # exact limit


def test_infoflow_pos_weights_by_the_start_of_the_span():
    signal = torch.zeros(40)
    signal[[12, 33]] = torch.tensor([2.0, 1.0])  # spans start at 10 and 30: 20 < 30
    assert select("infoflow-pos", _inp(1, signal)).tolist() == [33]
    assert select("infoflow", _inp(1, signal)).tolist() == [12]
    inp = _inp(3)
    assert span_starts(inp).tolist() == [10] * 10 + [30] * 10


def test_random_and_epic_respect_budget_and_candidates():
    r = select("random", _inp(5))
    assert r.numel() == 5 and set(r.tolist()) <= set(_inp(5).candidates.tolist())
    assert torch.equal(r, select("random", _inp(5)))  # seeded
    assert select("epic", _inp(6)).tolist() == [10, 11, 12, 30, 31, 32]


def test_reordered_layout_moves_chunks_and_keeps_glue():
    from vllm_kvflow.blend.pipeline import reordered_layout

    ids = [0, 1, 10, 11, 12, 2, 20, 3, 30, 31, 4, 5]
    chunks = [(2, 5), (6, 7), (8, 10)]
    new, spans = reordered_layout(ids, chunks, [2, 0, 1])
    assert new == [0, 1, 30, 31, 2, 10, 11, 12, 3, 20, 4, 5]
    assert spans == [(2, 4), (5, 8), (9, 10)]
    assert sorted(new) == sorted(ids) and len(new) == len(ids)
    for (s, e), src in zip(spans, [2, 0, 1]):
        assert new[s:e] == ids[chunks[src][0]:chunks[src][1]]
    with pytest.raises(ValueError):
        reordered_layout(ids, chunks, [0, 0, 1])


def _quota_reference(inp, power, quota_tokens):
    """The position-quota rule written as loops: each span's top signals up to its
    quota, then the rest of the budget by the global top signal."""
    quota = span_quotas([e - s for s, e in inp.chunks], [float(s) ** power for s, _ in inp.chunks],
                        min(quota_tokens, inp.budget))
    chosen = []
    for (s, e), n in zip(inp.chunks, quota):
        span = [p for p in inp.candidates.tolist() if s <= p < e]
        chosen += sorted(span, key=lambda p: (-float(inp.signal[p]), p))[:n]
    rest = [p for p in inp.candidates.tolist() if p not in chosen]
    chosen += sorted(rest, key=lambda p: (-float(inp.signal[p]), p))[:inp.budget - len(chosen)]
    return sorted(chosen)


@pytest.mark.parametrize("power,quota_share", [(1.0, 1.0), (1.0, 0.5), (2.0, 0.2), (0.0, 1.0)])
def test_position_quotas_match_a_loop_reference(power, quota_share):
    gen = torch.Generator().manual_seed(int(power * 10 + quota_share * 100))
    for trial in range(20):
        # Spans of 1-40 tokens with gaps (the sink, exact tokens) between them.
        lengths = torch.randint(1, 40, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen)
        chunks, start = [], 1
        for n in lengths.tolist():
            chunks.append((start, start + n))
            start += n + int(torch.randint(0, 3, (1,), generator=gen))
        cand = torch.cat([torch.arange(s, e) for s, e in chunks])
        # Coarse signal values, so that ties occur and their order is checked too.
        signal = torch.randint(0, 6, (start,), generator=gen).float()
        for budget in (1, cand.numel() // 7, cand.numel() // 3, cand.numel() - 1):
            inp = SelectionInput(cand, chunks, budget, signal=signal)
            quota = int(quota_share * cand.numel())
            got = select_by_position_quotas(inp, power, quota).tolist()
            assert got == _quota_reference(inp, power, quota), (trial, budget, chunks)
            assert len(got) == budget == len(set(got))


def test_position_quotas_give_later_spans_more():
    signal = torch.zeros(40)
    signal[10:20] = 5.0  # the early span is where the signal is high
    inp = _inp(6, signal)  # spans (10, 20) and (30, 40): weights 10 and 30 at power 1
    picks = select_by_position_quotas(inp, 1.0, 6).tolist()
    assert sum(p >= 30 for p in picks) == 4 and sum(p < 20 for p in picks) == 2
    assert select("infoflow", inp).tolist() == list(range(10, 16))


def test_span_quotas_sum_to_the_budget_and_respect_lengths():
    assert span_quotas([10, 2, 30], [1.0, 1.0, 1e9], 35) == [4, 1, 30]  # a full span passes on
    assert span_quotas([5, 5], [0.0, 0.0], 4) == [2, 2]  # no weight: even
    assert span_quotas([5, 5], [1.0, 1.0], 100) == [5, 5]
    assert span_quotas([3, 0, 4], [1.0, 1.0, 1.0], 7) == [3, 0, 4]
