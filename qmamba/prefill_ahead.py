"""What a prefill starts early on a side stream (:mod:`qmamba.kernels.side_stream`), and when.

On CUDA a quantized projection of a prefill's many rows is one dequantization pass then cuBLAS; the pass depends
on nothing but the weight. So each Mamba mixer, as it starts, queues the passes of its own out_proj and of the next
mixer's in_proj, x_proj and dt_proj (the first mixer's at the start: taken before any scan, they run in line),
and the mixer starts them just before its scan, whose few warps a multiprocessor leave room beside them, instead
of in line before their GEMMs (:func:`qmamba.kernels.side_stream.start_queued`). The MoE block queues its
own early work (the W4A8 experts' input quantizer, :func:`qmamba.kernels.fused_moe.moe_forward`) inside the same
scope. At most five dense matrices are alive at once (the one in use, the four queued).

Runs with the Triton backend on CUDA under ``MatmulPolicy.prefill_side_stream``; elsewhere :func:`prefill_ahead`
yields a plan that does nothing, so the model's code is the same on every device.
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

_OWN = ("out_proj",)  # queued as a mixer starts (its scan comes before them), with the next mixer's _NEXT
_NEXT = ("in_proj", "x_proj", "dt_proj")


class PrefillAhead:
    """The plan of one prefill of ``rows`` token rows (batch x length) in ``dtype`` (see the module docstring)."""

    def __init__(self, mixers: list[nn.Module], rows: int, dtype):
        from qmamba.kernels import triton_ops  # lazily: the Triton path only

        self._issue = triton_ops.issue_dequantization
        self.rows, self.dtype = rows, dtype
        self._next = {id(a): b for a, b in zip(mixers, mixers[1:])}
        if mixers:
            self._queue_all(mixers[0], _NEXT)

    def _queue(self, module: nn.Module) -> None:
        from qmamba.kernel_view import linear_weight

        if hasattr(module, "kernel_weight"):  # a quantized linear (a float one has no pass)
            self._issue(linear_weight(module)[0], self.rows, self.dtype, queued=True)

    def _queue_all(self, mixer: nn.Module, names: tuple) -> None:
        for name in names:
            self._queue(getattr(mixer, name))

    def before_mixer(self, mixer: nn.Module) -> None:
        """Queue the passes of this mixer's out_proj and of the next mixer's in_proj, x_proj and dt_proj."""
        self._queue_all(mixer, _OWN)
        following = self._next.get(id(mixer))
        if following is not None:
            self._queue_all(following, _NEXT)


class _Nothing:
    def before_mixer(self, mixer: nn.Module) -> None:
        pass


@contextmanager
def prefill_ahead(model, rows: int):
    """The side-work scope of one prefill of ``model`` over ``rows`` token rows, yielding its plan (a plan that
    does nothing off CUDA, off the Triton backend, or when the matmul policy turns the side stream off)."""
    mixers = [b.mixer for b in model.blocks if b.is_mamba]
    if (model.device.type != "cuda" or not mixers or any(m.backend != "triton" for m in mixers)
            or not _policy_allows()):
        yield _Nothing()
        return
    from qmamba.kernels.side_stream import side_work

    with side_work(model.device):
        yield PrefillAhead(mixers, rows, model.compute_dtype)


def _policy_allows() -> bool:
    from qmamba.kernels.matmul_configs import current_policy  # lazily: the Triton path only

    return current_policy().prefill_side_stream
