"""Random initialisation follows Mamba's scheme and is reproducible."""

import math

import torch
import torch.nn.functional as F

from qmamba.checkpoints.random_init import DT_MAX, DT_MIN, random_state_dict
from qmamba.checkpoints.shapes import expected_shapes
from qmamba.config import preset


def test_mamba_init_values():
    cfg = preset("tiny-blackmamba")
    sd = random_state_dict(cfg, seed=0)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_shapes(cfg)
    a_log = sd["layers.0.mixer.A_log"]
    assert torch.allclose(a_log, torch.log(torch.arange(1, cfg.d_state + 1.0)).expand_as(a_log))
    assert torch.equal(sd["layers.0.mixer.D"], torch.ones(cfg.d_inner))
    dt = F.softplus(sd["layers.0.mixer.dt_bias"])
    assert dt.min() >= DT_MIN * 0.999 and dt.max() <= DT_MAX * 1.001
    assert dt.log().std() > 0.5  # log-uniform over two decades, not a constant
    assert torch.equal(sd["layers.0.norm.weight"], torch.ones(cfg.d_model))
    assert torch.equal(sd["norm_f.bias"], torch.zeros(cfg.d_model))
    assert sd["layers.1.mixer.router.bias"].abs().max() == 0
    assert abs(sd["embedding.weight"].std().item() - 0.02) < 0.002
    bound = 1 / math.sqrt(cfg.d_conv)
    assert sd["layers.0.mixer.conv_weight"].abs().max() <= bound


def test_reproducible_and_seeded():
    cfg = preset("tiny-mamba")
    a, b, c = random_state_dict(cfg, 1), random_state_dict(cfg, 1), random_state_dict(cfg, 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["layers.0.mixer.in_proj.weight"], c["layers.0.mixer.in_proj.weight"])


def test_generated_in_target_dtype():
    sd = random_state_dict(preset("tiny-blackmamba"), 0, dtype="bfloat16")
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
