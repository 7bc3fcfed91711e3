"""Which modules get quantized, and how: defaults from the command line, overridden by a recipe file.

Quantizable modules (manifest names): ``layers.{i}.mixer.in_proj``, ``.out_proj``, ``.x_proj``, ``.dt_proj``
(Mamba layers), ``layers.{i}.mixer.experts.fc1`` / ``.fc2`` (all experts of an MoE layer), ``lm_head``.
Selected by default: in_proj, out_proj, experts fc1/fc2; ``--quantize-xdt`` adds x_proj/dt_proj and
``--quantize-head`` adds lm_head (the embedding always stays in the source precision). Never quantized: A_log, D,
dt bias, conv, norms, router and its bias.

A recipe (YAML or JSON) overrides these per module-name pattern (``fnmatch``; rules apply in order, later wins)::

    default: {bits: 4, group_size: 128, symmetric: false, method: gptq}   # optional, overrides the CLI values
    rules:
      - {pattern: "layers.*.mixer.out_proj", bits: 8}
      - {pattern: "*.experts.fc2", group_size: 64, method: awq}
      - {pattern: "layers.0.*", bits: 16}          # 16 = keep in float
      - {pattern: "*.x_proj", bits: 8}             # a rule may also select a module off by default

Unknown keys, bad values and patterns that match no quantizable module are errors.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path

from qmamba.errors import ConfigError
from qmamba.quant.formats import WeightFormat, make_format
from qmamba.quant.layout import INT4_GROUP_SIZES

from qmamba.calib.methods import SELECTABLE_METHODS

SETTING_KEYS = ("bits", "group_size", "symmetric", "method")
FLOAT_BITS = 16
DEFAULT_GROUP_SIZE = 128  # int4, when no group size is given
DEFAULT_METHOD = "gptq"   # int4 / int8, when no method is given (1-bit: PTB, its only initialisation)


class RecipeError(ConfigError):
    """A recipe file with unknown keys or unsupported values."""


@dataclass(frozen=True)
class ModuleSetting:
    bits: int
    group_size: int
    symmetric: bool
    method: str

    def fmt(self) -> WeightFormat:
        return make_format(self.bits, self.group_size, self.symmetric)


@dataclass(frozen=True)
class PlanEntry:
    fmt: WeightFormat
    method: str


def quantizable_modules(model) -> dict[str, str]:
    """``{manifest name: kind}`` for every module this pipeline can quantize, in forward order."""
    out = {}
    for block in model.blocks:
        out.update(block.quantizable_modules())
    out["lm_head"] = "lm_head"
    return out


def _check_setting(data: dict, where: str, allow_pattern: bool) -> dict:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping, got {data!r}")
    allowed = SETTING_KEYS + (("pattern",) if allow_pattern else ())
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise RecipeError(f"{where}: unknown recipe keys {unknown} (allowed: {list(allowed)})")
    if "bits" in data and (isinstance(data["bits"], bool) or data["bits"] not in (1, 4, 8, FLOAT_BITS)):
        raise RecipeError(f"{where}: bits must be 1 (binary), 4, 8 or 16 (keep in float), got {data['bits']!r}")
    if "method" in data and data["method"] not in SELECTABLE_METHODS:
        raise RecipeError(f"{where}: method must be one of {SELECTABLE_METHODS}, got {data['method']!r}")
    if "symmetric" in data and not isinstance(data["symmetric"], bool):
        raise RecipeError(f"{where}: symmetric must be true or false, got {data['symmetric']!r}")
    if "group_size" in data and (isinstance(data["group_size"], bool) or data["group_size"] not in INT4_GROUP_SIZES):
        raise RecipeError(f"{where}: group_size must be one of {INT4_GROUP_SIZES}, got {data['group_size']!r}")
    return {k: v for k, v in data.items() if k != "pattern"}


def _cli_spelling(key: str, value) -> str:
    return f"--{key.replace('_', '-')}" + ("" if value is True else f" {value}")


def check_applicable(setting: dict, bits, where: str = "", spell=None) -> None:
    """Raise :class:`ConfigError` when ``setting`` (options given explicitly at one level: the command line, a
    recipe's default or one rule) sets something that does not apply to ``bits``: a group size or ``symmetric``
    outside int4, a method for 1-bit (PTB is its only initialisation) or for modules kept in float."""
    spell = spell or (lambda key, value: f"{key} {value!r}")
    prefix = f"{where}: " if where else ""
    bits_text = spell("bits", bits)
    if bits not in (1, 4, 8, FLOAT_BITS):
        return  # reported as an unsupported bit width elsewhere
    if setting.get("group_size") is not None and bits != 4:
        why = {8: "int8 has one scale per output channel", 1: "1-bit has per-column scales",
               FLOAT_BITS: "the modules stay in float"}[bits]
        raise ConfigError(f"{prefix}{spell('group_size', setting['group_size'])} does not apply to {bits_text} "
                          f"({why}); group sizes are for 4-bit")
    if setting.get("symmetric") and bits != 4:
        why = {8: "int8 is always symmetric", 1: "1-bit has no zero point",
               FLOAT_BITS: "the modules stay in float"}[bits]
        raise ConfigError(f"{prefix}{spell('symmetric', True)} does not apply to {bits_text} ({why})")
    if setting.get("method") is not None and bits in (1, FLOAT_BITS):
        why = "1-bit modules are initialised by PTB, see docs/binary.md" if bits == 1 else "the modules stay in float"
        raise ConfigError(f"{prefix}{spell('method', setting['method'])} does not apply to {bits_text} ({why})")


def resolve_options(bits: int, group_size: int | None = None, method: str | None = None, symmetric: bool = False,
                    act_order: bool = False) -> dict:
    """The command-line settings checked and completed: options that do not apply to ``bits`` are an error, and
    the defaults fill the rest (``{"bits", "group_size", "symmetric", "method"}``; ``None`` where not used)."""
    make_format(bits, group_size or DEFAULT_GROUP_SIZE, symmetric)  # unsupported bits / group sizes
    if method is not None and method not in SELECTABLE_METHODS:
        raise ConfigError(f"method must be one of {SELECTABLE_METHODS}, got {method!r}")
    check_applicable({"group_size": group_size, "symmetric": symmetric, "method": method}, bits, spell=_cli_spelling)
    resolved_method = "ptb" if bits == 1 else method or DEFAULT_METHOD
    if act_order and resolved_method != "gptq":
        raise ConfigError(f"--act-order applies to GPTQ only, not to method {resolved_method}")
    return {"bits": bits, "group_size": (group_size or DEFAULT_GROUP_SIZE) if bits == 4 else None,
            "symmetric": bool(symmetric) if bits == 4 else bits == 8, "method": resolved_method}


def load_recipe(path: str | Path) -> dict:
    """Read and validate a YAML/JSON recipe file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # json/yaml parse errors
        raise RecipeError(f"cannot parse recipe {path}: {' '.join(str(exc).split())[:300]}") from None
    return validate_recipe(data, str(path))


def validate_recipe(data, where: str = "recipe") -> dict:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe must be a mapping with 'default' and/or 'rules'")
    unknown = sorted(set(data) - {"default", "rules"})
    if unknown:
        raise RecipeError(f"{where}: unknown recipe keys {unknown} (allowed: ['default', 'rules'])")
    _check_setting(data.get("default", {}), f"{where}: default", allow_pattern=False)
    rules = data.get("rules", [])
    if not isinstance(rules, list):
        raise RecipeError(f"{where}: 'rules' must be a list")
    for j, rule in enumerate(rules):
        _check_setting(rule, f"{where}: rules[{j}]", allow_pattern=True)
        if not isinstance(rule.get("pattern"), str):
            raise RecipeError(f"{where}: rules[{j}] needs a 'pattern' string")
    return {"default": dict(data.get("default", {})), "rules": [dict(r) for r in rules]}


def build_plan(model, bits: int = 4, group_size: int | None = None, symmetric: bool = False,
               method: str | None = None, quantize_head: bool = False, quantize_xdt: bool = False,
               recipe: dict | None = None) -> dict[str, PlanEntry]:
    """``{manifest name: PlanEntry}`` in forward order, for the modules to quantize.

    ``group_size`` / ``method`` ``None``: the defaults (``DEFAULT_GROUP_SIZE`` for int4, ``DEFAULT_METHOD``; 1-bit:
    PTB). Options given at one level (the arguments, the recipe's default, one rule) that do not apply to the bits
    of that level are a :class:`ConfigError` (see :func:`check_applicable`); values inherited from an outer level
    simply do not apply (a rule ``bits: 1`` under ``--method awq`` gives PTB modules)."""
    if method is not None and method not in SELECTABLE_METHODS:
        raise ConfigError(f"method must be one of {SELECTABLE_METHODS}, got {method!r}")
    if bits not in (1, 4, 8):
        make_format(bits)  # the unsupported-bit-width error
    check_applicable({"group_size": group_size, "symmetric": symmetric, "method": method}, bits, spell=_cli_spelling)
    recipe = validate_recipe(recipe or {})
    base = {"bits": bits, "group_size": group_size, "symmetric": symmetric, "method": method}
    default = recipe["default"]
    check_applicable(default, default.get("bits", bits), "recipe default")
    base.update(default)
    candidates = quantizable_modules(model)
    on_by_default = {"in_proj", "out_proj", "experts.fc1", "experts.fc2"}
    if quantize_xdt:
        on_by_default |= {"x_proj", "dt_proj"}
    if quantize_head:
        on_by_default.add("lm_head")
    settings = {name: dict(base) if kind in on_by_default else None for name, kind in candidates.items()}
    for j, rule in enumerate(recipe["rules"]):
        matched = [name for name in candidates if fnmatch.fnmatchcase(name, rule["pattern"])]
        if not matched:
            raise RecipeError(f"recipe rules[{j}]: pattern {rule['pattern']!r} matches no quantizable module "
                              f"(examples: {', '.join(list(candidates)[:4])}, ...; norms, router, conv and SSM "
                              "parameters are never quantized)")
        given = {k: v for k, v in rule.items() if k != "pattern"}
        for name in matched:
            current = settings[name] or dict(base)
            check_applicable(given, given.get("bits", current["bits"]), f"recipe rules[{j}] ({name})")
            current.update(given)
            settings[name] = current
    plan = {}
    for name, s in settings.items():
        if s is None or s["bits"] == FLOAT_BITS:
            continue
        bits_s = int(s["bits"])
        setting = ModuleSetting(bits_s, int(s["group_size"] or DEFAULT_GROUP_SIZE),
                                bool(s["symmetric"]) and bits_s == 4, s["method"] or DEFAULT_METHOD)
        fmt = setting.fmt()
        # formats with one data-free initialisation (binary: PTB) have no method to choose
        plan[name] = PlanEntry(fmt, getattr(fmt, "data_free_method", None) or setting.method)
    if not plan:
        raise ConfigError("nothing to quantize: every module is kept in float")
    return plan
