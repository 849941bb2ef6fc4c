"""The CLI on bad input: one line on stderr, exit code 2, no traceback — before any model is loaded."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cfic.cli", *args], input=stdin, capture_output=True, timeout=120)


@pytest.fixture()
def files(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("A sentence. Another sentence.", encoding="utf-8")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\x01\x02PNG\x00")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n ", encoding="utf-8")
    return {"good": good, "binary": binary, "latin": latin, "empty": empty, "dir": tmp_path,
            "missing": tmp_path / "nope.txt"}


@pytest.mark.parametrize(
    ("which", "needle"),
    [("missing", "no such file"), ("dir", "is a directory"), ("binary", "binary"), ("latin", "UTF-8"),
     ("empty", "empty")],
)
def test_bad_files(files, which, needle):
    res = run_cli("ground", "--query", "q", str(files[which]))
    err = res.stderr.decode()
    assert res.returncode == 2
    assert needle in err and err.startswith("error:")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_empty_query(files):
    res = run_cli("ground", "--query", "  ", str(files["good"]))
    assert res.returncode == 2 and "query is empty" in res.stderr.decode()


def test_empty_stdin():
    res = run_cli("ground", "--query", "q", "-", stdin=b"")
    assert res.returncode == 2 and "<stdin>" in res.stderr.decode()


def test_usage_errors_exit_nonzero(files):
    res = run_cli("ground", str(files["good"]))  # no --query
    assert res.returncode == 2 and "Traceback" not in res.stderr.decode()
    res = run_cli("ground", "--query", "q", "--top-k", "0", str(files["good"]))
    assert res.returncode == 2 and "Traceback" not in res.stderr.decode()
    res = run_cli("no-such-command")
    assert res.returncode == 2


def test_help_lists_commands():
    res = run_cli("--help")
    assert res.returncode == 0
    assert "ground" in res.stdout.decode()
