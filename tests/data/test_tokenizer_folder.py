"""``data.tokenizer`` / ``prepare-data --tokenizer`` as a Hugging Face WordPiece tokenizer folder."""

import json

import numpy as np
import pytest

from ipu_app.data.corpus import CorpusError
from ipu_app.data.prepare import data_vocabulary, prepare_files
from ipu_app.data.tokenizer import SPECIAL_TOKENS, is_lowercase, load_tokenizer, tokenizer_hash

TEXT = ("Paris is the capital of France. The Seine flows through Paris.\nBerlin is in Germany. It is large.\n\n"
        "Rome lies in Italy. The Tiber flows through Rome.\nMadrid is in Spain. It is sunny.\n\n") * 30


def _folder(path, lowercase: bool, words=("Paris", "paris", "France", "Berlin", "Rome", "is", "in", "the", "The",
                                          "capital", "of", ".", "flows", "through", "Seine", "Germany", "It",
                                          "large", "lies", "Italy", "Tiber", "Madrid", "Spain", "sunny")):
    """A WordPiece folder as Hugging Face's save_pretrained writes it."""
    from transformers import BertTokenizerFast

    path.mkdir()
    letters = sorted({c for w in words for c in w.lower() + w.upper()})
    vocab = [*SPECIAL_TOKENS, *letters, *[f"##{c}" for c in letters], *words]
    vocab = list(dict.fromkeys(vocab))
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=lowercase).save_pretrained(str(path))
    return path


def test_a_cased_folder_prepares_data_that_keeps_the_case(tmp_path):
    cased = _folder(tmp_path / "cased", lowercase=False)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    out = prepare_files([corpus], tmp_path / "data", tokenizer=str(cased), progress=False, workers=1)
    tokenizer = load_tokenizer(out / "tokenizer")
    assert not is_lowercase(out / "tokenizer") and tokenizer.tokenize("Paris paris") == ["Paris", "paris"]
    tokens = np.concatenate([np.load(p) for p in sorted(out.glob("*.tokens.npy"))])
    vocab = tokenizer.get_vocab()
    assert (tokens == vocab["Paris"]).sum() > 0 and (tokens == vocab["paris"]).sum() == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"] == str(cased.resolve()) and manifest["tokenizer_sha256"] == tokenizer_hash(cased)

    class Data:  # the config's data section
        dir, tokenizer, vocab_size = str(out), "bert-base-uncased", 30522

    assert data_vocabulary(Data) == {"tokenizer": str(cased.resolve()), "vocab_size": len(vocab), "from": "data"}


def test_one_vocabulary_cased_and_uncased_are_two_tokenizers(tmp_path):
    cased, uncased = _folder(tmp_path / "cased", False), _folder(tmp_path / "uncased", True)
    assert (cased / "vocab.txt").read_bytes() == (uncased / "vocab.txt").read_bytes()
    assert is_lowercase(uncased) and not is_lowercase(cased)
    assert tokenizer_hash(cased) != tokenizer_hash(uncased)
    from ipu_app.data.tokenizer import file_sha256

    assert tokenizer_hash(uncased) == file_sha256(uncased / "vocab.txt")  # lower-casing ones keep their identity


def test_folders_that_are_not_bert_tokenizers_are_one_line_errors(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    no_mask = tmp_path / "no_mask"
    no_mask.mkdir()
    (no_mask / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\na\n")
    with pytest.raises(CorpusError, match=r"vocabulary lacks BERT's special tokens \['\[MASK\]'\]"):
        prepare_files([corpus], tmp_path / "a", tokenizer=str(no_mask), progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusError, match="has no vocab.txt and no tokenizer.json: only WordPiece"):
        prepare_files([corpus], tmp_path / "b", tokenizer=str(empty), progress=False)
    with pytest.raises(CorpusError, match="or the path of a Hugging Face WordPiece tokenizer folder"):
        prepare_files([corpus], tmp_path / "c", tokenizer=str(tmp_path / "nowhere"), progress=False)
    assert not any((tmp_path / n).exists() for n in "abc")


def test_a_folder_with_only_tokenizer_json_is_read_and_a_bpe_one_refused(tmp_path):
    """What today's transformers saves: tokenizer.json and no vocab.txt."""
    from tokenizers import Tokenizer, models

    from ipu_app.data.tokenizer import vocab_tokens, wordpiece_tokens

    both = _folder(tmp_path / "both", lowercase=True)
    only_json = tmp_path / "json"
    only_json.mkdir()
    for path in both.iterdir():
        if path.name != "vocab.txt":
            (only_json / path.name).write_bytes(path.read_bytes())
    tokens = (both / "vocab.txt").read_text().splitlines()
    assert wordpiece_tokens(only_json) == tokens and vocab_tokens(only_json) == len(tokens)
    assert tokenizer_hash(only_json) == tokenizer_hash(both)  # one vocabulary, one identity
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    out = prepare_files([corpus], tmp_path / "data", tokenizer=str(only_json), progress=False, workers=1)
    assert (out / "tokenizer" / "vocab.txt").read_text().splitlines() == tokens
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer_sha256"] == tokenizer_hash(both)
    same = prepare_files([corpus], tmp_path / "data_b", tokenizer=str(both), progress=False, workers=1)
    assert [np.load(p).tolist() for p in sorted(out.glob("*.tokens.npy"))] == \
        [np.load(p).tolist() for p in sorted(same.glob("*.tokens.npy"))]
    # another model in tokenizer.json: one line naming it
    bpe = tmp_path / "bpe"
    bpe.mkdir()
    Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")])).save(str(bpe / "tokenizer.json"))
    with pytest.raises(CorpusError, match="is a BPE tokenizer .*only WordPiece"):
        prepare_files([corpus], tmp_path / "c", tokenizer=str(bpe), progress=False)
    (bpe / "tokenizer.json").write_text("{not json")
    with pytest.raises(CorpusError, match="does not read as a tokenizer"):
        prepare_files([corpus], tmp_path / "d", tokenizer=str(bpe), progress=False)
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()
