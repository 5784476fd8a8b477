import pytest

from ipu_app.data.corpus import CorpusError, Document, file_documents, split_sentences


def test_blank_line_and_file_modes(tmp_path):
    (tmp_path / "a.txt").write_text("First doc line one.\nStill first.\n\n  \nSecond doc.\n\n\nThird doc.\n")
    (tmp_path / "b.txt").write_text("Whole file. Is one document.\n\nEven here.")
    docs = list(file_documents([tmp_path / "a.txt"]))
    assert [d.text.strip() for d in docs] == ["First doc line one.\nStill first.", "Second doc.", "Third doc."]
    assert [d.doc_id for d in docs] == ["a.txt#0", "a.txt#1", "a.txt#2"]
    whole = list(file_documents([tmp_path / "b.txt"], mode="file"))
    assert len(whole) == 1 and whole[0].doc_id == "b.txt"


@pytest.mark.parametrize(
    "content, match",
    [(b"abc\x00\x01def", "looks binary"), ("caf\u00e9 na\u00efve".encode("latin-1"), "not valid UTF-8 at byte 3")],
)
def test_bad_files_get_one_line_errors(tmp_path, content, match):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=match) as info:
        list(file_documents([path]))
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_missing_file_and_bad_mode(tmp_path):
    with pytest.raises(CorpusError, match="no such file"):
        list(file_documents([tmp_path / "nope.txt"]))
    with pytest.raises(CorpusError, match="unknown document mode"):
        list(file_documents([], mode="lines"))


def test_sentence_splitting():
    text = 'He said "Stop." Then he left! Was it 5 p.m. or so? Yes.\nNew paragraph without end'
    assert split_sentences(text) == ['He said "Stop."', "Then he left!", "Was it 5 p.m. or so?", "Yes.",
                                     "New paragraph without end"]


def test_validation_split_is_deterministic_by_document():
    docs = [Document("wiki", f"title {i}", "x") for i in range(2000)]
    held = [d.is_validation() for d in docs]
    assert held == [d.is_validation() for d in docs]
    assert 0.01 < sum(held) / len(held) < 0.03  # wiki: 2%


def test_windows_and_old_mac_line_ends_and_a_byte_order_mark(tmp_path):
    (tmp_path / "crlf.txt").write_bytes("\ufeffFirst doc.\r\nStill first.\r\n\r\nSecond doc.\r\n\r\nThird.".encode())
    (tmp_path / "cr.txt").write_bytes(b"One.\r\rTwo.")
    docs = list(file_documents([tmp_path / "crlf.txt", tmp_path / "cr.txt"]))
    assert [d.text.strip() for d in docs] == ["First doc.\nStill first.", "Second doc.", "Third.", "One.", "Two."]


def test_folders_expand_to_their_text_files(tmp_path):
    from ipu_app.data.corpus import expand_inputs

    (tmp_path / "books" / "b").mkdir(parents=True)
    for name in ("books/z.txt", "books/b/a.txt", "books/notes.md", "single.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "books" / "c.jsonl.gz").write_bytes(b"")
    (tmp_path / "books" / "d.parquet").write_bytes(b"")
    assert [(i.path, i.format) for i in expand_inputs([tmp_path / "books", tmp_path / "single.txt"])] == [
        (tmp_path / "books" / "b" / "a.txt", "text"), (tmp_path / "books" / "c.jsonl.gz", "jsonl"),
        (tmp_path / "books" / "d.parquet", "parquet"), (tmp_path / "books" / "z.txt", "text"),
        (tmp_path / "single.txt", "text")]
    # a forced format reads every file of a folder as that format
    assert [i.format for i in expand_inputs([tmp_path / "books" / "notes.md"], "jsonl")] == ["jsonl"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="is a folder without input files"):
        expand_inputs([tmp_path / "empty"])
    with pytest.raises(CorpusError, match="no such file or folder"):
        expand_inputs([tmp_path / "nope"])
