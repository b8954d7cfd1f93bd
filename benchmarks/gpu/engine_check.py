"""Exactness of chunk reuse inside real vLLM on the GPU (FLASH_ATTN layout, the Triton
kernels), on a dummy-weight model given trained-scale random weights.

1. ratio 1.0 reproduces full prefill: identical greedy tokens, first-token logprobs
   within bf16 noise, for infoflow / cacheblend / random on several multi-chunk prompts;
2. re-rotated layer-0 keys in the engine's own paged cache equal keys computed at the
   global positions (both bf16; tolerance: 2 bf16 ulps of the largest key);
3. infoflow at 0.15 runs without fallback and recomputes ~15%.

    python benchmarks/gpu/engine_check.py --model .gpu_models/llama-3.1-8b --out check.json
"""
import argparse
import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _prompts(tok, n: int):
    from vllm_kvflow.bench.dataset import generate
    from vllm_kvflow.rag import build_rag_prompt

    items = generate(n, num_passages=6, passage_words=60, seed=11)
    return [(it, lambda it=it, **kw: build_rag_prompt(tok, it["question"], it["passages"], **kw)) for it in items]


def check_ratio_one(llm, tok, n_prompts: int, max_tokens: int) -> list[dict]:
    """Each method at ratio 1.0 against full prefill, and vLLM's own noise floor: the
    same prompts computed in two steps (the context first, then the rest over vLLM's
    prefix-cached KV), which changes only the kernel schedule, as reuse does. Every run
    has its own cache salt, so no run is served another's blocks."""
    from vllm import SamplingParams

    prompts = _prompts(tok, n_prompts)
    rows = []

    def run(name, built, salt):
        sps = [SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=4,
                              extra_args={"kv_transfer_params": p.kv_transfer_params}) for p in built]
        outs = llm.generate([{**p.vllm_prompt(), "cache_salt": salt} for p in built], sps, use_tqdm=False)
        rows.append({"method": name,
                     "tokens": [list(o.outputs[0].token_ids) for o in outs],
                     "first_logprob": [next(iter(o.outputs[0].logprobs[0].values())).logprob for o in outs],
                     "margins": [[_top2_margin(step) for step in o.outputs[0].logprobs] for o in outs],
                     "stats": [(o.kv_transfer_params or {}).get("kvflow_stats", {}) for o in outs]})

    run("full", [make(method="full") for _, make in prompts], "full")
    heads = [make(method="full") for _, make in prompts]
    for h in heads:  # vLLM's two-step schedule: cache the context's blocks first
        h.prompt_token_ids = h.prompt_token_ids[:h.chunk_spans[-1][1]]
    llm.generate([{**h.vllm_prompt(), "cache_salt": "two-step"} for h in heads],
                 SamplingParams(max_tokens=1), use_tqdm=False)
    run("vllm-two-step", [make(method="full") for _, make in prompts], "two-step")
    for method in ("infoflow", "cacheblend", "random", "infoflow-reorder"):
        run(method, [make(method=method, ratio=1.0) for _, make in prompts], method)
    full = rows[0]
    for r in rows[1:]:
        r["identical_tokens"] = sum(a == b for a, b in zip(r["tokens"], full["tokens"]))
        r["max_first_logprob_diff"] = max(abs(a - b) for a, b in zip(r["first_logprob"], full["first_logprob"]))
        # Where greedy tokens part: the step, and how close full prefill's top two were
        # there (a near-tie that any change of summation order may flip).
        r["divergences"] = []
        for i, (got, want) in enumerate(zip(r["tokens"], full["tokens"])):
            step = next((j for j, (x, y) in enumerate(zip(got, want)) if x != y), None)
            if step is not None:
                r["divergences"].append({"prompt": i, "step": step,
                                         "full_top2_margin": full["margins"][i][step]})
        r["all_reused_and_recomputed"] = r["method"] == "vllm-two-step" or all(
            s.get("fallback") is None and s["tokens_reused"] == s["chunk_tokens"]
            and s["tokens_recomputed"] == s["candidate_tokens"] >= s["chunk_tokens"]
            for s in r["stats"])
    return rows


def _top2_margin(step_logprobs) -> float | None:
    """Logprob of the best token minus that of the best token scoring lower, at one
    generated step. Lower, not second: under tensor parallelism every rank randomizes
    its vocabulary shard alike, so each logit appears twice, exactly."""
    values = sorted({lp.logprob for lp in step_logprobs.values()}, reverse=True)
    return values[0] - values[1] if len(values) > 1 else None


def check_rerotated_keys(tok) -> dict:
    import torch
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    from vllm_kvflow.blend.paged import DenseKV

    worker = get_kv_transfer_group()._worker
    pipeline = worker._ready()
    chunk = tok.encode("Quellport was founded by Ada Finch in 1742, on the northern bank.",
                       add_special_tokens=False)
    entry = pipeline.compute_isolated(chunk)
    shape, device = pipeline.adapter.shape, pipeline.adapter.device
    offset = 1337  # the chunk's start in some long prompt, across block boundaries
    filler = (tok.encode(" filler" * offset, add_special_tokens=False) * 2)[:offset]
    ids = torch.tensor(filler + chunk, device=device)
    direct = DenseKV.empty(pipeline.adapter.num_layers, len(ids), shape.num_kv_heads, shape.head_dim,
                           entry.keys.dtype, device)
    pipeline.executor.prefill(ids, torch.arange(len(ids), device=device), direct)
    expected = direct.keys[0, offset:].float()
    # The engine's own FLASH_ATTN cache, in its last blocks (no request holds them now).
    cache = worker._kv_caches[next(iter(worker._kv_caches))]
    nblocks = -(-(offset + len(chunk)) // worker._views["block_size"])
    kv = worker._paged_kv(list(range(cache.shape[0] - nblocks, cache.shape[0])), device)
    positions = torch.arange(offset, offset + len(chunk), device=device)
    offsets = torch.arange(len(chunk), device=device)
    delta = positions - (offsets + entry.local_start)
    kv.load_rotated(0, positions, entry.keys[0].to(device), entry.values[0].to(device), delta,
                    pipeline.cos_sin.to(device), pipeline.rotary_dim, pipeline.is_neox)
    keys, values = kv.read(0, offset + len(chunk))
    err = (keys[offset:].float() - expected).abs().max().item()
    tol = 2 * 2.0 ** -7 * expected.abs().max().item()  # 2 bf16 ulps at the largest key
    return {"layout": worker._views["cls"].__name__, "block_size": worker._views["block_size"],
            "max_abs_err": err, "tolerance": tol, "ok": err <= tol,
            "values_equal": bool(torch.equal(values[offset:], entry.values[0].to(device)))}


def check_partial(llm, tok) -> dict:
    from vllm import SamplingParams

    (_, make), = _prompts(tok, 1)
    p = make(method="infoflow", ratio=0.15)
    out = llm.generate([p.vllm_prompt()], SamplingParams(temperature=0.0, max_tokens=4, extra_args={
        "kv_transfer_params": p.kv_transfer_params}), use_tqdm=False)[0]
    s = out.kv_transfer_params["kvflow_stats"]
    return {"stats": s, "ok": s.get("fallback") is None and 0 < s["tokens_recomputed"] < s["candidate_tokens"]}


def check_concurrent(llm, tok, n: int = 24) -> dict:
    """The asynchronous load path under concurrency: n requests over overlapping
    passages, on a cold store (a namespace of their own), submitted together (misses
    computed once, loads and passes batched) and then one at a time (all hits): the same
    greedy tokens and the same number of recomputed tokens.

    The floor is vLLM's own: the same prompts prefilled in full, together and one at a
    time (salted apart, so no prefix-cache hit crosses the phases). Batched and single
    forwards round differently, so on random weights, whose greedy choices are near-ties,
    vLLM itself changes some tokens; kvflow passes if it changes no more."""
    from vllm import SamplingParams

    from vllm_kvflow.bench.dataset import generate
    from vllm_kvflow.rag import build_rag_prompt

    pool = [p for it in generate(4, num_passages=6, passage_words=60, seed=21) for p in it["passages"]]
    built = []
    for r in range(n):
        passages = [pool[(r + 5 * k) % len(pool)] for k in range(5)]
        p = build_rag_prompt(tok, f"Which city exports item {r}?", passages, method="infoflow", ratio=0.15)
        p.kv_transfer_params["kvflow"]["namespace"] = "concurrent-check"
        built.append(p)

    def run(batch):
        sps = [SamplingParams(temperature=0.0, max_tokens=6, extra_args={
            "kv_transfer_params": p.kv_transfer_params}) for p in batch]
        return llm.generate([p.vllm_prompt() for p in batch], sps, use_tqdm=False)

    def run_full(batch, phase):
        prompts = [{**p.vllm_prompt(), "cache_salt": f"floor-{phase}"} for p in batch]
        return llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)

    floor_together = run_full(built, "together")
    floor_alone = [run_full([p], "alone")[0] for p in built]
    floor = sum(list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
                for a, b in zip(floor_together, floor_alone))
    together = run(built)
    alone = [run([p])[0] for p in built]
    st_together = [o.kv_transfer_params["kvflow_stats"] for o in together]
    st_alone = [o.kv_transfer_params["kvflow_stats"] for o in alone]
    same = sum(list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
               and sa["tokens_recomputed"] == sb["tokens_recomputed"]
               for a, b, sa, sb in zip(together, alone, st_together, st_alone))
    same_selection = sum(sa.get("selected_positions") == sb.get("selected_positions")
                         for sa, sb in zip(st_together, st_alone))
    # How far apart differing selections are: rounding flips near-ties at the budget's
    # edge (a few positions of a request), a defect changes many.
    overlap = [_jaccard(sa.get("selected_positions"), sb.get("selected_positions"))
               for sa, sb in zip(st_together, st_alone)]
    return {"requests": n, "identical": same, "vllm_floor_identical": floor,
            "same_selection": same_selection,
            "selection_overlap_min": min(overlap), "selection_overlap_mean": sum(overlap) / n,
            "misses_together": sum(s["chunks_missed"] for s in st_together),
            "max_batched_with": max(s.get("batched_with", 0) for s in st_together),
            "fallbacks": sum(bool(s.get("fallback")) for s in st_together + st_alone),
            "ok": same >= floor and not any(s.get("fallback") for s in st_together + st_alone)}


def _jaccard(a, b) -> float:
    """|a & b| / |a | b| of two selections (position lists); 1.0 when both are empty."""
    a, b = set(a or ()), set(b or ())
    return len(a & b) / len(a | b) if a | b else 1.0


def _randomize_on_worker(worker) -> None:
    """collective_rpc target: each tensor-parallel worker randomizes its own shards."""
    from vllm_kvflow.bench.engine import randomize_weights

    randomize_weights()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size (workers in subprocesses)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--only-concurrent", action="store_true", help="the concurrency check alone")
    ap.add_argument("--settings", default="{}",
                    help='more engine settings as JSON, e.g. \'{"blend_stream": "side"}\'')
    args = ap.parse_args()
    settings = json.loads(args.settings)

    from vllm_kvflow.bench.engine import environment, make_llm, randomize_weights

    if args.tp > 1:
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # a function via collective_rpc
    llm = make_llm(args.model, load_format="dummy", dtype=args.dtype, max_model_len=4096,
                   tensor_parallel_size=args.tp, prefix_caching=True,
                   **{"method": "infoflow", "log_stats": False, "debug_selection": True, **settings})
    if args.tp > 1:
        llm.collective_rpc(_randomize_on_worker)
    else:
        randomize_weights()
    tok = llm.get_tokenizer()
    if args.only_concurrent:
        c = check_concurrent(llm, tok)
        print(f"\n{args.model}: {c}")
        with open(args.out, "w") as f:
            json.dump({**environment(), "model": args.model, "settings": settings, "concurrent": c},
                      f, indent=1)
        return 0 if c["ok"] else 1
    report = {**environment(), "model": args.model, "tp": args.tp, "settings": settings,
              "ratio_one": check_ratio_one(llm, tok, args.prompts, args.max_tokens),
              # The worker (and its cache) lives in this process only without TP.
              "rerotated_keys": check_rerotated_keys(tok) if args.tp == 1 else None,
              "partial": check_partial(llm, tok),
              "concurrent": check_concurrent(llm, tok)}
    print(f"\n{args.model} on {report['card']} (vLLM {report['vllm']})")
    rows = report["ratio_one"]
    floor = rows[1]
    ok = True
    for r in rows[1:]:
        # Exact means: the same greedy tokens as full prefill on every prompt, or no
        # further from it than vLLM itself is under a different schedule (floor).
        good = r["all_reused_and_recomputed"] and (
            r["identical_tokens"] == args.prompts
            or (r["identical_tokens"] >= floor["identical_tokens"]
                and r["max_first_logprob_diff"] <= 2 * floor["max_first_logprob_diff"] + 1e-3))
        r["exact"] = good
        ok &= good
        print(f"  ratio 1.0 {r['method']:<17} identical {r['identical_tokens']}/{args.prompts}  "
              f"max |dlogprob| {r['max_first_logprob_diff']:.4f}  all recomputed {r['all_reused_and_recomputed']}")
        for d in r["divergences"]:
            print(f"      prompt {d['prompt']} parts at step {d['step']}: full prefill's top-2 "
                  f"logprob margin there {d['full_top2_margin']:.4f}")
    k = report["rerotated_keys"] or {"ok": True, "values_equal": True}
    if report["rerotated_keys"]:
        print(f"  re-rotated keys ({k['layout']}, block {k['block_size']}): max err {k['max_abs_err']:.5f} "
              f"<= {k['tolerance']:.5f}: {k['ok']}; values equal: {k['values_equal']}")
    p = report["partial"]["stats"]
    print(f"  infoflow 0.15: recomputed {p.get('tokens_recomputed')}/{p.get('candidate_tokens')} "
          f"fallback {p.get('fallback')}")
    c = report["concurrent"]
    print(f"  {c['requests']} concurrent requests (cold store: {c['misses_together']} misses, "
          f"passes batched up to {c['max_batched_with'] + 1} requests): {c['identical']} identical "
          f"to one at a time (vLLM's own full prefill: {c['vllm_floor_identical']}), "
          f"{c['fallbacks']} fallbacks; same selection {c['same_selection']}/{c['requests']}, "
          f"overlap of the selections min {c['selection_overlap_min']:.3f} / mean "
          f"{c['selection_overlap_mean']:.3f}")
    ok &= k["ok"] and k["values_equal"] and report["partial"]["ok"] and c["ok"]
    report["pass"] = bool(ok)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
