"""Streamed responses carry the request's kv_transfer_params too.

vLLM 0.32 returns `kv_transfer_params` (where kvflow_stats live) only in non-streamed
responses. Streaming is how a client measures time to first token, so this wraps the
chat and completion stream generators: they see the engine outputs through a tap, and
one extra event `{"object": "<chunk type>", "choices": [], "kv_transfer_params": {...}}`
goes out just before `data: [DONE]` (the same shape as the usage event, so OpenAI
clients accept it). Nothing is held back, so the first token is not delayed.

The serving classes are patched when their modules are imported (patches/import_hooks),
so only the API-server process is touched, however it was started; a vLLM whose
generators lack a `result_generator` parameter is left unpatched.
"""
from __future__ import annotations

import functools
import inspect
import json
import logging

from vllm_kvflow.patches.import_hooks import when_imported

logger = logging.getLogger("vllm_kvflow")

_TARGETS = (
    ("vllm.entrypoints.openai.chat_completion.serving", "OpenAIServingChat",
     "chat_completion_stream_generator"),
    ("vllm.entrypoints.openai.completion.serving", "OpenAIServingCompletion",
     "completion_stream_generator"),
)
_DONE = "data: [DONE]"


def _request_output(item):
    # Completions stream (prompt index, RequestOutput) pairs; chat streams outputs.
    return item[1] if isinstance(item, tuple) else item


def _stats_event(last_event: str | None, params: dict) -> str:
    head = {}
    if last_event and last_event.startswith("data: {"):
        try:
            prev = json.loads(last_event[len("data: "):])
            head = {k: prev[k] for k in ("id", "object", "created", "model") if k in prev}
        except ValueError:
            pass
    return f"data: {json.dumps({**head, 'choices': [], 'kv_transfer_params': params})}\n\n"


def _wrap(method):
    sig = inspect.signature(method)
    if "result_generator" not in sig.parameters:
        return None

    @functools.wraps(method)
    async def stream_with_params(self, *args, **kwargs):
        bound = sig.bind(self, *args, **kwargs)
        inner = bound.arguments["result_generator"]
        captured: dict = {}

        async def tap():
            async for item in inner:
                params = getattr(_request_output(item), "kv_transfer_params", None)
                if params:
                    captured.update(params)  # several prompts: the last one's wins
                yield item

        bound.arguments["result_generator"] = tap()
        last = None
        async for event in method(*bound.args, **bound.kwargs):
            if event.startswith(_DONE) and captured:
                yield _stats_event(last, captured)
            last = event
            yield event

    stream_with_params.__kvflow_patched__ = True
    return stream_with_params


def _patch(cls_name: str, attr: str):
    def patch(module) -> None:
        cls = getattr(module, cls_name, None)
        method = getattr(cls, attr, None)
        if method is None:
            logger.warning("kvflow: no %s.%s; streamed responses will not carry kvflow_stats",
                           cls_name, attr)
            return
        if getattr(method, "__kvflow_patched__", False):
            return
        wrapper = _wrap(method)
        if wrapper is None:
            logger.warning("kvflow: %s.%s has no result_generator; streamed responses "
                           "will not carry kvflow_stats", cls_name, attr)
            return
        setattr(cls, attr, wrapper)

    patch.__qualname__ = f"stream_stats.{cls_name}.{attr}"
    return patch


def install() -> None:
    """Patch the stream generators when (and where) their modules are imported."""
    for module_name, cls_name, attr in _TARGETS:
        when_imported(module_name, _patch(cls_name, attr))
