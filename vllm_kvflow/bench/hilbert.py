"""`kvflow bench hilbert`: HilbertA sparse attention against dense attention on one GPU.

Same run, same card, bf16, non-causal, batch 1, q/k/v already in the [shared | local]
layout (the permutation is a gather done once per image and is not timed):
    dense_ms    torch SDPA, flash backend (FlashAttention 2)
    fa3_ms      FlashAttention 3 from vLLM's bundled vllm.vllm_flash_attn (null if absent)
    flex_ms     FlexAttention with the same HilbertA mask (compiled, 128x128 block mask)
    hilbert_ms  vllm_kvflow.kernels.hilbert_attention
bound = dense pairs / HilbertA pairs (vllm_kvflow.kernels.hilbert_attention.pair_count);
bound_fraction = speedup / bound, the share of the pair-count speedup reached.

Also the accuracy proxy: relative output error of HilbertA against dense attention, on
random inputs and on spatially smooth inputs (features drawn from a 2-D Gaussian random
field over the patch grid), per tile count, both sides in float32.

usage: kvflow bench hilbert --out FILE.json [--quick] [--sweep] [--no-flex]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Callable, Optional

# (image height, width in patches, text tokens, heads, head_dim)
SHAPES = [
    (64, 64, 512, 24, 128),     # Flux-like 1024^2: 4096 image + 512 text
    (128, 128, 512, 24, 128),   # Flux-like 2048^2: 16384 image + 512 text
    (64, 64, 0, 16, 80),        # ViT (Qwen2.5-VL vision tower width): 4096 patches
    (128, 128, 0, 16, 80),      # ViT: 16384 patches
]
TILES = (4, 16)


def _bench_ms(fn: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _load_fa3():
    """vLLM's FA3 varlen entry point, or (None, reason)."""
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
        from vllm.vllm_flash_attn.flash_attn_interface import fa_version_unsupported_reason
    except Exception as exc:  # vLLM not staged on this machine
        return None, f"vllm.vllm_flash_attn not importable: {type(exc).__name__}: {exc}"
    try:
        reason = fa_version_unsupported_reason(3)
    except Exception:
        reason = None
    if reason:
        return None, f"FA3 unsupported: {reason}"
    return flash_attn_varlen_func, None


def _fa3_runner(fa3, q, k, v):
    """Time-ready closure: FA3 on [N, H, D] views of one sequence (batch 1)."""
    import torch

    n = q.shape[2]
    qt, kt, vt = (x[0].transpose(0, 1).contiguous() for x in (q, k, v))  # [N, H, D]
    cu = torch.tensor([0, n], dtype=torch.int32, device=q.device)
    out = torch.empty_like(qt)

    def run():
        return fa3(qt, kt, vt, max_seqlen_q=n, cu_seqlens_q=cu, max_seqlen_k=n,
                   cu_seqlens_k=cu, causal=False, out=out, fa_version=3)

    return run, out


class _Flex:
    """Compiled FlexAttention with the HilbertA mask_mod. The mask parameters live in
    0-d tensors, so one compiled kernel per (N, heads, head_dim) serves all tile counts."""

    def __init__(self, device):
        import torch
        from torch.nn.attention.flex_attention import flex_attention

        from vllm_kvflow.kernels.hilbert_attention import hilbert_mask_mod

        self.params = {k: torch.zeros((), dtype=torch.int32, device=device)
                       for k in ("n_shared", "n_local", "tile_size", "offset")}
        self.mask_mod = hilbert_mask_mod(**self.params)
        self.attn = torch.compile(flex_attention, dynamic=False)
        self.device = device

    def runner(self, q, k, v, n_shared, tile_size, offset):
        from torch.nn.attention.flex_attention import create_block_mask

        n = q.shape[2]
        for key, val in (("n_shared", n_shared), ("n_local", n - n_shared),
                         ("tile_size", tile_size), ("offset", offset)):
            self.params[key].fill_(val)
        block_mask = create_block_mask(self.mask_mod, None, None, n, n, device=self.device)

        def run():
            return self.attn(q, k, v, block_mask=block_mask)

        return run


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _gaussian_field(h: int, w: int, channels: int, sigma: float, gen, device):
    """[h*w, channels] smooth features: white noise blurred by a Gaussian of `sigma` patches
    (in Fourier space, periodic), each channel normalised to zero mean, unit variance."""
    import torch

    noise = torch.randn(channels, h, w, generator=gen, device=device)
    fy = torch.fft.fftfreq(h, device=device)[:, None]
    fx = torch.fft.fftfreq(w, device=device)[None, :]
    kernel = torch.exp(-2 * (math.pi * sigma) ** 2 * (fx ** 2 + fy ** 2))
    field = torch.fft.ifft2(torch.fft.fft2(noise) * kernel).real
    field = (field - field.mean((1, 2), keepdim=True)) / field.std((1, 2), keepdim=True)
    return field.reshape(channels, h * w).T


def accuracy_proxy(device, heads: int = 4, head_dim: int = 64, sigma: float = 4.0,
                   shapes=((64, 64, 512), (64, 64, 0)), tiles=(1, 4, 16), seed: int = 0):
    """Relative error ||O_hilbert - O_dense|| / ||O_dense|| (float32 both), per input kind
    and tile count. Offset 0 (one layer; the sliding schedule matters across layers)."""
    import torch
    import torch.nn.functional as F

    from vllm_kvflow.kernels.hilbert_attention import hilbert_attention, hilbert_attention_reference
    from vllm_kvflow.vision.hilbert import hilbert_layout

    gen = torch.Generator(device=device).manual_seed(seed)
    on_gpu = torch.device(device).type == "cuda"
    rows = []
    for h, w, text in shapes:
        n = text + h * w
        channels = 64
        # Random: iid Gaussian q, k, v (near-uniform attention, so the dense output is
        # close to zero and the relative error is large for any sparse pattern).
        # Smooth: X = a Gaussian field over the grid (text tokens iid), q = k = X Wqk,
        # v = X Wv, so a patch's score with a key falls off with their 2-D distance:
        # the regime HilbertA is designed for.
        inputs = {"random": [torch.randn(1, heads, n, head_dim, generator=gen, device=device)
                             for _ in range(3)]}
        feats = torch.cat([torch.randn(text, channels, generator=gen, device=device),
                           _gaussian_field(h, w, channels, sigma, gen, device)])

        def project():
            proj = torch.randn(channels, heads * head_dim, generator=gen, device=device)
            return ((feats @ proj / math.sqrt(channels))
                    .reshape(n, heads, head_dim).transpose(0, 1)[None].contiguous())

        qk = project()
        inputs["smooth"] = [qk, qk, project()]
        for kind, (q, k, v) in inputs.items():
            dense = F.scaled_dot_product_attention(q, k, v)  # permutation-invariant
            for g_tiles in tiles:
                lay = hilbert_layout(h, w, text, g_tiles)
                ql, kl, vl = (lay.to_layout(x, dim=2) for x in (q, k, v))
                if on_gpu:
                    out = hilbert_attention(ql, kl, vl, lay.n_shared, lay.tile_size, 0)
                else:
                    out = hilbert_attention_reference(ql, kl, vl, lay.n_shared, lay.tile_size, 0)
                err = _rel(lay.from_layout(out, dim=2), dense)
                rows.append(dict(input=kind, image=f"{h}x{w}", text_tokens=text, tiles=g_tiles,
                                 heads=heads, head_dim=head_dim, sigma=sigma, rel_error=err))
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="kvflow bench hilbert", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="first shape only")
    ap.add_argument("--sweep", action="store_true",
                    help="also time the kernel under each of SWEEP_CONFIGS (extra key 'sweep')")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vllm_kvflow.kernels.hilbert_attention import SWEEP_CONFIGS, hilbert_attention, pair_count
    from vllm_kvflow.vision.hilbert import hilbert_layout

    if not torch.cuda.is_available():
        print("kvflow bench hilbert: needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = "cuda"
    card = torch.cuda.get_device_name()
    fa3, fa3_reason = _load_fa3()
    print(f"card {card}  torch {torch.__version__}  triton {triton.__version__}  "
          f"FA3: {'vllm.vllm_flash_attn' if fa3 else fa3_reason}")
    flex = None if args.no_flex else _Flex(dev)
    torch.manual_seed(args.seed)

    results = []
    for h, w, text, heads, head_dim in (SHAPES[:1] if args.quick else SHAPES):
        n = text + h * w
        q, k, v = (torch.randn(1, heads, n, head_dim, device=dev, dtype=torch.bfloat16)
                   for _ in range(3))
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            dense_out = F.scaled_dot_product_attention(q, k, v)
            dense_ms = _bench_ms(lambda: F.scaled_dot_product_attention(q, k, v))
        fa3_ms = None
        if fa3 is not None:
            try:
                run_fa3, fa3_out = _fa3_runner(fa3, q, k, v)
                run_fa3()
                fa3_err = _rel(fa3_out.transpose(0, 1)[None], dense_out)
                if fa3_err > 2e-2:
                    raise RuntimeError(f"FA3 disagrees with SDPA flash: rel err {fa3_err:.3g}")
                fa3_ms = _bench_ms(run_fa3)
            except Exception as exc:
                print(f"  FA3 failed at {n} tokens, head_dim {head_dim}: {exc}")
        for tiles in TILES:
            lay = hilbert_layout(h, w, text, tiles)
            s, g, off = lay.n_shared, lay.tile_size, 0
            out = torch.full_like(q, float("nan"))
            run_h = lambda: hilbert_attention(q, k, v, s, g, off, out=out)  # noqa: E731
            run_h()
            flex_ms, flex_err = None, None
            if flex is not None:
                try:
                    run_f = flex.runner(q, k, v, s, g, off)
                    flex_err = _rel(out, run_f())  # same mask, both bf16: agreement check
                    flex_ms = _bench_ms(run_f)
                except Exception as exc:
                    print(f"  flex failed at {n} tokens, head_dim {head_dim}: {exc}")
            if bool(torch.isnan(out).any()):
                raise RuntimeError("HilbertA kernel left output rows unwritten")
            hilbert_ms = _bench_ms(run_h)
            sweep = None
            if args.sweep:
                sweep = []
                for cfg in SWEEP_CONFIGS:
                    try:
                        fn = lambda: hilbert_attention(q, k, v, s, g, off, out=out, config=cfg)  # noqa: E731
                        fn()
                        sweep.append(dict(cfg, ms=_bench_ms(fn)))
                    except Exception as exc:
                        sweep.append(dict(cfg, ms=None, error=f"{type(exc).__name__}: {exc}"[:200]))
            bound = n * n / pair_count(n, s, g)
            speedup = dense_ms / hilbert_ms
            row = dict(tokens=n, text_tokens=text, tiles=tiles, heads=heads, head_dim=head_dim,
                       dense_ms=dense_ms, fa3_ms=fa3_ms, flex_ms=flex_ms, hilbert_ms=hilbert_ms,
                       speedup=speedup,
                       speedup_vs_fa3=None if fa3_ms is None else fa3_ms / hilbert_ms,
                       speedup_vs_flex=None if flex_ms is None else flex_ms / hilbert_ms,
                       bound=bound, bound_fraction=speedup / bound,
                       image=f"{h}x{w}", n_shared=s, tile_size=g, flex_rel_diff=flex_err)
            if sweep is not None:
                row["sweep"] = sweep
            results.append(row)
            print(json.dumps(row), flush=True)
        del q, k, v, dense_out
        torch.cuda.empty_cache()

    acc = accuracy_proxy(dev, seed=args.seed)
    report = dict(card=card, torch=torch.__version__, triton=triton.__version__,
                  results=results, accuracy_proxy=acc,
                  fa3_source="vllm.vllm_flash_attn" if fa3 else None, fa3_note=fa3_reason)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)

    def fmt(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    print(f"\n{card}, bf16, batch 1 (ms; speedups of HilbertA)")
    print(f"{'tokens':>7} {'text':>4} {'HxD':>7} {'G':>3} {'sdpa':>7} {'fa3':>7} {'flex':>7} "
          f"{'hilb':>7} {'x sdpa':>6} {'x fa3':>6} {'x flex':>6} {'bound':>5} {'frac':>5}")
    for r in results:
        print(f"{r['tokens']:>7} {r['text_tokens']:>4} {r['heads']:>3}x{r['head_dim']:<3} "
              f"{r['tiles']:>3} {fmt(r['dense_ms'])} {fmt(r['fa3_ms']):>7} {fmt(r['flex_ms']):>7} "
              f"{fmt(r['hilbert_ms'])} {fmt(r['speedup'], '6.2f')} "
              f"{fmt(r['speedup_vs_fa3'], '6.2f'):>6} {fmt(r['speedup_vs_flex'], '6.2f'):>6} "
              f"{r['bound']:5.2f} {r['bound_fraction']:5.2f}")
    print("\naccuracy proxy: ||O_hilbert - O_dense|| / ||O_dense|| (float32)")
    for a in acc:
        print(f"  {a['input']:<6} {a['image']:>7}+{a['text_tokens']:<3} tiles {a['tiles']:>2}: "
              f"{a['rel_error']:.4f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
