"""The Mamba mixer's ``A = -exp(A_log)``: computed once, reused while A_log is unchanged, recomputed when it
changes (in place or through load_state_dict), and differentiable where a gradient is wanted."""

import torch

from qmamba.config import preset
from qmamba.mamba_mixer import MambaMixer


def _mixer():
    torch.manual_seed(0)
    mixer = MambaMixer(preset("tiny-mamba"))
    with torch.no_grad():
        mixer.A_log.copy_(torch.randn_like(mixer.A_log))
    return mixer


def test_ssm_A_is_kept_while_A_log_is_unchanged():
    mixer = _mixer()
    with torch.no_grad():
        a = mixer.ssm_A()
        torch.testing.assert_close(a, -torch.exp(mixer.A_log.float()), rtol=0, atol=0)
        assert mixer.ssm_A() is a  # no second computation


def test_ssm_A_follows_a_changed_A_log():
    mixer = _mixer()
    with torch.no_grad():
        before = mixer.ssm_A().clone()
        mixer.A_log.add_(1.0)  # in place: a new version of the same tensor
        torch.testing.assert_close(mixer.ssm_A(), before * torch.e, rtol=1e-6, atol=0)
        state = {k: v.clone() for k, v in mixer.state_dict().items()}
        state["A_log"] = torch.zeros_like(state["A_log"])
        mixer.load_state_dict(state)
        assert torch.equal(mixer.ssm_A(), -torch.ones_like(before))


def test_ssm_A_is_differentiable_where_a_gradient_is_wanted():
    mixer = _mixer()
    a = mixer.ssm_A()
    assert a.requires_grad
    a.sum().backward()
    torch.testing.assert_close(mixer.A_log.grad, -torch.exp(mixer.A_log.detach()))
