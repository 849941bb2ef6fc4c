"""CorpusIndex: add/replace/remove by id, search, persistence, atomic saves, bad input. Real MiniLM, real faiss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cfic.errors import CficError, EmptyDocumentError, EmptyQueryError, ModelLoadError
from cfic.retrieval.embedder import DEFAULT_EMBEDDING_MODEL, get_embedder
from cfic.retrieval.index import (
    MANIFEST,
    STORE,
    CorpusIndex,
    IndexCorruptError,
    IndexNotFoundError,
)
from cfic.retrieval.passages import split_passages

CORPUS = [
    {"id": "normans", "text": "The Normans came from Normandy in northern France. In 1066 William the Conqueror "
     "invaded England and won the Battle of Hastings.", "metadata": {"topic": "history"}},
    {"id": "cats", "text": "Cats are small carnivorous mammals. A cat sleeps for up to sixteen hours a day."},
    {"id": "python", "text": "Python is a programming language created by Guido van Rossum. Python 3.0 was "
     "released in December 2008."},
    {"id": "volcano", "text": "Mount Vesuvius erupted in 79 AD and buried the Roman town of Pompeii in ash."},
]


@pytest.fixture(scope="session")
def embedder():
    return get_embedder()


@pytest.fixture
def index(tmp_path, embedder):
    idx = CorpusIndex.create(tmp_path / "idx", embedder=embedder)
    idx.add(CORPUS)
    yield idx
    idx.close()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and p.name != ".lock"}


def test_embedder_makes_unit_vectors_of_its_dimension(embedder):
    vectors = embedder.embed(["a short text", "another, rather different sentence about volcanoes"])
    assert vectors.shape == (2, embedder.dimension)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # Batching and sorting by length must not reorder results.
    single = embedder.embed_query("another, rather different sentence about volcanoes")
    np.testing.assert_allclose(single, vectors[1], atol=1e-5)
    assert embedder.name == DEFAULT_EMBEDDING_MODEL


def test_search_finds_the_relevant_document_with_its_metadata(index):
    hits = index.search("Which battle did William the Conqueror win?", k=2)
    assert [h.id for h in hits][0] == "normans"
    assert hits[0].metadata == {"topic": "history"}
    assert hits[0].text == CORPUS[0]["text"]
    assert hits[0].score >= hits[1].score
    assert hits[0].passage == hits[0].text[hits[0].start_char : hits[0].end_char]
    assert len(index.search("anything", k=10)) == len(CORPUS)


def test_reopen_gives_the_same_results(index, embedder):
    before = [(h.id, round(h.score, 5)) for h in index.search("eruption that buried a town", k=3)]
    path = index.path
    index.close()
    with CorpusIndex.open(path) as again:
        assert sorted(again.ids()) == sorted(d["id"] for d in CORPUS)
        assert [(h.id, round(h.score, 5)) for h in again.search("eruption that buried a town", k=3)] == before
        assert again.get("cats").text == CORPUS[1]["text"]


def test_readding_an_id_replaces_it(index):
    report = index.add([{"id": "cats", "text": "Dogs bark at the postman every morning."}])
    assert report.replaced == ["cats"] and report.added == []
    assert len(index) == len(CORPUS)
    assert index.get("cats").text.startswith("Dogs bark")
    assert index.search("a barking dog", k=1)[0].id == "cats"
    info = index.info()
    assert info["vectors"] == sum(d["n_passages"] for d in _passage_counts(index))


def _passage_counts(index):
    return [{"n_passages": n} for (n,) in index._db().execute("SELECT n_passages FROM documents")]


def test_remove_by_id(index):
    assert index.remove(["python", "not-there"]) == ["python"]
    assert "python" not in index and len(index) == len(CORPUS) - 1
    assert all(h.id != "python" for h in index.search("programming language", k=10))
    assert index.remove(["python"]) == []


def test_long_document_is_embedded_as_several_passages_and_stays_whole(tmp_path, embedder):
    filler = " ".join(f"Paragraph {i} talks about the weather, rain, clouds and wind in spring." for i in range(60))
    text = filler + " The secret launch code of the lighthouse is written on a blue brass plate."
    idx = CorpusIndex.create(tmp_path / "long", embedder=embedder)
    report = idx.add([{"id": "long", "text": text}, CORPUS[1]])
    assert report.passages > 3  # the long document alone needs several 128-token passages
    hit = idx.search("Where is the lighthouse launch code written?", k=1)[0]
    assert hit.id == "long" and hit.text == text
    assert "lighthouse" in hit.passage
    spans = split_passages(text, embedder.count_tokens, 128)
    assert all(b > a for a, b in spans) and spans == sorted(spans)
    assert all(n <= 128 + 8 for n in embedder.count_tokens([text[a:b] for a, b in spans]))


def test_hnsw_index_agrees_with_flat_and_survives_removals(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(300, 24)).astype(np.float32)
    docs = [{"id": f"d{i}", "text": f"document {i}"} for i in range(300)]
    flat = CorpusIndex.create(tmp_path / "flat", dimension=24)
    hnsw = CorpusIndex.create(tmp_path / "hnsw", dimension=24, kind="hnsw")
    for idx in (flat, hnsw):
        idx.add(docs, embeddings=vectors)
    queries = rng.normal(size=(20, 24)).astype(np.float32)
    overlap = [len({h.id for h in flat.search(q, k=5)} & {h.id for h in hnsw.search(q, k=5, ef_search=128)})
               for q in queries]
    assert sum(overlap) / (5 * len(queries)) >= 0.9
    # Tombstones: removed documents never come back, even before the graph is rebuilt.
    removed = hnsw.remove([f"d{i}" for i in range(0, 40)])
    assert len(removed) == 40 and hnsw.info()["tombstones"] == 40
    assert all(int(h.id[1:]) >= 40 for q in queries for h in hnsw.search(q, k=10))
    assert hnsw.search(vectors[50], k=1)[0].id == "d50"
    # Past a quarter of the index, the graph is rebuilt from the live vectors.
    hnsw.remove([f"d{i}" for i in range(40, 100)])
    info = hnsw.info()
    assert info["tombstones"] == 0 and info["vectors"] == 200
    reopened = CorpusIndex.open(tmp_path / "hnsw")
    assert reopened.search(vectors[150], k=1)[0].id == "d150"
    assert len(reopened) == 200


def test_a_failed_save_leaves_the_index_as_it_was(index, monkeypatch):
    before_files = _files(index.path)
    before_hits = [h.id for h in index.search("volcano", k=4)]

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("cfic.files.os.replace", broken_replace)
    with pytest.raises(OSError):
        index.add([{"id": "new", "text": "A brand new document about tides."}])
    with pytest.raises(OSError):
        index.remove(["cats"])
    monkeypatch.undo()
    assert _files(index.path) == before_files
    assert "new" not in index and "cats" in index
    assert [h.id for h in index.search("volcano", k=4)] == before_hits
    with CorpusIndex.open(index.path) as again:
        assert sorted(again.ids()) == sorted(d["id"] for d in CORPUS)


def test_a_crash_mid_save_leaves_the_previous_index_intact(index):
    """A real crash: a child process dies (os._exit) right after the new faiss file is renamed into place,
    before the store commits the new generation."""
    path = index.path
    index.close()
    script = textwrap.dedent(f"""
        import os
        import numpy as np
        import cfic.retrieval.index as m
        import cfic.retrieval.vectors as v
        idx = m.CorpusIndex.open({str(path)!r})
        real = v.write_atomic
        def dying(p, data):
            real(p, data)
            if p.name.startswith("vectors-"):
                os._exit(17)
        v.write_atomic = dying
        vectors = np.ones((1, idx.dimension), dtype=np.float32)
        idx.add([{{"id": "cats", "text": "replaced"}}, ], embeddings=vectors)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 17, proc.stderr
    with CorpusIndex.open(path) as again:
        assert again.get("cats").text == CORPUS[1]["text"]
        assert again.info()["generation"] == 1
        assert again.search("How long do cats sleep?", k=1)[0].id == "cats"
        again.add([{"id": "after", "text": "Saving works again after the crash."}])
        assert len(again) == len(CORPUS) + 1
    leftovers = [p.name for p in path.iterdir() if p.name.startswith("vectors-")]
    assert leftovers == ["vectors-00000002.faiss"]


def test_two_handles_on_one_folder_see_each_others_saves(index):
    """Two processes (here: two handles with their own file locks) writing in turn must not lose each other's
    documents, and a long-lived reader sees what the other saved."""
    other = CorpusIndex.open(index.path)
    index.add([{"id": "tides", "text": "Tides are caused by the gravity of the Moon."}])
    assert other.search("What causes the tides?", k=1)[0].id == "tides"
    other.add([{"id": "bread", "text": "Bread is made from flour, water and yeast."}])
    index.remove(["cats"])
    other.close()
    with CorpusIndex.open(index.path) as again:
        assert sorted(again.ids()) == sorted({d["id"] for d in CORPUS} - {"cats"} | {"tides", "bread"})
        assert again.search("yeast dough", k=1)[0].id == "bread"
        assert again.info()["vectors"] == len(again)


def test_missing_index_folder(tmp_path):
    with pytest.raises(IndexNotFoundError, match="does not exist"):
        CorpusIndex.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexNotFoundError, match="not a cfic index"):
        CorpusIndex.open(tmp_path / "empty")


@pytest.mark.parametrize("target", ["vectors", "store", "manifest", "truncated"])
def test_corrupt_files_are_a_clear_error(index, target):
    path = index.path
    index.close()
    if target == "vectors":
        next(path.glob("vectors-*.faiss")).write_bytes(b"this is not a faiss index at all" * 10)
    elif target == "truncated":
        f = next(path.glob("vectors-*.faiss"))
        f.write_bytes(f.read_bytes()[:1000])
    elif target == "store":
        (path / STORE).write_bytes(b"garbage" * 200)
    else:
        (path / MANIFEST).write_text("{not json")
    with pytest.raises(IndexCorruptError):
        CorpusIndex.open(path)


def test_vector_and_store_disagreeing_is_detected(index):
    path = index.path
    index._db().execute("DELETE FROM passages WHERE doc_id = 'cats'")
    index.close()
    with pytest.raises(IndexCorruptError, match="vectors"):
        CorpusIndex.open(path)


def test_dimension_mismatch_with_the_embedding_model(tmp_path, embedder):
    idx = CorpusIndex.create(tmp_path / "small", dimension=16)
    idx.add(["some text"], embeddings=np.ones((1, 16), dtype=np.float32))
    before = _files(idx.path)
    with pytest.raises(CficError, match="dimension mismatch"):
        idx.search("a text query needs the embedding model")
    with pytest.raises(CficError, match="dimension mismatch"):
        idx.add(["another document"])
    with pytest.raises(CficError, match="dimension mismatch"):
        CorpusIndex.open(tmp_path / "small", embedder=embedder)
    assert _files(idx.path) == before


def test_any_sentence_transformers_folder_works(tmp_path, embedder):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Dense

    base = embedder._model
    small = SentenceTransformer(modules=[*base, Dense(embedder.dimension, 32)], device="cpu")
    folder = tmp_path / "my-small-model"
    small.save(str(folder))
    idx = CorpusIndex.create(tmp_path / "custom", model=folder)
    assert idx.dimension == 32 and idx.embedding_model == "my-small-model"
    idx.add(CORPUS)
    idx.close()
    manifest = json.loads((tmp_path / "custom" / MANIFEST).read_text())
    assert manifest["embedding_model_path"] == str(folder.resolve())
    with CorpusIndex.open(tmp_path / "custom") as again:  # the recorded model is found again
        assert len(again.search("Pompeii", k=2)) == 2
        assert again.embedder.dimension == 32


def test_bad_documents_are_refused_before_anything_changes(index):
    before = _files(index.path)
    with pytest.raises(EmptyDocumentError):
        index.add([{"id": "ok", "text": "fine"}, {"id": "blank", "text": "   \n"}])
    with pytest.raises(CficError, match="JSON"):
        index.add([{"id": "x", "text": "t", "metadata": {"when": object()}}])
    with pytest.raises(CficError, match="text"):
        index.add([{"id": "x", "body": "t"}])
    with pytest.raises(CficError):
        index.add([42])
    with pytest.raises(EmptyQueryError):
        index.search("  ")
    with pytest.raises(CficError):
        index.search("fine", k=0)
    assert _files(index.path) == before


def test_create_refuses_folders_that_are_not_its_own(tmp_path, index):
    with pytest.raises(CficError, match="already holds an index"):
        CorpusIndex.create(index.path, dimension=8)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep-me.txt").write_text("precious")
    with pytest.raises(CficError, match="not empty"):
        CorpusIndex.create(other, dimension=8)
    assert (other / "keep-me.txt").read_text() == "precious"
    with pytest.raises(ModelLoadError):
        CorpusIndex.create(tmp_path / "x", model=tmp_path / "no-such-model")


def test_documents_of_every_shape(tmp_path, embedder):
    from langchain_core.documents import Document as LCDocument

    from cfic.types import Document

    idx = CorpusIndex.create(tmp_path / "shapes", embedder=embedder)
    idx.add(["plain string document", Document(text="a cfic document", id="c"),
             LCDocument(page_content="a langchain document", id="lc", metadata={"m": 1})])
    assert "c" in idx and "lc" in idx and idx.get("lc").metadata == {"m": 1}
    assert len(idx) == 3
    idx.add(["plain string document"])  # same text, same id: replaced, not duplicated
    assert len(idx) == 3


def test_every_index_file_gets_the_same_documented_mode(index):
    """One policy for every file (store, vectors, manifest, lock): 0o666 less the umask, like any file a tool
    writes; the atomic writes used to leave their files at mkstemp's 0600 while the store got 0644."""
    from cfic.files import FILE_MODE, _umask

    index.add([{"id": "extra", "text": "One more document, saved again."}])
    modes = {p.name: p.stat().st_mode & 0o777 for p in index.path.iterdir() if p.is_file()}
    assert len(modes) >= 3
    assert set(modes.values()) == {FILE_MODE & ~_umask()}, modes


def test_add_in_chunks_saves_each_chunk_and_finds_the_same(tmp_path, embedder, index):
    chunked = CorpusIndex.create(tmp_path / "chunked", embedder=embedder)
    report = chunked.add(CORPUS, commit_every=3)
    assert report.added == [d["id"] for d in CORPUS] and report.replaced == [] and report.passages == len(CORPUS)
    assert chunked.info()["generation"] == 2  # two saves: 3 documents, then 1
    for query in ("Who invaded England?", "volcano ash", "programming language"):
        assert [h.id for h in chunked.search(query, k=4)] == [h.id for h in index.search(query, k=4)]
    with pytest.raises(CficError, match="commit_every"):
        chunked.add(CORPUS, commit_every=0)


def test_precomputed_embeddings_in_chunks_keep_their_documents(tmp_path):
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(10, 16)).astype(np.float32)
    idx = CorpusIndex.create(tmp_path / "vec", dimension=16, kind="hnsw")
    idx.add([{"id": f"d{i}", "text": f"document {i}"} for i in range(10)], embeddings=vectors, commit_every=4)
    assert idx.info()["generation"] == 3 and len(idx) == 10
    assert [idx.search(v, k=1)[0].id for v in vectors] == [f"d{i}" for i in range(10)]


def test_an_interrupted_chunked_add_keeps_its_saved_chunks_and_resumes(tmp_path, embedder, monkeypatch):
    idx = CorpusIndex.create(tmp_path / "resume", embedder=embedder)
    embedded: list[str] = []
    real_embed = embedder.embed

    def embed(texts, *, progress=None):
        if embedded:  # the second chunk: as if the process were killed while embedding it
            raise KeyboardInterrupt
        embedded.extend(texts)
        return real_embed(texts, progress=progress)

    monkeypatch.setattr(embedder, "embed", embed)
    with pytest.raises(KeyboardInterrupt) as caught:
        idx.add(CORPUS, commit_every=2)
    assert any("2 of 4 documents were saved" in note for note in caught.value.__notes__)
    assert sorted(idx.ids()) == sorted(d["id"] for d in CORPUS[:2])
    monkeypatch.undo()

    embedded.clear()
    monkeypatch.setattr(embedder, "embed", lambda texts, *, progress=None: embedded.extend(texts) or
                        real_embed(texts, progress=progress))
    report = idx.add(CORPUS, commit_every=2, skip_unchanged=True)
    assert report.unchanged == ["normans", "cats"] and report.added == ["python", "volcano"]
    assert embedded == [d["text"] for d in CORPUS[2:]]  # only what the interrupted add had not saved
    assert sorted(idx.ids()) == sorted(d["id"] for d in CORPUS)
    assert idx.search("Pompeii", k=1)[0].id == "volcano"


def test_skip_unchanged_still_replaces_changed_text_or_metadata(index):
    changed = [dict(d) for d in CORPUS]
    changed[1]["text"] = "Dogs bark at the postman every morning."
    changed[2]["metadata"] = {"topic": "software"}
    report = index.add(changed, skip_unchanged=True)
    assert report.unchanged == ["normans", "volcano"] and report.replaced == ["cats", "python"]
    assert report.added == [] and report.passages == 2
    assert index.get("python").metadata == {"topic": "software"}
    assert index.search("a barking dog", k=1)[0].id == "cats"
    assert index.add(changed, skip_unchanged=True) == type(report)([], [], 0, [d["id"] for d in CORPUS])
