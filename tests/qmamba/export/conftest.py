"""The export tests share plain helper functions (export_helpers.py, a unique module name): make them importable
under pytest's importlib import mode, which does not put test folders on sys.path."""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
