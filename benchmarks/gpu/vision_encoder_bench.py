"""HilbertA against the stock attention in vLLM 0.26's Qwen2.5-VL vision encoder (GPU).

Builds the encoder from benchmarks/gpu/configs/qwen2.5-vl-7b.json (Qwen2.5-VL-7B vision
shapes) with random bf16 weights (patches/vision_encoder.py), feeds it images made from
code at each size (resized as vLLM's processor would: 1024^2 -> 74 x 74 patches, 2048^2 ->
146 x 146), and times, median of --repeats after warm-up (CUDA events):
  attention   the four full-attention blocks' attention op on their real inputs
              (captured from a stock forward): vLLM's op (FlashAttention varlen) against
              HilbertEncoderAttention (gather to the Hilbert layout, Triton kernel,
              scatter back); also the kernel alone on pre-gathered inputs;
  encoder     the whole encoder, stock against HilbertA (same weights, same instance);
and checks the HilbertA op against dense attention under the same mask (2 heads, float32)
on those inputs. Prints a table, writes JSON with the card and versions.

  bash benchmarks/gpu/env.sh python3 benchmarks/gpu/vision_encoder_bench.py --out FILE.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "benchmarks/gpu/configs/qwen2.5-vl-7b.json"
TARGET_ATTENTION_SPEEDUP_2048 = 3.0


def fail(message: str) -> None:
    print(f"vision_encoder_bench: {message}", file=sys.stderr)
    sys.exit(2)


def preflight():
    try:
        import torch
    except ImportError as e:
        fail(f"torch is not importable ({e})")
    if not torch.cuda.is_available():
        fail("no CUDA GPU visible (this benchmark runs on the device machine)")
    try:
        import triton  # noqa: F401
    except ImportError as e:
        fail(f"triton is not importable ({e})")
    try:
        import vllm
        from vllm.model_executor.models import qwen2_5_vl  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure: say what and how to fix
        fail(f"vLLM's Qwen2.5-VL is not importable ({type(e).__name__}: {e}); stage vLLM 0.26 "
             "in $HOME/site and run through benchmarks/gpu/env.sh (shared/gpu/README.md)")
    if not vllm.__version__.startswith("0.26"):
        print(f"warning: written against vLLM 0.26, found {vllm.__version__}", file=sys.stderr)


def time_ms(fn, warmup: int, repeats: int) -> dict:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "repeats": repeats}


def versions() -> dict:
    import torch
    import transformers
    import triton
    import vllm

    return {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "vllm": vllm.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def run(args) -> dict:
    import torch

    from vllm_kvflow.kernels.hilbert_attention import hilbert_attention, pair_count
    from vllm_kvflow.patches import vision_attention as va
    from vllm_kvflow.patches.vision_encoder import (build_qwen25_vision_encoder, config_summary,
                                                    encoder_context, image_patches, make_image)
    from vllm_kvflow.vision.encoder_attention import (EncoderContext, HilbertASettings,
                                                      HilbertEncoderAttention,
                                                      masked_dense_reference)

    t0 = time.time()
    enc, vllm_config, hf = build_qwen25_vision_encoder(args.config, dtype=torch.bfloat16, seed=0)
    full = sorted(enc.fullatt_block_indexes)
    merge = enc.spatial_merge_size
    window_units = enc.window_size // merge // enc.patch_size
    print(f"encoder built in {time.time() - t0:.1f} s: {config_summary(hf)}; "
          f"attention backend {enc.attn_backend}")
    rows = []
    for size in args.sizes:
        for tiles in args.tiles:
            settings = HilbertASettings(tiles=tiles, central_fraction=args.central,
                                        cycle=args.cycle, min_tokens=args.min_tokens)
            pixels, grid_t = image_patches(make_image(args.image, size, size, seed=size))
            pixels, grid = pixels.cuda(), grid_t.tolist()
            captured = {}

            def grab(index):
                def hook(module, hook_args, kwargs):
                    captured[index] = dict(kwargs)
                return hook

            handles = [enc.blocks[i].attn.attn.register_forward_pre_hook(grab(i), with_kwargs=True)
                       for i in full]
            with torch.no_grad(), encoder_context(vllm_config):
                enc(pixels, grid)
            for h in handles:
                h.remove()
            torch.cuda.synchronize()

            ctx = EncoderContext(merge, window_units, settings,
                                 unit_order=va.FAMILIES[0].unit_order(enc), kernel="triton")
            plan = ctx.plans_for(grid)[0]
            if plan.layout is None:
                fail(f"{size}^2 ({plan.length} patches) is under min_tokens={args.min_tokens}")
            n, lay = plan.length, plan.layout
            ops = {i: enc.blocks[i].attn.attn for i in full}
            hil = {i: HilbertEncoderAttention(ops[i], k, ctx, ops[i].scale) for k, i in enumerate(full)}

            def stock_attention():
                for i in full:
                    ops[i](**captured[i])

            def hilbert_op():
                with ctx.frames(grid):
                    for i in full:
                        hil[i](**captured[i])

            gathered = {}
            idx = torch.from_numpy(lay.order.copy()).cuda()
            for k, i in enumerate(full):
                q, kk, v = (captured[i][name].index_select(1, idx).transpose(1, 2).contiguous()
                            for name in ("query", "key", "value"))
                gathered[i] = (q, kk, v, plan.offset(k, settings.cycle))

            def kernel_only():
                for i in full:
                    q, kk, v, off = gathered[i]
                    hilbert_attention(q, kk, v, lay.n_shared, lay.tile_size, off, ops[i].scale)

            # Correctness on the captured inputs: the op against the masked dense reference,
            # two heads (the reference holds an n x n float32 score matrix per head).
            with torch.no_grad(), ctx.frames(grid):
                errs = []
                for k, i in enumerate(full):
                    c = captured[i]
                    out = hil[i](**c)[:, :, :2]
                    ref = masked_dense_reference(c["query"][:, :, :2], c["key"][:, :, :2],
                                                 c["value"][:, :, :2], ctx.plans, k, ops[i].scale)
                    errs.append(float((out.float() - ref).norm() / ref.norm()))
                    del ref
                torch.cuda.empty_cache()

            with torch.no_grad():
                t_stock_attn = time_ms(stock_attention, args.warmup, args.repeats)
                t_hil_attn = time_ms(hilbert_op, args.warmup, args.repeats)
                t_kernel = time_ms(kernel_only, args.warmup, args.repeats)
                with encoder_context(vllm_config):
                    stock_out = enc(pixels, grid)
                    t_stock_enc = time_ms(lambda: enc(pixels, grid), args.warmup, args.enc_repeats)
                    va.enable(enc, settings, kernel="triton")
                    try:
                        sparse_out = enc(pixels, grid)
                        t_hil_enc = time_ms(lambda: enc(pixels, grid), args.warmup, args.enc_repeats)
                    finally:
                        va.disable(enc)
            drift = float((sparse_out.float() - stock_out.float()).norm() / stock_out.float().norm())
            row = {
                "image": f"{size}x{size} ({args.image})", "grid_thw": grid[0], "patches": n,
                "llm_tokens": n // (merge * merge), "heads": enc.num_heads,
                "head_dim": enc.hidden_size // enc.num_heads,
                "tiles": -(-(n - lay.n_shared) // lay.tile_size), "tile_tokens": lay.tile_size,
                "shared_tokens": lay.n_shared,
                "pair_bound": n * n / pair_count(n, lay.n_shared, lay.tile_size),
                "attention_stock_ms": t_stock_attn, "attention_hilberta_ms": t_hil_attn,
                "attention_kernel_only_ms": t_kernel,
                "attention_speedup": t_stock_attn["median_ms"] / t_hil_attn["median_ms"],
                "encoder_stock_ms": t_stock_enc, "encoder_hilberta_ms": t_hil_enc,
                "encoder_speedup": t_stock_enc["median_ms"] / t_hil_enc["median_ms"],
                "rel_err_vs_masked_dense": errs,
                "encoder_output_rel_change_vs_stock": drift,
                "settings": settings.identity(),
            }
            rows.append(row)
            print(f"{size}^2 tiles={row['tiles']}: attention {t_stock_attn['median_ms']:.3f} -> "
                  f"{t_hil_attn['median_ms']:.3f} ms ({row['attention_speedup']:.2f}x), encoder "
                  f"{t_stock_enc['median_ms']:.2f} -> {t_hil_enc['median_ms']:.2f} ms "
                  f"({row['encoder_speedup']:.2f}x), max rel err {max(errs):.2e}", flush=True)
            del captured, gathered
            torch.cuda.empty_cache()
    return {"rows": rows, "config": config_summary(hf), "attn_backend": str(enc.attn_backend),
            "full_attention_blocks": full}


def table(result: dict) -> str:
    head = ("| image | patches | tiles x tokens | shared | bound | 4 full-attn blocks: stock ms | "
            "HilbertA ms (kernel only) | x | encoder stock ms | HilbertA ms | x | rel err |")
    lines = [head, "|" + " --- |" * 12]
    for r in result["rows"]:
        lines.append(
            f"| {r['image']} | {r['patches']} | {r['tiles']} x {r['tile_tokens']} | "
            f"{r['shared_tokens']} | {r['pair_bound']:.2f} | {r['attention_stock_ms']['median_ms']:.3f} | "
            f"{r['attention_hilberta_ms']['median_ms']:.3f} ({r['attention_kernel_only_ms']['median_ms']:.3f}) | "
            f"{r['attention_speedup']:.2f} | {r['encoder_stock_ms']['median_ms']:.2f} | "
            f"{r['encoder_hilberta_ms']['median_ms']:.2f} | {r['encoder_speedup']:.2f} | "
            f"{max(r['rel_err_vs_masked_dense']):.1e} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(CONFIG), help="Qwen2.5-VL config.json (or model dir)")
    p.add_argument("--sizes", default="1024,2048", help="square image sides in pixels")
    p.add_argument("--tiles", default="16", help="HilbertA tiles per image (comma list)")
    p.add_argument("--central", type=float, default=0.25, help="central shared block, per side")
    p.add_argument("--cycle", type=int, default=4, help="sliding schedule period")
    p.add_argument("--min-tokens", type=int, default=4096, help="dense below this many patches")
    p.add_argument("--image", default="shapes", choices=("gradient", "noise", "shapes"))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20, help="timed runs of the attention ops")
    p.add_argument("--enc-repeats", type=int, default=10, help="timed runs of the whole encoder")
    p.add_argument("--out", required=True, help="JSON result file")
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.tiles = [int(s) for s in args.tiles.split(",")]
    preflight()
    import torch

    result = run(args)
    result.update(card=torch.cuda.get_device_name(), versions=versions(),
                  command=" ".join(sys.argv), dtype="bfloat16",
                  target={"attention_speedup_at_2048": TARGET_ATTENTION_SPEEDUP_2048})
    at_2048 = [r for r in result["rows"] if r["patches"] == 146 * 146]
    if at_2048:
        best = max(r["attention_speedup"] for r in at_2048)
        result["target"]["met"] = best >= TARGET_ATTENTION_SPEEDUP_2048
        result["target"]["measured"] = best
    print()
    print(f"{result['card']}, {result['versions']}, attention backend {result['attn_backend']}")
    print(table(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
