"""Where the connector's host time goes in its slow steps: reads the per-step cProfile
dumps of KVFLOW_PROFILE_DIR (KVFLOW_PROFILE_MODE=python, connector/worker.py), prints
the distribution of step host times, then the functions by cumulative time summed over
the steps of at least --slow-ms, against the same sums over the other steps.
    python3 benchmarks/gpu/rank_step_profiles.py DIR [--slow-ms 20] [--top 30]"""
import argparse
import glob
import os
import pstats

from vllm_kvflow.blend.step_log import _ms  # the step lines' percentiles, the same way


def _cumulative(steps: list[pstats.Stats]) -> dict:
    """(file, line, function) -> (calls, cumulative s) summed over the steps."""
    sums: dict = {}
    for stats in steps:
        for func, (_, calls, _, cum, _) in stats.stats.items():
            n, t = sums.get(func, (0, 0.0))
            sums[func] = (n + calls, t + cum)
    return sums


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--slow-ms", type=float, default=20.0)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    steps = [pstats.Stats(p) for p in sorted(glob.glob(os.path.join(args.dir, "*.prof")))]
    if not steps:
        raise SystemExit(f"no .prof files in {args.dir}")
    totals = [s.total_tt for s in steps]
    print(f"{len(steps)} steps profiled: host ms p50 {_ms(totals, 0.5):.1f} / p90 {_ms(totals, 0.9):.1f} / "
          f"max {_ms(totals, 1.0):.1f} (under cProfile, which inflates Python-heavy code)")
    slow = [s for s in steps if 1e3 * s.total_tt >= args.slow_ms]
    fast = [s for s in steps if 1e3 * s.total_tt < args.slow_ms]
    print(f"slow steps (>= {args.slow_ms:.0f} ms): {len(slow)}; the others: {len(fast)}")
    slow_sums, fast_sums = _cumulative(slow), _cumulative(fast)
    print("\n| function | calls per slow step | ms per slow step | ms per other step |")
    print("| --- | --- | --- | --- |")
    ranked = sorted(slow_sums.items(), key=lambda kv: -kv[1][1])[:args.top]
    for (file, line, name), (calls, cum) in ranked:
        other = fast_sums.get((file, line, name), (0, 0.0))[1]
        where = f"{os.path.basename(file)}:{line} {name}" if line else name
        print(f"| {where} | {calls / max(1, len(slow)):.1f} | {1e3 * cum / max(1, len(slow)):.2f} | "
              f"{1e3 * other / max(1, len(fast)):.2f} |")


if __name__ == "__main__":
    main()
