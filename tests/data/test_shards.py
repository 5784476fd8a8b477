import json
import os

import numpy as np
import pytest

from ipu_app.data.corpus import CorpusError, Document, split_sentences
from ipu_app.data.shards import load_manifest, prepare_data
from ipu_app.data.tokenizer import load_tokenizer, tokenizer_hash, train_tokenizer


def test_manifest_counts_and_token_round_trip(data_dir, small_documents, tokenizer_dir):
    manifest = load_manifest(data_dir)
    assert manifest["tokenizer_sha256"] == tokenizer_hash(tokenizer_dir)
    train, val = manifest["splits"]["train"], manifest["splits"]["validation"]
    assert train["documents"] + val["documents"] == len(small_documents)
    assert val["documents"] >= 1 and len(train["shards"]) == -(-train["documents"] // 40)
    # the first document's sentences decode back from the shard
    tokenizer = load_tokenizer(tokenizer_dir)
    name = train["shards"][0]
    tokens = np.load(data_dir / f"{name}.tokens.npy", mmap_mode="r")
    sentences = np.load(data_dir / f"{name}.sentences.npy")
    assert tokens.dtype == np.uint16 and sentences[-1] == len(tokens)
    first = next(d for d in small_documents if not d.is_validation())
    expected = tokenizer(split_sentences(first.text)[0], add_special_tokens=False)["input_ids"]
    assert tokens[sentences[0] : sentences[1]].tolist() == expected


def test_rerun_reuses_finished_shards_and_redoes_unfinished(tmp_path, small_documents, tokenizer_dir):
    out = tmp_path / "data"
    first = prepare_data(small_documents, tokenizer_dir, out, documents_per_shard=40, progress=False)
    shard = out / "train-00001.tokens.npy"
    stamp = shard.stat().st_mtime_ns
    assert prepare_data(small_documents, tokenizer_dir, out, documents_per_shard=40, progress=False) == first
    assert shard.stat().st_mtime_ns == stamp
    # an interrupted run: one marker missing, a stray temp file, no manifest
    (out / "train-00002.json").unlink()
    (out / "manifest.json").unlink()
    (out / "train-00003.tokens.npy.tmp.npy").write_bytes(b"partial")
    other = out / "train-00002.tokens.npy"
    other_stamp = other.stat().st_mtime_ns
    again = prepare_data(small_documents, tokenizer_dir, out, documents_per_shard=40, progress=False)
    assert again["splits"] == first["splits"]
    assert shard.stat().st_mtime_ns == stamp  # finished shard untouched
    assert other.stat().st_mtime_ns != other_stamp  # unfinished shard rewritten


def test_too_small_and_empty_corpora(tmp_path, tokenizer_dir):
    with pytest.raises(CorpusError, match="empty"):
        prepare_data([], tokenizer_dir, tmp_path / "a", progress=False)
    with pytest.raises(CorpusError, match="corpus too small: 2 documents"):
        prepare_data([Document("file", str(i), "Some text here.") for i in range(2)], tokenizer_dir, tmp_path / "b",
                     progress=False)


def test_data_of_another_tokenizer_is_not_mixed(tmp_path, data_dir, small_documents):
    other = train_tokenizer(small_documents, tmp_path / "tok", vocab_size=500)
    with pytest.raises(CorpusError, match="another tokenizer"):
        prepare_data(small_documents, other, data_dir, documents_per_shard=40, progress=False)


def test_broken_manifest_errors(tmp_path):
    with pytest.raises(CorpusError, match="no manifest.json"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CorpusError, match="corrupt"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(CorpusError, match="format 99"):
        load_manifest(tmp_path)


def test_trained_tokenizer_folder_loads_with_transformers(tmp_path, small_documents):
    from transformers import BertTokenizerFast

    folder = train_tokenizer(small_documents, tmp_path / "tok", vocab_size=800)
    tokenizer = BertTokenizerFast.from_pretrained(str(folder))
    assert len(tokenizer) == 800
    assert tokenizer.convert_ids_to_tokens(tokenizer("the")["input_ids"]) == ["[CLS]", "the", "[SEP]"]
    assert os.path.isfile(folder / "vocab.txt")


def test_prepare_data_cli(tmp_path, small_documents, capsys):
    from ipu_app.__main__ import main

    text = "\n\n".join(d.text for d in small_documents[:30])
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "data"
    assert main(["prepare-data", "--input", str(tmp_path / "corpus.txt"), "--output", str(out)]) == 0
    manifest = load_manifest(out)
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["validation"]["documents"] == 30
    assert list(manifest["sources"]) == [str(tmp_path / "corpus.txt")]
    held = manifest["splits"]["validation"]["documents"]
    assert 0 < held < 20  # 30 documents: about 3 in 100 go to validation, and at least one
    err = capsys.readouterr().err
    assert f"warning: the validation split holds {held} document" in err and "noisy" in err
    embedded = main(["prepare-data", "--output", str(tmp_path / "cache")])  # the embedded corpus: enough held out
    assert embedded == 0 and "warning: the validation split" not in capsys.readouterr().err
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe bad")
    assert main(["prepare-data", "--input", str(tmp_path / "bad.txt"), "--output", str(tmp_path / "x")]) == 1
    assert "not valid UTF-8" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_prepare_data_reads_folders_and_never_silently_replaces_data(tmp_path, small_documents, capsys):
    from ipu_app.__main__ import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n\n".join(d.text for d in small_documents[:15]), encoding="utf-8")
    (corpus / "b.txt").write_text("\n\n".join(d.text for d in small_documents[15:30]), encoding="utf-8")
    out = tmp_path / "data"
    assert main(["prepare-data", "--input", str(corpus), "--output", str(out)]) == 0
    manifest = load_manifest(out)
    assert sorted(manifest["sources"]) == [str(corpus / "a.txt"), str(corpus / "b.txt")]
    assert main(["prepare-data", "--input", str(corpus), "--output", str(out)]) == 0  # the same input: reused
    before = (out / "manifest.json").read_bytes()
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(d.text for d in small_documents[30:60]), encoding="utf-8")
    capsys.readouterr()
    assert main(["prepare-data", "--input", str(other), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "already holds prepared data of other input" in err and "--overwrite" in err and err.count("\n") == 1
    assert (out / "manifest.json").read_bytes() == before
    assert main(["prepare-data", "--input", str(other), "--output", str(out), "--overwrite"]) == 0
    assert list(load_manifest(out)["sources"]) == [str(other)]


def test_a_trained_tokenizer_below_the_floor_is_refused(tmp_path, small_documents):
    from ipu_app.data.corpus import CorpusError
    from ipu_app.data.prepare import prepare_files

    (tmp_path / "small.txt").write_text("\n\n".join(d.text for d in small_documents[:12]), encoding="utf-8")
    with pytest.raises(CorpusError, match=r"--tokenizer train learned only \d+ tokens from this corpus \(asked for "
                                          r"30522; at least 1000 are needed\)"):
        prepare_files([tmp_path / "small.txt"], tmp_path / "out", tokenizer="train", progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_processes_starting_together_prepare_the_embedded_corpus_once(tmp_path, monkeypatch, capsys):
    """A sweep's --jobs start their runs at once on a fresh cache: the second waits for the first's
    preparation and reuses it, instead of reading its half-written folder (which failed one run with
    'holds data of another tokenizer')."""
    import threading

    from ipu_app.data import prepare

    calls, entered, finish = [], threading.Event(), threading.Event()

    def slow_prepare(documents, output_dir, *args, **kwargs):
        calls.append(output_dir)
        entered.set()
        assert finish.wait(10)
        output_dir.mkdir(parents=True)
        (output_dir / "manifest.json").write_text("{}")
        return output_dir

    monkeypatch.setattr(prepare, "_prepare", slow_prepare)
    results = {}

    def start(name):
        results[name] = prepare.prepare_embedded(cache_dir=tmp_path, progress=True)

    first = threading.Thread(target=start, args=("first",))
    first.start()
    assert entered.wait(10)
    second = threading.Thread(target=start, args=("second",))
    second.start()
    second.join(0.5)
    assert second.is_alive() and len(calls) == 1  # the second waits on the lock, not preparing too
    finish.set()
    first.join(10)
    second.join(10)
    assert len(calls) == 1 and results["first"] == results["second"] == calls[0]
    assert f"waiting for another process to prepare the embedded corpus in {calls[0]}" in capsys.readouterr().err
    assert prepare.prepare_embedded(cache_dir=tmp_path) == calls[0] and len(calls) == 1  # prepared: no lock needed


def test_an_unwritable_corpus_cache_fails_in_one_line(tmp_path):
    from ipu_app.data.prepare import prepare_embedded

    (tmp_path / "cache").write_text("a file where the cache folder should be")
    with pytest.raises(CorpusError, match=r"^the corpus cache .*/cache cannot be written \(File exists\): set "
                                          r"IPU_APP_CACHE to a writable folder$"):
        prepare_embedded(cache_dir=tmp_path / "cache", progress=False)
    assert (tmp_path / "cache").read_text() == "a file where the cache folder should be"


def test_exclusive_lock_serialises_and_fails_in_one_line(tmp_path):
    import threading

    from ipu_app.io import WriteError, exclusive_lock

    lock, order = tmp_path / "x.lock", []

    def wait_and_hold():
        with exclusive_lock(lock, on_wait=lambda: order.append("waited")):
            order.append("held")

    with exclusive_lock(lock):
        waiter = threading.Thread(target=wait_and_hold)
        waiter.start()
        waiter.join(0.3)
        assert order == ["waited"]  # blocked while this holds it
    waiter.join(10)
    assert order == ["waited", "held"] and lock.exists()
    with pytest.raises(WriteError, match=r"^cannot write .*/nowhere/x\.lock: "):
        (tmp_path / "nowhere").write_text("a file")
        with exclusive_lock(tmp_path / "nowhere" / "x.lock"):
            pass
