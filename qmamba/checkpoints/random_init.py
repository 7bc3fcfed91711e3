"""Random-weight checkpoints of any preset, in any supported format (to try the pipeline and to benchmark big
shapes without downloads).

Initialisation follows Mamba's: ``A_log[i, :] = log(1..N)``, ``D = 1``, dt bias = inverse-softplus of dt drawn
log-uniform in [1e-3, 1e-1], ``dt_proj`` uniform(+-dt_rank^-0.5), depthwise conv uniform(+-1/sqrt(d_conv)),
linears and embedding normal(0, 0.02) (``out_proj``/``fc2`` scaled by 1/sqrt(n_layers)), norms 1, biases 0.
Tensors are generated directly in the target dtype, one at a time, so BlackMamba-2.8B in bf16 needs about one
copy of its weights (5.6 GB) in memory.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from tqdm import tqdm

from qmamba.config import ModelConfig, preset
from qmamba.devices import check_fits
from qmamba.errors import ConfigError

from . import blackmamba, hf_mamba, mamba_ssm, native
from .files import atomic_output_dir, check_output_dir, check_tokenizer_file, copy_tokenizer
from .manifest import dtype_name, parse_dtype
from .shapes import expected_shapes

DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4
INIT_STD = 0.02
WRITERS = {"blackmamba": blackmamba, "mamba_ssm": mamba_ssm, "hf": hf_mamba}
CREATE_FORMATS = ("qmamba", *WRITERS)


def _init_tensor(name: str, shape: tuple, cfg: ModelConfig, dtype: torch.dtype, gen: torch.Generator):
    """One freshly initialised tensor for internal name ``name`` (generated in ``dtype``)."""
    if name.endswith("A_log"):  # S4D-real: A = -(1..N) in every row
        row = torch.log(torch.arange(1, cfg.d_state + 1, dtype=torch.float32))
        return row.expand(shape).to(dtype).contiguous()
    if name.endswith(("mixer.D", "norm.weight", "norm_f.weight")):
        return torch.ones(shape, dtype=dtype)
    if name.endswith("dt_bias"):  # softplus(dt_bias) = dt, log-uniform in [DT_MIN, DT_MAX]
        u = torch.rand(shape, generator=gen, dtype=torch.float32)
        dt = torch.exp(u * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)).clamp(min=DT_FLOOR)
        return (dt + torch.log(-torch.expm1(-dt))).to(dtype)
    out = torch.empty(shape, dtype=dtype)
    if name.endswith("dt_proj.weight"):
        bound = cfg.dt_rank ** -0.5
        return out.uniform_(-bound, bound, generator=gen)
    if name.endswith(("conv_weight", "conv_bias")):  # PyTorch's Conv1d default for a depthwise conv
        bound = 1.0 / math.sqrt(cfg.d_conv)
        return out.uniform_(-bound, bound, generator=gen)
    if name.endswith(".bias"):
        return out.zero_()
    std = INIT_STD / math.sqrt(cfg.n_layers) if name.endswith(("out_proj.weight", "experts.fc2")) else INIT_STD
    return out.normal_(0.0, std, generator=gen)


def random_state_dict(cfg: ModelConfig, seed: int = 0, dtype=torch.float32, progress: bool = False):
    """Internal-name state dict of a freshly initialised model (tied head not included)."""
    dtype = parse_dtype(dtype) or torch.float32
    gen = torch.Generator().manual_seed(int(seed))
    shapes = expected_shapes(cfg)
    return {name: _init_tensor(name, shape, cfg, dtype, gen)
            for name, shape in tqdm(shapes.items(), desc="init", unit="tensor", disable=not progress)}


def default_dtype(fmt: str, cfg: ModelConfig) -> torch.dtype:
    """bf16 for the BlackMamba format (as published) and native BlackMamba models; fp32 otherwise."""
    if fmt == "blackmamba" or (fmt == "qmamba" and cfg.family == "blackmamba"):
        return torch.bfloat16
    return torch.float32


def write_checkpoint(state_dict: dict, cfg: ModelConfig, fmt: str, out_dir, *, tokenizer_file=None,
                     overwrite: bool = False, source: dict | None = None, max_shard_bytes: int | None = None) -> Path:
    """Write an internal-name ``state_dict`` (consumed) as a checkpoint of format ``fmt``, atomically."""
    if fmt not in CREATE_FORMATS:
        raise ConfigError(f"unknown checkpoint format {fmt!r}; choose from {', '.join(CREATE_FORMATS)}")
    if fmt == "qmamba":
        return native.save_checkpoint(state_dict, cfg, out_dir, source=source, tokenizer_file=tokenizer_file,
                                      overwrite=overwrite)
    writer = WRITERS[fmt]
    writer.config_to_json(cfg)  # refuse an unrepresentable config before any work
    check_tokenizer_file(tokenizer_file)
    with atomic_output_dir(Path(out_dir), overwrite) as tmp:
        if fmt == "hf":
            writer.write(state_dict, cfg, tmp, max_shard_bytes=max_shard_bytes)
        else:
            writer.write(state_dict, cfg, tmp)
        copy_tokenizer(tokenizer_file, tmp)
    return Path(out_dir)


def check_tokenizer_fits(tokenizer_file, cfg: ModelConfig) -> None:
    """A tokenizer to put into a new checkpoint must load and have no more tokens than the model's vocabulary
    (fewer is normal: vocabularies are padded)."""
    if tokenizer_file is None:
        return
    from qmamba.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_file)
    if tok.vocab_size > cfg.vocab_size:
        raise ConfigError(f"tokenizer {tokenizer_file} has {tok.vocab_size} tokens, more than the model's vocabulary "
                          f"of {cfg.vocab_size}: token ids would fall outside the embedding; use the preset's "
                          "tokenizer (or a preset with a larger vocabulary)")


def create_checkpoint(preset_or_config, fmt: str, out_dir, *, seed: int = 0, dtype=None, tokenizer_file=None,
                      overwrite: bool = False, progress: bool = False) -> Path:
    """A random-weight checkpoint of a preset name (or a :class:`ModelConfig`) in format ``fmt``.

    ``tokenizer_file`` is copied in as ``tokenizer.json``; by default a model with GPT-NeoX-20B's vocabulary gets
    the NeoX tokenizer shipped with qmamba, others none."""
    from qmamba.tokenizer import NEOX_TOKENIZER_FILE, is_neox_vocab

    cfg = preset(preset_or_config) if isinstance(preset_or_config, str) else preset_or_config
    if tokenizer_file is None and is_neox_vocab(cfg.vocab_size):
        tokenizer_file = NEOX_TOKENIZER_FILE
    if fmt not in CREATE_FORMATS:
        raise ConfigError(f"unknown checkpoint format {fmt!r}; choose from {', '.join(CREATE_FORMATS)}")
    if fmt in WRITERS:
        WRITERS[fmt].config_to_json(cfg)
    check_output_dir(Path(out_dir), overwrite)
    check_tokenizer_fits(tokenizer_file, cfg)
    dtype = parse_dtype(dtype) or default_dtype(fmt, cfg)
    itemsize = torch.empty(0, dtype=dtype).element_size()
    check_fits(cfg.parameter_counts()["total"] * itemsize, torch.device("cpu"),
               f"a random {dtype_name(dtype)} model of {cfg.parameter_counts()['total']:.3g} parameters")
    sd = random_state_dict(cfg, seed, dtype, progress=progress)
    source = {"format": "random", "path": None, "files": {}, "seed": int(seed)}
    return write_checkpoint(sd, cfg, fmt, out_dir, tokenizer_file=tokenizer_file, overwrite=overwrite,
                            source=source)
