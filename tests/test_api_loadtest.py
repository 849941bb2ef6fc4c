"""End to end through a real process: the load-test script starts `python -m cfic.api.cli` on a saved tiny model
folder (loopback only), drives it briefly, and checks the server still answers afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def test_loadtest_drives_a_served_model_folder_and_the_server_survives(tiny_loaded, tmp_path):
    folder = tmp_path / "tiny-model"
    tiny_loaded.model.save_pretrained(folder)
    tiny_loaded.tokenizer.save_pretrained(folder)
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "cfic.api.loadtest", "--model", str(folder), "--clients", "2", "--seconds", "2",
           "--phases", "unique,repeated,overload", "--overload-clients", "12", "--overload-seconds", "2",
           "--max-queue", "2", "--max-batch", "1", "--doc-words", "60", "--pool", "2", "--startup-timeout", "180",
           "--json", str(report)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        pytest.fail(f"load test failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    result = json.loads(report.read_text())
    unique, repeated, overload = result["phases"]
    assert unique["ok"] > 0 and unique["cached_token_share"] == 0.0
    assert repeated["ok"] > 0 and repeated["cached_token_share"] > 0.5
    for phase in (unique, repeated, overload):
        assert phase["other_errors"] == {}, phase  # only 200s and 503s, never a 5xx or a dropped connection
        assert phase["p50_ms"] is not None and phase["p95_ms"] >= phase["p50_ms"]
    assert result["after"] == {"healthz": 200, "ground": 200, "verbatim": True}
    assert result["server_exit_code"] is not None  # the server was stopped
    assert "| phase |" in out.stdout
