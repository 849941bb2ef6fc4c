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


def test_help_lists_distill_swiftkv():
    res = run_cli("--help")
    assert "distill-swiftkv" in res.stdout.decode()
    res = run_cli("distill-swiftkv", "--help")
    assert res.returncode == 0 and "--layer" in res.stdout.decode()
    res = run_cli("ground", "--help")
    assert all(opt in res.stdout.decode() for opt in ("--swiftkv-layer", "--swiftkv-group", "--swiftkv",
                                                      "--layer-skip"))


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["--swiftkv-layer", "0"], "swiftkv_layer must be a positive integer"),
     (["--swiftkv-layer", "-3"], "swiftkv_layer"),
     (["--swiftkv-layer", "abc"], "--swiftkv-layer"),
     (["--swiftkv-group", "0", "--swiftkv-layer", "2"], "swiftkv_group"),
     (["--swiftkv-group", "2"], "needs --swiftkv-layer"),
     (["--swiftkv", "no/such/params.safetensors"], "no such file"),
     (["--swiftkv", " "], "--swiftkv is empty"),
     (["--layer-skip", "-1"], "layer_skip must be a non-negative integer"),
     (["--layer-skip-warmup", "2"], "needs --layer-skip"),
     (["--layer-skip", "2", "--layer-skip-warmup", "-1"], "layer_skip_warmup"),
     (["--ffn-skip", "1.5"], "ffn_skip must be a cosine threshold"),
     (["--ffn-skip", "0.9", "--layer-skip", "2"], "exclude each other")],
)
@pytest.mark.parametrize("command", ["ground", "serve"])
def test_bad_acceleration_options_are_one_line_errors(files, command, args, needle):
    """Checked before any model is loaded: one `error:` line and exit code 2, for ground and for serve."""
    extra = ["--query", "q", str(files["good"])] if command == "ground" else ["--port", "0"]
    res = run_cli(command, *extra, *args)
    err = res.stderr.decode()
    assert res.returncode == 2, err
    assert err.startswith("error:") and needle in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [["bench"], ["distill-swiftkv"], ["ground", "--query", "q", "x"], ["serve"]])
def test_adapter_flags_exclude_each_other(command, files):
    args = [str(files["good"]) if a == "x" else a for a in command]
    res = run_cli(*args, "--adapter", str(files["dir"]), "--no-adapter")
    err = res.stderr.decode()
    assert res.returncode == 2 and "exclude each other" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("weights", ["abc", "0.5,x", "-1", "nan"])
def test_bench_refuses_bad_lm_weights_before_loading_a_model(weights):
    res = run_cli("bench", "--no-accel", "--lm-weights", weights)
    err = res.stderr.decode()
    assert res.returncode == 2, err
    assert "--lm-weights" in err and "Traceback" not in err


@pytest.mark.parametrize(("args", "needle"), [(["--many-documents", "1,x"], "--many-documents"),
                                              (["--many-documents", "0,5"], "--many-documents"),
                                              (["--plot", "curve.png"], "--plot")])
def test_bench_refuses_bad_many_documents_options_before_loading_a_model(args, needle):
    res = run_cli("bench", "--no-core", "--no-accel", *args)
    err = res.stderr.decode()
    assert res.returncode == 2, err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_ground_refuses_bad_hop_options_before_loading_a_model(files):
    res = run_cli("ground", "--query", "q", "--hops", "3", str(files["good"]))
    assert res.returncode == 2 and "Traceback" not in res.stderr.decode()
    res = run_cli("ground", "--query", "q", "--hops", "2", "--no-prior", str(files["good"]))
    err = res.stderr.decode()
    assert res.returncode == 2 and err.startswith("error:") and "--no-prior" in err


def test_help_lists_fit_attention():
    res = run_cli("--help")
    assert res.returncode == 0 and "fit-attention" in res.stdout.decode()
