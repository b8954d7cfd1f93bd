"""Load test against a server: concurrent RAG requests over a document pool with Zipf
reuse, once per method and concurrency (`full`: plain vLLM prefill, prefix cache as
configured; `none`, `infoflow`, ...: chunk reuse), the same request sequence each time,
all against one server start.

    kvflow bench load --spawn --requests 400 --docs 64 --zipf 1.1 --concurrency 8,32 \\
        --methods full,none,infoflow --warmup 16 --out load.json

TTFT is the time to the first streamed event that carries a choice (the server sends
it once the first token exists, whatever its text). Chunk statistics (hit rate, tokens
reused and recomputed) come from the stream's kvflow_stats. The first --warmup requests
of each phase are left out of the statistics; the first wave (the first `concurrency`
measured requests) is also reported on its own. Each phase stops submitting at
--max-seconds (requests in flight finish and count). The chunk store starts cold for the
first reuse phase; Zipf reuse is what makes hits.

`--probe` measures instead how a small request fares during a burst of all-miss
requests: its TTFT alone, then sent while --burst requests of --burst-docs fresh
documents each are being served.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vllm_kvflow.bench.dataset import generate
from vllm_kvflow.client import KVFlowClient, ServerError
from vllm_kvflow.config import KVFlowConfig


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


def _record(client: KVFlowClient, question: str, docs: list[dict], method: str,
            max_tokens: int, namespace: str | None = None) -> dict:
    rec: dict = {"sent_s": time.time()}
    try:
        r = client.query(question, docs, method=method, max_tokens=max_tokens, namespace=namespace)
        st = r.stats
        rec.update(ttft_s=r.ttft_s, latency_s=r.latency_s,
                   prompt_tokens=r.usage.get("prompt_tokens"),
                   completion_tokens=r.usage.get("completion_tokens"), stats=bool(st),
                   chunks_hit=st.get("chunks_hit", 0), chunks_missed=st.get("chunks_missed", 0),
                   tokens_reused=st.get("tokens_reused", 0),
                   tokens_recomputed=st.get("tokens_recomputed", 0), fallback=st.get("fallback"))
    except (ServerError, OSError) as e:
        rec["error"] = str(e)
    return rec


def summarize(method: str, concurrency: int, records: list[dict], wall: float) -> dict:
    done = [r for r in records if "ttft_s" in r]
    ttfts = [r["ttft_s"] for r in done]
    lat = [r["latency_s"] for r in done]
    hits = sum(r["chunks_hit"] for r in done)
    misses = sum(r["chunks_missed"] for r in done)
    return {
        "method": method, "concurrency": concurrency, "completed": len(done),
        "errors": sum("error" in r for r in records),
        "wall_s": wall, "throughput_rps": len(done) / wall if wall else None,
        "output_tok_s": sum(r["completion_tokens"] or 0 for r in done) / wall if wall else None,
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
        "ttft_mean_s": sum(ttfts) / len(ttfts) if ttfts else None,
        "latency_p50_s": percentile(lat, 50), "latency_p99_s": percentile(lat, 99),
        "with_stats": sum(r["stats"] for r in done),
        "chunk_hit_rate": hits / (hits + misses) if hits + misses else None,
        "chunks_missed": misses,
        "tokens_reused": sum(r["tokens_reused"] for r in done),
        "tokens_recomputed": sum(r["tokens_recomputed"] for r in done),
        "fallbacks": sum(bool(r.get("fallback")) for r in done),
    }


def run_phase(clients: list[KVFlowClient], pool, requests, method: str, concurrency: int,
              max_seconds: float, max_tokens: int, warmup: int) -> dict:
    """One method at one concurrency: warm-up requests (left out of the statistics),
    then the measured ones; the first wave is also summarized alone. With several
    servers (replicas), request i goes to server i mod n."""
    def send(i: int, req: dict) -> dict:
        rec = _record(clients[i % len(clients)], req["question"], [pool[d] for d in req["docs"]],
                      method, max_tokens)
        rec.update(docs=req["docs"], server=i % len(clients))
        return rec

    if warmup:
        with ThreadPoolExecutor(concurrency) as ex:
            list(ex.map(send, range(warmup), requests[:warmup]))
    measured = requests[warmup:]
    start = time.perf_counter()
    deadline = start + max_seconds

    def one(i: int, req: dict) -> dict:
        if time.perf_counter() > deadline:
            return {"skipped": True}
        return send(warmup + i, req)

    with ThreadPoolExecutor(concurrency) as ex:
        records = list(ex.map(one, range(len(measured)), measured))
    wall = time.perf_counter() - start
    records = [r for r in records if not r.get("skipped")]
    summary = summarize(method, concurrency, records, wall)
    summary["skipped"] = len(measured) - len(records)
    wave = records[:concurrency]
    wave_wall = max((r["sent_s"] + r["latency_s"] for r in wave if "latency_s" in r), default=start) \
        - min((r["sent_s"] for r in wave), default=0)
    summary["first_wave"] = summarize(method, concurrency, wave, wave_wall)
    return {"summary": summary, "records": records,
            "first_error": next((r["error"] for r in records if "error" in r), None)}


def probe(client: KVFlowClient, args) -> dict:
    """A small plain request alone, then during a burst of all-miss chunk requests."""
    words = max(8, int(args.probe_tokens * 0.7))
    filler = " ".join(f"w{i}" for i in range(words))
    small_q = f"Repeat the first word of this list: {filler}"

    def small() -> dict:
        t0 = time.perf_counter()
        ttft = None
        body = {"model": client.model, "max_tokens": 4, "temperature": 0, "stream": True,
                "messages": [{"role": "user", "content": small_q}]}
        for event in client.stream_events("/v1/chat/completions", body):
            if event.get("choices") and ttft is None:
                ttft = time.perf_counter() - t0
        return {"ttft_s": ttft, "latency_s": time.perf_counter() - t0}

    # Untimed: first-request costs, paid once per API server process (vLLM hands requests
    # to its --api-server-count processes in turn); with one warm-up request, the first
    # timed ones of a four-process server took 2-3x the later ones.
    for _ in range(args.probe_warmup):
        small()
    alone = [small() for _ in range(args.probe_repeats)]
    # Fresh documents (never seen by the server: every chunk a miss), worded like the
    # pool's, each opened by a tag unique to this run.
    run = uuid.uuid4().hex[:8]
    texts = document_pool(args.burst * args.burst_docs, args.burst_doc_words,
                          seed=int(run, 16) % 100_000)
    texts = [texts[i % len(texts)] for i in range(args.burst * args.burst_docs)]  # the pool may run short
    burst_docs = [[{"title": f"{d['title']} ({run})", "text": f"Record {run}-{i}-{j}. {d['text']}"}
                   for j, d in enumerate(texts[i * args.burst_docs:(i + 1) * args.burst_docs])]
                  for i in range(args.burst)]
    burst_records: list[dict] = []
    during: list[dict] = []

    def burst_one(i: int) -> None:
        burst_records.append(_record(client, "What is the first word?", burst_docs[i],
                                     args.burst_method, 4, namespace=f"burst-{run}"))

    threads = [threading.Thread(target=burst_one, args=(i,)) for i in range(args.burst)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(args.probe_delay)
    for _ in range(args.probe_repeats):
        if all(not t.is_alive() for t in threads):
            break
        during.append(small())
    for t in threads:
        t.join()
    burst_wall = time.perf_counter() - t0
    alone_ttft = statistics.median(r["ttft_s"] for r in alone)
    during_ttft = [r["ttft_s"] for r in during]
    return {
        "probe_tokens": args.probe_tokens, "burst": args.burst, "burst_docs": args.burst_docs,
        "burst_method": args.burst_method, "burst_wall_s": burst_wall,
        "burst_prompt_tokens": statistics.median(r.get("prompt_tokens") or 0 for r in burst_records),
        "burst_chunks_missed": sum(r.get("chunks_missed", 0) for r in burst_records),
        "burst_errors": sum("error" in r for r in burst_records),
        "burst_first_error": next((r["error"] for r in burst_records if "error" in r), None),
        "alone_ttft_s": alone_ttft, "alone": alone, "during": during,
        "during_ttft_max_s": max(during_ttft) if during_ttft else None,
        "during_ttft_median_s": statistics.median(during_ttft) if during_ttft else None,
        "ratio_max": max(during_ttft) / alone_ttft if during_ttft else None,
    }


def _fmt(x, spec=".3f") -> str:
    return "" if x is None else format(x, spec)


def table(summaries: list[dict]) -> str:
    head = ("| method | C | done | errors | req/s | TTFT p50 s | TTFT p99 s | first wave TTFT p99 s | "
            "latency p50 s | chunk hit rate | tokens reused | recomputed |")
    rows = [head, "| --- " * 12 + "|"]
    for s in summaries:
        rows.append(f"| {s['method']} | {s['concurrency']} | {s['completed']} | {s['errors']} | "
                    f"{_fmt(s['throughput_rps'], '.2f')} | {_fmt(s['ttft_p50_s'])} | {_fmt(s['ttft_p99_s'])} | "
                    f"{_fmt(s['first_wave']['ttft_p99_s'])} | {_fmt(s['latency_p50_s'])} | "
                    f"{_fmt(s['chunk_hit_rate'], '.2f')} | {s['tokens_reused']} | {s['tokens_recomputed']} |")
    return "\n".join(rows)


def probe_table(p: dict) -> str:
    return "\n".join([
        "| probe | burst | TTFT alone s | TTFT during burst, median / max s | max / alone |",
        "| --- | --- | --- | --- | --- |",
        f"| {p['probe_tokens']} tokens, plain | {p['burst']} x {p['burst_docs']} fresh docs "
        f"({p['burst_prompt_tokens']:.0f} tokens, {p['burst_method']}) | {_fmt(p['alone_ttft_s'])} | "
        f"{_fmt(p['during_ttft_median_s'])} / {_fmt(p['during_ttft_max_s'])} | {_fmt(p['ratio_max'], '.2f')}x |"])


def server_info(client: KVFlowClient) -> dict:
    """When the server's process started (its /metrics), and the card and versions here."""
    info: dict = {}
    for line in client.metrics_text().splitlines():
        if line.startswith("process_start_time_seconds"):
            started = float(line.rsplit(" ", 1)[1])
            info.update(process_started_at=started, uptime_at_bench_start_s=time.time() - started)
    try:
        from vllm_kvflow.bench.engine import environment

        info.update(environment())
    except ImportError:
        pass
    return info


def run(args, base_url: str) -> dict:
    """base_url: one server, or several separated by commas (replicas of one model,
    requests alternating between them)."""
    clients = [KVFlowClient(url, args.model_name, timeout_s=max(args.max_seconds * 2, 600))
               for url in base_url.split(",")]
    client = clients[0]
    info = server_info(client)
    if args.probe:
        return {"config": vars(args), "server": base_url, "server_info": info, "probe": probe(client, args)}
    pool = document_pool(args.docs, args.doc_words, args.seed)
    requests = zipf_requests(pool, args.requests + args.warmup, args.docs_per_request, args.zipf,
                             args.seed)
    phases = []
    for concurrency in [int(c) for c in str(args.concurrency).split(",")]:
        for method in args.methods.split(","):
            phase = run_phase(clients, pool, requests, method, concurrency, args.max_seconds,
                              args.max_tokens, args.warmup)
            if phase["first_error"]:
                print(f"kvflow bench load: {method}: first error: {phase['first_error']}", file=sys.stderr)
            print(table([phase["summary"]]).splitlines()[-1], file=sys.stderr, flush=True)
            phases.append(phase)
    summaries = [p["summary"] for p in phases]
    return {"config": vars(args), "server": base_url, "server_info": info, "summaries": summaries,
            "phases": {f"{p['summary']['method']}@{p['summary']['concurrency']}": p["records"]
                       for p in phases}}


def _engine_settings(parser, args) -> dict:
    """--settings as a dict of valid engine settings (only for a spawned server: a
    running server's settings were fixed at its start)."""
    if args.settings is None:
        return {}
    if not args.spawn:
        parser.error("--settings applies to a spawned server (--spawn); a running server "
                     "keeps the settings it was started with")
    try:
        settings = json.loads(args.settings)
    except json.JSONDecodeError as e:
        parser.error(f"--settings is not JSON: {e}")
    if not isinstance(settings, dict):
        parser.error("--settings must be a JSON object of engine settings")
    try:
        KVFlowConfig.from_extra_config(settings)
    except (TypeError, ValueError) as e:
        parser.error(f"--settings: {e}")
    return settings


def step_lines(log_path) -> list[str]:
    """The worker's step lines (setting log_steps_every_s) in a server log."""
    from vllm_kvflow.blend.step_log import LINE_PREFIX

    lines = Path(log_path).read_text(errors="replace").splitlines()
    return [line[line.index(LINE_PREFIX):] for line in lines if LINE_PREFIX in line]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvflow bench load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", help="base URL of a running server with the connector; several "
                       "replicas: URLs separated by commas, requests alternate between them")
    where.add_argument("--spawn", action="store_true", help="start a local CPU server for the run")
    p.add_argument("--model", help="model to spawn (default: the embedded SmolLM2)")
    p.add_argument("--model-name", help="served model name (default: the server's first)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-seqs", type=int, default=None,
                   help="spawned CPU server: sequences of --max-model-len tokens its KV cache "
                        "holds at once, sized in bytes from it (default: the largest --concurrency)")
    p.add_argument("--compile", action="store_true",
                   help="spawned server: torch.compile the model (minutes at start on CPU; default eager)")
    p.add_argument("--settings", default=None,
                   help="spawned server: more engine settings, JSON (README, Engine settings), e.g. "
                        "'{\"log_steps_every_s\": 1}': its step lines are then printed and kept in --out")
    p.add_argument("--requests", type=int, default=500, help="measured requests per phase")
    p.add_argument("--warmup", type=int, default=0, help="requests per phase before the measured ones")
    p.add_argument("--docs", type=int, default=64, help="document pool size")
    p.add_argument("--docs-per-request", type=int, default=4)
    p.add_argument("--doc-words", type=int, default=60)
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of document reuse")
    p.add_argument("--concurrency", default="8", help="one value or a list: 8,32,64")
    p.add_argument("--max-seconds", type=float, default=300, help="per phase")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--methods", default="full,infoflow")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe", action="store_true", help="measure a small request during a miss burst")
    p.add_argument("--probe-tokens", type=int, default=200)
    p.add_argument("--probe-repeats", type=int, default=5)
    p.add_argument("--probe-warmup", type=int, default=8,
                   help="untimed small requests before the timed ones (at least one per API server)")
    p.add_argument("--probe-delay", type=float, default=1.0, help="seconds into the burst")
    p.add_argument("--burst", type=int, default=32, help="all-miss requests in the burst")
    p.add_argument("--burst-docs", type=int, default=8, help="fresh documents per burst request")
    p.add_argument("--burst-doc-words", type=int, default=200)
    p.add_argument("--burst-method", default="infoflow")
    p.add_argument("--out", help="JSON file for summaries and per-request records")
    args = p.parse_args(argv)
    settings = _engine_settings(p, args)

    if args.spawn:
        import vllm_kvflow
        from vllm_kvflow.model import default_model_path
        from vllm_kvflow.server import ServerProcess, cpu_server_args

        model = args.model or str(default_model_path())
        log = Path(tempfile.mkdtemp(prefix="kvflow-load-")) / "server.log"
        print(f"starting server (log {log})", file=sys.stderr)
        seqs = args.max_seqs or max(int(c) for c in str(args.concurrency).split(","))
        if args.probe:
            seqs = max(seqs, args.burst + 1)
        t0 = time.perf_counter()
        with ServerProcess(model, log, vllm_kvflow.transfer_config(**{"log_stats": False, **settings}),
                           cpu_server_args(model, args.max_model_len, seqs, eager=not args.compile,
                                           size_flags="--max-model-len or --max-seqs")) as srv:
            start_s = time.perf_counter() - t0
            print(f"server up in {start_s:.1f} s", file=sys.stderr)
            result = run(args, srv.base_url)
            result["server_info"]["start_to_healthy_s"] = start_s
        if settings:
            result["server_info"]["settings"] = settings
        if settings.get("log_steps_every_s"):
            result["server_step_lines"] = step_lines(log)
            print("\n".join(result["server_step_lines"]), file=sys.stderr)
    else:
        result = run(args, args.server)
    if args.probe:
        print(probe_table(result["probe"]))
    else:
        print(table(result["summaries"]))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}", file=sys.stderr)
    if args.probe:
        return 0 if result["probe"]["during"] and not result["probe"]["burst_errors"] else 1
    return 0 if all(s["completed"] for s in result["summaries"]) else 1
