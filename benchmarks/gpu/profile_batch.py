"""Where a concurrent batch's time goes: one `LLM.generate` of N RAG requests per method,
timed, then profiled (GPU kernels by name, GPU busy share, host functions).

`kvflow bench load` measures a server under concurrency; this takes the same requests
(Zipf over a document pool, chunk store warm) into one in-process engine, so the
scheduler, the connector and the model runner are all in one profile.

    python3 benchmarks/gpu/profile_batch.py --model MODELS/llama-3.1-8b --load-format dummy \
        --requests 32 --methods full,none,infoflow --out OUTDIR

prints a table (batch wall, requests/s, GPU kernel time, busy share per method) and
writes OUTDIR/batch_<method>.txt (kernels by total time, host functions by own and
cumulative time) and OUTDIR/profile_batch.json.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time


def _batches(tok, pool, args, method: str, seed: int):
    """(prompts, sampling params) of one batch of requests drawn with seed."""
    from vllm import SamplingParams

    from vllm_kvflow.bench.load import zipf_requests
    from vllm_kvflow.rag import build_rag_prompt

    prompts, params = [], []
    for i, req in enumerate(zipf_requests(pool, args.requests, args.docs_per_request,
                                          args.zipf, seed)):
        docs = [pool[j] for j in req["docs"]]
        # A unique instruction per request keeps vLLM's prefix cache from serving `full`
        # the context another request of the batch already prefilled.
        p = build_rag_prompt(tok, req["question"], docs, instruction=f"Batch {seed} request {i}.",
                             method=method, ratio=args.ratio)
        prompts.append(p.vllm_prompt())
        params.append(SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True,
                                     extra_args={"kv_transfer_params": p.kv_transfer_params}))
    return prompts, params


def _kernel_table(prof, top: int) -> tuple[str, float]:
    """Kernels by total device time, and the sum of all kernel time in seconds."""
    rows, total = [], 0.0
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", 0.0) or 0.0
        if t > 0 and ev.device_type.name != "CPU":
            rows.append((t, ev.count, ev.key))
            total += t
    rows.sort(reverse=True)
    lines = [f"{'ms':>9} {'calls':>6}  kernel"]
    lines += [f"{t / 1e3:9.2f} {n:6d}  {k[:110]}" for t, n, k in rows[:top]]
    return "\n".join(lines), total / 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--docs-per-request", type=int, default=8)
    p.add_argument("--doc-words", type=int, default=330)
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--methods", default="full,none,infoflow")
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--warm-batches", type=int, default=3)
    p.add_argument("--settings", default="{}", help="more engine settings, JSON")
    p.add_argument("--out", default=".")
    args = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from vllm_kvflow.bench.engine import environment, make_llm
    from vllm_kvflow.bench.load import document_pool

    llm = make_llm(args.model, prefix_caching=True, max_model_len=8192,
                   load_format=args.load_format, method="none", recompute_ratio=args.ratio,
                   store_device_gb=24.0, log_stats=False, **json.loads(args.settings))
    tok = llm.get_tokenizer()
    pool = document_pool(args.docs, args.doc_words, seed=3)
    os.makedirs(args.out, exist_ok=True)
    methods = args.methods.split(",")
    # Warm: every document of the pool stored (the timed batches then measure hits
    # only), every pass, kernel and graph bucket met a few times per method.
    from vllm import SamplingParams

    from vllm_kvflow.rag import build_rag_prompt

    k = args.docs_per_request
    store_warm = [build_rag_prompt(tok, "Warm.", pool[i:i + k], method="none")
                  for i in range(0, len(pool), k)]
    llm.generate([w.vllm_prompt() for w in store_warm],
                 [SamplingParams(max_tokens=1, extra_args={"kv_transfer_params": w.kv_transfer_params})
                  for w in store_warm], use_tqdm=False)
    for m in methods:
        for rep in range(args.warm_batches):
            llm.generate(*_batches(tok, pool, args, m, seed=100 + rep), use_tqdm=False)

    results = []
    for k, m in enumerate(methods):
        walls = []
        for rep in range(2):
            batch = _batches(tok, pool, args, m, seed=200 + 10 * k + rep)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            llm.generate(*batch, use_tqdm=False)
            walls.append(time.perf_counter() - t0)
        batch = _batches(tok, pool, args, m, seed=300 + k)
        host = cProfile.Profile()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            host.enable()
            t0 = time.perf_counter()
            llm.generate(*batch, use_tqdm=False)
            torch.cuda.synchronize()
            profiled_wall = time.perf_counter() - t0
            host.disable()
        kernels, kernel_s = _kernel_table(prof, args.top)
        buf = io.StringIO()
        stats = pstats.Stats(host, stream=buf)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(50)
        wall = min(walls)
        row = {"method": m, "requests": args.requests, "wall_s": wall,
               "req_per_s": args.requests / wall, "profiled_wall_s": profiled_wall,
               "kernel_s": kernel_s, "gpu_busy": kernel_s / profiled_wall}
        results.append(row)
        with open(os.path.join(args.out, f"batch_{m}.txt"), "w") as f:
            f.write(f"{json.dumps(row)}\n\n{kernels}\n\n{buf.getvalue()}")
    full = next((r for r in results if r["method"] == "full"), None)
    print(f"{'method':<10} {'wall s':>7} {'req/s':>7} {'vs full':>7} {'kernel s':>8} {'GPU busy':>8}")
    for r in results:
        vs = f"{r['req_per_s'] / full['req_per_s']:.2f}x" if full else "-"
        print(f"{r['method']:<10} {r['wall_s']:7.3f} {r['req_per_s']:7.2f} {vs:>7} "
              f"{r['kernel_s']:8.3f} {r['gpu_busy']:8.0%}")
    with open(os.path.join(args.out, "profile_batch.json"), "w") as f:
        json.dump({"environment": environment(), "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
