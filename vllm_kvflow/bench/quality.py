"""`kvflow bench quality`: answer quality of each reuse method against full prefill.

Input: LongBench-style JSONL, one object per line: {"id", "question", "answers": [...],
"passages": [{"title", "text"}, ...]} (real LongBench / 2WikiMQA / MuSiQue / HotpotQA
exports work unchanged; `kvflow bench dataset` writes a fictional one).

Per method and ratio: accuracy (a normalized gold answer contained in the output),
LongBench token F1, fidelity (token F1 against the full-prefill answer), nll_gap (mean
per-token NLL of the full-prefill answer under the method minus under full prefill,
teacher-forced: the low-noise measure of how far the method's KV is from exact), echo
rate (answers that reproduce "Passage k:" headers), the recompute ratio actually used
and mean TTFT (requests timed alone). 95% intervals: paired bootstrap of the difference
against `none` and against `cacheblend`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np

from vllm_kvflow.bench import metrics as M
from vllm_kvflow.bench.dataset import load_items
from vllm_kvflow.bench.engine import environment, make_llm, time_first_token
from vllm_kvflow.blend.selection import METHODS
from vllm_kvflow.rag import build_rag_prompt, header_sink_ids

def ratio_free(name: str) -> bool:
    """A method whose result does not depend on rho (full prefill, pure reuse): run once."""
    m = METHODS.get(name)
    return m is None or not (m.reuses and m.recomputes)


def _progress(done: int, total: int, label: str) -> None:
    width = 30
    fill = int(width * done / max(total, 1))
    print(f"\r[{'#' * fill}{'.' * (width - fill)}] {done}/{total} {label:<28}", end="",
          file=sys.stderr, flush=True)


def _answer_nll(out, answer_len: int) -> float:
    """Mean NLL of the last answer_len prompt tokens from prompt_logprobs."""
    lps = out.prompt_logprobs[-answer_len:]
    ids = out.prompt_token_ids[-answer_len:]
    return -sum(lp[t].logprob for lp, t in zip(lps, ids)) / answer_len


def _check_served(outs, method: str) -> None:
    """The teacher-forced pass must run on the method's KV, not on a silent full prefill."""
    if method == "full":
        return
    for o in outs:
        stats = (o.kv_transfer_params or {}).get("kvflow_stats", {})
        if stats.get("fallback") is not None or "tokens_reused" not in stats:
            raise RuntimeError(f"teacher-forced {method} request was not served by kvflow: {stats}")


def run(args) -> dict:
    from vllm import SamplingParams

    items = load_items(args.dataset, args.limit)
    methods = [m for m in args.methods.split(",") if m]
    ratios = [float(r) for r in str(args.ratio).split(",")]
    # full first: it is the reference of fidelity and nll_gap.
    runs = [("full", 0.0)] + [(m, 0.0) for m in methods if m != "full" and ratio_free(m)]
    runs += [(m, r) for r in ratios for m in methods if not ratio_free(m)]
    per = _load_checkpoint(args, items)
    if all(r in per for r in runs):
        return _summarize(per, items, args)  # everything done: report without an engine
    # The store must hold every chunk of the dataset: each run after the first then hits
    # it, instead of recomputing evicted chunks in isolation.
    extra = {"scoring_layers": _layers_arg(args.scoring_layers)} if args.scoring_layers else {}
    if args.sink == "header":
        from transformers import AutoTokenizer

        from vllm_kvflow.model import default_model_path

        extra["sink_token_ids"] = header_sink_ids(
            AutoTokenizer.from_pretrained(args.model or str(default_model_path())))
    llm = make_llm(args.model, dtype=args.dtype, max_model_len=args.max_model_len,
                   num_seqs=args.max_seqs, size_flags="--max-model-len or --max-seqs",
                   gpu_memory_utilization=args.gpu_memory_utilization, method="none", log_stats=False,
                   store_capacity_gb=args.store_gb, **extra)
    tok = llm.get_tokenizer()
    prompts = [build_rag_prompt(tok, it["question"], it["passages"]) for it in items]

    full_answers: list[list[int]] = []
    if ("full", 0.0) in per:
        full_texts = per[("full", 0.0)]["answers"]
        full_answers = per[("full", 0.0)]["answer_ids"]
    total = len(runs)
    for k, (method, ratio) in enumerate(runs):
        _progress(k, total, f"{method} rho={ratio}")
        if (method, ratio) in per:
            continue  # finished in an earlier, interrupted run
        params = [{"kvflow": {**p.kv_transfer_params["kvflow"], "method": method, "ratio": ratio}}
                  for p in prompts]
        outs = llm.generate([p.vllm_prompt() for p in prompts],
                            [SamplingParams(temperature=0.0, max_tokens=args.max_tokens,
                                            extra_args={"kv_transfer_params": kp}) for kp in params],
                            use_tqdm=False)
        texts = [o.outputs[0].text for o in outs]
        if method == "full":
            full_answers = [list(o.outputs[0].token_ids) or [tok.eos_token_id] for o in outs]
            full_texts = texts
        # Teacher-forced NLL of the full-prefill answer under this method's KV.
        tf_prompts = [{"prompt_token_ids": p.prompt_token_ids + a} for p, a in zip(prompts, full_answers)]
        # prompt_logprobs makes vLLM skip cached/external KV by default; the answer's
        # logprobs come after the reused context, so the connector may serve it.
        # detokenize=False: prompt-logprob rows of the reused context were never computed
        # (their token ids are garbage) and must not be decoded.
        tf = llm.generate(tf_prompts, [SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0,
                                                      skip_reading_prefix_cache=False, detokenize=False,
                                                      extra_args={"kv_transfer_params": kp}) for kp in params],
                          use_tqdm=False)
        _check_served(tf, method)
        nll = [_answer_nll(o, len(a)) for o, a in zip(tf, full_answers)]
        stats = [(o.kv_transfer_params or {}).get("kvflow_stats", {}) for o in outs]
        ttft = []
        for p, kp in list(zip(prompts, params))[: args.ttft_samples]:
            ttft.append(time_first_token(llm, p.vllm_prompt(), kp)[0])
        per[(method, ratio)] = {
            "accuracy": [M.contains_answer(t, it["answers"]) for t, it in zip(texts, items)],
            "f1": [M.best_f1(t, it["answers"]) for t, it in zip(texts, items)],
            "fidelity": [M.token_f1(t, f) for t, f in zip(texts, full_texts)],
            "nll": nll,
            "echo_rate": [M.is_echo(t) for t in texts],
            "recompute_ratio": [s.get("tokens_recomputed", 0) / max(s.get("candidate_tokens", 1), 1)
                                if method != "full" else 1.0 for s in stats],
            "ttft_s": ttft,
            "answers": texts,
        }
        if method == "full":
            per[(method, ratio)]["answer_ids"] = full_answers
        _save_checkpoint(args, items, per)
    _progress(total, total, "done")
    print(file=sys.stderr)
    return _summarize(per, items, args)


# Bump when the reuse path's results change (2: glue KV reused and selectable); runs of
# an older version are recomputed on resume. Full prefill does not depend on it.
REUSE_VERSION = 2


def _layers_arg(text: str) -> list:
    """"18,19,20,21" (layer indices) or "0.6,0.65" (depth fractions)."""
    return [float(x) if "." in x else int(x) for x in text.split(",") if x]


def _checkpoint_path(args) -> str:
    return args.out.rsplit(".", 1)[0] + ".partial.json"


def _load_checkpoint(args, items) -> dict:
    """Finished runs of an interrupted invocation with the same dataset and settings."""
    path = _checkpoint_path(args)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        saved = json.load(f)
    if saved["key"] != _checkpoint_key(args, items):
        print(f"ignoring {path}: it was made with other settings", file=sys.stderr)
        return {}
    print(f"resuming from {path}: {len(saved['runs'])} runs done", file=sys.stderr)
    runs = {(r["method"], r["ratio"]): r["data"] for r in saved["runs"] if _still_valid(r, args)}
    if len(runs) < len(saved["runs"]):
        print(f"{len(saved['runs']) - len(runs)} runs of an older reuse path or other scoring "
              "layers are redone", file=sys.stderr)
    return runs


def _still_valid(run: dict, args) -> bool:
    if run["method"] == "full":
        return True  # plain prefill: depends on neither
    if run.get("version") != REUSE_VERSION:
        return False
    if run.get("sink", "bos") != args.sink:
        return False
    scored = "infoflow" in run["method"]
    return not scored or run.get("scoring_layers") == args.scoring_layers


def _save_checkpoint(args, items, per) -> None:
    runs = [{"method": m, "ratio": r, "version": REUSE_VERSION, "scoring_layers": args.scoring_layers,
             "sink": args.sink, "data": d} for (m, r), d in per.items()]
    with open(_checkpoint_path(args), "w") as f:
        json.dump({"key": _checkpoint_key(args, items), "runs": runs}, f)


def _checkpoint_key(args, items) -> list:
    # The dataset by content (not path), so a checkpoint moves with the repository.
    with open(args.dataset, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return [digest, [it.get("id") for it in items], args.max_tokens, args.model, args.dtype]


def _summarize(per, items, args) -> dict:
    full_nll = per[("full", 0.0)]["nll"]
    results = []
    for (method, ratio), m in per.items():
        gap = [a - b for a, b in zip(m["nll"], full_nll)]
        row = {"method": method, "ratio": ratio, "n": len(items)}
        for key, values in (("accuracy", m["accuracy"]), ("f1", m["f1"]), ("fidelity", m["fidelity"]),
                            ("nll_gap", gap), ("echo_rate", m["echo_rate"])):
            mean, lo, hi = M.mean_ci(values)
            row[key], row[f"{key}_ci"] = mean, [lo, hi]
        row["recompute_ratio"] = float(np.mean(m["recompute_ratio"]))
        row["ttft_s"] = float(np.mean(m["ttft_s"])) if m["ttft_s"] else None
        for base in ("none", "cacheblend"):
            ref = per.get((base, 0.0)) or per.get((base, ratio))
            if ref is None or base == method:
                continue
            ref_gap = [a - b for a, b in zip(ref["nll"], full_nll)]
            row[f"vs_{base}"] = {
                "nll_gap_diff": list(M.paired_diff_ci(gap, ref_gap)),
                "accuracy_diff": list(M.paired_diff_ci(m["accuracy"], ref["accuracy"])),
            }
        results.append(row)
    none_gap = next((r["nll_gap"] for r in results if r["method"] == "none"), None)
    for r in results:
        if none_gap:
            r["gap_closed"] = 1.0 - r["nll_gap"] / none_gap
    answers = {f"{k[0]}@{k[1]}": v["answers"] for k, v in per.items()}
    return {**environment(), "dataset": args.dataset, "dtype": args.dtype, "results": results,
            "answers": answers, "ids": [it.get("id") for it in items]}


def print_table(report: dict) -> None:
    print(f"\nquality on {report['card']} (vLLM {report['vllm']}), n={report['results'][0]['n']}")
    head = f"{'method':<17}{'rho':>5}{'acc':>7}{'F1':>7}{'fidel':>7}{'nll_gap [95% CI]':>24}{'closed':>8}{'echo':>6}{'recomp':>7}{'TTFT s':>8}"
    print(head)
    for r in report["results"]:
        lo, hi = r["nll_gap_ci"]
        closed = r.get("gap_closed")
        print(f"{r['method']:<17}{r['ratio']:>5.2f}{r['accuracy']:>7.3f}{r['f1']:>7.3f}{r['fidelity']:>7.3f}"
              f"{r['nll_gap']:>9.4f} [{lo:.4f},{hi:.4f}]{'' if closed is None else f'{closed:>8.0%}'}"
              f"{r['echo_rate']:>6.2f}{r['recompute_ratio']:>7.3f}"
              f"{'' if r['ttft_s'] is None else format(r['ttft_s'], '8.3f')}")


def speedups_from(ttft_report: dict) -> tuple[dict, str]:
    """(method, ratio) -> TTFT speedup over full prefill at the largest context of a
    `kvflow bench ttft` report, and a label saying where it was measured."""
    rows = ttft_report["results"]
    context = max(r["context_tokens"] for r in rows)
    table = {(r["method"], round(r["ratio"], 4)): r["speedup_vs_full"]
             for r in rows if r["context_tokens"] == context}
    model = os.path.basename((ttft_report.get("model") or "SmolLM2").rstrip("/"))
    return table, f"{ttft_report.get('card', '?')}, {model}, {context} tokens"


def plot(report: dict, path: str, ttft_report: dict | None = None) -> None:
    """nll_gap and accuracy against rho, and the trade-off: nll_gap closed (share of
    none's gap) against the TTFT speedup over full prefill, every method and ratio. The
    speedups come from a `kvflow bench ttft` report where one is given (measured at a
    context length where prefill matters), else from this run's own requests."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    methods = sorted({r["method"] for r in report["results"]})
    full_ttft = next((r["ttft_s"] for r in report["results"] if r["method"] == "full"), None)
    table, where = speedups_from(ttft_report) if ttft_report else ({}, "these prompts, requests alone")

    def speedup(r: dict) -> float | None:
        if ttft_report:
            return table.get((r["method"], round(r["ratio"], 4)))
        return full_ttft / r["ttft_s"] if full_ttft and r["ttft_s"] else None
    palette = [c for c in plt.rcParams["axes.prop_cycle"].by_key()["color"] if c != "#7f7f7f"]  # gray is none's
    for i, method in enumerate(methods):
        color = {"full": "k", "none": "gray"}.get(method, palette[i % len(palette)])
        rows = sorted((r for r in report["results"] if r["method"] == method), key=lambda r: r["ratio"])
        if len(rows) == 1 and ratio_free(method):
            for ax, key in zip(axes, ("nll_gap", "accuracy")):
                ax.axhline(rows[0][key], linestyle="--", label=method, color=color)
        else:
            xs = [r["ratio"] for r in rows]
            for ax, key in zip(axes, ("nll_gap", "accuracy")):
                ax.errorbar(xs, [r[key] for r in rows],
                            yerr=[[r[key] - r[f"{key}_ci"][0] for r in rows],
                                  [r[f"{key}_ci"][1] - r[key] for r in rows]],
                            marker="o", capsize=3, label=method, color=color)
        timed = [r for r in rows if speedup(r) and r.get("gap_closed") is not None]
        if timed:
            axes[2].plot([speedup(r) for r in timed], [r["gap_closed"] for r in timed],
                         marker="o", label=method, color=color)
            for r in timed:
                axes[2].annotate(f"{r['ratio']:g}", (speedup(r), r["gap_closed"]), fontsize=7)
    for ax, key in zip(axes, ("nll_gap (lower is better)", "accuracy")):
        ax.set_xlabel("recompute ratio rho")
        ax.set_title(key)
    axes[2].set_xlabel(f"TTFT speedup over full prefill ({where})")
    axes[2].set_title("share of none's nll_gap closed (labels: rho)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _load_json(path: str | None) -> dict | None:
    if path is None:
        return None
    with open(path) as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvflow bench quality", description=__doc__)
    p.add_argument("--dataset")
    p.add_argument("--replot", metavar="JSON", help="only draw the plot of a finished run's JSON")
    p.add_argument("--ttft-json", help="a `kvflow bench ttft` JSON (same methods and ratios) for the "
                   "plot's speedup axis, measured where prefill matters; default: this run's requests")
    p.add_argument("--methods", default="full,none,cacheblend,epic,random,infoflow,infoflow-reorder")
    p.add_argument("--ratio", default="0.15", help="one ratio or a comma list, e.g. 0.05,0.15,0.3")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--ttft-samples", type=int, default=10, help="requests timed alone per method")
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, auto on GPU")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--scoring-layers", default=None,
                   help="infoflow scoring layers: indices (18,19,20,21) or depth fractions "
                        "(0.6,0.65); default: the engine's (4 layers from 69%% depth)")
    p.add_argument("--sink", choices=("bos", "header"), default="bos",
                   help="what chunks are computed behind: the BOS token (engine default) or "
                        "the prompts' chat header (system prompt + user-turn opening)")
    p.add_argument("--max-seqs", type=int, default=4,
                   help="CPU: sequences of --max-model-len tokens the KV cache holds at once "
                        "(its size in bytes follows)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.6,
                   help="GPU: vLLM's memory fraction (two runs share one GPU at 0.3 each)")
    p.add_argument("--store-gb", type=float, default=6.0,
                   help="chunk store capacity; size it to hold the dataset's chunks")
    p.add_argument("--out", help="JSON file; a PNG plot is written beside it. Finished "
                   "runs are kept beside it (.partial.json): a rerun with the same dataset "
                   "and settings reuses them and computes only what is new")
    args = p.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            report = json.load(f)
        png = args.replot.rsplit(".", 1)[0] + ".png"
        plot(report, png, _load_json(args.ttft_json))
        print(f"wrote {png}")
        return 0
    if not (args.dataset and args.out):
        p.error("--dataset and --out are required (or --replot JSON)")
    report = run(args)
    print_table(report)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    png = args.out.rsplit(".", 1)[0] + ".png"
    try:
        plot(report, png, _load_json(args.ttft_json))
    except ImportError as e:  # the GPU machine's image may lack matplotlib
        print(f"no plot ({e}); `kvflow bench quality --replot {args.out}` draws it elsewhere")
    # The checkpoint stays: its per-question data lets a later run add methods or ratios
    # and still pair them with the runs made here.
    print(f"wrote {args.out} and {png} (per-question runs: {_checkpoint_path(args)})")
    return 0
