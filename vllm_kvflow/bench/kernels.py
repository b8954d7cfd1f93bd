"""`kvflow bench kernels`: the reuse-path Triton kernels against the card's own ceilings.

One run on one card measures, in order:
  1. copy bandwidth: a 1 GiB device-to-device copy, bytes read + written;
  2. dense causal attention through torch SDPA's FlashAttention backend, 32 heads x 128,
     at each context length: FLOP = 4 * D * H * N(N+1)/2 (causal pairs, two matmuls);
  3. the fused chunk load over 32 layers x 8 KV heads x 128 (bf16, FLASH_ATTN layout,
     block 16, one chunk per 512 tokens), bytes = K and V read + written;
     target >= 85% of (1);
  4. partial attention of 15% of the context (sorted random positions), 32 query heads /
     8 KV heads x 128, FLOP per computed pair counted as in (2): 4 * D * Hq * sum(pos+1);
     target >= 70% of (2) at the same context; a few variants of it (PARTIAL_VARIANTS,
     --baseline) and the default once more inside a CUDA graph;
  5. attention-norm scoring of 64 question tokens over the context, one layer, as a
     fraction of the full prefill's attention time for one layer at that context (2).
Timings are medians of triton.testing.do_bench. The partial attention's reported figure
times plain calls; the load and the scoring are captured in a CUDA graph first so that
Python launch time is not counted (the engine replays them per layer). Prints a table
and writes the JSON given by --out.
"""
from __future__ import annotations

import argparse
import json
import sys

GIB = 1 << 30


def _graph_time_ms(fn, inner: int = 1) -> float:
    """Median ms of one call of fn, timed as replays of a CUDA graph of `inner` calls."""
    import torch
    import triton

    fn()  # compile / warm up outside the capture
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(graph.replay, warmup=50, rep=300,
                                   return_mode="median") / inner


def _copy_gbps(torch, triton) -> float:
    src = torch.randn(GIB // 2, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300,
                                 return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def _sdpa_flash(torch, triton, n: int, heads: int = 32, d: int = 128):
    """(ms, TFLOP/s) of causal SDPA with the FlashAttention backend at context n."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    q, k, v = (torch.randn(1, heads, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        ms = triton.testing.do_bench(fn, warmup=50, rep=400, return_mode="median")
    flop = 4 * d * heads * n * (n + 1) / 2
    return ms, flop / (ms * 1e-3) / 1e12


def _bench_load(torch, n: int, layers: int, hkv: int, d: int, log: list):
    from vllm_kvflow.kernels.chunk_load import layer_offsets, load_chunk_kv, load_chunk_kv_layers

    dt, bs, chunk = torch.bfloat16, 16, 512
    n_blocks = n // bs + 1
    # The engine's gathered source: [layers, tokens, heads, dim], one tensor.
    k_all = torch.randn(layers, n, hkv, d, device="cuda", dtype=dt)
    v_all = torch.randn(layers, n, hkv, d, device="cuda", dtype=dt)
    k_src, v_src = list(k_all), list(v_all)
    caches = [torch.randn(n_blocks, bs, hkv, 2 * d, device="cuda", dtype=dt) for _ in range(layers)]
    kvs = [c.split(d, -1) for c in caches]
    blocks = torch.randperm(n_blocks, device="cuda")[: -(-n // bs)]
    slots = (blocks[:, None] * bs + torch.arange(bs, device="cuda")).flatten()[:n]
    t = torch.arange(n, device="cuda")
    delta = (t // chunk) * chunk - 1  # chunk i stored at local 1..512, placed at i*512
    inv = 1.0 / 500000 ** (torch.arange(0, d, 2, device="cuda", dtype=torch.float64) / d)
    ang = torch.outer(torch.arange(n + 1, device="cuda", dtype=torch.float64), inv)
    cos_sin = torch.cat([ang.cos(), ang.sin()], -1).to(dt)  # vLLM keeps it in model dtype
    nbytes = layers * 2 * 2 * n * hkv * d * 2  # K and V, read + written
    best = None
    offsets = (layer_offsets([kv[0] for kv in kvs]), layer_offsets([kv[1] for kv in kvs]))
    for launch in ("all layers", "per layer"):
        for block_t, warps in ((16, 4), (32, 4), (64, 8), (8, 2)):
            if launch == "per layer":
                def fn():
                    for i in range(layers):
                        load_chunk_kv(k_src[i], v_src[i], kvs[i][0], kvs[i][1], slots, delta,
                                      cos_sin, d, True, block_t=block_t, num_warps=warps)
            else:
                def fn():
                    load_chunk_kv_layers(k_all, v_all, [kv[0] for kv in kvs], [kv[1] for kv in kvs],
                                         slots, delta, cos_sin, d, True, offsets=offsets,
                                         block_t=block_t, num_warps=warps)
            ms = _graph_time_ms(fn)
            gbps = nbytes / (ms * 1e-3) / 1e9
            log.append(f"load n={n} {launch} BLOCK_T={block_t} warps={warps}: {ms:.3f} ms {gbps:.0f} GB/s")
            if best is None or ms < best[0]:
                best = (ms, gbps, dict(launch=launch, BLOCK_T=block_t, num_warps=warps))
    # Same bytes as plain copies, one per layer and the same launch count: the ceiling at
    # this per-launch size (small launches pay the ramp-up/drain of each kernel).
    flat_src = [torch.cat([k.flatten(), v.flatten()]) for k, v in zip(k_src[:1], v_src[:1])]
    flat_dst = torch.empty_like(flat_src[0])

    def copies():
        for _ in range(layers):
            flat_dst.copy_(flat_src[0])
    ms_copy = _graph_time_ms(copies)
    same_size_gbps = nbytes / (ms_copy * 1e-3) / 1e9
    log.append(f"copy of the same bytes as {layers} launches: {ms_copy:.3f} ms "
               f"{same_size_gbps:.0f} GB/s")
    del k_src, v_src, k_all, v_all, caches, kvs, flat_src, flat_dst
    torch.cuda.empty_cache()
    return best + (same_size_gbps,)


def _paged(torch, n, hkv, d, dt, bs=16):
    n_blocks = -(-n // bs)
    kv = torch.randn(n_blocks + 1, bs, hkv, 2 * d, device="cuda", dtype=dt)
    kc, vc = kv.split(d, -1)
    bt = torch.randperm(n_blocks + 1, device="cuda")[:n_blocks].int()
    return kv, kc, vc, bt


# Partial-attention variants timed at every context: (name, config for the wrapper).
# "default" is the wrapper's own choice (the figure reported in results); the others
# change one thing each.
PARTIAL_VARIANTS = [
    ("default", None),
    ("splits=2", dict(splits=2)),
    ("2 stages", dict(num_stages=2)),
    ("128x64 3 stages", dict(BLOCK_N=64, num_stages=3)),
    ("128x64 4 stages", dict(BLOCK_N=64, num_stages=4)),
]


def _load_baseline(path: str):
    """partial_attention from a file (e.g. the previous version, for a same-run baseline)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("partial_attention_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.partial_attention


def _bench_partial(torch, triton, n, hq, hkv, d, frac, log, sweep=False, baseline=None):
    """Times the variants at context n; returns (default's (ms, TFLOP/s, config),
    nq, pairs, [variant rows])."""
    from vllm_kvflow.kernels.partial_attention import partial_attention

    dt = torch.bfloat16
    kv, kc, vc, bt = _paged(torch, n, hkv, d, dt)
    nq = int(frac * n)
    q_pos = torch.randperm(n, device="cuda")[:nq].sort().values
    q = torch.randn(nq, hq, d, device="cuda", dtype=dt)
    seq_lens = torch.tensor([n], device="cuda", dtype=torch.int32)
    cu = torch.tensor([0, nq], device="cuda", dtype=torch.int32)
    pairs = float((q_pos.double() + 1).sum())
    flop = 4 * d * hq * pairs
    args = (q, kc, vc, bt[None], seq_lens, cu, q_pos, d ** -0.5)
    variants = [(name, partial_attention, cfg) for name, cfg in PARTIAL_VARIANTS]
    for path in baseline.split(",") if baseline else []:
        variants.append(("baseline " + path.rsplit("/", 1)[-1], _load_baseline(path), None))
    if sweep:  # a wider grid, for tuning the defaults on a new card
        variants += [(f"{bm}x{bn} {w}w {st}st splits={sp}", partial_attention,
                      dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st, splits=sp))
                     for bm, bn, w in ((128, 128, 8), (128, 64, 4), (128, 64, 8), (256, 64, 8),
                                       (64, 64, 4), (128, 128, 4))
                     for st in (2, 3, 4) for sp in (1, 2, 3, 4, 6)]
    rows, default = [], None
    for name, fn_impl, cfg in variants:
        fn = lambda: fn_impl(*args, config=cfg)  # noqa: E731
        try:
            ms = triton.testing.do_bench(fn, warmup=20 if sweep else 50, rep=100 if sweep else 300,
                                         return_mode="median")
        except Exception as e:  # noqa: BLE001 - a config may not fit shared memory
            log.append(f"partial n={n} {name} cfg={cfg}: failed ({type(e).__name__}: {e})"[:300])
            continue
        tf = flop / (ms * 1e-3) / 1e12
        log.append(f"partial n={n} nq={nq} {name} cfg={cfg}: {ms:.3f} ms {tf:.1f} TFLOP/s")
        rows.append(dict(variant=name, context=n, config=cfg, time_ms=ms, tflops=tf))
        if name == "default":
            default = (ms, tf, "default")
    # The engine replays the call inside a CUDA graph: the default once more that way
    # (no Python or launch gaps; also checks that the call is capturable).
    ms = _graph_time_ms(lambda: partial_attention(*args))
    tf = flop / (ms * 1e-3) / 1e12
    log.append(f"partial n={n} nq={nq} default in a CUDA graph: {ms:.3f} ms {tf:.1f} TFLOP/s")
    rows.append(dict(variant="default, CUDA graph", context=n, config=None, time_ms=ms, tflops=tf))
    return default, nq, pairs, rows


def _bench_scoring(torch, n, nq, hq, hkv, d, log):
    from vllm_kvflow.kernels.attn_norm import attn_norm

    dt = torch.bfloat16
    seq_len = n + nq
    kv, kc, vc, bt = _paged(torch, seq_len, hkv, d, dt)
    q = torch.randn(nq, hq, d, device="cuda", dtype=dt)
    q_pos = torch.arange(n, seq_len, device="cuda")
    out = torch.empty(n, device="cuda")
    ms = _graph_time_ms(lambda: attn_norm(q, kc, bt, seq_len, q_pos, n, d ** -0.5, out=out))
    log.append(f"scoring n={n} nq={nq}: {ms:.4f} ms")
    return ms


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvflow bench kernels", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--contexts", default="8192,32768", help="comma-separated context lengths")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--fraction", type=float, default=0.15, help="selected fraction")
    ap.add_argument("--sweep", action="store_true",
                    help="try a wide grid of partial-attention tile configs (slow)")
    ap.add_argument("--baseline", default=None,
                    help="comma-separated .py files, each with another partial_attention (e.g. "
                         "the previous version), timed as more variants in the same run")
    args = ap.parse_args(argv)

    import torch
    import triton

    if not torch.cuda.is_available():
        print("kvflow bench kernels: needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    contexts = [int(x) for x in args.contexts.split(",")]
    hq, hkv, d = 32, 8, 128
    card = torch.cuda.get_device_name()
    log: list[str] = []

    copy_gbps = _copy_gbps(torch, triton)
    sdpa = {n: _sdpa_flash(torch, triton, n, hq, d) for n in contexts}
    results = []
    for n in contexts:
        ms, gbps, cfg, same_size = _bench_load(torch, n, args.layers, hkv, d, log)
        results.append(dict(kernel="load", shape=dict(
            layers=args.layers, tokens=n, kv_heads=hkv, head_dim=d, dtype="bf16",
            layout="FLASH_ATTN block 16", config=cfg, metric="GB/s, K+V read+written",
            copy_gbps_same_launch_size=same_size),
            time_ms=ms, achieved=gbps, ceiling=copy_gbps, fraction=gbps / copy_gbps))
    variant_rows = []
    for n in contexts:
        (ms, tf, cfg), nq, pairs, rows = _bench_partial(
            torch, triton, n, hq, hkv, d, args.fraction, log, sweep=args.sweep,
            baseline=args.baseline)
        ceil = sdpa[n][1]
        variant_rows += [dict(r, fraction=r["tflops"] / ceil) for r in rows]
        results.append(dict(kernel="partial_attention", shape=dict(
            context=n, queries=nq, q_heads=hq, kv_heads=hkv, head_dim=d, dtype="bf16",
            pairs_per_head=pairs, config=cfg,
            metric="TFLOP/s per computed query-key pair vs causal SDPA flash at this context"),
            time_ms=ms, achieved=tf, ceiling=ceil, fraction=tf / ceil))
    for n in contexts:
        ms = _bench_scoring(torch, n, args.questions, hq, hkv, d, log)
        full_ms = sdpa[n][0]
        results.append(dict(kernel="scoring", shape=dict(
            context=n, questions=args.questions, q_heads=hq, kv_heads=hkv, head_dim=d,
            dtype="bf16", layers=1,
            metric="ms of one layer's scoring vs ms of one layer's full causal prefill "
                   "attention (SDPA flash); fraction = time / ceiling"),
            time_ms=ms, achieved=ms, ceiling=full_ms, fraction=ms / full_ms))

    report = dict(card=card, torch=torch.__version__, triton=triton.__version__,
                  copy_gbps=copy_gbps,
                  sdpa_flash_tflops={str(n): tf for n, (_, tf) in sdpa.items()},
                  results=results, partial_attention_variants=variant_rows)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)

    print("\n".join(log))
    print(f"\ncard: {card}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"copy: {copy_gbps:.0f} GB/s (read+written)")
    for n, (ms, tf) in sdpa.items():
        print(f"SDPA flash causal 32x128 n={n}: {ms:.3f} ms  {tf:.1f} TFLOP/s")
    print(f"\n{'partial-attention variant':<34} {'context':>8} {'time ms':>9} {'TFLOP/s':>8} "
          f"{'fraction':>9}")
    for r in variant_rows:
        print(f"{r['variant'][:34]:<34} {r['context']:>8} {r['time_ms']:>9.4f} {r['tflops']:>8.1f} "
              f"{r['fraction']:>9.3f}")
    print(f"{'kernel':<18} {'context':>8} {'time ms':>9} {'achieved':>10} {'ceiling':>10} {'fraction':>9}")
    for r in results:
        ctx = r["shape"].get("tokens", r["shape"].get("context"))
        print(f"{r['kernel']:<18} {ctx:>8} {r['time_ms']:>9.4f} {r['achieved']:>10.2f} "
              f"{r['ceiling']:>10.2f} {r['fraction']:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
