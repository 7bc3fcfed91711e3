"""tests/conftest.py's ``--shard K/N``: the parts of a run are disjoint and together the whole run (so that
scripts/gpu_check.sh can run in calls that each fit the device's time limit); bad values are refused."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = "tests/qmamba/test_config.py"


def _collected(*args) -> tuple[int, list[str]]:
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", TARGET,
                        *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return r.returncode, [line for line in r.stdout.splitlines() if "::" in line]


def test_shards_partition_the_run():
    rc, whole = _collected()
    assert rc == 0 and len(whole) >= 3, whole
    parts = []
    for k in (1, 2, 3):
        rc, part = _collected("--shard", f"{k}/3")
        assert rc == 0 and part, (k, part)
        parts.append(part)
    assert sorted(sum(parts, [])) == sorted(whole)  # every test once
    assert all(abs(len(p) - len(whole) / 3) < 1 for p in parts)  # every third test


def test_bad_shard_is_refused():
    for value in ("0/2", "3/2", "x"):
        rc, _ = _collected("--shard", value)
        assert rc != 0, value
