"""Temporary GPU experiment (not committed): Python profile of the fused loss's forward+backward."""
import cProfile, os, pstats, sys, torch
sys.path[:0] = [os.path.join(os.getcwd(), "src")]
import entflash.kernels.rowwise as kr
x = torch.randn(32768, 1024, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
t = torch.randint(0, 1024, (32768,), device="cuda")
def fb():
    x.grad = None
    kr.fused_entmax_loss(x, t, 1.5).backward()
for _ in range(5):
    fb()
torch.cuda.synchronize()
pr = cProfile.Profile()
pr.enable()
for _ in range(50):
    fb()
torch.cuda.synchronize()
pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(22)
