"""patches/declaration_guard on a stand-in serving class: a kvflow declaration that
cannot cross a process boundary gets the class's own error response, everything else
reaches the wrapped entry point untouched (the real server: test_server_bad_input.py)."""
from __future__ import annotations

import asyncio
import types

import pytest

from vllm_kvflow.patches.declaration_guard import _patch, declaration_error


class _Request:
    def __init__(self, kv_transfer_params):
        self.kv_transfer_params = kv_transfer_params


class _Serving:
    calls: list = []

    @staticmethod
    def create_error_response(message, err_type="BadRequestError", status_code=400, param=None):
        return ("error", status_code, message, param)

    async def create_completion(self, request, raw_request=None):
        self.calls.append(request)
        return "served"


@pytest.fixture
def serving():
    cls = type("Serving", (_Serving,), {"calls": []})
    module = types.SimpleNamespace(Serving=cls)
    _patch("Serving", "create_completion")(module)
    _patch("Serving", "create_completion")(module)  # the plugin may load twice: one guard
    return cls()


def _call(serving, params, **kwargs):
    request = _Request(params)
    if kwargs.pop("as_keyword", False):
        return asyncio.run(serving.create_completion(request=request))
    return asyncio.run(serving.create_completion(request, None))


GOOD = {"kvflow": {"chunks": [{"text": "Zorbia"}, {"span": [0, 4]}], "namespace": "Zürich"}}


@pytest.mark.parametrize("params", [GOOD, None, {}, {"other": "\ud800"}, "not a dict",
                                    {"kvflow": {"chunks": "not a list"}}])
def test_everything_transportable_or_not_ours_is_served(serving, params):
    # Malformed but transportable declarations fall back in the engine, with a reason.
    assert _call(serving, params) == "served" and len(serving.calls) == 1


@pytest.mark.parametrize("params,message", [
    ({"kvflow": {"chunks": [{"text": "\ud800"}]}},
     r"kv_transfer_params.kvflow.chunks[0].text: not valid Unicode text (lone surrogate '\ud800'"),
    ({"kvflow": {"chunks": [{"text": "a"}], "question": {"text": "q\udfff"}}},
     "kv_transfer_params.kvflow.question.text: not valid Unicode"),
    ({"kvflow": {"chunks": [{"text": "a"}], "namespace": "\udc00"}},
     "kv_transfer_params.kvflow.namespace: not valid Unicode"),
    ({"kvflow": {"chunks": [{"text": "a"}], "\ud800": 1}},
     "kv_transfer_params.kvflow (a key): not valid Unicode"),
    ({"kvflow": {"chunks": [{"span": [[[0]], 4]}]}},
     "kv_transfer_params.kvflow.chunks[0].span[0]: nested more than 4 levels"),
    ({"kvflow": {"chunks": [{"text": "x" * (9 << 20)}]}},
     "kv_transfer_params.kvflow: larger than 8 MiB"),
])
def test_untransportable_declarations_get_the_error_response(serving, params, message):
    kind, status, text, param = _call(serving, params)
    assert (kind, status, param) == ("error", 400, "kv_transfer_params")
    assert text.startswith(message), text
    text.encode("ascii")  # the message itself must cross the wire
    assert serving.calls == []


def test_a_900_deep_value_is_refused_and_the_request_keyword_is_found(serving):
    deep: list = []
    for _ in range(900):
        deep = [deep]
    assert _call(serving, {"kvflow": deep}, as_keyword=True)[0] == "error"
    assert declaration_error({"kvflow": deep}).startswith("kv_transfer_params.kvflow[0][0][0][0]: nested")


def test_a_class_without_the_entry_point_is_left_alone(caplog):
    module = types.SimpleNamespace(Serving=type("Serving", (), {}))
    _patch("Serving", "create_completion")(module)
    assert not hasattr(module.Serving, "create_completion")
    assert "not checked" in caplog.text
