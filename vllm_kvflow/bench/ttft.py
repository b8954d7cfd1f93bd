"""`kvflow bench ttft`: time-to-first-token of chunk reuse against full prefill and
against vLLM's exact prefix-cache hit, all measured in one engine, one run.

Methods: `full` (plain prefill), `prefix-hit` (the same context served from vLLM's prefix
cache, a new question: the ideal of reuse), and any kvflow method (`none`, `random`,
`epic`, `infoflow`, ...) with a warm chunk store. `full` and the kvflow methods share one
system prompt, as a deployment does (the kvflow methods find its KV in their glue
cache, warmed with the store); each `full` request carries a unique cache salt, so
vLLM's prefix cache cannot serve any of its blocks, and kvflow requests keep their
blocks in their own hash space (patches/prefix_cache.py). Repetitions are interleaved
across methods (machines are noisy); medians are reported.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

from vllm_kvflow.bench.dataset import generate as make_dataset
from vllm_kvflow.bench.engine import default_dtype, environment, make_llm, time_first_token
from vllm_kvflow.blend.selection import METHODS
from vllm_kvflow.rag import build_rag_prompt


SYSTEM_PROMPT = "Answer briefly from the documents."


def _passages_for(tokenizer, context_tokens: int, seed: int) -> list[dict]:
    """Enough fictional passages (~100 tokens each) to fill context_tokens."""
    item_passages: list[dict] = []
    seed_i = seed
    while sum(len(tokenizer.encode(p["text"])) + 8 for p in item_passages) < context_tokens:
        item_passages += make_dataset(1, num_passages=10, passage_words=70, seed=seed_i)[0]["passages"]
        seed_i += 1
    out, total = [], 0
    for p in item_passages:
        n = len(tokenizer.encode(p["text"])) + 8
        if total + n > context_tokens:
            break
        out.append(p)
        total += n
    return out


def _store_settings(args) -> dict:
    """Where the warm chunk store lives on GPU: device memory, or host memory only."""
    if args.store == "host":
        return {"store_device_gb": 0.0, "store_host_gb": 64.0}
    return {"store_device_gb": 24.0} if args.store == "device" else {}


def runs_for(methods: list[str], ratios: list[float]) -> list[tuple[str, float]]:
    """(method, ratio) pairs: a method that recomputes once per ratio, the others
    (full, prefix-hit, none) once with ratio 0."""
    def recomputes(name: str) -> bool:
        return name in METHODS and METHODS[name].reuses and METHODS[name].recomputes
    return [(m, r) for m in methods for r in (ratios if recomputes(m) else [0.0])]


def run(args) -> dict:
    methods = [m for m in args.methods.split(",") if m]
    ratios = [float(r) for r in str(args.ratio).split(",") if r]
    runs = runs_for(methods, ratios)
    sizes = [int(x) for x in args.context_tokens.split(",")]
    llm = make_llm(args.model, prefix_caching=True, max_model_len=max(sizes) + 512,
                   dtype=args.dtype, load_format=args.load_format,
                   gpu_memory_utilization=args.gpu_memory_utilization,
                   tensor_parallel_size=args.tensor_parallel_size, size_flags="--context-tokens",
                   method="none", recompute_ratio=ratios[0], **_store_settings(args))
    tok = llm.get_tokenizer()
    results = []
    total_steps = len(sizes) * args.repeats * len(runs)
    step = 0
    for size in sizes:
        passages = _passages_for(tok, size, seed=1000 + size)
        times: dict[tuple[str, float], list[float]] = {run: [] for run in runs}
        stats: dict[tuple[str, float], dict] = {}
        # Warm the chunk store (a miss computes and stores each chunk).
        warm = build_rag_prompt(tok, "Which city exports wool?", passages,
                                instruction=SYSTEM_PROMPT, method="none")
        time_first_token(llm, warm.vllm_prompt(), warm.kv_transfer_params)
        # One untimed request per kvflow run: the first of a size compiles kernels and
        # captures the scoring graphs of its bucket (steady state is what is timed).
        for method, ratio in runs:
            if method not in ("full", "prefix-hit"):
                w = build_rag_prompt(tok, "Which city exports cloth?", passages,
                                     instruction=SYSTEM_PROMPT, method=method, ratio=ratio)
                time_first_token(llm, w.vllm_prompt(), w.kv_transfer_params)
        for rep in range(args.repeats):
            for method, ratio in runs:
                step += 1
                print(f"\r[{step}/{total_steps}] {size} tokens, {method:<12} {ratio:g}", end="",
                      file=sys.stderr, flush=True)
                tag = f"Request {size}-{rep}-{method}-{ratio}. "
                question = f"Which city exports {['wool', 'salt', 'iron', 'tea'][rep % 4]}?"
                if method == "prefix-hit":
                    base = build_rag_prompt(tok, "Warm the prefix cache.", passages,
                                            instruction=tag, method="full")
                    time_first_token(llm, base.vllm_prompt(), None)  # fills the prefix cache
                    p = build_rag_prompt(tok, question, passages, instruction=tag, method="full")
                    t, out = time_first_token(llm, p.vllm_prompt(), None)
                elif method == "full":
                    p = build_rag_prompt(tok, question, passages, instruction=SYSTEM_PROMPT)
                    t, out = time_first_token(llm, {**p.vllm_prompt(), "cache_salt": tag}, None)
                else:
                    p = build_rag_prompt(tok, question, passages, instruction=SYSTEM_PROMPT,
                                         method=method, ratio=ratio)
                    t, out = time_first_token(llm, p.vllm_prompt(), p.kv_transfer_params)
                    stats[(method, ratio)] = (out.kv_transfer_params or {}).get("kvflow_stats", {})
                times[(method, ratio)].append(t)
        print(file=sys.stderr)
        context = len(build_rag_prompt(tok, "q", passages).prompt_token_ids)
        for method, ratio in runs:
            s = stats.get((method, ratio), {})
            results.append({
                "method": method, "context_tokens": context,
                "ttft_s": statistics.median(times[(method, ratio)]),
                "ttft_all_s": times[(method, ratio)], "ratio": ratio,
                "tokens_recomputed": s.get("tokens_recomputed"), "chunks_hit": s.get("chunks_hit"),
                "timings_s": s.get("timings_s"),
            })
    by = {(r["context_tokens"], r["method"]): r for r in results}
    for r in results:
        full = by.get((r["context_tokens"], "full"))
        hit = by.get((r["context_tokens"], "prefix-hit"))
        r["speedup_vs_full"] = full["ttft_s"] / r["ttft_s"] if full else None
        if full and hit and r["method"] not in ("full", "prefix-hit"):
            r["share_of_prefix_hit_speedup"] = r["speedup_vs_full"] / (full["ttft_s"] / hit["ttft_s"])
    return {**environment(), "model": args.model, "load_format": args.load_format, "dtype": args.dtype,
            "store": args.store, "repeats": args.repeats, "results": results}


def run_name(r: dict) -> str:
    return f"{r['method']}@{r['ratio']:g}" if r["ratio"] else r["method"]


def print_table(report: dict) -> None:
    print(f"\nTTFT on {report['card']} (vLLM {report['vllm']}, torch {report['torch']}), "
          f"median of {report['repeats']}; breakdown of the last kvflow request in ms "
          "(load = store fetch + re-rotation, score, recompute incl. glue, rest = suffix prefill + engine)")
    print(f"{'context':>8} {'method':<17} {'TTFT s':>8} {'vs full':>8} {'of prefix-hit':>14} {'recomputed':>10}"
          f"{'load':>7}{'score':>7}{'recomp':>7}{'rest':>7}")
    for r in report["results"]:
        share = r.get("share_of_prefix_hit_speedup")
        t = r.get("timings_s") or {}
        parts = ""
        if t:
            load, score = t.get("load", 0.0), t.get("score", 0.0)
            recomp = t.get("recompute", 0.0) + t.get("glue", 0.0)
            rest = r["ttft_s"] - load - score - recomp
            parts = "".join(f"{1e3 * x:>7.1f}" for x in (load, score, recomp, rest))
        speedup = r.get("speedup_vs_full")  # None where the run had no `full`
        print(f"{r['context_tokens']:>8} {run_name(r):<17} {r['ttft_s']:>8.3f} "
              f"{'' if speedup is None else f'{speedup:>7.2f}x':>8} "
              f"{'' if share is None else f'{share:>13.0%}':>14} "
              f"{'' if r['tokens_recomputed'] is None else r['tokens_recomputed']:>10}{parts}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvflow bench ttft", description=__doc__)
    p.add_argument("--model", default=None, help="model directory (default: embedded SmolLM2)")
    p.add_argument("--context-tokens", default="1024,2048,4096")
    p.add_argument("--methods", default="full,none,prefix-hit")
    p.add_argument("--ratio", default="0.15",
                   help="one ratio or a comma list (each recomputing method runs at each)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, auto on GPU")
    p.add_argument("--load-format", default="auto", help="'dummy': random weights (speed only)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.6)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--store", choices=("device", "host"), default=None,
                   help="GPU only: keep the warm chunk store in device memory or in host memory")
    p.add_argument("--out", default=None, help="JSON file")
    args = p.parse_args(argv)
    args.dtype = args.dtype or default_dtype()
    report = run(args)
    print_table(report)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}")
    return 0
