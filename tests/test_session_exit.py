"""conftest.py ends the test process early (see there): it must hand on pytest's exit status unchanged, so a
failing suite stays red and a passing one green, with the summary printed."""

import shutil
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).with_name("conftest.py")


def _run(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_one.py").write_text(body)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_failing_session_still_exits_1_with_its_summary(tmp_path):
    r = _run(tmp_path, "def test_fails():\n    assert 1 == 2\n")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 failed" in r.stdout


def test_a_passing_session_exits_0_with_its_summary(tmp_path):
    r = _run(tmp_path, "def test_passes():\n    assert 1 == 1\n")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed" in r.stdout
