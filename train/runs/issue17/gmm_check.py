# on the GPU: the MoE's grouped (torch._grouped_mm under bf16 autocast) and dense impls agree, forward and
# backward, and how fast each trains one MoE layer of MODEL (env, default mobilemoe-mini)
import os, time, torch
from mobilemoe.config import MobileMoEConfig
from mobilemoe.model import MoE
torch.manual_seed(0)
cfg = MobileMoEConfig.from_name(os.environ.get("MODEL", "mobilemoe-mini"))
moe = MoE(cfg).cuda()
for p in moe.parameters():
    torch.nn.init.normal_(p, std=0.02)
x = torch.randn(8, 1024, cfg.hidden_size, device="cuda", requires_grad=True)
out, ms, errs = {}, {}, []
for impl in ("dense", "grouped"):
    moe.impl = impl
    x.grad = None; moe.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, _, _ = moe(x)
    y.float().square().mean().backward()
    out[impl] = (y.float(), x.grad.clone(), moe.w1.grad.clone())
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, _, _ = moe(x)
        y.float().square().mean().backward()
    torch.cuda.synchronize(); ms[impl] = (time.perf_counter() - t) / 20 * 1e3
    print(impl, f"{ms[impl]:.2f} ms/step fwd+bwd (8x1024 tokens)")
for i, n in enumerate(("y", "x.grad", "w1.grad")):
    a, b = out["dense"][i], out["grouped"][i]
    errs.append(float((a - b).abs().max() / a.abs().max()))
    print(n, "max rel err", errs[-1])
# the impl the call should train with: grouped when it agrees with dense and is faster
print("CHOICE", "grouped" if max(errs) < 0.05 and ms["grouped"] < ms["dense"] else "dense")
