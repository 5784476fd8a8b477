"""The README and docs/ are true to the code: links resolve, every command line in them parses with the
real parsers and names configs and sweep specs that exist, and the config vocabulary table lists
exactly the config's keys."""

import dataclasses
import re
import shlex
from pathlib import Path

import pytest

from ipu_app.config import CONFIG_DIR, RunConfig, resolve_config_path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def links(path: Path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    for m in re.finditer(r"\]\(([^)\s]+)\)", text):
        target = m.group(1)
        if not re.match(r"[a-z]+://", target):
            yield target


def test_readme_is_short_and_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 120  # a five-minute read; the reference lives in docs/
    linked = {t.split("#")[0] for t in links(ROOT / "README.md")}
    for page in (ROOT / "docs").glob("*.md"):
        assert f"docs/{page.name}" in linked, f"README does not link docs/{page.name}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_resolve(page):
    for target in links(page):
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        assert dest.exists(), f"{page.name}: link to missing {file}"
        if anchor:
            assert anchor in anchors(dest), f"{page.name}: no heading #{anchor} in {dest.name}"


def test_slug_matches_github():
    assert slug("Result: DynSparse vs static on an encoder-dominated CPU proxy") == \
        "result-dynsparse-vs-static-on-an-encoder-dominated-cpu-proxy"
    assert slug("Graphcore IPUs (`backend: ipu`)") == "graphcore-ipus-backend-ipu"


def command_lines():
    """(page, argv) for every ``python run_pretraining.py`` / ``python -m ipu_app`` line of a bash block."""
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                for part in line.split("&&"):
                    words = shlex.split(part.replace("[", " ").replace("]", " "), comments=True)
                    for start, word in enumerate(words):
                        if word == "run_pretraining.py":
                            yield page.name, ["train", *words[start + 1:]]
                            break
                        if word == "ipu_app" and words[start - 1] == "-m":
                            yield page.name, words[start + 1:]
                            break


def test_every_documented_command_parses_and_names_what_exists(capsys):
    from ipu_app.__main__ import build_parser as tools_parser
    from ipu_app.experiments.sweep_spec import SWEEP_DIR
    from ipu_app.commands.train import build_parser as train_parser

    seen = 0
    for page, argv in command_lines():
        seen += 1
        parser = train_parser() if argv[0] == "train" else tools_parser()
        try:
            args = parser.parse_args(argv[1:] if argv[0] == "train" else argv)
        except SystemExit:
            pytest.fail(f"{page}: {shlex.join(argv)} does not parse: {capsys.readouterr().err.strip()}")
        config = getattr(args, "config", None)
        if config and config.isidentifier():  # a name, not a placeholder such as NAME or a path
            assert resolve_config_path(config).is_file(), f"{page}: no config {config}"
        if getattr(args, "spec", None):
            assert (SWEEP_DIR / f"{args.spec}.yaml").is_file(), f"{page}: no sweep spec {args.spec}"
    assert seen >= 25


def test_a_broken_command_line_is_caught(capsys):
    from ipu_app.commands.train import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--config", "bert_tiny_sparse", "--stepz", "5"])


def vocabulary_table() -> dict[str, set[str]]:
    text = (ROOT / "docs" / "training.md").read_text()
    table = re.search(r"\| section \| keys \|\n\|---\|---\|\n((?:\|.*\n)+)", text).group(1)
    rows = {}
    for line in table.splitlines():
        section, keys = line.strip("|").split("|", 1)
        while re.search(r"\([^()]*\)", keys):
            keys = re.sub(r"\([^()]*\)", "", keys)  # explanations may name other things in backticks
        rows[section.strip().strip("`")] = set(re.findall(r"`([a-z_0-9]+)`", keys))
    return rows


def test_config_vocabulary_table_lists_exactly_the_config_keys():
    rows = vocabulary_table()
    config = RunConfig()
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            assert rows[f.name] == {g.name for g in dataclasses.fields(value)}, f.name
    top = {f.name for f in dataclasses.fields(config) if not dataclasses.is_dataclass(getattr(config, f.name))}
    assert rows["top level"] == top - {"name"}  # name is set from the config file, not a key


def test_documented_configs_and_sweep_specs_exist():
    from ipu_app.experiments.sweep_spec import SWEEP_DIR

    text = "\n".join(p.read_text() for p in PAGES)
    for size in ("tiny", "mini", "small", "medium", "base"):  # the configs table's bert_<size>_<kind>
        for kind in ("dense", "static", "sparse", "sparse_b16", "sparse_rigl"):
            assert (CONFIG_DIR / f"bert_{size}_{kind}.yaml").is_file()
    names = set(re.findall(r"`((?:bert|proxy)_[a-z0-9_]+)`", text))
    names |= set(re.findall(r"`([a-z_]+_(?:cpu|paper))`", text))  # sweep specs in the figures table
    assert len(names) >= 15
    for name in names:
        if name.endswith("_"):
            continue  # a prefix such as proxy_tiny_
        assert (CONFIG_DIR / f"{name}.yaml").is_file() or (SWEEP_DIR / f"{name}.yaml").is_file(), \
            f"documented config or sweep spec {name} does not exist"
