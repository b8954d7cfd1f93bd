"""What the ceiling recomputes that the selectors do not: the anatomy of the picks.

The ceiling (`kvflow bench ceiling`) picks the tokens whose recompute the first-order
estimate says lowers the answer's NLL most; it closes far more of the gap than any
selector. This compares, at one rho, the picks of the ceiling with those of infoflow
and cacheblend over the same candidates (transformers reference, float32, CPU):
- overlap: the share of a selector's picks that the ceiling also picks;
- where the picks sit: by offset inside their span (a chunk's first token, the next
  few, ...), glue against chunk tokens, and early against late chunks;
- how each signal ranks the ceiling's benefit: Spearman's rho over the candidates of
  each question, against infoflow's score, cacheblend's key deviation, and the
  token's offset in its chunk (negated: early first);
- how concentrated the benefit is: the share of all positive estimated benefit that
  the ceiling's k tokens hold.
Prints a table, writes JSON (and a bar chart of the offsets with --plot).

    nice -n 19 taskset -c 1 python benchmarks/ceiling_anatomy.py \\
        --dataset benchmarks/specs_qa_300.jsonl --limit 100 --ratio 0.15 \\
        --out benchmarks/results/ceiling_anatomy_cpu_smollm2_specs_n100.json --plot
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

SELECTORS = ("ceiling", "infoflow", "cacheblend")
# Offset of a token inside its candidate span: its first token, the next three, the
# next twelve, the rest.
OFFSET_BINS = ((0, 1), (1, 4), (4, 16), (16, 1 << 30))
OFFSET_NAMES = ("first", "2-4", "5-16", "17+")


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties given their mean rank (as Spearman's rho needs)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    _, inverse = np.unique(x, return_inverse=True)
    return np.bincount(inverse, ranks)[inverse] / np.bincount(inverse)[inverse]


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = _ranks(np.asarray(a)), _ranks(np.asarray(b))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def token_places(q) -> dict[str, np.ndarray]:
    """Per candidate (in q.candidates order): its offset inside its span, whether the
    span is a declared chunk (not glue), and the span's index among the chunks scaled
    to 0..1 (early..late; glue -1)."""
    order = sorted(q.chunks)
    offset, is_chunk, where = {}, {}, {}
    for s, e in q.blend.candidate_spans:
        # The chunk holding the span, as (its index, its first position); none: glue.
        holder = next(((i, cs) for i, (cs, ce) in enumerate(order) if cs <= s and e <= ce), None)
        for p in range(s, e):
            offset[p] = p - (holder[1] if holder else s)
            is_chunk[p] = holder is not None
            where[p] = holder[0] / max(1, len(order) - 1) if holder else -1.0
    cand = q.candidates.tolist()
    return {"offset": np.array([offset[p] for p in cand]),
            "chunk": np.array([is_chunk[p] for p in cand]),
            "where": np.array([where[p] for p in cand])}


def shares(mask: np.ndarray, places: dict[str, np.ndarray]) -> dict[str, float]:
    """Where the picked candidates (mask over candidates) sit, as shares of the picks."""
    n = max(1, int(mask.sum()))
    off, chunk, where = places["offset"][mask], places["chunk"][mask], places["where"][mask]
    out = {f"offset {name}": float(((off >= a) & (off < b) & chunk).sum()) / n
           for name, (a, b) in zip(OFFSET_NAMES, OFFSET_BINS)}
    out["glue"] = float((~chunk).sum()) / n
    out["early chunks (first third)"] = float((chunk & (where < 1 / 3)).sum()) / n
    out["late chunks (last third)"] = float((chunk & (where > 2 / 3)).sum()) / n
    return out


def anatomy(q, ratio: float) -> dict:
    from vllm_kvflow.bench.hf_select import select

    cand = q.candidates
    index = {p: i for i, p in enumerate(cand.tolist())}
    places = token_places(q)
    benefit = (-q.nll_gradient_estimate[cand]).numpy()
    masks = {}
    for name in SELECTORS:
        positions, _ = select(name, q, ratio)
        mask = np.zeros(cand.numel(), dtype=bool)
        mask[[index[p] for p in positions.tolist()]] = True
        masks[name] = mask
    k = int(masks["ceiling"].sum())
    positive = benefit[benefit > 0].sum()
    return {
        "T": int(cand.numel()), "k": k,
        "overlap": {name: float((masks[name] & masks["ceiling"]).sum()) / max(1, k)
                    for name in SELECTORS if name != "ceiling"},
        "where": {"all candidates": shares(np.ones(cand.numel(), dtype=bool), places),
                  **{name: shares(masks[name], places) for name in SELECTORS}},
        "spearman": {
            "infoflow score": _spearman(q.infoflow_score[cand].numpy(), benefit),
            "cacheblend deviation": _spearman(q.key_deviation[cand].numpy(), benefit),
            "early offset": _spearman(-places["offset"].astype(float), benefit),
        },
        "benefit held by the ceiling's k": float(benefit[masks["ceiling"]].clip(min=0).sum() / positive)
        if positive > 0 else float("nan"),
    }


def summarize(records: list[dict]) -> dict:
    def mean(get):
        values = np.array([get(r) for r in records], dtype=float)
        values = values[~np.isnan(values)]
        return float(values.mean()) if values.size else float("nan")

    first = records[0]
    return {
        "overlap": {n: mean(lambda r, n=n: r["overlap"][n]) for n in first["overlap"]},
        "where": {who: {k: mean(lambda r, who=who, k=k: r["where"][who][k]) for k in first["where"][who]}
                  for who in first["where"]},
        "spearman": {n: mean(lambda r, n=n: r["spearman"][n]) for n in first["spearman"]},
        "benefit held by the ceiling's k": mean(lambda r: r["benefit held by the ceiling's k"]),
    }


def print_summary(s: dict, n: int, ratio: float) -> None:
    print(f"{n} questions, rho {ratio}")
    print("overlap with the ceiling's picks: " + ", ".join(f"{k} {v:.1%}" for k, v in s["overlap"].items()))
    print("Spearman rho against the estimated benefit (mean over questions): "
          + ", ".join(f"{k} {v:+.3f}" for k, v in s["spearman"].items()))
    held = s["benefit held by the ceiling's k"]
    print(f"share of the positive estimated benefit in the ceiling's k: {held:.1%}")
    cols = list(s["where"]["all candidates"])
    print("\n| picks | " + " | ".join(cols) + " |")
    print("| --- |" + " --- |" * len(cols))
    for who, row in s["where"].items():
        print(f"| {who} | " + " | ".join(f"{row[c]:.1%}" for c in cols) + " |")


def plot(s: dict, path: str, title: str) -> None:
    """Two panels: where in its chunk each selector's picks sit, and in which chunks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ((["offset " + n for n in OFFSET_NAMES] + ["glue"], list(OFFSET_NAMES) + ["glue"],
               "token's offset in its chunk"),
              (["early chunks (first third)", "late chunks (last third)"], ["first third", "last third"],
               "chunk's place in the prompt"))
    who = list(s["where"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [5, 2]})
    width = 0.8 / len(who)
    for ax, (cols, labels, xlabel) in zip(axes, panels):
        for i, name in enumerate(who):
            ax.bar(np.arange(len(cols)) + i * width, [s["where"][name][c] for c in cols], width,
                   label=name)
        ax.set_xticks(np.arange(len(cols)) + 0.4 - width / 2, labels)
        ax.set_xlabel(xlabel)
    axes[0].set_ylabel("share of the picks")
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--ratio", type=float, default=0.15)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--plot", action="store_true", help="also a bar chart beside the JSON (.png)")
    p.add_argument("--plot-only", action="store_true", help="only redraw the chart of an existing --out")
    args = p.parse_args(argv)
    if args.plot_only:
        with open(args.out) as f:
            report = json.load(f)
        _plot_beside(report["summary"], args.out, args.dataset, report["n"], report["ratio"])
        return 0
    torch.set_num_threads(args.threads)
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from vllm_kvflow.bench.ceiling import _default_model, build_question, environment
    from vllm_kvflow.bench.dataset import load_items
    from vllm_kvflow.bench.hf_blend import HFReference

    ref = HFReference()
    tok = AutoTokenizer.from_pretrained(_default_model())
    t0 = time.perf_counter()
    records = []
    for item in tqdm(load_items(args.dataset, args.limit), desc="anatomy", unit="question", file=sys.stderr):
        q = build_question(ref, tok, item, args.max_tokens, piece_cache={})
        records.append({"id": item.get("id"), **anatomy(q, args.ratio)})
    summary = summarize(records)
    print_summary(summary, len(records), args.ratio)
    report = {"dataset": args.dataset, "n": len(records), "ratio": args.ratio, "summary": summary,
              "seconds": time.perf_counter() - t0, **environment(),
              "command": "python benchmarks/ceiling_anatomy.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "per_question": records}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    if args.plot:
        _plot_beside(summary, args.out, args.dataset, len(records), args.ratio)
    return 0


def _plot_beside(summary: dict, out: str, dataset: str, n: int, ratio: float) -> None:
    png = out.rsplit(".", 1)[0] + ".png"
    plot(summary, png, f"What each selector recomputes: {dataset.rsplit('/', 1)[-1]}, n = {n}, rho {ratio}")
    print(f"wrote {png}")


if __name__ == "__main__":
    sys.exit(main())
