"""Model configuration: one dataclass for BlackMamba and plain Mamba, with named presets.

The layer plan follows BlackMamba's ``mamba_moe_layers`` codes: ``"r"`` is a Mamba block, a digit string is a
Switch-MoE block whose expert count is its last character (``"8"`` = 8 experts). Plain Mamba is the plan with
every layer ``"r"``. Codes that no released model uses (``"1"`` dense MLP, ``"r8"`` parallel Mamba+MoE) are
rejected with a clear error rather than guessed at.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from qmamba.errors import ConfigError

ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu")
FINAL_NORMS = ("layernorm", "rmsnorm")
# A config describing more parameters than this is refused before anything is built (the largest released
# Mamba-family models have under 1e11); it also keeps every tensor size far from int64 overflow.
MAX_PARAMETERS = 10**12
MAX_LAYERS = 4096  # layer plans are lists in config files: bounded before a list of that length is made


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{name} must be {what}, got {value!r}")


def parse_layer_code(code: str, index: int) -> tuple[str, int]:
    """Return ``("mamba", 0)`` or ``("moe", n_experts)`` for one ``mamba_moe_layers`` code."""
    code = str(code).strip()
    if code == "r":
        return "mamba", 0
    if code.startswith("r"):
        raise ConfigError(
            f"layer {index}: code {code!r} (a Mamba block with a parallel MLP/MoE) is not supported; "
            "the released BlackMamba models use only 'r' and expert-count codes such as '8'")
    digits = code.isascii() and code.isdigit()
    if digits and code[0] != "1" and int(code[-1]) >= 1:
        return "moe", int(code[-1])
    if digits and code[0] == "1":
        raise ConfigError(f"layer {index}: code {code!r} (a dense MLP block) is not supported")
    raise ConfigError(f"layer {index}: unknown layer code {code!r} (expected 'r' or an expert count such as '8')")


@dataclass
class ModelConfig:
    """Architecture of a BlackMamba or Mamba language model.

    ``layers`` is the layer plan: one code per block, see :func:`parse_layer_code`.
    """

    d_model: int
    layers: list[str]
    vocab_size: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # None -> ceil(d_model / 16)
    ffn_hidden: int = 0  # expert hidden width (fc1 produces 2 * ffn_hidden rows when gated)
    expert_gated: bool = True
    expert_activation: str = "gelu"  # exact (erf) GELU, as the BlackMamba reference code
    final_norm: str = "layernorm"  # BlackMamba: LayerNorm with bias; Mamba: RMSNorm
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    conv_bias: bool = True
    proj_bias: bool = False  # bias on in_proj / out_proj (HF use_bias)
    family: str = "blackmamba"  # "blackmamba" or "mamba": informational, the plan decides the blocks
    pad_vocab_multiple: int = 1
    extra: dict = field(default_factory=dict)  # source-format fields kept for the record

    def __post_init__(self):
        if not isinstance(self.layers, (list, tuple)) or not all(isinstance(c, (str, int)) and not isinstance(c, bool)
                                                                  for c in self.layers):
            raise ConfigError(f"layers must be a list of layer codes ('r' or an expert count), got {self.layers!r}")
        self.layers = [str(c) for c in self.layers]
        if self.dt_rank is None:
            _check_int("d_model", self.d_model, minimum=1)
            self.dt_rank = math.ceil(self.d_model / 16)
        self.validate()

    # ---- derived -------------------------------------------------------------------------------------
    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def layer_kinds(self) -> list[tuple[str, int]]:
        return [parse_layer_code(c, i) for i, c in enumerate(self.layers)]

    @property
    def mamba_layer_ids(self) -> list[int]:
        return [i for i, (k, _) in enumerate(self.layer_kinds) if k == "mamba"]

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i, (k, _) in enumerate(self.layer_kinds) if k == "moe"]

    @property
    def n_mamba_layers(self) -> int:
        return len(self.mamba_layer_ids)

    @property
    def fc1_rows(self) -> int:
        return 2 * self.ffn_hidden if self.expert_gated else self.ffn_hidden

    # ---- checks --------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Types and ranges of every field, and the size of the model it describes (before anything is built)."""
        for name in ("d_model", "vocab_size", "d_state", "d_conv", "expand", "dt_rank", "pad_vocab_multiple"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("ffn_hidden", self.ffn_hidden, minimum=0)
        for name in ("expert_gated", "tie_embeddings", "conv_bias", "proj_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.family, str):
            raise ConfigError(f"family must be a string, got {self.family!r}")
        if not isinstance(self.extra, dict):
            raise ConfigError(f"extra must be an object, got {self.extra!r}")
        if not self.layers:
            raise ConfigError("the model has no layers")
        if len(self.layers) > MAX_LAYERS:
            raise ConfigError(f"the model has {len(self.layers)} layers, above qmamba's limit of {MAX_LAYERS}")
        kinds = self.layer_kinds  # raises on unknown codes
        if any(k == "moe" for k, _ in kinds):
            _check_int("ffn_hidden", self.ffn_hidden, minimum=1)
        if not isinstance(self.expert_activation, str) or self.expert_activation not in ACTIVATIONS:
            raise ConfigError(f"expert_activation must be one of {ACTIVATIONS}, got {self.expert_activation!r}")
        if not isinstance(self.final_norm, str) or self.final_norm not in FINAL_NORMS:
            raise ConfigError(f"final_norm must be one of {FINAL_NORMS}, got {self.final_norm!r}")
        eps = self.norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < 1):
            raise ConfigError(f"norm_eps must be a number in (0, 1), got {eps!r}")
        total = self.parameter_counts()["total"]
        if total > MAX_PARAMETERS:
            raise ConfigError(f"the config describes a model of {total:.3g} parameters ({4 * total / 2**40:.3g} TiB "
                              f"in float32), above qmamba's limit of {MAX_PARAMETERS:.0e}; check d_model, "
                              "vocab_size, ffn_hidden and the layer count")

    # ---- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown model config keys: {unknown}")
        try:
            return cls(**data)
        except TypeError as exc:  # missing required field
            raise ConfigError(f"invalid model config: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def parameter_counts(self) -> dict[str, int]:
        """Parameter count by kind (embedding counted once when tied)."""
        d, di, r, n, k = self.d_model, self.d_inner, self.dt_rank, self.d_state, self.d_conv
        counts = {"embedding": self.vocab_size * d, "head": 0 if self.tie_embeddings else self.vocab_size * d,
                  "norms": 0, "mamba_proj": 0, "mamba_ssm": 0, "router": 0, "experts": 0}
        counts["norms"] = self.n_layers * d + d + (d if self.final_norm == "layernorm" else 0)
        for kind, n_exp in self.layer_kinds:
            if kind == "mamba":
                counts["mamba_proj"] += 2 * di * d + di * d  # in_proj (x and z) + out_proj
                counts["mamba_proj"] += (r + 2 * n) * di + di * r  # x_proj + dt_proj
                counts["mamba_ssm"] += di * k + (di if self.conv_bias else 0) + di + di * n + di  # conv, dt bias, A, D
                if self.proj_bias:
                    counts["mamba_proj"] += 2 * di + d
            else:
                counts["router"] += n_exp * d + n_exp
                counts["experts"] += n_exp * (self.fc1_rows * d + d * self.ffn_hidden)
        counts["total"] = sum(counts.values())
        return counts


def _alternating(n_layers: int, n_experts: int, first: str = "r") -> list[str]:
    codes = ["r", str(n_experts)] if first == "r" else [str(n_experts), "r"]
    return [codes[i % 2] for i in range(n_layers)]


def _mamba(d_model: int, n_layers: int, vocab: int = 50280) -> ModelConfig:
    return ModelConfig(d_model=d_model, layers=["r"] * n_layers, vocab_size=vocab, final_norm="rmsnorm",
                       family="mamba", pad_vocab_multiple=8)


def _blackmamba(d_model: int, n_layers: int, ffn: int) -> ModelConfig:
    return ModelConfig(d_model=d_model, layers=_alternating(n_layers, 8), vocab_size=50304, ffn_hidden=ffn,
                       final_norm="layernorm", family="blackmamba")


PRESETS = {
    "blackmamba-1.5b": lambda: _blackmamba(1152, 30, 3072),
    "blackmamba-2.8b": lambda: _blackmamba(1472, 36, 3872),
    "mamba-130m": lambda: _mamba(768, 24),
    "mamba-370m": lambda: _mamba(1024, 48),
    "mamba-790m": lambda: _mamba(1536, 48),
    "mamba-1.4b": lambda: _mamba(2048, 48),
    "mamba-2.8b": lambda: _mamba(2560, 64),
    # tiny models for tests and demos
    "tiny-blackmamba": lambda: ModelConfig(d_model=64, layers=_alternating(4, 4), vocab_size=512, ffn_hidden=96,
                                           d_state=8, final_norm="layernorm", family="blackmamba"),
    "tiny-mamba": lambda: ModelConfig(d_model=64, layers=["r"] * 3, vocab_size=512, d_state=8,
                                      final_norm="rmsnorm", family="mamba"),
    "tiny-blackmamba-fixture": lambda: ModelConfig(d_model=128, layers=_alternating(8, 4), vocab_size=4096,
                                                   ffn_hidden=192, d_state=8, final_norm="layernorm",
                                                   family="blackmamba"),  # qmamba/assets/tiny-blackmamba
}


def preset(name: str) -> ModelConfig:
    """A fresh config for a named preset (see ``PRESETS``)."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
