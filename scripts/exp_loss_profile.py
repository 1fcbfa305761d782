"""Temporary GPU experiment (not committed): host time of the fused entmax loss's forward+backward."""
import os, sys, time, torch, triton
sys.path[:0] = [os.path.join(os.getcwd(), "src")]
import torch.nn.functional as F
import entflash.kernels.rowwise as kr


def host_ms(fn, n=30):
    """(host ms per call while enqueueing n calls, wall ms per call including the final sync)."""
    fn(); torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e3, (t2 - t0) / n * 1e3


for rows, cols in [(512, 131072), (32768, 1024)]:
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(rows, cols, device="cuda", dtype=dtype) * 3
        t = torch.randint(0, cols, (rows,), device="cuda")
        xg = x.clone().requires_grad_(True)

        def ours_fb():
            xg.grad = None
            kr.fused_entmax_loss(xg, t, 1.5).backward()

        def ce_fb():
            xg.grad = None
            F.cross_entropy(xg, t).backward()

        def ours_f():
            with torch.no_grad():
                kr.fused_entmax_loss(x, t, 1.5)

        def ours_f_grad():
            kr.fused_entmax_loss(xg, t, 1.5)

        loss = kr.fused_entmax_loss(xg, t, 1.5)

        def ours_b():
            xg.grad = None
            loss.backward(retain_graph=True)

        def ent_fb():
            xg.grad = None
            kr.fused_entmax(xg, 1.5, -1).backward(x)

        out = []
        for name, fn in (("ours_fb", ours_fb), ("ce_fb", ce_fb), ("ours_f", ours_f), ("ours_f_grad", ours_f_grad),
                         ("ours_b", ours_b), ("entmax_fb", ent_fb)):
            h, w = host_ms(fn)
            gpu = triton.testing.do_bench(fn, warmup=20, rep=100, return_mode="median")
            out.append(f"{name} host {h:.3f} wall {w:.3f} bench {gpu:.3f}")
        print(f"{rows}x{cols} {str(dtype)[6:]}: " + " | ".join(out), flush=True)
