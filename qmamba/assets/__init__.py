"""Models shipped inside the package.

``tiny-blackmamba/``: a tiny BlackMamba (8 layers alternating Mamba / 4-expert top-1 MoE, d_model 128, 4096-token
byte-level BPE) trained on the CPU on the train split of the shared corpus; qmamba's native checkpoint format with
its ``tokenizer.json``. How it was made: ``tiny-blackmamba/README.md`` and ``scripts/make_fixture.sh``.
"""

from __future__ import annotations

from pathlib import Path

from qmamba.errors import CheckpointError

ASSETS_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL = "tiny-blackmamba"


def default_model_path(name: str = DEFAULT_MODEL) -> Path:
    """Directory of a built-in model (default: the trained tiny BlackMamba), ready for ``qmamba.load_model``."""
    path = ASSETS_DIR / name
    if not (path / "model.safetensors").is_file():
        known = sorted(p.name for p in ASSETS_DIR.iterdir() if (p / "model.safetensors").is_file())
        raise CheckpointError(f"no built-in model {name!r} at {path}; available: {', '.join(known) or 'none'} "
                              "(remake the fixture with scripts/make_fixture.sh)")
    return path
