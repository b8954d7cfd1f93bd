"""A small client for a vLLM server running the kvflow connector (standard library only).

    client = KVFlowClient("http://127.0.0.1:8000")
    client.warm(documents)                       # precompute their KV into the chunk store
    r = client.query("Who founded Quellport?", documents)
    print(r.text, r.ttft_s, r.stats["chunks_hit"])

Requests are chat completions. Documents go into the user message, stripped and
separated by blank lines, each declared as a chunk by its text; the server locates a
chunk by its standalone token ids, so `warm` and `query` produce the same chunk ids and
a query after a warm hits the store. `warm` asks for one token with method `none`: a
miss computes each chunk in isolation and stores it, and nothing is recomputed.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from vllm_kvflow.rag import DEFAULT_INSTRUCTION, passage_text

PARAMS_KEY, STATS_KEY = "kvflow", "kvflow_stats"


class ServerError(RuntimeError):
    """The server answered with an HTTP error; `message` is the server's own."""

    def __init__(self, status: int, message: str, url: str):
        super().__init__(f"HTTP {status} from {url}: {message}")
        self.status, self.message, self.url = status, message, url


@dataclass
class QueryResult:
    text: str
    stats: dict[str, Any]  # kvflow_stats ({} if the server sent none)
    ttft_s: float  # request sent -> first streamed event carrying a choice (the first token)
    latency_s: float  # request sent -> end of stream
    usage: dict[str, Any] = field(default_factory=dict)


def _error_message(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode(errors="replace").strip()[:2000]
    err = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(err, dict):
        return str(err.get("message") or err.get("detail") or err)
    return str(err)


class KVFlowClient:
    def __init__(self, base_url: str, model: str | None = None, timeout_s: float = 600,
                 instruction: str = DEFAULT_INSTRUCTION):
        self.base_url = base_url.rstrip("/")
        self._model = model
        self.timeout_s = timeout_s
        self.instruction = instruction

    # -- HTTP ---------------------------------------------------------------------------
    def _open(self, path: str, body: dict | None = None):
        url = self.base_url + path
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data, {"content-type": "application/json"})
        try:
            return urllib.request.urlopen(req, timeout=self.timeout_s)
        except urllib.error.HTTPError as e:
            raise ServerError(e.code, _error_message(e.read()), url) from None

    def get_json(self, path: str) -> Any:
        with self._open(path) as resp:
            return json.loads(resp.read())

    def post_json(self, path: str, body: dict) -> dict:
        with self._open(path, body) as resp:
            return json.loads(resp.read())

    def stream_events(self, path: str, body: dict) -> Iterator[dict]:
        """The JSON events of a server-sent-event stream, until [DONE]."""
        with self._open(path, {**body, "stream": True}) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                payload = line[len("data:"):].strip()
                if payload == "[DONE]":
                    return
                event = json.loads(payload)
                if "error" in event and "choices" not in event:
                    err = event["error"]
                    raise ServerError(int(err.get("code") or 500), err.get("message", str(err)),
                                      self.base_url + path)
                yield event

    @property
    def model(self) -> str:
        if self._model is None:
            self._model = self.get_json("/v1/models")["data"][0]["id"]
        return self._model

    def metrics_text(self) -> str:
        with self._open("/metrics") as resp:
            return resp.read().decode()

    # -- requests -----------------------------------------------------------------------
    def chat_body(self, documents: Sequence[Any], question: str | None, *, method: str | None = None,
                  ratio: float | None = None, namespace: str | None = None,
                  cache_salt: str | None = None, max_tokens: int = 64) -> dict:
        """The chat request for documents (+ question), chunks declared by text."""
        texts = [passage_text(d).strip() for d in documents]
        if not texts or not all(texts):
            raise ValueError("documents must be a non-empty list of non-empty texts")
        content = "\n\n".join(texts)
        if question is not None:
            content += f"\n\nQuestion: {question}"
        kvflow: dict[str, Any] = {"chunks": [{"text": t} for t in texts]}
        for key, value in (("method", method), ("ratio", ratio), ("namespace", namespace)):
            if value is not None:
                kvflow[key] = value
        body = {"model": self.model, "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "system", "content": self.instruction},
                             {"role": "user", "content": content}],
                "kv_transfer_params": {PARAMS_KEY: kvflow}}
        if cache_salt is not None:
            body["cache_salt"] = cache_salt
        return body

    def warm(self, documents: Sequence[Any], namespace: str | None = None,
             cache_salt: str | None = None, batch_size: int = 4,
             progress: Callable[[int, int], None] | None = None) -> list[dict]:
        """Precompute the documents' KV into the server's chunk store, `batch_size`
        documents per request. Returns each request's kvflow_stats; raises if the
        server could not locate or load a chunk."""
        documents = list(documents)
        results = []
        for i in range(0, len(documents), batch_size):
            batch = documents[i:i + batch_size]
            body = self.chat_body(batch, None, method="none", namespace=namespace,
                                  cache_salt=cache_salt, max_tokens=1)
            out = self.post_json("/v1/chat/completions", body)
            stats = (out.get("kv_transfer_params") or {}).get(STATS_KEY)
            if not stats:
                raise RuntimeError("the server returned no kvflow_stats: is the KVFlowConnector configured?")
            if stats.get("fallback") or stats.get("chunks_unlocatable"):
                raise RuntimeError(f"warm of documents {i}..{i + len(batch) - 1} did not store every "
                                   f"chunk: fallback={stats.get('fallback')!r} "
                                   f"error={stats.get('error')!r} "
                                   f"unlocatable={stats.get('chunks_unlocatable')}")
            results.append(stats)
            if progress is not None:
                progress(i + len(batch), len(documents))
        return results

    def query(self, question: str, documents: Sequence[Any], method: str | None = None,
              ratio: float | None = None, namespace: str | None = None,
              cache_salt: str | None = None, max_tokens: int = 64) -> QueryResult:
        """Ask `question` over `documents` (declared as chunks), streamed: TTFT is the
        time to the first event carrying a choice, which the server sends once the first
        token exists (its text may be empty: a special token, or dummy weights)."""
        body = self.chat_body(documents, question, method=method, ratio=ratio, namespace=namespace,
                              cache_salt=cache_salt, max_tokens=max_tokens)
        body["stream_options"] = {"include_usage": True}
        parts, stats, usage = [], {}, {}
        ttft = None
        t0 = time.perf_counter()
        for event in self.stream_events("/v1/chat/completions", body):
            choices = event.get("choices") or ()
            if choices and ttft is None:
                ttft = time.perf_counter() - t0
            for choice in choices:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    parts.append(text)
            usage = event.get("usage") or usage
            stats = (event.get("kv_transfer_params") or {}).get(STATS_KEY, stats)
        latency = time.perf_counter() - t0
        return QueryResult("".join(parts), stats, latency if ttft is None else ttft, latency, usage)


def stats_line(stats: dict[str, Any]) -> str:
    """One human-readable line of kvflow_stats."""
    if not stats:
        return "kvflow: no stats (connector not configured?)"
    if stats.get("fallback"):
        return f"kvflow: fallback={stats['fallback']} {stats.get('error', '')}".rstrip()
    return (f"kvflow: method={stats.get('method')} ratio={stats.get('ratio')} "
            f"chunks={stats.get('chunks')} hit={stats.get('chunks_hit', 0)} "
            f"missed={stats.get('chunks_missed', 0)} "
            f"unlocatable={len(stats.get('chunks_unlocatable') or [])} "
            f"too_short={len(stats.get('chunks_too_short') or [])} "
            f"tokens reused={stats.get('tokens_reused', 0)} recomputed={stats.get('tokens_recomputed', 0)}")
