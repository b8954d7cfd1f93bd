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
on those inputs, and that the swap took: with HilbertA on, each full-attention block ran
HilbertEncoderAttention once and its stock op never (a forward without grid_thw would
silently fall back to it). Prints vLLM's choices (attention backend, FlashAttention
version, compile mode, IR-op providers) and each size's op input shapes, a table, and
writes JSON with the card and versions (after every size, so a timeout keeps the rest).

Each part (build, capture, check, each timing) runs on its own: one that raises prints
its traceback and the run goes on; the last lines list the failed parts in one line each
(suite.sh shows only the tail), the JSON holds their tracebacks.

  bash benchmarks/gpu/env.sh python3 benchmarks/gpu/vision_encoder_bench.py --out FILE.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "benchmarks/gpu/configs/qwen2.5-vl-7b.json"
TARGET_ATTENTION_SPEEDUP_2048 = 3.0
# MMEncoderAttention.forward_cuda's parameters (vLLM 0.26), in order.
OP_ARGS = ("query", "key", "value", "cu_seqlens", "max_seqlen", "sequence_lengths")


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
        traceback.print_exc()
        fail(f"vLLM's Qwen2.5-VL is not importable ({type(e).__name__}: {e}); stage vLLM 0.26 "
             "in $HOME/site and run through benchmarks/gpu/env.sh (shared/gpu/README.md)")
    if not vllm.__version__.startswith("0.26"):
        print(f"warning: written against vLLM 0.26, found {vllm.__version__}", file=sys.stderr)


def time_ms(fn, warmup: int, repeats: int) -> dict:
    """Median and min of `repeats` runs of fn in ms, CUDA events around each (the end
    event waited for), after `warmup` runs and a device synchronize."""
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


class Parts:
    """Runs the benchmark's parts one at a time: one that raises prints its traceback,
    is listed (one line each) at the end and in the JSON with its traceback, and the
    next part runs. A single GPU run then says everything that needs fixing."""

    def __init__(self):
        self.errors: list[dict] = []

    def run(self, name: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - report and go on to the next part
            text = traceback.format_exc()
            print(f"--- part failed: {name}\n{text}", file=sys.stderr, flush=True)
            frames = traceback.extract_tb(e.__traceback__)
            ours = [f for f in frames if str(ROOT) in f.filename] or frames
            where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
            if frames and frames[-1] is not ours[-1]:
                where += f" -> {Path(frames[-1].filename).name}:{frames[-1].lineno}"
            self.errors.append({"part": name, "error": f"{type(e).__name__}: {e}",
                                "where": where, "traceback": text})
            _free_cuda()
            return None


def _free_cuda() -> None:
    import torch

    try:
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 - a failed kernel may leave the context unusable
        pass
    torch.cuda.empty_cache()


def _describe_tensor(t) -> str:
    import torch

    if not isinstance(t, torch.Tensor):
        return repr(t)
    text = f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} {t.device} stride {t.stride()}"
    if t.numel() <= 8:
        text += f" = {t.tolist()}"
    return text


def _check_stock(enc) -> None:
    """The stock path must be stock: no HilbertA op in a block, no wrapped forward."""
    from vllm_kvflow.vision.encoder_attention import HilbertEncoderAttention

    swapped = [i for i, b in enumerate(enc.blocks) if isinstance(b.attn.attn, HilbertEncoderAttention)]
    if swapped or "forward" in vars(enc) or getattr(enc, "_kvflow_hilberta", None) is not None:
        raise RuntimeError(f"the stock encoder has HilbertA in blocks {swapped} "
                           f"(wrapped forward: {'forward' in vars(enc)})")


def capture_full_attention_inputs(enc, vllm_config, pixels, grid, full) -> dict:
    """Runs the stock encoder once; returns each full-attention block's op kwargs
    (query/key/value [1, S, H, D], cu_seqlens, max_seqlen, sequence_lengths), taken by
    forward pre-hooks on the ops (Qwen2_5_VisionAttention calls them as modules; the
    blocks' own hooks would not fire, their compile decorator calls forward directly)."""
    import torch

    from vllm_kvflow.patches.vision_encoder import encoder_context

    _check_stock(enc)
    captured = {}

    def grab(index):
        def hook(module, hook_args, kwargs):
            captured[index] = dict(kwargs, **dict(zip(OP_ARGS, hook_args)))
        return hook

    handles = [enc.blocks[i].attn.attn.register_forward_pre_hook(grab(i), with_kwargs=True)
               for i in full]
    try:
        with torch.no_grad(), encoder_context(vllm_config):
            out = enc(pixels, grid)
        torch.cuda.synchronize()
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in full if i not in captured]
    if missing:
        raise RuntimeError(f"the op pre-hooks of blocks {missing} never fired")
    print(f"  stock output {_describe_tensor(out)}; block {full[0]} op inputs: "
          + "; ".join(f"{k} {_describe_tensor(v)}" for k, v in captured[full[0]].items()), flush=True)
    return captured


def count_calls(modules) -> tuple[dict, list]:
    """(counts, handles): a forward pre-hook on each module counting its calls."""
    counts = {key: 0 for key in modules}

    def hook_for(key):
        def hook(module, hook_args):
            counts[key] += 1
        return hook

    return counts, [m.register_forward_pre_hook(hook_for(k)) for k, m in modules.items()]


def hilberta_encoder(enc, vllm_config, pixels, grid, full, settings, args, stock_ops) -> dict:
    """HilbertA in the encoder (vision_attention.enable, Triton): one forward checking that
    each full-attention block ran HilbertEncoderAttention once and its stock op never,
    then the timing; the encoder is stock again afterwards."""
    import torch

    from vllm_kvflow.patches import vision_attention as va
    from vllm_kvflow.patches.vision_encoder import encoder_context
    from vllm_kvflow.vision.encoder_attention import HilbertEncoderAttention

    va.enable(enc, settings, kernel="triton")
    try:
        ops = {i: enc.blocks[i].attn.attn for i in full}
        wrong = [i for i, op in ops.items() if not isinstance(op, HilbertEncoderAttention)]
        if wrong:
            raise RuntimeError(f"enable left the stock op in full-attention blocks {wrong}")
        hil_calls, h1 = count_calls(ops)
        stock_calls, h2 = count_calls(stock_ops)
        try:
            with torch.no_grad(), encoder_context(vllm_config):
                out = enc(pixels, grid)
            torch.cuda.synchronize()
        finally:
            for h in h1 + h2:
                h.remove()
        print(f"  HilbertA forward: HilbertEncoderAttention calls {hil_calls}, stock-op calls in "
              f"those blocks {stock_calls}", flush=True)
        if any(n != 1 for n in hil_calls.values()) or any(stock_calls.values()):
            raise RuntimeError(f"the swap did not take: HilbertA calls {hil_calls}, stock "
                               f"fallbacks {stock_calls}")
        with torch.no_grad(), encoder_context(vllm_config):
            timing = time_ms(lambda: enc(pixels, grid), args.warmup, args.enc_repeats)
    finally:
        va.disable(enc)
    _check_stock(enc)
    return {"out": out, "timing": timing}


def stock_size(enc, vllm_config, size, args, parts, full) -> dict | None:
    """One image size, stock: inputs, captured op inputs, stock op and encoder times."""
    import torch

    from vllm_kvflow.patches.vision_encoder import encoder_context, image_patches, make_image

    pixels, grid_t = image_patches(make_image(args.image, size, size, seed=size))
    pixels, grid = pixels.cuda(), grid_t.tolist()
    print(f"{size}^2 ({args.image}): pixel_values {_describe_tensor(pixels)}, grid_thw {grid}", flush=True)
    captured = parts.run(f"{size}^2 stock forward + capture", capture_full_attention_inputs,
                         enc, vllm_config, pixels, grid, full)
    if captured is None:
        return None
    ops = {i: enc.blocks[i].attn.attn for i in full}

    def stock_attention():
        for i in full:
            ops[i](**captured[i])

    with torch.no_grad():
        t_attn = parts.run(f"{size}^2 stock attention timing", time_ms, stock_attention,
                           args.warmup, args.repeats)

    def stock_encoder():
        with torch.no_grad(), encoder_context(vllm_config):
            out = enc(pixels, grid)
            return out, time_ms(lambda: enc(pixels, grid), args.warmup, args.enc_repeats)

    enc_run = parts.run(f"{size}^2 stock encoder timing", stock_encoder)
    return {"pixels": pixels, "grid": grid, "captured": captured, "ops": ops,
            "attention_ms": t_attn, "encoder_out": enc_run and enc_run[0],
            "encoder_ms": enc_run and enc_run[1]}


def hilberta_case(enc, vllm_config, stock, size, tiles, args, parts, full) -> dict:
    """One image size and tile count, HilbertA: the op against the masked dense
    reference on the captured inputs, the op, the kernel alone, the whole encoder."""
    import torch

    from vllm_kvflow.kernels.hilbert_attention import hilbert_attention, pair_count
    from vllm_kvflow.patches import vision_attention as va
    from vllm_kvflow.vision.encoder_attention import (EncoderContext, HilbertASettings,
                                                      HilbertEncoderAttention,
                                                      masked_dense_reference)

    settings = HilbertASettings(tiles=tiles, central_fraction=args.central,
                                cycle=args.cycle, min_tokens=args.min_tokens)
    merge = enc.spatial_merge_size
    window_units = enc.window_size // merge // enc.patch_size
    grid, captured, ops = stock["grid"], stock["captured"], stock["ops"]
    ctx = EncoderContext(merge, window_units, settings,
                         unit_order=va.FAMILIES[0].unit_order(enc), kernel="triton")
    plan = ctx.plans_for(grid)[0]
    if plan.layout is None:
        raise ValueError(f"{size}^2 ({plan.length} patches) is under min_tokens={args.min_tokens}: "
                         "dense, nothing to compare")
    n, lay = plan.length, plan.layout
    hil = {i: HilbertEncoderAttention(ops[i], k, ctx, ops[i].scale) for k, i in enumerate(full)}
    row = {"image": f"{size}x{size} ({args.image})", "grid_thw": grid[0], "patches": n,
           "llm_tokens": n // (merge * merge), "heads": enc.num_heads,
           "head_dim": enc.hidden_size // enc.num_heads,
           "tiles": -(-(n - lay.n_shared) // lay.tile_size), "tile_tokens": lay.tile_size,
           "shared_tokens": lay.n_shared,
           "pair_bound": n * n / pair_count(n, lay.n_shared, lay.tile_size),
           "settings": settings.identity(),
           "attention_stock_ms": stock["attention_ms"], "encoder_stock_ms": stock["encoder_ms"]}
    label = f"{size}^2 tiles={tiles}"

    def check():
        # Two heads: the reference holds an n x n float32 score matrix per head.
        errs = []
        with torch.no_grad(), ctx.frames(grid):
            for k, i in enumerate(full):
                c = captured[i]
                out = hil[i](**c)[:, :, :2]
                ref = masked_dense_reference(c["query"][:, :, :2], c["key"][:, :, :2],
                                             c["value"][:, :, :2], ctx.plans, k, ops[i].scale,
                                             settings.cycle)
                errs.append(float((out.float() - ref).norm() / ref.norm()))
                del ref
        torch.cuda.empty_cache()
        return errs

    row["rel_err_vs_masked_dense"] = parts.run(f"{label} check against masked dense", check)

    def hilbert_op():
        with ctx.frames(grid):
            for i in full:
                hil[i](**captured[i])

    with torch.no_grad():
        row["attention_hilberta_ms"] = parts.run(f"{label} HilbertA op timing", time_ms,
                                                 hilbert_op, args.warmup, args.repeats)

    def kernel_timing():
        idx = torch.from_numpy(lay.order.copy()).cuda()
        gathered = {}
        for k, i in enumerate(full):
            q, kk, v = (captured[i][name].index_select(1, idx).transpose(1, 2).contiguous()
                        for name in ("query", "key", "value"))
            gathered[i] = (q, kk, v, plan.offset(k, settings.cycle))

        def kernel_only():
            for i in full:
                q, kk, v, off = gathered[i]
                hilbert_attention(q, kk, v, lay.n_shared, lay.tile_size, off, ops[i].scale)

        with torch.no_grad():
            return time_ms(kernel_only, args.warmup, args.repeats)

    row["attention_kernel_only_ms"] = parts.run(f"{label} kernel-only timing", kernel_timing)
    sparse = parts.run(f"{label} HilbertA encoder (swap check + timing)", hilberta_encoder, enc,
                       vllm_config, stock["pixels"], grid, full, settings, args, ops)
    row["encoder_hilberta_ms"] = sparse and sparse["timing"]
    if sparse is not None and stock["encoder_out"] is not None:
        ref = stock["encoder_out"].float()
        row["encoder_output_rel_change_vs_stock"] = float((sparse["out"].float() - ref).norm() / ref.norm())
    for kind in ("attention", "encoder"):
        a, b = row.get(f"{kind}_stock_ms"), row.get(f"{kind}_hilberta_ms")
        row[f"{kind}_speedup"] = a["median_ms"] / b["median_ms"] if a and b else None
    print(f"{label}: attention {_ms(row['attention_stock_ms'], 3)} -> "
          f"{_ms(row['attention_hilberta_ms'], 3)} ms ({_x(row['attention_speedup'])}), encoder "
          f"{_ms(row['encoder_stock_ms'], 2)} -> {_ms(row['encoder_hilberta_ms'], 2)} ms "
          f"({_x(row['encoder_speedup'])}), rel err {row['rel_err_vs_masked_dense']}", flush=True)
    return row


def _ms(t, digits: int) -> str:
    return "-" if not t else f"{t['median_ms']:.{digits}f}"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def run(args, parts: Parts, save) -> dict:
    import torch

    from vllm_kvflow.patches.vision_encoder import (build_qwen25_vision_encoder, config_summary,
                                                    describe)

    result: dict = {"rows": [], "errors": parts.errors}
    t0 = time.time()
    built = parts.run("build the encoder", build_qwen25_vision_encoder, args.config,
                      dtype=torch.bfloat16, seed=0)
    if built is None:
        return result
    enc, vllm_config, hf = built
    full = sorted(int(i) for i in enc.fullatt_block_indexes)
    result.update(config=config_summary(hf), full_attention_blocks=full,
                  attn_backend=str(enc.attn_backend))
    print(f"encoder built in {time.time() - t0:.1f} s: {config_summary(hf)}", flush=True)
    result["vllm_choices"] = parts.run("describe the encoder", describe, enc, vllm_config)
    print(f"vLLM chose: {result['vllm_choices']}", flush=True)
    for size in args.sizes:
        stock = parts.run(f"{size}^2 stock", stock_size, enc, vllm_config, size, args, parts, full)
        if stock is None:
            continue
        for tiles in args.tiles:
            row = parts.run(f"{size}^2 tiles={tiles}", hilberta_case, enc, vllm_config, stock,
                            size, tiles, args, parts, full)
            if row is not None:
                result["rows"].append(row)
        del stock
        _free_cuda()
        save(result)
    return result


def table(result: dict) -> str:
    head = ("| image | patches | tiles x tokens | shared | bound | 4 full-attn blocks: stock ms | "
            "HilbertA ms (kernel only) | x | encoder stock ms | HilbertA ms | x | rel err |")
    lines = [head, "|" + " --- |" * 12]
    for r in result["rows"]:
        errs = r.get("rel_err_vs_masked_dense")
        lines.append(
            f"| {r['image']} | {r['patches']} | {r['tiles']} x {r['tile_tokens']} | "
            f"{r['shared_tokens']} | {r['pair_bound']:.2f} | {_ms(r.get('attention_stock_ms'), 3)} | "
            f"{_ms(r.get('attention_hilberta_ms'), 3)} ({_ms(r.get('attention_kernel_only_ms'), 3)}) | "
            f"{_x(r.get('attention_speedup'))} | {_ms(r.get('encoder_stock_ms'), 2)} | "
            f"{_ms(r.get('encoder_hilberta_ms'), 2)} | {_x(r.get('encoder_speedup'))} | "
            f"{'-' if not errs else f'{max(errs):.1e}'} |")
    return "\n".join(lines)


def summary(result: dict) -> list[str]:
    """The last lines of the output (suite.sh keeps the tail): card and versions, what
    vLLM chose, the table, the target, one line per failed part."""
    choices = result.get("vllm_choices") or {}
    lines = [f"{result.get('card')}, {result.get('versions')}",
             f"vLLM: encoder backend {result.get('attn_backend')}, ops "
             f"{choices.get('full_attention_ops')}, compile {choices.get('compilation', {}).get('mode')}, "
             f"IR {choices.get('ir_priority')}",
             table(result), f"target: {result.get('target')}"]
    errors = result.get("errors") or []
    lines.append(f"{len(errors)} part(s) failed" + (":" if errors else ""))
    for e in errors:
        lines.append(f"  FAILED {e['part']}: {e['error'][:240]} [{e['where']}]")
    return lines


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

    parts = Parts()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {"card": torch.cuda.get_device_name(), "command": " ".join(sys.argv),
              "dtype": "bfloat16", "target": {"attention_speedup_at_2048": TARGET_ATTENTION_SPEEDUP_2048}}
    header["versions"] = parts.run("versions", versions)
    print(f"{header['card']}, {header['versions']}", flush=True)

    def save(result: dict) -> None:
        out.write_text(json.dumps({**result, **header}, indent=1, default=str))

    result = {"rows": [], "errors": parts.errors}
    try:
        result = run(args, parts, save)
    finally:  # also on KeyboardInterrupt / a timeout's signal: keep what was measured
        if "vllm.distributed.parallel_state" in sys.modules:
            from vllm_kvflow.patches.vision_encoder import teardown_parallel_state

            teardown_parallel_state()  # before the summary: NCCL's exit warnings come first
        result.update(header)
        at_2048 = [r["attention_speedup"] for r in result["rows"]
                   if r["patches"] == 146 * 146 and r.get("attention_speedup") is not None]
        if at_2048:
            result["target"]["met"] = max(at_2048) >= TARGET_ATTENTION_SPEEDUP_2048
            result["target"]["measured"] = max(at_2048)
        save(result)
        print()
        print("\n".join(summary(result)))
        print(f"wrote {out}", flush=True)
    if parts.errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
