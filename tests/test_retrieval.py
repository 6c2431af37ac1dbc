"""BM25 retrieval (bm25s): finds an entity's passage, survives save/load, reads DPR-style TSV."""

from __future__ import annotations

import json

import pytest
from helpers import run_stage

from dyprag.retrieval import BM25Index, CorpusError, read_corpus


@pytest.fixture(scope="module")
def demo_index(demo_data):
    return BM25Index.from_corpus_file(demo_data / "demo_corpus.jsonl", show_progress=False)


@pytest.fixture(scope="module")
def demo_qa(demo_data):
    return json.loads((demo_data / "demo_qa.json").read_text())


def test_question_about_an_entity_retrieves_its_passage(demo_index, demo_qa, demo_data):
    hits = demo_index.search([r["question"] for r in demo_qa], k=3)
    assert len(hits) == len(demo_qa) and all(len(row) == 3 for row in hits)
    found = sum(r["entity_id"] in [h.id for h in row] for r, row in zip(demo_qa, hits))
    assert found >= 0.9 * len(demo_qa), f"entity passage in the top 3 for only {found}/{len(demo_qa)} questions"
    for row in hits:  # best first
        assert [h.score for h in row] == sorted((h.score for h in row), reverse=True)
    corpus = {p["id"]: p for p in read_corpus(demo_data / "demo_corpus.jsonl")}
    hit = hits[0][0]
    assert (hit.title, hit.text) == (corpus[hit.id]["title"], corpus[hit.id]["text"])


@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_round_trip(demo_index, demo_qa, tmp_path, mmap):
    questions = [r["question"] for r in demo_qa[:40]]
    demo_index.save(tmp_path / "index")
    loaded = BM25Index.load(tmp_path / "index", mmap=mmap)
    assert len(loaded) == len(demo_index)
    assert loaded.search(questions, k=5) == demo_index.search(questions, k=5)


def test_dpr_tsv_corpus(tmp_path):
    # psgs_w100.tsv layout: header id/text/title, csv quoting ("" inside quoted text).
    tsv = tmp_path / "psgs.tsv"
    tsv.write_text('id\ttext\ttitle\n'
                   '1\t"Aaron is a prophet, called ""the elder""."\tAaron\n'
                   '2\tZanzibar lies off the coast of Tanzania.\tZanzibar\n'
                   '3\tThe Nile flows north through Egypt.\tNile\n', encoding="utf-8")
    rows = list(read_corpus(tsv))
    assert rows[0] == {"id": "1", "title": "Aaron", "text": 'Aaron is a prophet, called "the elder".'}
    index = BM25Index.from_corpus_file(tsv, show_progress=False)
    assert index.search(["Which coast is Zanzibar off?"], k=1)[0][0].id == "2"
    assert index.search(["Where does the Nile flow?"], k=10)[0][0].title == "Nile"  # k capped at the corpus size
    (tmp_path / "bad.tsv").write_text("1\tsome text\tTitle\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="header"):
        list(read_corpus(tmp_path / "bad.tsv"))


def test_retrieve_stage_builds_and_queries(demo_data, tmp_path):
    index_dir, output = tmp_path / "index", tmp_path / "records.json"
    run_stage("retrieve", "--corpus", demo_data / "demo_corpus.jsonl", "--index_dir", index_dir,
              "--input_file", demo_data / "demo_qa.json", "--output_file", output, "--top_k", "2")
    records = json.loads(output.read_text())
    assert all(len(r["passages"]) == 2 and len(r["passage_ids"]) == 2 for r in records)
    assert sum(r["entity_id"] in r["passage_ids"] for r in records) >= 0.9 * len(records)
