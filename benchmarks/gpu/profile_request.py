"""Where one request's host time goes: cProfile around a single timed request, after the
same warm-up as `kvflow bench ttft` (engine in-process, so the scheduler, the connector
and the model runner are all in the profile).

    python3 benchmarks/gpu/profile_request.py --model MODELS/llama-3.1-8b --load-format dummy \
        --context-tokens 32768 --methods none,prefix-hit --out OUTDIR
writes OUTDIR/profile_<method>_<context>.txt (top functions by own and by cumulative time).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--context-tokens", type=int, default=8192)
    p.add_argument("--methods", default="none,prefix-hit")
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--out", default=".")
    args = p.parse_args()

    from vllm_kvflow.bench.engine import make_llm, time_first_token
    from vllm_kvflow.bench.ttft import SYSTEM_PROMPT, _passages_for
    from vllm_kvflow.rag import build_rag_prompt

    llm = make_llm(args.model, prefix_caching=True, max_model_len=args.context_tokens + 512,
                   load_format=args.load_format, method="none", recompute_ratio=args.ratio,
                   store_device_gb=24.0)
    tok = llm.get_tokenizer()
    passages = _passages_for(tok, args.context_tokens, seed=7)
    os.makedirs(args.out, exist_ok=True)
    for method in args.methods.split(","):
        def request(question: str, tag: str):
            if method == "prefix-hit":
                base = build_rag_prompt(tok, "Warm.", passages, instruction=tag)
                time_first_token(llm, base.vllm_prompt(), None)
                q = build_rag_prompt(tok, question, passages, instruction=tag)
                return lambda: time_first_token(llm, q.vllm_prompt(), None)
            q = build_rag_prompt(tok, question, passages, instruction=SYSTEM_PROMPT,
                                 method=method, ratio=args.ratio)
            return lambda: time_first_token(llm, q.vllm_prompt(), q.kv_transfer_params)

        for i in range(3):  # warm: store, kernels, graphs
            request(f"Which city exports item {i}?", f"Warm {method} {i}.")()
        run = request("Which city exports wool?", f"Profiled {method}.")
        prof = cProfile.Profile()
        prof.enable()
        ttft, _ = run()
        prof.disable()
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        buf.write(f"{method} at {args.context_tokens} tokens: TTFT {ttft * 1e3:.1f} ms (profiled)\n")
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(60)
        path = os.path.join(args.out, f"profile_{method}_{args.context_tokens}.txt")
        with open(path, "w") as f:
            f.write(buf.getvalue())
        print(buf.getvalue().splitlines()[0])


if __name__ == "__main__":
    main()
