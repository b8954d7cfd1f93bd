"""Load test against a server: concurrent RAG requests over a document pool with Zipf
reuse, once per method (`full`: plain vLLM prefill, prefix cache as configured;
`infoflow`: chunk reuse), the same request sequence each time.

    kvflow bench load --spawn --requests 500 --docs 64 --zipf 1.1 --concurrency 8 \\
        --max-seconds 240 --out load.json

Each phase stops submitting at --max-seconds (requests in flight finish and count).
The chunk store starts cold for the first reuse phase; Zipf reuse is what makes hits.
Reports throughput and TTFT (streamed, client side) p50/p99 per method; JSON + table.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vllm_kvflow.bench.dataset import generate
from vllm_kvflow.client import KVFlowClient, ServerError


def document_pool(n: int, words: int, seed: int) -> list[dict]:
    """n distinct fictional passages {"title", "text"} (titles are unique city names)."""
    items = generate(math.ceil(n / 4) + 1, num_passages=4, passage_words=words,
                     two_hop_share=0.0, seed=seed)
    pool, titles = [], set()
    for item in items:
        for p in item["passages"]:
            if p["title"] not in titles and len(pool) < n:
                titles.add(p["title"])
                pool.append(p)
    return pool


def zipf_requests(pool: list[dict], n: int, per_request: int, s: float, seed: int) -> list[dict]:
    """n requests of `per_request` distinct documents, document rank r drawn with
    probability ~ 1 / r^s; the question asks about the first one."""
    rng = random.Random(seed)
    weights = [1.0 / (r + 1) ** s for r in range(len(pool))]
    k = min(per_request, len(pool))
    out = []
    for _ in range(n):
        picked: list[int] = []
        while len(picked) < k:
            i = rng.choices(range(len(pool)), weights)[0]
            if i not in picked:
                picked.append(i)
        title = pool[picked[0]]["title"]
        out.append({"docs": picked, "question": f"What is the main export of {title}?"})
    return out


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile, q in [0, 100]."""
    if not values:
        return None
    v = sorted(values)
    x = (len(v) - 1) * q / 100
    lo = math.floor(x)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (x - lo)


def run_phase(client: KVFlowClient, pool, requests, method: str, concurrency: int,
              max_seconds: float, max_tokens: int) -> dict:
    records: list[dict] = []
    start = time.perf_counter()
    deadline = start + max_seconds

    def one(i: int, req: dict) -> dict:
        if time.perf_counter() > deadline:
            return {"i": i, "skipped": True}
        rec = {"i": i, "docs": req["docs"]}
        try:
            r = client.query(req["question"], [pool[d] for d in req["docs"]], method=method,
                             max_tokens=max_tokens)
            st = r.stats
            rec.update(ttft_s=r.ttft_s, latency_s=r.latency_s,
                       prompt_tokens=r.usage.get("prompt_tokens"),
                       completion_tokens=r.usage.get("completion_tokens"),
                       chunks_hit=st.get("chunks_hit", 0), chunks_missed=st.get("chunks_missed", 0),
                       tokens_reused=st.get("tokens_reused", 0),
                       tokens_recomputed=st.get("tokens_recomputed", 0), fallback=st.get("fallback"))
        except (ServerError, OSError) as e:
            rec["error"] = str(e)
        return rec

    with ThreadPoolExecutor(concurrency) as pool_exec:
        records = list(pool_exec.map(lambda a: one(*a), enumerate(requests)))
    wall = time.perf_counter() - start
    done = [r for r in records if "ttft_s" in r]
    ttfts = [r["ttft_s"] for r in done]
    lat = [r["latency_s"] for r in done]
    hits = sum(r["chunks_hit"] for r in done)
    misses = sum(r["chunks_missed"] for r in done)
    summary = {
        "method": method, "completed": len(done),
        "errors": sum("error" in r for r in records),
        "skipped": sum(bool(r.get("skipped")) for r in records),
        "wall_s": wall, "throughput_rps": len(done) / wall if wall else None,
        "output_tok_s": sum(r["completion_tokens"] or 0 for r in done) / wall if wall else None,
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
        "ttft_mean_s": sum(ttfts) / len(ttfts) if ttfts else None,
        "latency_p50_s": percentile(lat, 50), "latency_p99_s": percentile(lat, 99),
        "chunk_hit_rate": hits / (hits + misses) if hits + misses else None,
        "tokens_reused": sum(r["tokens_reused"] for r in done),
        "tokens_recomputed": sum(r["tokens_recomputed"] for r in done),
        "fallbacks": sum(bool(r.get("fallback")) for r in done),
    }
    return {"summary": summary, "records": records,
            "first_error": next((r["error"] for r in records if "error" in r), None)}


def _fmt(x, spec=".3f") -> str:
    return "" if x is None else format(x, spec)


def table(summaries: list[dict]) -> str:
    head = ("| method | done | errors | wall s | req/s | TTFT p50 s | TTFT p99 s | "
            "latency p50 s | chunk hit rate |")
    rows = [head, "| --- " * 9 + "|"]
    for s in summaries:
        rows.append(f"| {s['method']} | {s['completed']} | {s['errors']} | {_fmt(s['wall_s'], '.1f')} | "
                    f"{_fmt(s['throughput_rps'])} | {_fmt(s['ttft_p50_s'])} | {_fmt(s['ttft_p99_s'])} | "
                    f"{_fmt(s['latency_p50_s'])} | {_fmt(s['chunk_hit_rate'], '.2f')} |")
    return "\n".join(rows)


def run(args, base_url: str) -> dict:
    client = KVFlowClient(base_url, args.model_name, timeout_s=max(args.max_seconds * 2, 120))
    pool = document_pool(args.docs, args.doc_words, args.seed)
    requests = zipf_requests(pool, args.requests, args.docs_per_request, args.zipf, args.seed)
    # Untimed: first-request costs (lazy init of the connector's pipeline), outside the pool.
    extra = document_pool(args.docs + 1, args.doc_words, args.seed + 1)[-1:]
    phases = []
    for method in args.methods.split(","):
        client.query("What is this about?", extra, method=method, max_tokens=1)
        phase = run_phase(client, pool, requests, method, args.concurrency, args.max_seconds,
                          args.max_tokens)
        if phase["first_error"]:
            print(f"kvflow bench load: {method}: first error: {phase['first_error']}", file=sys.stderr)
        phases.append(phase)
    summaries = [p["summary"] for p in phases]
    return {"config": {k: v for k, v in vars(args).items()}, "server": base_url,
            "summaries": summaries, "phases": {p["summary"]["method"]: p["records"] for p in phases}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvflow bench load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", help="base URL of a running server with the connector")
    where.add_argument("--spawn", action="store_true", help="start a local server for the run")
    p.add_argument("--model", help="model to spawn (default: the embedded SmolLM2)")
    p.add_argument("--model-name", help="served model name (default: the server's first)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-seqs", type=int, default=None,
                   help="spawned CPU server: sequences of --max-model-len tokens its KV cache "
                        "holds at once, sized in bytes from it (default: --concurrency)")
    p.add_argument("--compile", action="store_true",
                   help="spawned server: torch.compile the model (minutes at start on CPU; default eager)")
    p.add_argument("--requests", type=int, default=500, help="requests per method")
    p.add_argument("--docs", type=int, default=64, help="document pool size")
    p.add_argument("--docs-per-request", type=int, default=4)
    p.add_argument("--doc-words", type=int, default=60)
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of document reuse")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-seconds", type=float, default=300, help="per method")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--methods", default="full,infoflow")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON file for summaries and per-request records")
    args = p.parse_args(argv)

    if args.spawn:
        import vllm_kvflow
        from vllm_kvflow.model import default_model_path
        from vllm_kvflow.server import ServerProcess, cpu_server_args

        model = args.model or str(default_model_path())
        log = Path(tempfile.mkdtemp(prefix="kvflow-load-")) / "server.log"
        print(f"starting server (log {log})", file=sys.stderr)
        with ServerProcess(model, log, vllm_kvflow.transfer_config(log_stats=False),
                           cpu_server_args(model, args.max_model_len, args.max_seqs or args.concurrency,
                                           eager=not args.compile,
                                           size_flags="--max-model-len or --max-seqs")) as srv:
            result = run(args, srv.base_url)
    else:
        result = run(args, args.server)
    print(table(result["summaries"]))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0 if all(s["completed"] for s in result["summaries"]) else 1
