"""`kvflow demo`: multi-passage RAG on the embedded SmolLM2-135M-Instruct.

1. Index: every passage's KV is computed once, in isolation, into the chunk store.
2. Ask: each question's prompt is assembled from its passages; the engine reuses their
   KV (re-rotated to their new positions) and recomputes ~15% of the chunk tokens
   chosen by the question's attention (InfoFlow KV). The same prompt is also answered
   with full prefill, and both TTFTs are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from vllm_kvflow.bench.dataset import generate as make_dataset
from vllm_kvflow.bench.engine import environment, make_llm, time_first_token
from vllm_kvflow.rag import build_rag_prompt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvflow demo", description=__doc__)
    p.add_argument("--questions", type=int, default=5)
    p.add_argument("--passages", type=int, default=12, help="passages per question")
    p.add_argument("--method", default="infoflow")
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--max-model-len", type=int, default=4096,
                   help="the engine's context length (its KV cache is sized from it)")
    p.add_argument("--out", help="also write the timings and answers as JSON here")
    a = p.parse_args(argv)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep the demo's output readable

    print("kvflow demo: starting the vLLM engine (CPU, SmolLM2-135M-Instruct) ...", flush=True)
    llm = make_llm(max_model_len=a.max_model_len, method=a.method, recompute_ratio=a.ratio, log_stats=False)
    tok = llm.get_tokenizer()
    from vllm import SamplingParams

    # A shared document pool: each question retrieves a subset, in its own order.
    pool = make_dataset(a.questions, num_passages=a.passages, passage_words=60, seed=7)
    print(f"indexing {sum(len(it['passages']) for it in pool)} passages into the chunk store ...",
          flush=True)
    for it in pool:
        warm = build_rag_prompt(tok, "Index only.", it["passages"], method="none")
        time_first_token(llm, warm.vllm_prompt(), warm.kv_transfer_params)

    rows, records = [], []
    for i, it in enumerate(pool, 1):
        passages = it["passages"][::-1] if i % 2 else it["passages"]  # a new order: still hits
        answers = {}
        for method in ("full", a.method):
            rp = build_rag_prompt(tok, it["question"], passages, method=method, ratio=a.ratio)
            ttft, out = time_first_token(llm, rp.vllm_prompt(), rp.kv_transfer_params)
            sp = SamplingParams(temperature=0.0, max_tokens=a.max_tokens,
                                extra_args={"kv_transfer_params": rp.kv_transfer_params})
            text = llm.generate([rp.vllm_prompt()], sp, use_tqdm=False)[0].outputs[0].text.strip()
            stats = (out.kv_transfer_params or {}).get("kvflow_stats", {})
            answers[method] = (ttft, text, stats, len(rp.prompt_token_ids))
        (t_full, a_full, _, n), (t_kv, a_kv, st, _) = answers["full"], answers[a.method]
        rows.append((t_full, t_kv))
        records.append({"question": it["question"], "gold": it["answers"][0], "prompt_tokens": n,
                        "full": {"ttft_s": t_full, "answer": a_full},
                        a.method: {"ttft_s": t_kv, "answer": a_kv, "stats": st}})
        print(f"\nQ{i}: {it['question']}   (gold: {it['answers'][0]}, {n} prompt tokens)")
        print(f"  full prefill      TTFT {t_full:6.3f} s   {a_full!r}")
        print(f"  {a.method:<8} rho={a.ratio:<4} TTFT {t_kv:6.3f} s   {a_kv!r}")
        print(f"  chunks hit {st.get('chunks_hit')}/{st.get('chunks')}, "
              f"recomputed {st.get('tokens_recomputed')} of {st.get('candidate_tokens')} reused tokens, "
              f"speedup {t_full / t_kv:.2f}x")
    med_full = statistics.median(r[0] for r in rows)
    med_kv = statistics.median(r[1] for r in rows)
    print(f"\nmedian TTFT: full prefill {med_full:.3f} s, {a.method} {med_kv:.3f} s "
          f"-> {med_full / med_kv:.2f}x faster to the first token")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({**environment(), "command": "kvflow demo " + " ".join(argv or sys.argv[1:]),
                       "method": a.method, "ratio": a.ratio, "median_ttft_full_s": med_full,
                       f"median_ttft_{a.method}_s": med_kv, "speedup": med_full / med_kv,
                       "questions": records}, f, indent=1)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
