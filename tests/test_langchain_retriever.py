"""CFICRetriever and CFICCompressor: verbatim evidence Documents with offsets, k, async off the event loop, chains.

The tiny random-weight grounder exercises the real decoding path quickly; one integration test uses the real
default model end to end (index -> faiss -> grounding)."""

from __future__ import annotations

import asyncio
import threading

import pytest
from langchain_core.documents import Document as LCDocument
from langchain_core.runnables import RunnableLambda, RunnableParallel, RunnablePassthrough
from test_core_answerability import constant_probe

from cfic.errors import CficError
from cfic.grounder import Grounder
from cfic.prior import PROBE_FEATURE, Abstention
from cfic.retrieval.embedder import get_embedder
from cfic.retrieval.index import CorpusIndex
from cfic.retrieval.langchain import CFICCompressor, CFICRetriever

CORPUS = [
    {"id": "normans", "text": "The Normans came from Normandy in northern France.\nIn 1066 William the Conqueror "
     "invaded England. He won the Battle of Hastings.", "metadata": {"topic": "history", "score": "mine"}},
    {"id": "cats", "text": "Cats are small carnivorous mammals. A cat sleeps up to sixteen hours a day. Cats "
     "were domesticated in the Near East.", "metadata": {"topic": "animals"}},
    {"id": "python", "text": "Python is a programming language. Guido van Rossum created it. Python 3.0 was "
     "released in December 2008.", "metadata": {}},
    {"id": "volcano", "text": "Mount Vesuvius erupted in 79 AD. The eruption buried Pompeii in ash.",
     "metadata": {"topic": "geology"}},
]
TEXTS = {d["id"]: d["text"] for d in CORPUS}
META = {d["id"]: d["metadata"] for d in CORPUS}


@pytest.fixture(scope="module")
def corpus_index(tmp_path_factory):
    index = CorpusIndex.create(tmp_path_factory.mktemp("lc") / "idx", embedder=get_embedder())
    index.add(CORPUS)
    return index


class ThreadRecorder:
    """Wraps the real grounder and records which thread each call ran on (it changes no result)."""

    def __init__(self, grounder):
        self.grounder = grounder
        self.threads: list[int] = []

    def ground(self, *args, **kwargs):
        self.threads.append(threading.get_ident())
        return self.grounder.ground(*args, **kwargs)

    def encode(self, *args, **kwargs):
        self.threads.append(threading.get_ident())
        return self.grounder.encode(*args, **kwargs)


def assert_verbatim(docs: list[LCDocument], texts: dict[str, str]) -> None:
    for doc in docs:
        meta = doc.metadata
        source = texts[meta["source_id"]]
        assert doc.page_content == source[meta["start_char"] : meta["end_char"]]
        assert doc.id == f"{meta['source_id']}:{meta['start_char']}-{meta['end_char']}"
        assert 0 <= meta["sentence_start"] < meta["sentence_end"]
        assert 0.0 <= meta["score"] <= 1.0
    scores = [d.metadata["score"] for d in docs]
    assert scores == sorted(scores, reverse=True)


def test_retriever_over_an_index_returns_verbatim_spans_with_source_metadata(tiny_grounder, corpus_index):
    retriever = CFICRetriever.from_index(corpus_index, grounder=tiny_grounder, k=3, fetch_k=2)
    docs = retriever.invoke("When did William the Conqueror invade England?")
    assert 1 <= len(docs) <= 3
    assert_verbatim(docs, TEXTS)
    # Only the two documents faiss ranked highest were grounded.
    top2 = {h.id for h in corpus_index.search("When did William the Conqueror invade England?", k=2)}
    assert {d.metadata["source_id"] for d in docs} <= top2
    for doc in docs:
        source_meta = META[doc.metadata["source_id"]]
        for key, value in source_meta.items():
            if key != "score":  # our keys win over the source's metadata of the same name
                assert doc.metadata[key] == value
        assert -1.0 <= doc.metadata["retrieval_score"] <= 1.0


def test_k_and_fetch_k_are_honoured_per_call(tiny_grounder, corpus_index):
    retriever = CFICRetriever(index=corpus_index, grounder=tiny_grounder, k=4, fetch_k=4)
    assert len(retriever.invoke("Pompeii", k=1)) == 1
    one_source = retriever.invoke("Pompeii", fetch_k=1)
    assert {d.metadata["source_id"] for d in one_source} == {corpus_index.search("Pompeii", k=1)[0].id}
    scores = {h.id: h.score for h in corpus_index.search("Pompeii", k=4)}
    cut = sorted(scores.values())[-2]  # keeps exactly the two best documents
    strict = CFICRetriever(index=corpus_index, grounder=tiny_grounder, k=3, min_retrieval_score=cut)
    kept = {d.metadata["source_id"] for d in strict.invoke("Pompeii")}
    assert kept and kept <= {i for i, s in scores.items() if s >= cut}
    with pytest.raises(CficError):
        retriever.invoke("Pompeii", k=0)
    with pytest.raises(CficError, match="unknown"):
        retriever.invoke("Pompeii", top_n=3)


def test_retriever_over_documents_reuses_their_encodings(tiny_grounder):
    recorder = ThreadRecorder(tiny_grounder)
    lc_docs = [LCDocument(page_content=d["text"], metadata=d["metadata"], id=d["id"]) for d in CORPUS]
    retriever = CFICRetriever.from_documents(lc_docs, grounder=recorder, k=5)
    first = retriever.invoke("How long does a cat sleep?")
    second = retriever.invoke("Who created Python?")
    assert first and second
    assert_verbatim(first, TEXTS)
    assert_verbatim(second, TEXTS)
    assert {d.metadata["source_id"] for d in first + second} <= set(TEXTS)
    # One encode for the corpus, then only grounding calls over the cached encodings.
    assert len(recorder.threads) == 3
    uncached = CFICRetriever.from_documents(["First sentence here. Second one there."], grounder=tiny_grounder,
                                            cache_encodings=False, k=1)
    (only,) = uncached.invoke("second")
    assert only.metadata["source_id"] == "0"
    assert_verbatim([only], {"0": "First sentence here. Second one there."})


def test_retriever_opens_an_index_folder_by_path(tiny_grounder, corpus_index):
    retriever = CFICRetriever(index=str(corpus_index.path), grounder=tiny_grounder, k=2, fetch_k=1)
    docs = retriever.invoke("How long does a cat sleep?")
    assert isinstance(retriever.index, CorpusIndex)
    assert {d.metadata["source_id"] for d in docs} == {"cats"}
    assert_verbatim(docs, TEXTS)


def test_bad_construction_is_refused(tiny_grounder, corpus_index):
    # Pydantic wraps our CficError (a ValueError) in its ValidationError (also a ValueError).
    with pytest.raises(ValueError, match="either index= or documents="):
        CFICRetriever(grounder=tiny_grounder)
    with pytest.raises(ValueError, match="either index= or documents="):
        CFICRetriever(index=corpus_index, documents=["x"], grounder=tiny_grounder)
    with pytest.raises(ValueError, match="empty"):
        CFICRetriever(documents=["fine", "   "], grounder=tiny_grounder)
    with pytest.raises(ValueError, match="two documents have the id"):
        CFICRetriever(documents=[{"id": "a", "text": "x"}, {"id": "a", "text": "y"}], grounder=tiny_grounder)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        CFICRetriever(index=corpus_index, grounder=tiny_grounder, k=0)


async def test_ainvoke_grounds_in_a_worker_thread(tiny_grounder, corpus_index):
    recorder = ThreadRecorder(tiny_grounder)
    retriever = CFICRetriever(index=corpus_index, grounder=recorder, k=2)
    loop_thread = threading.get_ident()
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    docs = await retriever.ainvoke("Which town did Vesuvius bury?")
    task.cancel()
    assert recorder.threads and all(t != loop_thread for t in recorder.threads)
    assert ticks > 1  # the loop kept running while the retriever worked
    assert_verbatim(docs, TEXTS)
    results = await asyncio.gather(retriever.ainvoke("cats"), retriever.ainvoke("Python"))
    assert all(isinstance(r, list) for r in results)


def test_retriever_in_an_lcel_chain(tiny_grounder, corpus_index):
    retriever = CFICRetriever(index=corpus_index, grounder=tiny_grounder, k=2)

    def cite(inputs):
        return [f"[{d.metadata['source_id']} {d.metadata['start_char']}-{d.metadata['end_char']}] "
                f"{d.page_content}" for d in inputs["context"]]

    chain = RunnableParallel(context=retriever, question=RunnablePassthrough()) | RunnableLambda(cite)
    lines = chain.invoke("Where did the Normans come from?")
    assert 1 <= len(lines) <= 2
    for line in lines:
        ref, text = line.split("] ", 1)
        source_id, span = ref[1:].split(" ")
        start, end = map(int, span.split("-"))
        assert TEXTS[source_id][start:end] == text


def test_compressor_keeps_only_verbatim_evidence(tiny_grounder):
    docs = [LCDocument(page_content=CORPUS[0]["text"], metadata={"url": "a"}),
            LCDocument(page_content="", metadata={"url": "empty"}),
            LCDocument(page_content=CORPUS[2]["text"], metadata={"url": "c"}, id="py")]
    compressor = CFICCompressor(grounder=tiny_grounder, k=2)
    out = compressor.compress_documents(docs, "When was Python 3.0 released?")
    assert 1 <= len(out) <= 2
    assert_verbatim(out, {"0": CORPUS[0]["text"], "py": CORPUS[2]["text"]})
    for doc in out:
        assert doc.metadata["url"] == {"0": "a", "py": "c"}[doc.metadata["source_id"]]
    assert compressor.compress_documents([], "anything") == []
    assert compressor.compress_documents([LCDocument(page_content="  ")], "anything") == []


def test_abstain_is_passed_to_the_grounder(tiny_loaded):
    hidden = tiny_loaded.model.config.hidden_size
    off = Abstention((1.0,), 0.0, 0.5, (PROBE_FEATURE,), constant_probe(hidden, 40.0), enabled=False)
    grounder = Grounder(tiny_loaded, Grounder(tiny_loaded).config.with_options(abstention=off))
    query = "When did the Normans invade England?"
    texts = [CORPUS[0]["text"]]
    assert CFICRetriever.from_documents(texts, grounder=grounder, k=2).invoke(query)
    assert CFICRetriever.from_documents(texts, grounder=grounder, k=2, abstain=True).invoke(query) == []
    docs = [LCDocument(page_content=CORPUS[0]["text"])]
    assert CFICCompressor(grounder=grounder, k=2).compress_documents(docs, query)
    assert CFICCompressor(grounder=grounder, k=2, abstain=True).compress_documents(docs, query) == []


def test_hops_and_attention_switches_reach_the_grounder(tiny_loaded):
    """A second hop changes the evidence exactly as the grounder's own call does; hops without a prior is refused."""
    from cfic.errors import CficError
    from cfic.prior import PriorWeights

    grounder = Grounder(tiny_loaded, Grounder(tiny_loaded).config.with_options(prior=PriorWeights(10.0, 5.0, 1.0, 0.0)))
    query = "When did the Normans invade England?"
    text = CORPUS[0]["text"]
    docs = [LCDocument(page_content=text)]
    for hops in (1, 2):
        direct = [e.text for e in grounder.ground(query, [text], top_k=2, hops=hops, use_attention=False).evidence]
        via = CFICCompressor(grounder=grounder, k=2, hops=hops, use_attention=False).compress_documents(docs, query)
        assert [d.page_content for d in via] == direct
        got = CFICRetriever.from_documents([text], grounder=grounder, k=2, hops=hops, use_attention=False).invoke(query)
        assert [d.page_content for d in got] == direct
    with pytest.raises(CficError):
        CFICCompressor(grounder=Grounder(tiny_loaded), k=2, hops=2).compress_documents(docs, query)


async def test_compressor_in_contextual_compression_retriever(tiny_grounder, corpus_index):
    from langchain_classic.retrievers import ContextualCompressionRetriever
    from langchain_core.embeddings import DeterministicFakeEmbedding
    from langchain_core.vectorstores import InMemoryVectorStore

    store = InMemoryVectorStore.from_texts([d["text"] for d in CORPUS], DeterministicFakeEmbedding(size=32),
                                           ids=[d["id"] for d in CORPUS])
    pipeline = ContextualCompressionRetriever(base_compressor=CFICCompressor(grounder=tiny_grounder, k=3),
                                              base_retriever=store.as_retriever(search_kwargs={"k": 2}))
    sync_docs = pipeline.invoke("Who won the Battle of Hastings?")
    async_docs = await pipeline.ainvoke("Who won the Battle of Hastings?")
    for docs in (sync_docs, async_docs):
        assert 1 <= len(docs) <= 3
        assert_verbatim(docs, TEXTS)
    assert [d.id for d in sync_docs] == [d.id for d in async_docs]


def test_cfic_exports_the_langchain_classes():
    import cfic

    assert cfic.CFICRetriever is CFICRetriever
    assert cfic.CFICCompressor is CFICCompressor


@pytest.mark.integration
def test_real_model_end_to_end(default_grounder, corpus_index):
    query = "When did William the Conqueror invade England?"
    retriever = CFICRetriever.from_index(corpus_index, grounder=default_grounder, k=3, fetch_k=2)
    docs = retriever.invoke(query)
    assert docs, "the real model found no evidence"
    assert_verbatim(docs, TEXTS)
    assert corpus_index.search(query, k=1)[0].id == "normans"
    assert all(d.metadata["source_id"] in TEXTS for d in docs)
    compressed = CFICCompressor(grounder=default_grounder, k=2).compress_documents(
        [LCDocument(page_content=t, id=i) for i, t in TEXTS.items()], query)
    assert compressed
    assert_verbatim(compressed, TEXTS)
