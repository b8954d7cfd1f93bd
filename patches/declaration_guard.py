"""Refuse at the API server, with HTTP 400, a kvflow declaration that vLLM's transport
cannot carry to the engine core.

A request's `kv_transfer_params` leaves the API-server process through vLLM's msgpack
encoder and may be pickled on the way. A string holding a lone surrogate ("\\ud800",
valid JSON) makes the encoder raise UnicodeEncodeError: HTTP 500, or a 200 stream that
only carries an error event. A value nested hundreds deep makes pickling raise
RecursionError inside the engine core, which dies and takes the server with it. A request
naming `kvflow` is ours to validate: its declaration goes through
`request.check_transportable` (nesting, size, valid Unicode) before the request is
rendered or sent, and a failure returns vLLM's own 400 ErrorResponse, streamed or not
(the routes check for an ErrorResponse before they open a stream).

The serving entry points are the same on vLLM 0.26 and 0.32 (module, class and method
names, and `create_error_response(message, err_type, status_code, param)`); Anthropic's
/v1/messages goes through OpenAIServingChat.create_chat_completion. They are patched when
their modules are imported (patches/import_hooks), so only the API server is touched.
"""
from __future__ import annotations

import functools
import logging

from vllm_kvflow.patches.import_hooks import when_imported
from vllm_kvflow.request import PARAMS_KEY, RequestError, check_transportable

logger = logging.getLogger("vllm_kvflow")

_TARGETS = (
    ("vllm.entrypoints.openai.completion.serving", "OpenAIServingCompletion", "create_completion"),
    ("vllm.entrypoints.openai.chat_completion.serving", "OpenAIServingChat",
     "create_chat_completion"),
    ("vllm.entrypoints.openai.responses.serving", "OpenAIServingResponses", "create_responses"),
)
_PARAM = "kv_transfer_params"


def declaration_error(kv_transfer_params) -> str | None:
    """Why the request's kvflow declaration cannot cross a process boundary, or None
    (also None for requests that do not name kvflow: those are not ours to judge)."""
    if not isinstance(kv_transfer_params, dict) or PARAMS_KEY not in kv_transfer_params:
        return None
    try:
        check_transportable(kv_transfer_params[PARAMS_KEY], root=f"{_PARAM}.{PARAMS_KEY}")
    except RequestError as e:
        return str(e)  # ASCII-safe: offending characters are spelled as escapes
    return None


def _guard(method):
    @functools.wraps(method)
    async def guarded(self, *args, **kwargs):
        request = args[0] if args else kwargs.get("request")
        error = declaration_error(getattr(request, _PARAM, None))
        if error is not None:
            logger.warning("kvflow: request refused (HTTP 400): %s", error)
            return self.create_error_response(error, param=_PARAM)
        return await method(self, *args, **kwargs)

    guarded.__kvflow_declaration_guard__ = True
    return guarded


def _patch(cls_name: str, attr: str):
    def patch(module) -> None:
        cls = getattr(module, cls_name, None)
        method = getattr(cls, attr, None)
        if method is None or not hasattr(cls, "create_error_response"):
            logger.warning("kvflow: no %s.%s (or no create_error_response); kvflow "
                           "declarations are not checked before they reach the engine",
                           cls_name, attr)
            return
        if getattr(method, "__kvflow_declaration_guard__", False):
            return
        setattr(cls, attr, _guard(method))

    patch.__qualname__ = f"declaration_guard.{cls_name}.{attr}"
    return patch


def install() -> None:
    """Guard the serving entry points when (and where) their modules are imported."""
    for module_name, cls_name, attr in _TARGETS:
        when_imported(module_name, _patch(cls_name, attr))
