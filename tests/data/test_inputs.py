"""prepare-data inputs beyond text files (JSON Lines, Parquet, datasets folders), streaming and workers."""

import gzip
import json

import numpy as np
import pytest

from ipu_app.data.corpus import CorpusError, CorpusReader, expand_inputs
from ipu_app.data.shards import load_manifest, prepare_data


def _texts(small_documents, n=40):
    return [d.text for d in small_documents[:n]]


def _shard_arrays(directory):
    return {p.name: np.load(p) for p in sorted(directory.glob("*.npy"))}


def _write_jsonl(path, records):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def test_jsonl_parquet_and_datasets_inputs_give_the_same_documents(tmp_path, small_documents):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = _texts(small_documents)
    ids = [f"art-{i}" for i in range(len(texts))]
    _write_jsonl(tmp_path / "a.jsonl", [{"body": t, "id": i, "extra": 1} for t, i in zip(texts, ids)])
    _write_jsonl(tmp_path / "b.jsonl.gz", [{"body": t, "id": i} for t, i in zip(texts, ids)])
    pq.write_table(pa.table({"body": texts, "id": ids}), tmp_path / "c.parquet", row_group_size=7)
    datasets.Dataset.from_dict({"body": texts, "id": ids}).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": texts, "id": ids})}).save_to_disk(
        str(tmp_path / "saved_dict"))
    inputs = expand_inputs([tmp_path / n for n in ("a.jsonl", "b.jsonl.gz", "c.parquet", "saved", "saved_dict")])
    assert [i.format for i in inputs] == ["jsonl", "jsonl", "parquet", "datasets", "datasets"]
    for item in inputs:
        reader = CorpusReader([item], text_field="body", id_field="id")
        docs = list(reader)
        assert [d.text for d in docs] == texts and [d.doc_id for d in docs] == ids, item
        assert reader.bytes_read == pytest.approx(reader.total_bytes, rel=0.05)  # the progress bar reaches the end
    # without an id field the position is the id (file and line, or file and row)
    docs = list(CorpusReader([tmp_path / "a.jsonl"], text_field="body"))
    assert docs[2].doc_id == "a.jsonl:3"
    assert list(CorpusReader([tmp_path / "c.parquet"], text_field="body"))[9].doc_id == "c.parquet#9"


def test_the_same_documents_in_any_format_prepare_to_the_same_shards(tmp_path, small_documents, tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = _texts(small_documents, 60)
    _write_jsonl(tmp_path / "a.jsonl", [{"text": t, "id": str(i)} for i, t in enumerate(texts)])
    pq.write_table(pa.table({"text": texts, "id": [str(i) for i in range(len(texts))]}), tmp_path / "a.parquet")
    outs = []
    for name in ("a.jsonl", "a.parquet"):
        out = tmp_path / f"out-{name}"
        prepare_data(CorpusReader([tmp_path / name], id_field="id"), tokenizer_dir, out, documents_per_shard=16,
                     progress=False)
        outs.append(_shard_arrays(out))
    assert outs[0].keys() == outs[1].keys() and len(outs[0]) > 6
    assert all(np.array_equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_workers_write_the_same_shards_as_one_process(tmp_path, small_documents, tokenizer_dir):
    one, two = tmp_path / "one", tmp_path / "two"
    a = prepare_data(small_documents, tokenizer_dir, one, documents_per_shard=20, progress=False, workers=1)
    b = prepare_data(small_documents, tokenizer_dir, two, documents_per_shard=20, progress=False, workers=2)
    assert a == b and len(a["splits"]["train"]["shards"]) >= 7
    first, second = _shard_arrays(one), _shard_arrays(two)
    assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)


def test_preparation_streams_shards_are_written_before_the_input_ends(tmp_path, small_documents, tokenizer_dir):
    out = tmp_path / "data"
    seen_before_end = []

    def documents():
        for i, doc in enumerate(small_documents):
            if i == len(small_documents) - 1:
                seen_before_end.extend(sorted(p.name for p in out.glob("train-*.json")))
            yield doc

    class Stream:  # a reader-like iterable: prepare_data must not make it a list
        total_bytes = 1

        def __init__(self):
            self.bytes_read = 0

        def __iter__(self):
            return documents()

    prepare_data(Stream(), tokenizer_dir, out, documents_per_shard=20, progress=False)
    assert len(seen_before_end) >= 5  # most shards were finished while documents were still coming
    assert load_manifest(out)["splits"]["train"]["shards"][: len(seen_before_end)] == \
        [n[: -len(".json")] for n in seen_before_end]


def test_shards_are_closed_by_size_as_well_as_by_count(tmp_path, small_documents, tokenizer_dir):
    manifest = prepare_data(small_documents, tokenizer_dir, tmp_path / "d", documents_per_shard=10_000,
                            progress=False, shard_bytes=64 << 10)
    total = sum(len(d.text.encode()) for d in small_documents if not d.is_validation())
    assert len(manifest["splits"]["train"]["shards"]) >= total // (64 << 10)


@pytest.mark.parametrize("content, match", [
    ('{"text": "ok"}\n{"text": "broken\n', r"a\.jsonl:2: not valid JSON"),
    ('{"text": "ok"}\n[1, 2]\n', r"a\.jsonl:2: a JSON list, not an object"),
    ('{"body": "x", "title": "t"}\n', r"a\.jsonl:1: no field 'text'; the line has \['body', 'title'\]"),
    ('{"text": 5}\n', r"a\.jsonl:1: field 'text' is int, not text"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, match):
    (tmp_path / "a.jsonl").write_text(content)
    with pytest.raises(CorpusError, match=match) as info:
        list(CorpusReader([tmp_path / "a.jsonl"]))
    assert "\n" not in str(info.value)


def test_bad_parquet_and_datasets_inputs_get_one_line_errors(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "empty.parquet").write_bytes(b"")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 this is not parquet")
    pq.write_table(pa.table({"body": ["x"], "n": [1]}), tmp_path / "cols.parquet")
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"a": datasets.Dataset.from_dict({"text": ["x"]}),
                          "b": datasets.Dataset.from_dict({"text": ["y"]})}).save_to_disk(str(tmp_path / "two"))
    cases = [(tmp_path / "empty.parquet", "not a readable Parquet file"),
             (tmp_path / "junk.parquet", "not a readable Parquet file"),
             (tmp_path / "cols.parquet", r"no column 'text'; it has \['body', 'n'\]"),
             (tmp_path / "saved", r"no column 'text'; it has \['body'\]"),
             (tmp_path / "two", r"holds the splits \['a', 'b'\]; choose one with --dataset-split")]
    for path, match in cases:
        with pytest.raises(CorpusError, match=match) as info:
            CorpusReader([path]).check()
        assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert [d.text for d in CorpusReader([tmp_path / "two"], dataset_split="b")] == ["y"]
    with pytest.raises(CorpusError, match="not a folder saved with datasets"):
        expand_inputs([tmp_path], "datasets")


def test_a_bad_line_late_in_the_input_keeps_the_finished_shards(tmp_path, small_documents, capsys):
    from ipu_app.__main__ import main

    records = [{"text": d.text, "id": str(i)} for i, d in enumerate(small_documents)]
    path = tmp_path / "c.jsonl"
    _write_jsonl(path, records[:-1] + ['{"text": "cut off'])
    out = tmp_path / "data"
    args = ["prepare-data", "--input", str(path), "--output", str(out), "--id-field", "id", "--workers", "2",
            "--documents-per-shard", "20"]
    assert main(args) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress bar: one line
    assert last.startswith("error: ") and f"c.jsonl:{len(records)}: not valid JSON" in last
    finished = {p: p.stat().st_mtime_ns for p in out.glob("train-*.tokens.npy")}
    assert finished and not (out / "manifest.json").exists()
    _write_jsonl(path, records)  # fixed: the finished shards are reused, the manifest is written last
    assert main(args) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())
    assert load_manifest(out)["splits"]["train"]["documents"] > 0


def test_prepare_data_cli_reads_jsonl_with_a_named_field(tmp_path, small_documents, capsys):
    from ipu_app.__main__ import main

    path = tmp_path / "wiki.jsonl"
    _write_jsonl(path, [{"title": d.doc_id, "body": d.text} for d in small_documents[:50]])
    out = tmp_path / "data"
    base = ["prepare-data", "--input", str(path), "--output", str(out), "--workers", "1"]
    assert main(base) == 1
    assert "no field 'text'; the line has ['body', 'title'] (choose with --text-field)" in capsys.readouterr().err
    assert not out.exists()  # checked before any work
    assert main(base + ["--text-field", "body", "--id-field", "title"]) == 0
    manifest = load_manifest(out)
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["validation"]["documents"] == 50


def test_too_small_is_counted_in_documents_even_when_shards_close_by_size(tmp_path, small_documents, tokenizer_dir):
    train = next(d for d in small_documents if not d.is_validation())
    held = next(d for d in small_documents if d.is_validation())
    with pytest.raises(CorpusError, match="corpus too small: 2 documents"):
        prepare_data([train, held], tokenizer_dir, tmp_path / "d", progress=False, shard_bytes=1)


def test_prepare_data_reads_nested_datasets_folders_warns_on_duplicates_and_counts(tmp_path, small_documents, capsys):
    """A folder holding a save_to_disk folder reads it as a dataset (it was skipped without a word);
    x.jsonl beside x.jsonl.gz and files with the same bytes are named; the end line's counts are
    the shards' own."""
    import datasets

    from ipu_app.__main__ import main

    corpus = tmp_path / "corpus"
    (corpus / "nested").mkdir(parents=True)
    docs = small_documents[:60]
    datasets.Dataset.from_dict({"text": [d.text for d in docs[:30]]}).save_to_disk(str(corpus / "nested" / "saved"))
    records = [{"text": d.text} for d in docs[30:]]
    _write_jsonl(corpus / "wiki.jsonl", records)
    with gzip.open(corpus / "wiki.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    (corpus / "copy.jsonl").write_bytes((corpus / "wiki.jsonl").read_bytes())
    found = expand_inputs([corpus])
    assert [(i.path.relative_to(corpus).as_posix(), i.format) for i in found] == [
        ("copy.jsonl", "jsonl"), ("nested/saved", "datasets"), ("wiki.jsonl", "jsonl"), ("wiki.jsonl.gz", "jsonl")]
    out = tmp_path / "data"
    assert main(["prepare-data", "--input", str(corpus), str(corpus / "wiki.jsonl"), "--output", str(out),
                 "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert f"warning: {corpus / 'wiki.jsonl'} is given more than once; it is read once" in err
    assert "reading 4 inputs: 1 datasets folder, 3 jsonl files" in err
    assert f"{corpus / 'copy.jsonl'}, {corpus / 'wiki.jsonl'} have the same bytes: their documents are taken 2 times" in err
    assert f"{corpus / 'wiki.jsonl'} and {corpus / 'wiki.jsonl.gz'} are both read" in err
    # the counts printed at the end are the shards': documents, sentences, tokens, shards
    arrays = {part: [np.load(p) for p in sorted(out.glob(f"*.{part}.npy"))] for part in ("tokens", "documents")}
    documents = sum(len(a) - 1 for a in arrays["documents"])
    tokens = sum(len(a) for a in arrays["tokens"])
    assert documents == 30 + 3 * 30  # the nested dataset's and three jsonl files' documents
    line = next(line for line in err.splitlines() if line.startswith(f"prepared {out}: "))
    assert line.startswith(f"prepared {out}: {documents:,} documents, ")
    assert f" {tokens:,} tokens in {len(arrays['tokens'])} shard" in line
