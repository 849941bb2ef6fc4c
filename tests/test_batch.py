"""``cfic batch``: every question grounded once, grouped by documents, resumable after a kill, and the same
output on Ray as in process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cfic.batch import BatchSettings, finished_ids, group_rows, rows_from_table, run_batch
from cfic.errors import CficError

TOPICS = ["rivers", "volcanoes", "bridges", "orchards", "comets", "harbours", "glaciers", "deserts"]


def document(topic: str, n: int = 12) -> str:
    return " ".join(f"Fact {i} about {topic}: the {topic} of region {i} were surveyed in {1800 + 7 * i}."
                    for i in range(n))


def table(groups: int = 3, per_group: int = 2) -> list[dict]:
    rows = []
    for g in range(groups):
        for q in range(per_group):
            rows.append({"id": f"q{g}-{q}", "question": f"When were the {TOPICS[g % len(TOPICS)]} of region {q} "
                                                        f"surveyed?", "documents": [document(TOPICS[g % 8])]})
    rows.append({"id": 99, "question": "Which comets were surveyed?", "document": document("comets", 5)})
    return rows


def comparable(record: dict) -> dict:
    """A record without its timings (the only part that may differ between two runs)."""
    return {k: v for k, v in record.items() if k != "usage"}


def up_to_rounding(value):
    """``value`` with every float compared approximately: a Ray actor runs torch with its own thread count (1 per
    replica), the driver with the machine's, and a different reduction order moves scores in the 7th digit."""
    if isinstance(value, float):
        return pytest.approx(value, rel=1e-4, abs=1e-12)
    if isinstance(value, dict):
        return {k: up_to_rounding(v) for k, v in value.items()}
    if isinstance(value, list):
        return [up_to_rounding(v) for v in value]
    return value


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def settings(tiny_model_folder):
    return BatchSettings(top_k=2, model_options={"model": str(tiny_model_folder), "adapter": None, "dtype": "float32",
                                                 "max_span_tokens": 24, "max_sentence_tokens": 24})


def test_rows_are_validated_and_grouped_by_their_documents():
    rows = rows_from_table(table())
    assert [r.id for r in rows] == ["q0-0", "q0-1", "q1-0", "q1-1", "q2-0", "q2-1", "99"]
    groups = group_rows(rows)
    assert [[r.id for r in g] for g in groups] == [["q0-0", "q0-1"], ["q1-0", "q1-1"], ["q2-0", "q2-1"], ["99"]]
    for bad, message in (({"documents": ["x"]}, "question"),
                         ({"question": "q?", "documents": ["x"], "document": "y"}, "not both"),
                         ({"question": "q?"}, "no 'documents'"),
                         ({"question": "q?", "documents": "one string"}, "list of strings"),
                         ({"question": "q?", "documents": [""]}, "non-empty"),
                         ({"question": "q?", "document": "x", "id": 1.5}, "id")):
        with pytest.raises(CficError, match=message):
            rows_from_table([bad])
    with pytest.raises(CficError, match="twice"):
        rows_from_table([{"id": "a", "question": "q?", "document": "x"}] * 2)
    with pytest.raises(CficError, match="no rows"):
        rows_from_table([])
    # rows without documents take them from the search function (the index, in the CLI)
    found = rows_from_table([{"question": "q?"}], search=lambda q: [{"id": "d1", "text": "found text"}])
    assert found[0].documents == ({"id": "d1", "text": "found text"},)


def test_in_process_output_is_what_ground_returns_for_each_question(tmp_path, settings):
    from cfic.grounder import Grounder
    from cfic.types import ground_json

    rows = rows_from_table(table())
    out = tmp_path / "out.jsonl"
    counts = run_batch(rows, out, settings, progress=False)
    assert counts == {"rows": 7, "skipped": 0, "written": 7, "groups": 4}
    records = read(out)
    assert sorted(r["id"] for r in records) == sorted(r.id for r in rows)
    grounder = Grounder.from_pretrained(**settings.model_options)
    for row, record in zip(rows, records, strict=True):
        assert set(record) == {"id", "query", "model", "evidence", "no_evidence", "no_evidence_probability", "usage"}
        expected = ground_json(grounder.ground(row.question, list(row.documents), top_k=2))
        assert comparable(record) == {"id": row.id, **comparable(expected)}
        texts = {d["id"]: d["text"] for d in row.documents}
        for ev in record["evidence"]:
            assert ev["text"] == texts[ev["document_id"]][ev["start_char"]:ev["end_char"]]
    # encoded once per group: the second question of a group finds its documents cached
    assert records[1]["usage"]["cached_tokens"] > 0 and records[0]["usage"]["cached_tokens"] == 0
    # a finished job run again writes nothing
    assert run_batch(rows, out, settings, progress=False)["written"] == 0 and len(read(out)) == 7


def test_a_line_cut_short_by_a_kill_is_dropped_and_its_question_grounded_again(tmp_path, settings):
    rows = rows_from_table(table(groups=2, per_group=1))
    full = tmp_path / "full.jsonl"
    run_batch(rows, full, settings, progress=False)
    lines = full.read_text().splitlines(keepends=True)
    cut = tmp_path / "cut.jsonl"
    cut.write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # killed while writing the second line
    assert finished_ids(cut) == {rows[0].id} and cut.read_text() == lines[0]
    counts = run_batch(rows, cut, settings, progress=False)
    assert counts["skipped"] == 1 and counts["written"] == len(rows) - 1
    assert [comparable(r) for r in read(cut)] == [comparable(r) for r in read(full)]
    (tmp_path / "other.jsonl").write_text('{"not": "ours"}\n')
    with pytest.raises(CficError, match="not a cfic batch output"):
        run_batch(rows, tmp_path / "other.jsonl", settings, progress=False)


def test_cfic_batch_killed_mid_run_resumes_without_losing_or_repeating_rows(tmp_path, tiny_model_folder):
    rows = [{"id": f"r{i}", "question": f"When were the {TOPICS[i % 8]} of region {i % 5} surveyed?",
             "document": document(f"{TOPICS[i % 8]} {i}", 40)} for i in range(40)]
    source = tmp_path / "questions.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "cfic.cli", "batch", str(source), "--out", str(out), "--model", str(tiny_model_folder),
           "--no-adapter", "--dtype", "float32", "--top-k", "2", "--max-span-tokens", "24", "--quiet"]
    # the datasets cache of the loaded question file stays in tmp_path (not a new entry in ~/.cache per test run)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    written_before = out.read_bytes().count(b"\n")
    assert 3 <= written_before < len(rows)
    res = subprocess.run(cmd, env=env, capture_output=True, timeout=600)
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    # every complete line was kept (a line cut short by the kill has no newline), and only the rest was grounded
    assert f"{len(rows) - written_before} written, {written_before} already done" in res.stdout.decode()
    ids = [r["id"] for r in read(out)]
    assert sorted(ids) == sorted(r["id"] for r in rows)  # nothing lost, nothing twice


def test_ray_local_gives_the_same_output_as_in_process(tmp_path, settings):
    ray = pytest.importorskip("ray")
    rows = rows_from_table(table())
    local, on_ray = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    run_batch(rows, local, settings, progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        counts = run_batch(rows, on_ray, settings, ray=True, replicas=2, progress=False)
    finally:
        ray.shutdown()
    assert counts["written"] == len(rows)
    by_id = {r["id"]: comparable(r) for r in read(on_ray)}
    assert len(by_id) == len(rows)
    assert by_id == {r["id"]: up_to_rounding(comparable(r)) for r in read(local)}  # same spans, same texts
