"""`kvflow bench ttft` prints its table for any set of methods, including runs without
`full` (then there is no speedup to show), which is how one method is profiled."""
from vllm_kvflow.bench.ttft import print_table


def _row(method, ratio, speedup, share=None):
    return {"context_tokens": 4096, "method": method, "ratio": ratio, "ttft_s": 2.8,
            "speedup_vs_full": speedup, "share_of_prefix_hit_speedup": share,
            "tokens_recomputed": 585 if ratio else None,
            "timings_s": {"load": 0.1, "score": 0.1, "recompute": 2.4} if ratio else {}}


def test_ttft_table_with_and_without_full(capsys):
    report = {"card": "CPU test", "vllm": "0", "torch": "0", "repeats": 2}
    print_table({**report, "results": [_row("full", 0.0, 1.0), _row("infoflow", 0.15, 5.29, 0.9)]})
    lines = capsys.readouterr().out.splitlines()
    assert "5.29x" in lines[-1] and "90%" in lines[-1] and "2400.0" in lines[-1]
    print_table({**report, "results": [_row("infoflow", 0.15, None)]})
    last = capsys.readouterr().out.splitlines()[-1]
    assert "infoflow@0.15" in last and "x " not in last and "585" in last
