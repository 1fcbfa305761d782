"""Quick GPU check and timing of the fused forward and backward (developer tool; official numbers: benchmarks/).

    PYTHONPATH=src python3 scripts/kernel_dev.py --shapes 4096:128 16384:128 --local 0 3 --out /tmp/dev.json

For each (N, D) with B * N = 16k tokens and H * D = 2048, causal, bf16, and each locality strength (or, with
--levels, each target block sparsity on the benchmark harness's own inputs, benchmarks/inputs.py):
checks the output against the float32 reference on a slice of heads, then times (median ms,
triton.testing.do_bench) FA2 (SDPA flash backend), our whole forward and each of its three stages, our fused
backward (from the training forward's saved tensors) against FA2's backward (its fwd+bwd minus fwd), and
reports block sparsity (64x64 tile map), support size and first-call (compile) time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch


def local_inputs(B, H, N, D, local, seed, dtype=torch.bfloat16):
    """Random q, k, v (B, H, N, D) plus `local` times a shared positional code (geometric frequencies),
    which concentrates attention near the diagonal as `local` grows."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, H, N, D, device="cuda", generator=g)
    k = torch.randn(B, H, N, D, device="cuda", generator=g)
    v = torch.randn(B, H, N, D, device="cuda", generator=g)
    if local > 0:
        freqs = 0.02 * 50.0 ** torch.linspace(0.0, 1.0, D // 2, device="cuda")
        pos = torch.arange(N, device="cuda", dtype=torch.float32)[:, None] * freqs
        code = torch.cat([pos.cos(), pos.sin()], dim=-1)
        q = q + local * code
        k = k + local * code
    return q.to(dtype), k.to(dtype), v.to(dtype)


def launch_config(config: str):
    """"BLOCK_M:num_warps[:maxnreg]" -> (block_m, num_warps, extra launch options, result-key tag "m64w4[r128]")."""
    fields = [int(f) for f in config.split(":")]
    if len(fields) not in (2, 3):
        raise ValueError(f"launch config {config!r}: expected BLOCK_M:num_warps or BLOCK_M:num_warps:maxnreg")
    tag = f"m{fields[0]}w{fields[1]}" + (f"r{fields[2]}" if len(fields) == 3 else "")
    return fields[0], fields[1], ({"maxnreg": fields[2]} if len(fields) == 3 else {}), tag


def backward_config(config: str, default_blocks: dict):
    """"num_warps:num_stages[:maxnreg]" -> (attention_backward's blocks= dict over default_blocks, result-key tag
    "w4s2[r168]")."""
    fields = [int(f) for f in config.split(":")]
    if len(fields) not in (2, 3):
        raise ValueError(f"backward config {config!r}: expected num_warps:num_stages or num_warps:num_stages:maxnreg")
    blocks = dict(default_blocks, warps=fields[0], stages=fields[1])
    if len(fields) == 3:
        blocks["maxnreg"] = fields[2]
    return blocks, "w{}s{}".format(*fields[:2]) + (f"r{fields[2]}" if len(fields) == 3 else "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["4096:128", "16384:128", "4096:64", "16384:64"])
    ap.add_argument("--local", nargs="+", type=float, default=[0.0, 3.0])
    ap.add_argument("--levels", nargs="*", type=float, default=[],
                    help="target block sparsities on the harness's inputs (replaces --local)")
    ap.add_argument("--alpha", type=float, default=1.5)
    ap.add_argument("--newton", nargs="+", type=int, default=[1])
    ap.add_argument("--noncausal", action="store_true")
    ap.add_argument("--warps", nargs="*", type=int, default=[],
                    help="also time the sweep and the output stage with these num_warps (launch-config experiments)")
    ap.add_argument("--sweep-configs", nargs="*", default=[],
                    help="also time the sweep alone with these BLOCK_M:num_warps[:maxnreg] (e.g. 64:4 or 64:4:128: "
                         "at most 128 registers per thread), launch experiments")
    ap.add_argument("--sparse-configs", nargs="*", default=[],
                    help="also time the solve and output stages with these BLOCK_M:num_warps[:maxnreg] (e.g. 64:4)")
    ap.add_argument("--bwd-configs", nargs="*", default=[],
                    help="also time the backward with these num_warps:num_stages[:maxnreg] (e.g. 4:2:168)")
    ap.add_argument("--far-scores", nargs="*", type=int, default=[],
                    help="also time the sweep and both forwards, and measure the sweep bound's gap and both outputs' "
                         "errors, with far key tiles binning this many scores per row (sweep.FAR_TILE_SCORES for "
                         "inference and FAR_TILE_SCORES_BEFORE_NEWTON for training: 0, 1 or 2)")
    ap.add_argument("--learned", action="store_true",
                    help="also time the training forward and the backward with alpha as a learnable (H,) tensor "
                         "(--alpha on every head, requires_grad: the alpha-gradient path), each --bwd-configs too")
    ap.add_argument("--pointer-loads", action="store_true",
                    help="also time the three forward stages with key/value tiles read through pointers "
                         "(kv_tma off, no register cap): ms_*_pointers, next to the plan's ms_sweep/solve/output")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from entflash.autograd import fused_backward, fused_forward
    from entflash.kernels.backward import _pick_blocks, attention_backward
    from entflash.kernels.forward import alpha_tensor, entmax_forward
    from entflash.kernels.launch import make_spec
    from entflash.kernels.output import sparse_output
    from entflash.kernels.solve import solve_tau
    from entflash.kernels import forward as forward_module
    from entflash.kernels import sweep as sweep_module
    from entflash.kernels.sweep import dense_sweep
    from entflash.reference.attention import torch_attention


    causal = not args.noncausal
    rows, experiments = [], []
    print(f"device {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    for shape in args.shapes:
        N, D = map(int, shape.split(":"))
        B, H = max(1, 16384 // N), 2048 // D
        for local in (args.levels or args.local):
            if args.levels:
                from benchmarks.inputs import StructuredInputs, calibrate_strength
                parts = StructuredInputs(B, H, N, D, device="cuda")
                strength = calibrate_strength(local, parts, causal=causal)
                q, k = parts.queries_keys(strength, torch.bfloat16)
                v = parts.v.to(torch.bfloat16)
                del parts
            else:
                q, k, v = local_inputs(B, H, N, D, local, seed=N + D)
            scale = D ** -0.5
            for ni in args.newton:
                t0 = time.time()
                res = entmax_forward(q, k, v, args.alpha, causal, scale, newton_iters=ni)
                torch.cuda.synchronize()
                first_call_s = time.time() - t0
                # correctness on two heads of batch 0 against the float32 reference
                hs = slice(0, 2)
                ref, aux = torch_attention(q[:1, hs].float(), k[:1, hs].float(), v[:1, hs].float(), args.alpha,
                                           causal, scale, None, None, None, True)
                err = ((res["out"][:1, hs].float() - ref).norm() / ref.norm()).item()
                tau_err = (res["tau"][:1, hs] - aux["tau"]).abs().max().item()
                finite = bool(torch.isfinite(res["out"]).all())
                n_tiles = res["tile_map"].shape[-1]
                valid = torch.ones(n_tiles, n_tiles, dtype=torch.bool, device="cuda")
                if causal:
                    valid = valid.tril()
                sparsity = 1 - (res["tile_map"] & valid).sum().item() / (valid.sum().item() * B * H)
                support = res["support"].float().mean().item()
                # timings
                def bench(**kw):
                    fn = lambda: entmax_forward(q, k, v, args.alpha, causal, scale, newton_iters=ni, **kw)
                    return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")

                def library(keep):  # the forward as the library runs it (autograd.fused_forward, no return_aux)
                    fn = lambda: fused_forward(q, k, v, args.alpha, causal, scale, None, None, None, keep, False)
                    return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")
                ms = library(False)                          # inference
                ms_train = library(True)                     # training: also stores O2, S for the backward
                ms_norm = bench(save_bwd=False, fold=False)  # inference, closed by normalization
                res_n = entmax_forward(q, k, v, args.alpha, causal, scale, newton_iters=ni, save_bwd=False,
                                       fold=False)
                err_norm = ((res_n["out"][:1, hs].float() - ref).norm() / ref.norm()).item()
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    fa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
                    fa()
                    ms_fa = triton.testing.do_bench(fa, warmup=50, rep=200, return_mode="median")
                a_t = alpha_tensor(args.alpha, H, q.device)
                spec = make_spec(q, k, args.alpha, a_t, causal, None, None, None)
                rm, tm, th = dense_sweep(q, k, a_t, scale, spec)
                tau, tlo, hits = solve_tau(q, k, a_t, scale, spec, rm, tm, th, ni)
                # histogram bound alone (no Newton pass): does it hold, and how far below the root is it?
                tau0 = th
                t0h, tr = tau0[:1, hs], aux["tau"]
                fin = torch.isfinite(tr)
                gap = (tr[fin] - t0h[fin])
                hist_held = (gap >= -1e-3).float().mean().item()
                hist_gap_bins = (gap * 16).mean().item()
                _, _, th_all = dense_sweep(q, k, a_t, scale, spec, far_scores=0)  # every score binned
                hist_gap_bins_all = ((tr[fin] - th_all[:1, hs][fin]) * 16).mean().item()
                ms_sweep_all = triton.testing.do_bench(lambda: dense_sweep(q, k, a_t, scale, spec, far_scores=0),
                                                       return_mode="median")
                ms_sweep = triton.testing.do_bench(lambda: dense_sweep(q, k, a_t, scale, spec), return_mode="median")
                ms_solve = triton.testing.do_bench(lambda: solve_tau(q, k, a_t, scale, spec, rm, tm, th, ni),
                                                   return_mode="median")
                ms_out = triton.testing.do_bench(
                    lambda: sparse_output(q, k, v, a_t, scale, spec, rm, tm, tau, tlo, hits, save_bwd=False),
                    return_mode="median")
                warp_ms = {}
                if args.pointer_loads:
                    spec_p = dataclasses.replace(spec, kv_tma=False, tma_launch={})
                    warp_ms["kv_tma"] = float(spec.kv_tma)
                    warp_ms["ms_sweep_pointers"] = triton.testing.do_bench(
                        lambda: dense_sweep(q, k, a_t, scale, spec_p), return_mode="median")
                    warp_ms["ms_solve_pointers"] = triton.testing.do_bench(
                        lambda: solve_tau(q, k, a_t, scale, spec_p, rm, tm, th, ni), return_mode="median")
                    warp_ms["ms_output_pointers"] = triton.testing.do_bench(
                        lambda: sparse_output(q, k, v, a_t, scale, spec_p, rm, tm, tau, tlo, hits, save_bwd=False),
                        return_mode="median")

                def inference_error():  # the library's inference forward (16-bit: no Newton pass) against ref
                    out = fused_forward(q, k, v, args.alpha, causal, scale, None, None, None, False, False)[0]
                    return ((out[:1, hs].float() - ref).norm() / ref.norm()).item()
                warp_ms["rel_err_inference"] = inference_error()
                for far in args.far_scores:
                    _, _, th_far = dense_sweep(q, k, a_t, scale, spec, far_scores=far)
                    gap_far = tr[fin] - th_far[:1, hs][fin]
                    warp_ms[f"hist_gap_in_bins_far{far}"] = (gap_far * 16).mean().item()
                    warp_ms[f"hist_bound_held_far{far}"] = (gap_far >= -1e-3).float().mean().item()
                    warp_ms[f"ms_sweep_far{far}"] = triton.testing.do_bench(
                        lambda: dense_sweep(q, k, a_t, scale, spec, far_scores=far), return_mode="median")
                    default_far, sweep_module.FAR_TILE_SCORES = sweep_module.FAR_TILE_SCORES, far
                    default_train_far = forward_module.FAR_TILE_SCORES_BEFORE_NEWTON
                    forward_module.FAR_TILE_SCORES_BEFORE_NEWTON = far
                    try:
                        warp_ms[f"rel_err_inference_far{far}"] = inference_error()
                        warp_ms[f"ms_far{far}"] = library(False)
                        # the training forward with this sweep before its Newton pass
                        warp_ms[f"ms_train_far{far}"] = library(True)
                        out_t = fused_forward(q, k, v, args.alpha, causal, scale, None, None, None, True, False)[0]
                        warp_ms[f"rel_err_train_far{far}"] = ((out_t[:1, hs].float() - ref).norm() / ref.norm()).item()
                    finally:
                        sweep_module.FAR_TILE_SCORES = default_far
                        forward_module.FAR_TILE_SCORES_BEFORE_NEWTON = default_train_far
                for config in args.sweep_configs:
                    block_m, w, extra, tag = launch_config(config)
                    spec_c = dataclasses.replace(spec, sweep_block_m=block_m,
                                                 sweep_launch=dict(spec.sweep_launch, num_warps=w, **extra))
                    warp_ms[f"ms_sweep_{tag}"] = triton.testing.do_bench(
                        lambda: dense_sweep(q, k, a_t, scale, spec_c), return_mode="median")
                for config in args.sparse_configs:
                    block_m, w, extra, tag = launch_config(config)
                    n_mb = triton.cdiv(N, block_m)
                    spec_c = dataclasses.replace(
                        spec, tiles=dict(spec.tiles, BLOCK_M=block_m), num_m_blocks=n_mb, grid=(n_mb, B * H),
                        lists=torch.empty(n_mb * B * H * spec.nk_chunk, device="cuda", dtype=torch.int32),
                        sparse_launch=dict(spec.sparse_launch, num_warps=w, **extra))
                    tau_c, tlo_c, hits_c = solve_tau(q, k, a_t, scale, spec_c, rm, tm, th, ni)
                    res_c = sparse_output(q, k, v, a_t, scale, spec_c, rm, tm, tau_c, tlo_c, hits_c, save_bwd=False)
                    warp_ms[f"rel_err_{tag}"] = (
                        (res_c["out"][:1, hs].float() - ref).norm() / ref.norm()).item()
                    warp_ms[f"ms_solve_{tag}"] = triton.testing.do_bench(
                        lambda: solve_tau(q, k, a_t, scale, spec_c, rm, tm, th, ni), return_mode="median")
                    warp_ms[f"ms_output_{tag}"] = triton.testing.do_bench(
                        lambda: sparse_output(q, k, v, a_t, scale, spec_c, rm, tm, tau_c, tlo_c, hits_c,
                                              save_bwd=False), return_mode="median")
                    warp_ms[f"ms_output0_{tag}"] = triton.testing.do_bench(
                        lambda: sparse_output(q, k, v, a_t, scale, spec_c, rm, tm, th, th, None, save_bwd=False,
                                              need_map=False), return_mode="median")
                if args.sparse_configs:
                    warp_ms["ms_output0"] = triton.testing.do_bench(
                        lambda: sparse_output(q, k, v, a_t, scale, spec, rm, tm, th, th, None, save_bwd=False,
                                              need_map=False), return_mode="median")
                for w in args.warps:
                    spec_w = dataclasses.replace(spec, sweep_launch=dict(spec.sweep_launch, num_warps=w),
                                                 sparse_launch=dict(spec.sparse_launch, num_warps=w))
                    warp_ms[f"ms_sweep_w{w}"] = triton.testing.do_bench(
                        lambda: dense_sweep(q, k, a_t, scale, spec_w), return_mode="median")
                    warp_ms[f"ms_output_w{w}"] = triton.testing.do_bench(
                        lambda: sparse_output(q, k, v, a_t, scale, spec_w, rm, tm, tau, tlo, hits, save_bwd=False),
                        return_mode="median")
                # backward: ours from the training forward's saved tensors; FA2's as its fwd+bwd minus fwd
                grad_out = torch.randn_like(q)
                _, tau_s, _, tile_map, o2, s_sum = fused_forward(q, k, v, args.alpha, causal, scale, None, None,
                                                                 None, True)
                needs = (True, True, True, False)
                ms_bwd = triton.testing.do_bench(lambda: fused_backward(
                    grad_out, q, k, v, tau_s, tile_map, o2, s_sum, args.alpha, causal, scale, None, None, None,
                    needs), return_mode="median")
                for config in args.bwd_configs:
                    blocks, tag = backward_config(config, _pick_blocks(D, q.dtype))
                    warp_ms[f"ms_bwd_{tag}"] = triton.testing.do_bench(lambda: attention_backward(
                        q, k, v, grad_out, tau_s, tile_map, o2, s_sum, args.alpha, causal, scale, None, None, None,
                        blocks=blocks), return_mode="median")
                if args.learned:  # the learnable-alpha path: generic power code, dalpha sums in the dQ kernel
                    a_h = torch.full((H,), args.alpha, device="cuda", requires_grad=True)
                    warp_ms["ms_train_learned"] = triton.testing.do_bench(lambda: fused_forward(
                        q, k, v, a_h, causal, scale, None, None, None, True), return_mode="median")
                    saved = fused_forward(q, k, v, a_h, causal, scale, None, None, None, True)
                    _, tau_l, _, map_l, o2_l, s_l = saved
                    warp_ms["ms_bwd_learned"] = triton.testing.do_bench(lambda: fused_backward(
                        grad_out, q, k, v, tau_l, map_l, o2_l, s_l, a_h, causal, scale, None, None, None,
                        (True, True, True, True)), return_mode="median")
                    for config in args.bwd_configs:
                        blocks, tag = backward_config(config, _pick_blocks(D, q.dtype))
                        warp_ms[f"ms_bwd_learned_{tag}"] = triton.testing.do_bench(lambda: attention_backward(
                            q, k, v, grad_out, tau_l, map_l, o2_l, s_l, a_h, causal, scale, None, None, None,
                            blocks=blocks, alpha_requires_grad=True), return_mode="median")
                    del saved, tau_l, map_l, o2_l, s_l
                qf, kf, vf = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    ms_fa_fb = triton.testing.do_bench(lambda: torch.autograd.grad(
                        torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, is_causal=causal),
                        (qf, kf, vf), grad_out), return_mode="median")
                row = dict(N=N, D=D, B=B, H=H, local=local, alpha=args.alpha, causal=causal, newton_iters=ni,
                           rel_err=err, tau_err=tau_err, finite=finite, block_sparsity=sparsity,
                           mean_support=support, ms=ms, ms_fa2=ms_fa, ratio=ms / ms_fa, ms_train=ms_train,
                           ms_normalized=ms_norm, rel_err_normalized=err_norm, ms_sweep=ms_sweep,
                           ms_solve=ms_solve, ms_output=ms_out, first_call_s=first_call_s,
                           hist_bound_held=hist_held, hist_gap_in_bins=hist_gap_bins,
                           hist_gap_in_bins_all_scores=hist_gap_bins_all, ms_sweep_all_scores=ms_sweep_all,
                           ms_bwd=ms_bwd,
                           ms_fa2_bwd=ms_fa_fb - ms_fa, ms_fa2_fwd_bwd=ms_fa_fb,
                           ratio_fwd_bwd=(ms_train + ms_bwd) / ms_fa_fb, **warp_ms)
                rows.append(row)
                experiments.append(warp_ms)  # the optional measurements, printed after the fixed columns
                print(json.dumps(row), flush=True)
                del res, ref, aux, tau_s, tile_map, o2, s_sum, qf, kf, vf
    print("\n   N    D local NI  sparsity support  err      ours ms  FA2 ms  ratio  sweep  solve output first_s"
          "  train  norm  err_norm   bwd  FA2bwd  f+b ratio  sweep_all gap gap_all")
    for r, extra in zip(rows, experiments):
        print(f"{r['N']:5d} {r['D']:4d} {r['local']:5.1f} {r['newton_iters']:2d} {r['block_sparsity']:8.3f} "
              f"{r['mean_support']:7.1f} {r['rel_err']:.1e} {r['ms']:8.3f} {r['ms_fa2']:7.3f} {r['ratio']:6.2f} "
              f"{r['ms_sweep']:6.3f} {r['ms_solve']:6.3f} {r['ms_output']:6.3f} {r['first_call_s']:6.1f} "
              f"{r['ms_train']:6.3f} {r['ms_normalized']:6.3f} {r['rel_err_normalized']:.1e} "
              f"{r['ms_bwd']:6.3f} {r['ms_fa2_bwd']:6.3f} {r['ratio_fwd_bwd']:6.2f}  {r['ms_sweep_all_scores']:6.3f} "
              f"{r['hist_gap_in_bins']:5.2f} {r['hist_gap_in_bins_all_scores']:5.2f} "
              + " ".join(f"{key.removeprefix('ms_')}={val:.3g}" for key, val in extra.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
