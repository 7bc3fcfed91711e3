"""scripts/gpu_open_work.sh (the GPU runs issue 13 waits for) without a GPU: its parts run their commands
under a stub interpreter, count failures in the exit status and the summary, refuse unknown parts, and name only
files, tests and bench_decode variants that exist."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_open_work.sh"


def _run(tmp_path, *parts, fail_on=None):
    stub = tmp_path / "python"
    # a stand-in for python3: prints its arguments; fails when they contain `fail_on`
    stub.write_text("#!/usr/bin/env bash\necho \"stub $*\"\n"
                    + (f"case \"$*\" in *{fail_on}*) exit 3 ;; esac\n" if fail_on else "") + "exit 0\n")
    stub.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=str(stub), OUT=str(out), QMAMBA_GPU_PART_LIMIT="100")
    run = subprocess.run(["bash", str(SCRIPT), *parts], capture_output=True, text=True, env=env, timeout=60)
    return run, out


def test_parts_run_their_commands_and_count_failures(tmp_path):
    run, out = _run(tmp_path, "gluon", "check")
    assert run.returncode == 0, run.stdout + run.stderr
    logs = sorted(p.name for p in out.iterdir())
    assert logs == ["check.log", "gluon_probe.log", "gluon_rowprog.log", "gluon_tests.log", "summary.txt"]
    assert "--variants rowprog,rowprog_bn8" in (out / "gluon_rowprog.log").read_text()
    assert "failed commands: 0" in (out / "summary.txt").read_text()

    run, out = _run(tmp_path, "gluon", fail_on="benchmarks/probe_gluon_gemm.py")
    assert run.returncode == 1, run.stdout + run.stderr
    summary = (out / "summary.txt").read_text()
    assert "rc 3" in summary and "failed commands: 1" in summary


def test_refuses_unknown_parts_and_no_parts(tmp_path):
    run, _ = _run(tmp_path, "step")
    assert run.returncode == 2 and "unknown part 'step'" in run.stderr
    run, _ = _run(tmp_path)
    assert run.returncode == 2 and "PART" in run.stdout


def test_names_files_and_variants_that_exist():
    text = SCRIPT.read_text()
    paths = set(re.findall(r"\b((?:benchmarks|tests|scripts)/[\w/]+\.(?:py|sh))", text))
    assert paths and not [p for p in paths if not (ROOT / p).exists()]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_decode_linear

    checked = 0
    for line in text.replace("\\\n", " ").splitlines():  # continuation lines joined
        names = re.search(r"--variants ([\w,]+)", line)
        if not names:
            continue
        for v in names.group(1).split(","):
            assert "bench_decode_linear.py" in line, line
            rows = int(re.search(r"--rows (\d+)", line).group(1))
            assert v in bench_decode_linear.variants(True, rows), v
            checked += 1
    assert checked == 3
