"""BM25 retrieval over a passage corpus with `bm25s` (sparse-matrix BM25, saved as numpy arrays).

Corpus files:
- JSON lines with `id`, `text` and optionally `title` (the embedded `demo_corpus.jsonl`);
- TSV with a header naming `id`, `text`, `title` columns in any order, laid out as the DPR
  Wikipedia dump `psgs_w100.tsv` (`id \\t text \\t title`, csv quoting).

The original PRAG retrieves with Elasticsearch's BM25 over title and text, and feeds the
passage text to the model; we index "title text" and return the passage (id, title, text).
Tokenisation is bm25s' default (lower-case, words of 2+ characters, English stop words
removed, no stemming), the same for the corpus and the queries.

An index folder holds bm25s' arrays (`*.index.npy`, `vocab.index.json`, `params.index.json`),
the passages (`corpus.jsonl`) and our `retriever.json` (format version, passage count, the
tokenisation settings); `BM25Index.load(dir, mmap=True)` memory-maps the arrays and the
passages, so a Wikipedia-sized index opens without reading it into memory.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

INDEX_INFO = "retriever.json"
FORMAT_VERSION = 1
STOPWORDS = "en"


class CorpusError(ValueError):
    """A corpus or index that cannot be read; the message names the file and the fix."""


@dataclass(frozen=True)
class Hit:
    """One retrieved passage with its BM25 score."""

    id: str
    title: str
    text: str
    score: float


def _count_lines(path: Path) -> int:
    with path.open("rb") as file:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 20), b""))


def read_corpus(path: str | Path) -> Iterator[dict[str, str]]:
    """{id, title, text} per passage of a .jsonl or .tsv corpus (see the module doc); a missing file fails now."""
    file = Path(path)
    if not file.is_file():
        raise CorpusError(f"corpus {path} does not exist; pass a .jsonl (id/title/text) or DPR-style .tsv file.")
    return _utf8(_read_tsv(file) if file.suffix == ".tsv" else _read_jsonl(file), file)


def _utf8(rows: Iterator[dict[str, str]], file: Path) -> Iterator[dict[str, str]]:
    try:
        yield from rows
    except UnicodeDecodeError:
        raise CorpusError(f"corpus {file} is not UTF-8 text; pass the .jsonl / .tsv file itself (uncompressed), "
                          f"saved as UTF-8.") from None


def _read_jsonl(file: Path) -> Iterator[dict[str, str]]:
    with file.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(f"{file} line {number} is not JSON ({err.msg}); a .jsonl corpus holds one "
                                  f"{{id, title, text}} object per line.") from None
            if not isinstance(row, dict) or "id" not in row or not isinstance(row.get("text"), str):
                raise CorpusError(f"{file} line {number} needs 'id' and a string 'text' (and optionally 'title').")
            yield {"id": str(row["id"]), "title": str(row.get("title") or ""), "text": row["text"]}


def _read_tsv(file: Path) -> Iterator[dict[str, str]]:
    csv.field_size_limit(2**31 - 1)  # Wikipedia passages are long; csv's default cap is 128 KiB
    with file.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        header = [name.strip().lower() for name in next(reader, [])]
        if "id" not in header or "text" not in header:
            raise CorpusError(f"{file} needs a header row naming the columns id, text (and title), as "
                              f"psgs_w100.tsv has; found {header[:5]}.")
        col_id, col_text = header.index("id"), header.index("text")
        col_title = header.index("title") if "title" in header else None
        for number, row in enumerate(reader, 2):
            if len(row) < len(header):
                raise CorpusError(f"{file} line {number} has {len(row)} columns, the header {len(header)}.")
            yield {"id": row[col_id], "title": row[col_title] if col_title is not None else "", "text": row[col_text]}


def _tokenize(texts: Sequence[str], show_progress: bool) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(list(texts), stopwords=STOPWORDS, return_ids=False, show_progress=show_progress)


class BM25Index:
    """A bm25s index plus its passages: build or load it, then `search` (batched top-k)."""

    def __init__(self, retriever: Any, passages: Sequence[dict[str, str]]) -> None:
        self.retriever = retriever
        self.passages = passages  # a list, or bm25s' memory-mapped JsonlCorpus

    def __len__(self) -> int:
        return len(self.passages)

    @classmethod
    def build(cls, passages: Iterable[dict[str, str]], k1: float = 1.5, b: float = 0.75,
              show_progress: bool = True, total: int | None = None, source: str = "the corpus") -> BM25Index:
        """Index passages ({id, title, text}); progress bars for reading, tokenising and indexing."""
        import bm25s
        from tqdm.auto import tqdm

        docs = list(tqdm(passages, total=total, desc="reading passages", unit="psg", disable=not show_progress))
        if not docs:
            raise CorpusError(f"{source} holds no passages, so there is nothing to index; give a corpus with at "
                              f"least one.")
        tokens = _tokenize([f"{d['title']} {d['text']}".strip() for d in docs], show_progress)
        retriever = bm25s.BM25(k1=k1, b=b)
        retriever.index(tokens, show_progress=show_progress)
        return cls(retriever, docs)

    @classmethod
    def from_corpus_file(cls, path: str | Path, show_progress: bool = True, **kwargs: float) -> BM25Index:
        total = _count_lines(Path(path)) if show_progress and Path(path).is_file() else None
        return cls.build(read_corpus(path), show_progress=show_progress, total=total, source=f"corpus {path}",
                         **kwargs)

    def save(self, index_dir: str | Path) -> None:
        out = Path(index_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.retriever.save(str(out), corpus=list(self.passages), show_progress=False)
        info = {"format_version": FORMAT_VERSION, "num_passages": len(self), "stopwords": STOPWORDS,
                "indexed_fields": ["title", "text"], "k1": self.retriever.k1, "b": self.retriever.b}
        (out / INDEX_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")  # last: marks complete

    @classmethod
    def load(cls, index_dir: str | Path, mmap: bool = False) -> BM25Index:
        import bm25s

        folder = Path(index_dir)
        try:
            info = json.loads((folder / INDEX_INFO).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            raise CorpusError(f"{index_dir} is not a complete BM25 index (no readable {INDEX_INFO}); build one with "
                              f"python -m stages.retrieve --corpus FILE --index_dir {index_dir}.") from None
        if info.get("format_version") != FORMAT_VERSION:
            raise CorpusError(f"{index_dir} was built by index format {info.get('format_version')}, this code reads "
                              f"{FORMAT_VERSION}; rebuild it.")
        retriever = bm25s.BM25.load(str(folder), load_corpus=True, mmap=mmap, show_progress=False)
        passages = retriever.corpus
        retriever.corpus = None  # retrieve() returns indices; we map them to passages ourselves
        if passages is None or len(passages) != info["num_passages"]:
            raise CorpusError(f"{index_dir}/corpus.jsonl is missing or truncated; rebuild the index.")
        return cls(retriever, passages)

    def search(self, queries: Sequence[str], k: int, show_progress: bool = False) -> list[list[Hit]]:
        """Top-`k` passages per query, best first (fewer when the corpus is smaller than k).

        A query sharing no word with the corpus still gets k passages, all scored 0.
        """
        if not queries:
            return []
        k = min(k, len(self))
        result = self.retriever.retrieve(_tokenize(queries, False), k=k, show_progress=show_progress)
        hits = []
        for row_docs, row_scores in zip(result.documents, result.scores):
            row = []
            for index, score in zip(row_docs.tolist(), row_scores.tolist()):
                doc = self.passages[index]
                row.append(Hit(str(doc["id"]), doc.get("title", ""), doc["text"], float(score)))
            hits.append(row)
        return hits
