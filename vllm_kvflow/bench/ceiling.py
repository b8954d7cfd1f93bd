"""`kvflow bench ceiling`: how much of the reuse gap a budget of floor(rho*T) recomputed
tokens could close, and how much of that each selector closes.

Everything runs in the transformers reference of the blend (bench/hf_blend.py, float32,
CPU), not in the engine. Per question: full prefill's greedy answer (the reference
answer, as `kvflow bench quality` uses), the blend of the isolated chunks, and then for
each selector and rho the teacher-forced NLL of that answer after recomputing the
selector's tokens; nll_gap is that NLL minus full prefill's.

The ceiling: per reused token, the first-order change of the answer's NLL if its K/V
(all layers) became full prefill's, from one backward pass (the gradient of the NLL with
respect to the reused K/V, dotted with K_full - K_reused and V_full - V_reused). Its top
floor(rho*T) tokens are then really recomputed and their nll_gap measured like any
selector's: the estimate ranks, the measurement judges. It is an estimate, not a bound:
a selector may close more. `oracle-kv` (the tokens whose K/V are farthest from full
prefill's) is a different thing, reported beside it.

"closed" is the share of none's nll_gap a method recovers (1 - mean gap / mean gap of
none); "of ceiling" is closed / the ceiling's closed at the same rho. Intervals: 95%
bootstrap, paired over questions.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np

from vllm_kvflow.bench import metrics as M
from vllm_kvflow.bench.dataset import load_items

DEFAULT_METHODS = "none,random,epic,cacheblend,infoflow,oracle-kv"
RATIO_FREE = ("none",)


def environment() -> dict:
    """Card and versions of a reference (transformers) run."""
    import platform

    import torch
    import transformers

    import vllm_kvflow

    return {"card": f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "vllm_kvflow": vllm_kvflow.__version__, "dtype": "float32",
            "torch_threads": torch.get_num_threads()}


class Checkpoint:
    """Per-question records of an interrupted run (JSONL beside the output), keyed by the
    dataset's content and the settings, so a rerun computes only what is missing."""

    def __init__(self, out: str, key: dict):
        self.path = out.rsplit(".", 1)[0] + ".partial.jsonl"
        self.key = key
        self.records: dict[str, dict] = {}
        if os.path.exists(self.path):
            with open(self.path) as f:
                lines = [json.loads(x) for x in f if x.strip()]
            if lines and lines[0].get("key") == key:
                self.records = {r["id"]: r for r in lines[1:]}
                print(f"resuming from {self.path}: {len(self.records)} questions done", file=sys.stderr)
            else:
                print(f"ignoring {self.path}: made with other settings", file=sys.stderr)
                os.remove(self.path)
        if not os.path.exists(self.path):
            with open(self.path, "w") as f:
                f.write(json.dumps({"key": key}) + "\n")

    def add(self, record: dict) -> None:
        self.records[record["id"]] = record
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def dataset_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def build_question(ref, tok, item: dict, max_tokens: int, piece_cache: dict):
    from vllm_kvflow.bench.hf_select import Question
    from vllm_kvflow.rag import build_rag_prompt

    rp = build_rag_prompt(tok, item["question"], item["passages"])
    return Question(ref, rp.prompt_token_ids, rp.chunk_spans, rp.question_span,
                    max_tokens=max_tokens, eos=tok.eos_token_id, piece_cache=piece_cache)


def measure(q, methods: list[str], ratios: list[float]) -> dict:
    """nll_gap and recompute count per method@rho for one question."""
    from vllm_kvflow.bench.hf_select import select

    out = {}
    for method in methods:
        for ratio in ([0.0] if method in RATIO_FREE else ratios):
            positions, base = select(method, q, ratio)
            out[f"{method}@{ratio}"] = {"gap": q.nll_gap(positions, base), "k": int(positions.numel())}
    for ratio in ratios:
        positions, base = select("ceiling", q, ratio)
        est = float(q.nll_gradient_estimate[positions].sum())
        out[f"ceiling@{ratio}"] = {"gap": q.nll_gap(positions, base), "k": int(positions.numel()),
                                   "linear_estimate": est}
    return out


def run(args) -> dict:
    import torch
    from transformers import AutoTokenizer

    from vllm_kvflow.bench.hf_blend import HFReference

    torch.set_num_threads(args.threads)
    items = load_items(args.dataset, args.limit)
    methods = [m for m in args.methods.split(",") if m]
    ratios = [float(r) for r in args.ratio.split(",") if r]
    from vllm_kvflow.bench.hf_select import SELECTORS

    unknown = sorted(set(methods) - set(SELECTORS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {sorted(SELECTORS)}")
    ref = HFReference(args.model)
    tok = AutoTokenizer.from_pretrained(args.model or _default_model())
    key = {"dataset": dataset_digest(args.dataset), "methods": methods, "ratios": ratios,
           "max_tokens": args.max_tokens, "model": args.model, "version": REFERENCE_VERSION}
    ckpt = Checkpoint(args.out, key)
    from tqdm import tqdm

    t0 = time.perf_counter()
    for i, item in enumerate(tqdm(items, desc="ceiling", unit="question", file=sys.stderr)):
        qid = str(item.get("id", i))
        if qid in ckpt.records:
            continue
        q = build_question(ref, tok, item, args.max_tokens, piece_cache={})
        record = {"id": qid, "T": q.num_candidates, "nll_full": q.nll_full,
                  "answer": tok.decode(q.answer), "runs": measure(q, methods, ratios)}
        ckpt.add(record)
    records = [ckpt.records[str(it.get("id", i))] for i, it in enumerate(items)]
    report = summarize(records, methods, ratios)
    if args.engine_run:
        report["engine_agreement"] = engine_agreement(records, args.engine_run, tok)
    report.update(environment())
    report.update({"dataset": args.dataset, "n": len(records), "max_tokens": args.max_tokens,
                   "seconds": time.perf_counter() - t0,
                   "command": "kvflow bench ceiling " + " ".join(sys.argv[1:] if args.argv is None else args.argv),
                   "per_question": records})
    return report


# Bump when the reference's results change; checkpoints of an older version are redone.
REFERENCE_VERSION = 1


def _default_model() -> str:
    from vllm_kvflow.model import default_model_path

    return str(default_model_path())


def summarize(records: list[dict], methods: list[str], ratios: list[float]) -> dict:
    def gaps(name):
        return np.array([r["runs"][name]["gap"] for r in records])

    none = gaps("none@0.0") if "none" in methods else None
    none_mean = float(none.mean()) if none is not None else None
    rows = []
    for ratio in ratios:
        ceiling = gaps(f"ceiling@{ratio}")
        ceiling_closed = 1 - ceiling.mean() / none_mean if none_mean else None
        for method in [m for m in methods if m not in RATIO_FREE] + ["ceiling"]:
            g = gaps(f"{method}@{ratio}")
            mean, lo, hi = M.mean_ci(g)
            row = {"method": method, "ratio": ratio, "nll_gap": mean, "nll_gap_ci": [lo, hi],
                   "recomputed": float(np.mean([r["runs"][f"{method}@{ratio}"]["k"] for r in records]))}
            if none_mean:
                row["closed"] = 1 - mean / none_mean
                # Closed share with a paired bootstrap interval: resample questions once,
                # the same for the method and none.
                row["closed_ci"] = list(_closed_ci(g, none))
                if ceiling_closed:
                    row["of_ceiling"] = row["closed"] / ceiling_closed
            if method != "cacheblend" and "cacheblend" in methods:
                row["vs_cacheblend"] = list(M.paired_diff_ci(g, gaps(f"cacheblend@{ratio}")))
            if method != "ceiling":
                row["vs_ceiling"] = list(M.paired_diff_ci(g, ceiling))
            if method == "ceiling":
                row["linear_estimate"] = float(np.mean([r["runs"][f"ceiling@{ratio}"]["linear_estimate"]
                                                        for r in records]))
            rows.append(row)
    out = {"results": rows}
    if none is not None:
        mean, lo, hi = M.mean_ci(none)
        out["none"] = {"nll_gap": mean, "nll_gap_ci": [lo, hi]}
    return out


def engine_agreement(records: list[dict], path: str, tok) -> dict:
    """The reference against the engine on the same questions: per method@rho, the largest
    |nll_gap difference| against a `kvflow bench quality` run's per-question records
    (its .partial.json), over the questions where both found the same full-prefill answer."""
    with open(path) as f:
        saved = json.load(f)
    engine_ids = [str(x) for x in saved["key"][1]]
    runs = {f"{r['method']}@{r['ratio']}": r["data"] for r in saved["runs"]}
    full = runs["full@0.0"]
    out: dict = {"source": path, "questions": 0, "same_answer": 0, "max_abs_gap_diff": {}}
    for r in records:
        if r["id"] not in engine_ids:
            continue
        i = engine_ids.index(r["id"])
        out["questions"] += 1
        if tok.decode(full["answer_ids"][i]) != r["answer"]:
            continue
        out["same_answer"] += 1
        for name, run in runs.items():
            if name in r["runs"]:
                diff = abs(run["nll"][i] - full["nll"][i] - r["runs"][name]["gap"])
                worst = out["max_abs_gap_diff"]
                worst[name] = max(worst.get(name, 0.0), diff)
    return out


def _closed_ci(gap, none_gap, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(gap), (resamples, len(gap)))
    closed = 1 - gap[idx].mean(1) / none_gap[idx].mean(1)
    return float(np.percentile(closed, 2.5)), float(np.percentile(closed, 97.5))


def print_table(report: dict) -> None:
    print(f"\nceiling on {report['dataset']} ({report['card']}, torch {report['torch']}, "
          f"transformers {report['transformers']}), n={report['n']}")
    agree = report.get("engine_agreement")
    if agree:
        worst = max(agree["max_abs_gap_diff"].values(), default=float("nan"))
        print(f"reference against the engine ({agree['source']}): {agree['same_answer']}/"
              f"{agree['questions']} questions with the same full-prefill answer, per-question "
              f"nll_gap within {worst:.1e} for {sorted(agree['max_abs_gap_diff'])}")
    if "none" in report:
        lo, hi = report["none"]["nll_gap_ci"]
        print(f"none: nll_gap {report['none']['nll_gap']:.4f} [{lo:.4f}, {hi:.4f}]")
    print(f"{'method':<12}{'rho':>5}{'nll_gap [95% CI]':>26}{'closed [95% CI]':>22}{'of ceiling':>11}"
          f"{'vs cacheblend [95% CI]':>30}")
    for r in report["results"]:
        lo, hi = r["nll_gap_ci"]
        closed = r.get("closed")
        cl = "" if closed is None else f"{closed:>7.1%} [{r['closed_ci'][0]:.0%},{r['closed_ci'][1]:.0%}]"
        of = "" if r.get("of_ceiling") is None else f"{r['of_ceiling']:>10.0%}"
        vs = r.get("vs_cacheblend")
        vs = "" if vs is None else f"{vs[0]:+.4f} [{vs[1]:+.4f},{vs[2]:+.4f}]"
        print(f"{r['method']:<12}{r['ratio']:>5.2f}{r['nll_gap']:>9.4f} [{lo:.4f},{hi:.4f}]"
              f"{cl:>22}{of:>11}{vs:>30}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvflow bench ceiling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--ratio", default="0.05,0.15,0.3", help="comma list of rho")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"selectors beside the ceiling (default {DEFAULT_METHODS})")
    p.add_argument("--max-tokens", type=int, default=16, help="length of the reference answer")
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--engine-run", default=None,
                   help="a `kvflow bench quality` checkpoint (.partial.json) on the same questions: "
                        "report how far the reference's per-question nll_gap is from the engine's")
    p.add_argument("--out", required=True, help="JSON file; per-question records are kept beside "
                   "it (.partial.jsonl) and reused by a rerun with the same settings")
    args = p.parse_args(argv)
    args.argv = argv
    report = run(args)
    print_table(report)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    return 0
