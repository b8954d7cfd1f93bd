"""`kvflow` command line: make-model, demo, warm, query, bench <name>.

Each subcommand is a `main(argv)` in its own module (or a named `module:function`); this
file only routes, so `kvflow --help` stays fast (nothing heavy is imported until a command runs).
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "make-model": ("vllm_kvflow.model", "build the embedded SmolLM2-135M-Instruct model"),
    "warm": ("vllm_kvflow.serve_cli:warm_main", "precompute documents into a server's chunk store"),
    "query": ("vllm_kvflow.serve_cli:query_main", "ask a server a question over documents"),
    "demo": ("vllm_kvflow.demo", "RAG demo: answers with chunk reuse, TTFT vs full prefill"),
}
BENCHES = {
    "ttft": ("vllm_kvflow.bench.ttft", "TTFT of reuse methods against full prefill"),
    "quality": ("vllm_kvflow.bench.quality", "answer quality of reuse methods vs full prefill"),
    "dataset": ("vllm_kvflow.bench.dataset", "write fictional multi-passage QA as JSONL"),
    "kernels": ("vllm_kvflow.bench.kernels", "GPU kernels against the card's ceilings"),
    "hilbert": ("vllm_kvflow.bench.hilbert", "HilbertA sparse attention against dense"),
    "load": ("vllm_kvflow.bench.load", "server load test: throughput and TTFT, Zipf document reuse"),
    "remote": ("vllm_kvflow.bench.remote", "TTFT of a remote (Redis) hit vs a local hit vs full prefill"),
    "ceiling": ("vllm_kvflow.bench.ceiling", "what a recompute budget could close, and each selector's share"),
}


def _usage() -> str:
    lines = ["usage: kvflow COMMAND [args]", "", "commands:"]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += [f"  bench {name:<8} {help_}" for name, (_, help_) in BENCHES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    table, name, rest = COMMANDS, argv[0], argv[1:]
    if name == "bench":
        if not rest or rest[0] not in BENCHES:
            print(_usage(), file=sys.stderr)
            return 2
        table, name, rest = BENCHES, rest[0], rest[1:]
    if name not in table:
        print(f"kvflow: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _, func = table[name][0].partition(":")
    module = importlib.import_module(module_name)
    from vllm_kvflow.kv_memory import KVCacheTooLarge

    try:
        return int(getattr(module, func or "main")(rest) or 0)
    except KVCacheTooLarge as e:  # one line, no traceback: what it needs, what there is, which flag
        print(f"kvflow: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
