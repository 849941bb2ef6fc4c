"""``cfic index add/search/info/remove`` through typer's runner on ``index_app`` (real model, real files)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cfic.errors import CficError, DocumentReadError
from cfic.retrieval.cli import index_app
from cfic.retrieval.index import IndexNotFoundError

runner = CliRunner()


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "normans.txt").write_text("The Normans conquered England in 1066 after the Battle of Hastings.\n")
    (folder / "sub" / "cats.md").write_text("# Cats\n\nA cat sleeps up to sixteen hours a day.\n")
    (folder / "more.jsonl").write_text(
        json.dumps({"id": "py", "text": "Python 3.0 was released in December 2008.", "metadata": {"lang": "en"}})
        + "\n\n" + json.dumps({"text": "Mount Vesuvius buried Pompeii in 79 AD."}) + "\n"
    )
    (folder / "empty.txt").write_text("  \n")
    (folder / ".hidden.txt").write_text("never indexed")
    (folder / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    return folder


def invoke(*args: str):
    return runner.invoke(index_app, [str(a) for a in args])


def search_ids(index: Path, query: str, k: int = 5) -> list[str]:
    result = invoke("search", "--index", index, "--query", query, "-k", str(k), "--json")
    assert result.exit_code == 0, result.output
    return [json.loads(line)["id"] for line in result.stdout.splitlines() if line.strip()]


def test_add_a_folder_then_search_info_remove(tmp_path, docs):
    index = tmp_path / "idx"
    result = invoke("add", "--index", index, docs, "--quiet")
    assert result.exit_code == 0, result.output
    assert "skipped" in result.stderr and "empty.txt" in result.stderr

    found = search_ids(index, "When did the Normans conquer England?", k=2)
    assert found[0] == "normans.txt"
    assert set(search_ids(index, "anything", k=10)) == {"normans.txt", "sub/cats.md", "py", "more.jsonl:3"}

    human = invoke("search", "--index", index, "-q", "How long do cats sleep?", "-k", "1")
    assert human.exit_code == 0 and "sub/cats.md" in human.stdout and "sixteen hours" in human.stdout

    info = invoke("info", "--index", index, "--json")
    assert info.exit_code == 0
    data = json.loads(info.stdout)
    assert data["documents"] == 4 and data["kind"] == "flat" and data["dimension"] == 384

    removed = invoke("remove", "--index", index, "py", "ghost")
    assert removed.exit_code == 0
    assert "removed 1" in removed.stdout and "ghost" in removed.stderr
    assert "py" not in search_ids(index, "Python release", k=10)


def test_readding_an_edited_file_replaces_it(tmp_path, docs):
    index = tmp_path / "idx"
    assert invoke("add", "--index", index, docs, "-q").exit_code == 0
    (docs / "normans.txt").write_text("Volcanoes erupt molten lava and ash.\n")
    result = invoke("add", "--index", index, docs / "normans.txt")
    assert result.exit_code == 0 and "replaced 1" in result.stdout
    assert search_ids(index, "lava eruption", k=1) == ["normans.txt"]
    info = json.loads(invoke("info", "--index", index, "--json").stdout)
    assert info["documents"] == 4


def test_hnsw_kind_on_creation(tmp_path, docs):
    index = tmp_path / "idx"
    assert invoke("add", "--index", index, docs, "--kind", "hnsw", "-q").exit_code == 0
    assert json.loads(invoke("info", "--index", index, "--json").stdout)["kind"] == "hnsw"
    assert search_ids(index, "Pompeii", k=1) == ["more.jsonl:3"]
    clash = invoke("add", "--index", index, docs, "--kind", "flat")
    assert isinstance(clash.exception, CficError)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("latin1.txt", "caf\xe9".encode("latin-1"), "not UTF-8"),
        ("binary.txt", b"abc\x00def", "binary"),
        ("broken.jsonl", b'{"id": "a", "text": "ok"}\n{"id": "b", "text": \n', "broken.jsonl:2"),
        ("notext.jsonl", b'{"id": "a", "body": "x"}\n', "'text'"),
    ],
)
def test_unreadable_input_is_a_clear_error_and_the_index_is_untouched(tmp_path, docs, name, content, message):
    index = tmp_path / "idx"
    assert invoke("add", "--index", index, docs, "-q").exit_code == 0
    before = {p.name: p.read_bytes() for p in index.iterdir() if p.name != ".lock"}
    bad = tmp_path / name
    bad.write_bytes(content)
    good = tmp_path / "good.txt"
    good.write_text("A perfectly fine file that must not be added alone.")
    result = invoke("add", "--index", index, good, bad)
    assert isinstance(result.exception, DocumentReadError)
    assert message in str(result.exception)
    assert {p.name: p.read_bytes() for p in index.iterdir() if p.name != ".lock"} == before


def test_missing_inputs_and_missing_index(tmp_path, docs):
    result = invoke("add", "--index", tmp_path / "idx", tmp_path / "nope.txt")
    assert isinstance(result.exception, DocumentReadError)
    assert not (tmp_path / "idx").exists()
    for args in (("search", "-q", "x"), ("info",), ("remove", "some-id")):
        result = invoke(*args, "--index", tmp_path / "missing")
        assert isinstance(result.exception, IndexNotFoundError)
    two = tmp_path / "two"
    (two / "a").mkdir(parents=True)
    (two / "a" / "x.txt").write_text("one")
    dup = invoke("add", "--index", tmp_path / "idx", two / "a" / "x.txt", two / "a")
    assert isinstance(dup.exception, DocumentReadError) and "x.txt" in str(dup.exception)


def test_help_lists_the_four_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("add", "search", "info", "remove"):
        assert command in result.stdout


def test_add_in_chunks_then_skip_unchanged(tmp_path, docs):
    index = tmp_path / "idx"
    result = invoke("add", "--index", index, docs, "--commit-every", "1")
    assert result.exit_code == 0, result.output
    assert "added 4, replaced 0 document(s)" in result.stdout
    assert json.loads(invoke("info", "--index", index, "--json").stdout)["generation"] == 4  # a save per document
    (docs / "normans.txt").write_text("Volcanoes erupt molten lava and ash.\n")
    again = invoke("add", "--index", index, docs, "--skip-unchanged", "--commit-every", "0")
    assert again.exit_code == 0, again.output
    assert "added 0, replaced 1, 3 unchanged document(s) (1 passages)" in again.stdout
    assert search_ids(index, "lava eruption", k=1) == ["normans.txt"]


def test_an_interrupted_chunked_add_says_what_it_kept(tmp_path, docs, monkeypatch):
    from cfic.retrieval.embedder import get_embedder

    embedder = get_embedder()
    real_embed = embedder.embed
    calls: list[int] = []

    def failing(texts, *, progress=None):
        calls.append(len(texts))
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real_embed(texts, progress=progress)

    monkeypatch.setattr(embedder, "embed", failing)
    index = tmp_path / "idx"
    result = invoke("add", "--index", index, docs, "--commit-every", "2")
    assert isinstance(result.exception, RuntimeError)
    assert "2 of 4 documents were saved before this; run the same command with --skip-unchanged" in result.stderr
    monkeypatch.undo()
    resumed = invoke("add", "--index", index, docs, "--skip-unchanged")
    assert "added 2, replaced 0, 2 unchanged document(s)" in resumed.stdout
