"""Limits on what one request may declare: the chunk count and minimum chunk length
settings, and the transport checks (nesting, size, valid Unicode) that the API server
and the parser share."""
import pytest

from vllm_kvflow.config import KVFlowConfig
from vllm_kvflow.request import (MAX_DECLARATION_BYTES, MAX_NESTING, RequestError,
                                 check_transportable, parse_request)

PROMPT = list(range(1000, 1400))  # 400 distinct token ids


def _parse(params, **settings):
    # Any text is the prompt's token 39 (only the question is declared by text here).
    return parse_request(params, PROMPT, KVFlowConfig(**settings), tokenize=lambda t: [PROMPT[39]])


# -- chunk count ------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["chunks", "chunk_spans"])
def test_chunk_count_up_to_max_chunks_is_accepted_and_one_more_falls_back(form):
    def declaration(n):
        spans = [[4 * i, 4 * i + 2] for i in range(n)]
        if form == "chunks":
            return {"chunks": [{"span": s} for s in spans]}
        return {"chunk_spans": [x for s in spans for x in s]}

    spec = _parse(declaration(50), max_chunks=50, min_chunk_tokens=2)
    assert len(spec.chunks) == 50
    with pytest.raises(RequestError, match="51 chunks declared, more than max_chunks=50"):
        _parse(declaration(51), max_chunks=50, min_chunk_tokens=2)


def test_chunk_count_is_checked_before_any_chunk_is_tokenized():
    calls = []

    def tokenize(text):
        calls.append(text)
        return [1000]

    with pytest.raises(RequestError, match="max_chunks"):
        parse_request({"chunks": [{"text": "a"}] * 11}, PROMPT, KVFlowConfig(max_chunks=10), tokenize)
    assert calls == []


def test_five_thousand_one_token_chunks_fall_back_under_the_default_limit():
    """5,000 one-token chunks over a 3,000-token prompt, as in the amplification report."""
    prompt = list(range(3000))
    params = {"chunks": [{"token_ids": [t]} for t in range(5000)]}
    with pytest.raises(RequestError, match="5000 chunks declared, more than max_chunks=1024"):
        parse_request(params, prompt, KVFlowConfig())
    # Within the count, one-token chunks are all too short: the same fallback, another reason.
    params = {"chunks": [{"token_ids": [t]} for t in range(1000)]}
    with pytest.raises(RequestError, match="no chunk of at least min_chunk_tokens=16"):
        parse_request(params, prompt, KVFlowConfig())


# -- minimum chunk length ---------------------------------------------------------------------
def test_short_chunks_are_listed_by_declaration_index_and_left_to_prefill():
    # Declared out of prompt order: indices are the declaration's, not the prompt's.
    params = {"chunks": [{"span": [100, 120]}, {"span": [10, 25]}, {"span": [30, 46]},
                         {"token_ids": PROMPT[60:63]}, {"token_ids": [5]}]}
    spec = _parse(params, min_chunk_tokens=16)
    assert spec.chunks == [(30, 46), (100, 120)]
    assert spec.too_short == [1, 3] and spec.unlocatable == [4]
    assert spec.num_chunk_tokens == 36 and spec.question == (120, 400)


def test_chunk_of_exactly_the_minimum_is_kept():
    assert _parse({"chunks": [{"span": [0, 16]}]}, min_chunk_tokens=16).chunks == [(0, 16)]
    assert _parse({"chunks": [{"span": [0, 15]}, {"span": [20, 40]}]},
                  min_chunk_tokens=16).too_short == [0]


def test_last_chunk_is_measured_after_it_gives_up_the_prompts_last_token():
    spec = _parse({"chunks": [{"span": [0, 20]}, {"span": [384, 400]}]}, min_chunk_tokens=16)
    assert spec.chunks == [(0, 20)] and spec.too_short == [1]
    spec = _parse({"chunks": [{"span": [0, 20]}, {"span": [399, 400]}]}, min_chunk_tokens=1)
    assert spec.chunks == [(0, 20)] and spec.too_short == [1]


def test_only_short_chunks_fall_back_with_both_lists_in_the_reason():
    with pytest.raises(RequestError, match=r"too short: \[0, 2\], unlocatable: \[1\]"):
        _parse({"chunks": [{"span": [0, 4]}, {"token_ids": [1]}, {"span": [10, 20]}]},
               min_chunk_tokens=16)


def test_overlap_is_reported_even_between_short_chunks():
    with pytest.raises(RequestError, match="overlap"):
        _parse({"chunks": [{"span": [0, 10]}, {"span": [5, 15]}]}, min_chunk_tokens=16)


@pytest.mark.parametrize("name", ["max_chunks", "min_chunk_tokens"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True, "8", None])
def test_limit_settings_must_be_positive_integers(name, value):
    with pytest.raises(ValueError, match=name):
        KVFlowConfig(**{name: value})


def test_limit_settings_round_trip_through_extra_config():
    cfg = KVFlowConfig(max_chunks=7, min_chunk_tokens=3)
    assert KVFlowConfig.from_extra_config(cfg.to_extra_config()) == cfg


# -- transport: nesting, size, Unicode -----------------------------------------------------------
LONE = ["\ud800", "\udfff", "ok\udc80ok"]


@pytest.mark.parametrize("bad", LONE)
@pytest.mark.parametrize("place,where", [
    (lambda s: {"chunks": [{"text": s}]}, "kvflow.chunks[0].text"),
    (lambda s: {"chunks": [{"text": "fine"}, {"text": s}]}, "kvflow.chunks[1].text"),
    (lambda s: {"chunks": [{"span": [0, 20]}], "question": {"text": s}}, "kvflow.question.text"),
    (lambda s: {"chunks": [{"span": [0, 20]}], "namespace": s}, "kvflow.namespace"),
    (lambda s: {"chunks": [{"span": [0, 20]}], "method": s}, "kvflow.method"),
    (lambda s: {"chunks": [{"span": [0, 20]}], s: 1}, "kvflow (a key)"),
    (lambda s: {"chunks": [{s: [0, 20]}]}, "kvflow.chunks[0] (a key)"),
    (lambda s: {"chunks": [{"span": [0, s]}]}, "kvflow.chunks[0].span[1]"),
    (lambda s: s, "kvflow"),
])
def test_strings_that_are_not_unicode_are_rejected_wherever_they_are(bad, place, where):
    params = place(bad)
    for check in (check_transportable, lambda p: _parse(p)):
        with pytest.raises(RequestError, match="lone surrogate") as e:
            check(params)
        assert str(e.value).startswith(where + ":"), str(e.value)


def test_valid_non_ascii_text_passes():
    check_transportable({"chunks": [{"text": "Zürich, 東京, emoji \U0001F600"}], "namespace": "ß"})


def test_the_deepest_valid_declarations_pass():
    for params in ({"chunks": [{"span": [0, 20]}], "question": {"span": [30, 40]}},
                   {"chunks": [[0, 20]]}, {"chunk_spans": [0, 20]},
                   {"chunks": [{"token_ids": PROMPT[:20]}], "question": {"text": "q"}}):
        check_transportable(params)
        _parse(params)


@pytest.mark.parametrize("depth", [MAX_NESTING + 1, 50, 900, 100_000])
def test_values_nested_deeper_than_any_declaration_are_rejected_without_recursion(depth):
    deep = [0]
    for _ in range(depth - 1):
        deep = [deep]
    with pytest.raises(RequestError, match=f"nested more than {MAX_NESTING} levels"):
        check_transportable(deep)
    params = {"chunks": [{"span": [0, 20]}], "extra": deep}
    with pytest.raises(RequestError, match=r"kvflow\.extra\[0\]\[0\].*nested"):
        _parse(params)


def test_size_is_bounded():
    fits = MAX_DECLARATION_BYTES - 200
    check_transportable({"chunks": [{"text": "x" * fits}]})
    with pytest.raises(RequestError, match="larger than 8 MiB"):
        check_transportable({"chunks": [{"text": "x" * (MAX_DECLARATION_BYTES + 1)}]})
    with pytest.raises(RequestError, match="larger than 8 MiB"):
        check_transportable({"chunks": [{"token_ids": [1] * (MAX_DECLARATION_BYTES // 8 + 1)}]})
    many = [{"text": "y" * 100} for _ in range(MAX_DECLARATION_BYTES // 100)]
    with pytest.raises(RequestError, match="larger than 8 MiB"):
        check_transportable({"chunks": many})


def test_multibyte_text_counts_its_utf8_bytes():
    third = MAX_DECLARATION_BYTES // 3 + 10  # "東" is 3 bytes in UTF-8
    with pytest.raises(RequestError, match="larger than"):
        check_transportable({"chunks": [{"text": "東" * third}]})
