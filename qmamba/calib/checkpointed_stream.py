"""The residual stream of a :class:`qmamba.model.MambaLM`'s parallel forward for training, each block optionally
under activation checkpointing.

:func:`residual_stream` walks ``model.blocks`` as :meth:`MambaLM.prefill` does (fp32 residual, the block's norm in
the compute dtype, the mixer from a zero recurrent state) and stops before the final norm: ``model._logits(*stream)``
equals ``model(ids)``. With ``checkpoint_blocks`` each block's norm + mixer runs under
``torch.utils.checkpoint.checkpoint(use_reentrant=False)``: autograd keeps only the block's input (the fp32
residual stream, ``[B, L, d]``) and recomputes the block in the backward pass, instead of keeping every activation
of every block (projections, the training scan's ``[B, L, d_inner, d_state]`` factors, expert inputs, the
materialized trainable weights) until the backward.

Recomputation is exact: a block's forward draws no random numbers (no dropout) and its only data-dependent choice,
the MoE top-1 routing, is an argmax of the same inputs. The residual add sits outside the checkpointed part (it
keeps nothing for the backward), so one tensor per block stays alive.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def block_output(block, residual: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``mixer(norm(residual))`` of one block, from a zero recurrent state (a Mamba mixer's states are dropped)."""
    _, x = block.norm.add_forward(None, residual, dtype)
    return block.mixer(x)[0] if block.is_mamba else block.mixer(x)


def residual_stream(model, input_ids: torch.Tensor, checkpoint_blocks: bool = False):
    """``(residual fp32 [B, L, d], h [B, L, d])`` after the last block, before the final add + norm, of ``model``
    (a :class:`MambaLM` on the reference backend) over ``input_ids [B, L]``; ``checkpoint_blocks``: each block under
    activation checkpointing (same values and gradients, one block-input tensor kept per block)."""
    dtype = model.compute_dtype
    h = model.embedding(input_ids).to(dtype)
    residual = None
    for block in model.blocks:
        residual = h.float() if residual is None else residual + h.float()  # add_norm's add (ops.add_norm)
        if checkpoint_blocks and torch.is_grad_enabled():
            h = checkpoint(block_output, block, residual, dtype, use_reentrant=False)
        else:
            h = block_output(block, residual, dtype)
    return residual, h
