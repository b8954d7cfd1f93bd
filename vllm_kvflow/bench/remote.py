"""`kvflow bench remote`: TTFT of a remote-tier hit (chunks from Redis/Valkey) against a
local host-tier hit and against full prefill, in one engine, one run; and the transfer
rate per chunk from the server into the paged cache.

Per context size: one request warms the store (each chunk computed in isolation,
stored in host memory and written through to the server; the bench waits for the
writes). Then, interleaved per repetition (medians reported):
  full        plain prefill (no prefix caching in this engine);
  miss        pure reuse of chunks never seen (a fresh passage set per repetition):
              every chunk computed in isolation, stored, written through;
  local-hit   pure reuse (`none`), every chunk from the host tier;
  remote-hit  the same request after the workers' memory tiers are emptied, so every
              chunk is fetched from the server, verified, promoted and loaded.
local-hit and remote-hit differ only in where the chunks come from. The crossover
(at which KV bytes per token a remote hit beats recomputing the chunk) follows from
the remote-hit and miss costs over a local hit.

Without --remote a throwaway redis-server (or valkey-server) is started on loopback;
it inherits this process's CPU affinity.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from vllm_kvflow.bench.engine import default_dtype, environment, make_llm, time_first_token
from vllm_kvflow.bench.ttft import SYSTEM_PROMPT, _passages_for
from vllm_kvflow.rag import build_rag_prompt

MODES = ("full", "miss", "local-hit", "remote-hit")
QUESTIONS = ["Which city exports wool?", "Which city exports salt?", "Which city exports iron?",
             "Which city exports tea?"]


def _store(worker):
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group()._worker.store


def _flush_store(worker) -> dict:
    """On each worker: wait for queued remote writes; their stats."""
    store = _store(worker)
    store.flush()
    return store.remote.stats()


def _empty_memory_tiers(worker) -> dict:
    """On each worker: drop the memory tiers (the next lookups go to the server); the
    remote tier's stats before the request."""
    store = _store(worker)
    store.clear()
    return store.remote.stats()


def _remote_delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in ("hits", "bytes_read", "read_s", "verify_s")}


def _timed(llm, tok, mode: str, passages, question: str):
    """(TTFT s, kvflow stats or {}, remote stats before the request or None)."""
    if mode == "full":
        p = build_rag_prompt(tok, question, passages, instruction=SYSTEM_PROMPT)
        t, _ = time_first_token(llm, p.vllm_prompt(), None)
        return t, {}, None
    before = llm.collective_rpc(_empty_memory_tiers)[0] if mode == "remote-hit" else None
    p = build_rag_prompt(tok, question, passages, instruction=SYSTEM_PROMPT, method="none")
    t, out = time_first_token(llm, p.vllm_prompt(), p.kv_transfer_params)
    stats = (out.kv_transfer_params or {}).get("kvflow_stats", {})
    if mode == "miss":
        llm.collective_rpc(_flush_store)  # its remote writes must not run into the next timing
    expected_misses = stats.get("chunks", 0) if mode == "miss" else 0
    if stats.get("chunks_missed") != expected_misses:
        raise RuntimeError(f"{mode}: {stats.get('chunks_missed')} chunks missed, expected "
                           f"{expected_misses}; see the log")
    return t, stats, before


def run(args) -> dict:
    sizes = [int(x) for x in args.context_tokens.split(",")]
    llm = make_llm(args.model, prefix_caching=False, max_model_len=max(sizes) + 512,
                   dtype=args.dtype, size_flags="--context-tokens", method="none",
                   store_capacity_gb=args.store_gb, store_remote_url=args.remote,
                   store_remote_timeout_s=args.remote_timeout_s,
                   store_remote_queue_mb=args.store_gb * 1024)
    tok = llm.get_tokenizer()
    results, transfers = [], []
    total, step = len(sizes) * (args.repeats + 1) * len(MODES), 0
    for size in sizes:
        passages = _passages_for(tok, size, seed=1000 + size)
        warm = build_rag_prompt(tok, "Which city exports cloth?", passages,
                                instruction=SYSTEM_PROMPT, method="none")
        time_first_token(llm, warm.vllm_prompt(), warm.kv_transfer_params)
        llm.collective_rpc(_flush_store)
        times: dict[str, list[float]] = {m: [] for m in MODES}
        stats: dict[str, dict] = {}
        for rep in range(args.repeats + 1):  # repetition 0 is untimed: steady state is timed
            # A miss needs chunks never seen: a fresh passage set of the same size per rep.
            fresh = _passages_for(tok, size, seed=100_000 * (rep + 1) + size)
            for mode in MODES:
                step += 1
                print(f"\r[{step}/{total}] {size} tokens, {mode:<10}", end="", file=sys.stderr,
                      flush=True)
                t, s, before = _timed(llm, tok, mode, fresh if mode == "miss" else passages,
                                      QUESTIONS[rep % len(QUESTIONS)])
                if rep == 0:
                    continue
                times[mode].append(t)
                stats[mode] = s
                if before is not None:
                    delta = _remote_delta(s["store"]["tiers"]["remote"], before)
                    if delta["hits"] != s["chunks_hit"]:
                        raise RuntimeError(f"remote-hit: {delta['hits']} of {s['chunks_hit']} "
                                           "chunks came from the server")
                    transfers.append({"context_tokens": size, "chunks": s["chunks_hit"],
                                      "tokens": s["tokens_reused"], "load_s": s["timings_s"]["load"],
                                      **delta})
        print(file=sys.stderr)
        row = {m: statistics.median(times[m]) for m in MODES}
        speedup = {m: row["full"] / row[m] for m in MODES}
        results.append({
            "context_tokens": size,
            "prompt_tokens": len(build_rag_prompt(tok, "q", passages).prompt_token_ids),
            "chunks": stats["local-hit"]["chunks_hit"], "chunk_tokens": stats["local-hit"]["tokens_reused"],
            "ttft_s": row, "ttft_all_s": times, "speedup_vs_full": speedup,
            "remote_share_of_local_speedup": speedup["remote-hit"] / speedup["local-hit"],
            "timings_s": {m: stats[m].get("timings_s") for m in MODES if m != "full"},
        })
    return {**environment(), "model": args.model, "dtype": args.dtype, "repeats": args.repeats,
            "remote": args.remote_note, "affinity": sorted(os.sched_getaffinity(0)),
            "redis_client": _versions(), "results": results, "transfers": transfers,
            "crossover": crossover(results, transfers)}


def crossover(results: list[dict], transfers: list[dict]) -> list[dict]:
    """Per size, from the medians: KV bytes per token; the effective remote rate (bytes
    over the extra TTFT of a remote hit over a local one: fetch, verify and promotion
    all count); the cost of recomputing a chunk token (extra TTFT of a miss, which
    computes every chunk in isolation, over a local hit); and the KV bytes per token
    below which a remote hit beats recomputing: effective rate x recompute time."""
    out = []
    for r in results:
        t = [t for t in transfers if t["context_tokens"] == r["context_tokens"]][-1]
        ttft = r["ttft_s"]
        remote_extra = ttft["remote-hit"] - ttft["local-hit"]
        recompute_extra = ttft["miss"] - ttft["local-hit"]
        rate = t["bytes_read"] / remote_extra if remote_extra > 0 else float("inf")
        recompute_s_per_token = recompute_extra / t["tokens"]
        out.append({"context_tokens": r["context_tokens"],
                    "kv_bytes_per_token": t["bytes_read"] / t["tokens"],
                    "remote_extra_s": remote_extra, "recompute_extra_s": recompute_extra,
                    "effective_rate_Bps": rate,
                    "get_rate_Bps": t["bytes_read"] / t["read_s"],
                    "verify_rate_Bps": t["bytes_read"] / t["verify_s"],
                    "load_rate_Bps": t["bytes_read"] / t["load_s"],
                    "ms_per_chunk_load": 1e3 * t["load_s"] / t["chunks"],
                    "recompute_s_per_chunk_token": recompute_s_per_token,
                    "crossover_kv_bytes_per_token": rate * recompute_s_per_token,
                    # The 80%-of-local-speedup target allows extra time <= local TTFT / 4.
                    "rate_for_80pct_Bps": t["bytes_read"] / (ttft["local-hit"] / 4)})
    return out


def _versions() -> dict:
    import redis

    try:
        import hiredis
        parser = f"hiredis {hiredis.__version__}"
    except ImportError:
        parser = "pure-Python parser"
    return {"redis-py": redis.__version__, "parser": parser}


def print_table(report: dict) -> None:
    print(f"\nTTFT on {report['card']} (vLLM {report['vllm']}, torch {report['torch']}, "
          f"{report['dtype']}), cores {report['affinity']}, median of {report['repeats']}; "
          f"remote: {report['remote']}")
    print(f"{'context':>8} {'chunks':>6} {'full s':>8} {'miss s':>8} {'local s':>8} {'remote s':>9} "
          f"{'local x':>8} {'remote x':>9} {'remote/local':>13}")
    for r in report["results"]:
        t, s = r["ttft_s"], r["speedup_vs_full"]
        print(f"{r['prompt_tokens']:>8} {r['chunks']:>6} {t['full']:>8.3f} {t['miss']:>8.3f} "
              f"{t['local-hit']:>8.3f} {t['remote-hit']:>9.3f} {s['local-hit']:>7.1f}x "
              f"{s['remote-hit']:>8.1f}x {r['remote_share_of_local_speedup']:>12.0%}")
    print(f"\n{'context':>8} {'KV B/tok':>9} {'GET MB/s':>9} {'verify MB/s':>12} {'load MB/s':>10} "
          f"{'ms/chunk':>9} {'eff. MB/s':>10} {'recompute us/tok':>17} {'crossover B/tok':>16} "
          f"{'80% needs MB/s':>15}")
    for c, r in zip(report["crossover"], report["results"]):
        print(f"{r['prompt_tokens']:>8} {c['kv_bytes_per_token']:>9.0f} {c['get_rate_Bps'] / 1e6:>9.0f} "
              f"{c['verify_rate_Bps'] / 1e6:>12.0f} {c['load_rate_Bps'] / 1e6:>10.0f} "
              f"{c['ms_per_chunk_load']:>9.2f} {c['effective_rate_Bps'] / 1e6:>10.0f} "
              f"{1e6 * c['recompute_s_per_chunk_token']:>17.0f} "
              f"{c['crossover_kv_bytes_per_token']:>16.0f} {c['rate_for_80pct_Bps'] / 1e6:>15.0f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvflow bench remote", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: embedded SmolLM2)")
    p.add_argument("--context-tokens", default="2048,4096")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, auto on GPU")
    p.add_argument("--remote", default=None,
                   help="redis:// URL of a running server (default: start a throwaway one)")
    p.add_argument("--remote-timeout-s", type=float, default=5.0)
    p.add_argument("--store-gb", type=float, default=2.0, help="host tier (and write queue) size")
    p.add_argument("--out", default=None, help="JSON file")
    args = p.parse_args(argv)
    args.dtype = args.dtype or default_dtype()
    if args.remote is not None:
        args.remote_note = args.remote
        report = run(args)
    else:
        from vllm_kvflow.redis_server import RedisServer

        with tempfile.TemporaryDirectory() as tmp, RedisServer(
                tmp, args=["--maxmemory", "8gb", "--maxmemory-policy", "allkeys-lru"]) as srv:
            version = subprocess.run([srv.binary, "--version"], capture_output=True,
                                     text=True).stdout.strip()
            args.remote = srv.url
            args.remote_note = f"throwaway {version} on loopback TCP, same CPU affinity"
            report = run(args)
    print_table(report)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
