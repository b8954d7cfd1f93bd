"""`kvflow warm` and `kvflow query`: the client from the command line.

    kvflow warm  --server http://127.0.0.1:8000 --docs docs/
    kvflow query --server http://127.0.0.1:8000 --docs docs/ "What is the capital of Zorbia?"

--docs takes a file or directory (every *.txt / *.md / *.jsonl inside, sorted by name)
and may be repeated. A .jsonl file holds one document per line ({"text": ...} or
{"title", "text"}); any other file is one document, or several separated by a line
holding only `---`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vllm_kvflow.client import KVFlowClient, ServerError, stats_line

_DOC_SUFFIXES = (".txt", ".md", ".jsonl")


def load_documents(paths: list[str]) -> list:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.is_file() and f.suffix in _DOC_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise SystemExit(f"kvflow: no such file or directory: {p}")
    docs: list = []
    for f in files:
        text = f.read_text(encoding="utf-8")
        if f.suffix == ".jsonl":
            docs += [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            docs += [part.strip() for part in text.split("\n---\n") if part.strip()]
    if not docs:
        raise SystemExit(f"kvflow: no documents in {paths}")
    return docs


def _progress(done: int, total: int) -> None:
    width = 30
    filled = width * done // total
    print(f"\rwarm [{'#' * filled}{'.' * (width - filled)}] {done}/{total} documents",
          end="\n" if done == total else "", file=sys.stderr, flush=True)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    # One path per --docs (repeatable): a variadic option would swallow the question.
    parser.add_argument("--docs", action="append", required=True,
                        help="document file or directory (repeat for several)")
    parser.add_argument("--model", help="served model name (default: the server's first)")
    parser.add_argument("--namespace", help="chunk namespace (must match between warm and query)")
    parser.add_argument("--cache-salt", help="tenant cache salt (must match between warm and query)")


def warm_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kvflow warm", description="precompute documents into "
                                     "the server's chunk store")
    _common(parser)
    parser.add_argument("--batch-size", type=int, default=4, help="documents per request")
    args = parser.parse_args(argv)
    docs = load_documents(args.docs)
    client = KVFlowClient(args.server, args.model)
    try:
        results = client.warm(docs, namespace=args.namespace, cache_salt=args.cache_salt,
                              batch_size=args.batch_size, progress=_progress)
    except (ServerError, RuntimeError) as e:
        print(f"\nkvflow warm: {e}", file=sys.stderr)
        return 1
    computed = sum(s.get("chunks_missed", 0) for s in results)
    cached = sum(s.get("chunks_hit", 0) for s in results)
    tokens = sum(s.get("chunk_tokens", 0) for s in results)
    print(f"warmed {len(docs)} documents ({tokens} tokens): {computed} computed, {cached} already stored")
    return 0


def query_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kvflow query", description="ask a question over documents")
    _common(parser)
    parser.add_argument("question")
    parser.add_argument("--method", help="full, none, random, epic, cacheblend, infoflow, ...")
    parser.add_argument("--ratio", type=float, help="fraction of chunk tokens to recompute")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    docs = load_documents(args.docs)
    client = KVFlowClient(args.server, args.model)
    try:
        r = client.query(args.question, docs, method=args.method, ratio=args.ratio,
                         namespace=args.namespace, cache_salt=args.cache_salt, max_tokens=args.max_tokens)
    except ServerError as e:
        print(f"kvflow query: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"text": r.text, "ttft_s": r.ttft_s, "latency_s": r.latency_s,
                          "usage": r.usage, "stats": r.stats}))
        return 0
    print(r.text.strip())
    print(f"ttft {r.ttft_s:.3f} s, total {r.latency_s:.3f} s | {stats_line(r.stats)}")
    return 0
