"""scripts/gpu_check.sh as the device machine runs it, with a stand-in Python that records what it is asked to run:
the default test paths stay unless a path is given (an option's value is not a path: `--shard 1/2` once dropped them
and ran the whole tree on the GPU), and tests/conftest.py's QMAMBA_FAILURES_LOG names each failing test as it fails."""

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pytest_args(tmp_path, *args) -> list[str]:
    stub = tmp_path / "python"
    record = tmp_path / "args.txt"
    stub.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        # a stand-in for python: `-c CODE` succeeds (the version line, the xdist probe fails), `-m pytest ...` is recorded
        if [ "$1" = "-c" ]; then case "$2" in *xdist*) exit 1 ;; *) echo stub; exit 0 ;; esac; fi
        printf '%s\\n' "$@" > {record}
        """))
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PYTHON": str(stub)}
    env.pop("OUT", None)
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return record.read_text().splitlines()


DEFAULT = "tests/qmamba/kernels"


@pytest.mark.parametrize("args", [(), ("-rf",), ("-rf", "--shard", "1/2"), ("--shard", "2/2", "-x"),
                                  ("-k", "int8 and not binary"), ("--shard=1/2",)])
def test_options_alone_keep_the_default_paths(tmp_path, args):
    got = _pytest_args(tmp_path, *args)
    assert got[:2] == ["-m", "pytest"]
    assert DEFAULT in got and "tests/qmamba/test_fused_step.py" in got, got
    assert "tests" not in got  # never the whole tree
    for a in args:
        assert a in got


@pytest.mark.parametrize("path", ["tests/qmamba/test_config.py", "tests/qmamba/test_config.py::test_presets",
                                  "tests/qmamba/kernels/test_decode_linear.py"])
def test_a_path_given_replaces_the_defaults(tmp_path, path):
    got = _pytest_args(tmp_path, "-rf", "--shard", "1/2", path)
    assert path in got and "--shard" in got
    assert "tests/qmamba/test_fused_step.py" not in got


def _run_with_failures_log(tmp_path, *extra) -> list[str]:
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text(textwrap.dedent(f"""\
        import importlib.util
        spec = importlib.util.spec_from_file_location("qmamba_tests_conftest", {str(ROOT / "tests" / "conftest.py")!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        pytest_configure = module.pytest_configure
        pytest_runtest_logreport = module.pytest_runtest_logreport
        """))
    (suite / "test_some.py").write_text(textwrap.dedent("""\
        import pytest
        def test_passes():
            assert 1 + 1 == 2
        def test_fails():
            assert 1 + 1 == 3, "arithmetic"
        @pytest.mark.skip(reason="not here")
        def test_skipped():
            pass
        """))
    log = tmp_path / "failures.txt"
    env = {**os.environ, "QMAMBA_FAILURES_LOG": str(log)}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(suite),
                        "-c", os.devnull, *extra, str(suite)], cwd=suite, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr  # one test failed
    return log.read_text().splitlines()


def test_failures_log_names_each_failure_as_it_fails(tmp_path):
    lines = _run_with_failures_log(tmp_path)
    assert len(lines) == 1, lines
    assert lines[0].startswith("test_some.py::test_fails (call)") and "AssertionError" in lines[0], lines


def test_failures_log_is_written_once_under_xdist(tmp_path):
    pytest.importorskip("xdist")
    lines = _run_with_failures_log(tmp_path, "-n", "2")
    assert len(lines) == 1 and "test_some.py::test_fails (call)" in lines[0], lines
