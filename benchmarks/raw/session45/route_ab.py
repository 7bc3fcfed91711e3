"""Two MoE routing kernels side by side on the GPU: checked (indices equal to the fp32 reference's but for ties, the
int8 variant's routing bit for bit the plain one's, its codes bit for bit quantize_rows_int8's), then timed.

    PYTHONPATH=$PWD python benchmarks/raw/session45/route_ab.py OLD.py [NEW.py]

OLD.py / NEW.py: copies of qmamba/kernels/fused_moe.py (e.g. ``git show 5837bd8:qmamba/kernels/fused_moe.py``, the
one-row kernel, and ``git show ddc5b92:qmamba/kernels/fused_moe.py``, the several-rows one); NEW defaults to the
tree's. Written in session 45, not run (no GPU); exits 1 when a check fails."""
import importlib.util
import sys
from pathlib import Path

import torch

from qmamba.kernels import fused_moe as tree
from qmamba.kernels.fused_moe import route_top1_ref
from qmamba.kernels.w4a8_gemm import quantize_rows_int8

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from timing import time_calls  # noqa: E402


def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


old = load(sys.argv[1], "fm_old")
new = load(sys.argv[2], "fm_new") if len(sys.argv) > 2 else tree


def timed(fn):
    """Median microseconds a launch: 200 launches in one CUDA graph (benchmarks/timing.py)."""
    return time_calls([fn], calls_per_graph=200)


failures = []
torch.manual_seed(0)
for t in (2048, 4096, 8):
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(t, 1472, device="cuda", dtype=dtype)
        w = (torch.randn(8, 1472, device="cuda") * 0.05).to(dtype)
        k_pad = 1536
        ref_idx, ref_wt = route_top1_ref(x, w)
        q_ref = quantize_rows_int8(x, k_pad)
        res = {}
        for name, mod in (("old", old), ("new", new)):
            idx, wt = mod.route_top1(x, w)
            idx8, wt8, q = mod.route_top1_int8(x, w, None, k_pad)
            ok = torch.equal(idx8, idx) and torch.equal(wt8, wt)
            ok &= all(torch.equal(a, b) for a, b in zip(q, q_ref))
            agree = (idx == ref_idx).float().mean().item()
            err = (wt - ref_wt).abs().max().item()
            ok &= agree >= 0.999 and err < 1e-4
            if not ok:
                failures.append(f"{name} t={t} {dtype}: int8 routing equal {torch.equal(idx8, idx) and torch.equal(wt8, wt)}, "
                                f"codes equal {[torch.equal(a, b) for a, b in zip(q, q_ref)]}, idx agree {agree}, wt err {err}")
            res[name] = (timed(lambda: mod.route_top1(x, w)), timed(lambda: mod.route_top1_int8(x, w, None, k_pad)))
            print(f"t={t:5d} {str(dtype)[6:]:9s} {name}: route {res[name][0]:7.2f} us, route+int8 {res[name][1]:7.2f} us, "
                  f"idx agree {agree:.4f}, wt err {err:.1e}, checks {'ok' if ok else 'FAILED'}", flush=True)
        print(f"t={t:5d} {str(dtype)[6:]:9s} new/old: route {res['new'][0] / res['old'][0]:.3f}, "
              f"route+int8 {res['new'][1] / res['old'][1]:.3f}")
        # the routing of old and new: the same picks but where the sums' order moves a near tie
        print(f"   old vs new idx agree {(old.route_top1(x, w)[0] == new.route_top1(x, w)[0]).float().mean().item():.5f}")
print("\n".join(failures) or "all checks passed")
sys.exit(1 if failures else 0)
