"""The side-work scope (qmamba/kernels/side_stream.py): what is issued is taken once by its key, a key issued twice
runs once, leaving the scope drops what was not taken, and outside a scope nothing is issued; on CUDA the work
runs on another stream and the consumer sees it finished."""

import pytest
import torch

from qmamba.kernels import side_stream
from qmamba.kernels.side_stream import side_work


def _inline(device):
    return device.type != "cuda"


def test_issue_take_join(device):
    launched = []

    def launch(buf):
        launched.append(1)
        buf.fill_(7)

    with side_work(device, inline=_inline(device)) as work:
        assert side_stream.active() is work
        assert side_stream.issue("a", lambda: torch.zeros(4, device=device), launch)
        side_stream.issue("a", lambda: torch.zeros(4, device=device), launch)  # issued twice: runs once
        side_stream.issue("b", lambda: torch.zeros(2, device=device), launch)
        assert work.pending == 2 and work.issued == 2
        got = side_stream.take("a")
        assert torch.equal(got, torch.full((4,), 7.0, device=device))
        assert side_stream.take("a") is None and side_stream.take("missing") is None  # taken once
        assert work.taken == 1
    assert work.pending == 0  # "b" joined and dropped on leaving
    assert len(launched) == 2
    assert side_stream.active() is None
    assert not side_stream.issue("c", lambda: torch.zeros(1), launch) and side_stream.take("b") is None


def test_scope_is_inactive_off_cuda_or_when_disabled(device):
    with side_work(torch.device("cpu")) as work:
        assert work is None and side_stream.active() is None
    with side_work(device, enabled=False) as work:
        assert work is None and side_stream.active() is None


def test_scopes_nest_and_unwind_on_error(device):
    with side_work(device, inline=_inline(device)) as outer:
        with pytest.raises(RuntimeError):
            with side_work(device, inline=_inline(device)) as inner:
                assert side_stream.active() is inner
                side_stream.issue("x", lambda: torch.zeros(1, device=device), lambda b: None)
                raise RuntimeError("boom")
        assert side_stream.active() is outer and inner.pending == 0


def test_side_stream_work_is_finished_when_taken(device):
    """CUDA: a long side-stream kernel queued behind the current stream's work; the consumer's reduction on the
    current stream after take() sees its whole result."""
    if device.type != "cuda":
        pytest.skip("a second stream needs a GPU")
    src = torch.randn(4096, 4096, device=device)
    with side_work(device) as work:
        assert work.stream is not None and work.stream != torch.cuda.current_stream()
        side_stream.issue("m", lambda: torch.empty(4096, 4096, device=device),
                          lambda out: torch.matmul(src, src, out=out))
        got = side_stream.take("m").sum()
    torch.testing.assert_close(got, (src @ src).sum(), rtol=1e-3, atol=1e-1)
