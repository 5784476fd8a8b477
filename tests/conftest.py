import os

import pytest
import torch

# auto's kernel choice by measuring depends on the host's speed: off, so that tests see the constant
# limits; the tests of measuring turn it on themselves (tests/ops/test_autotune.py)
os.environ["IPU_APP_AUTOTUNE"] = "0"
if not torch.cuda.is_available():
    # Triton kernels are checked in Triton's interpreter on the CPU; it must be on before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
from hypothesis import settings

from ipu_app.data.corpus import embedded_documents
from ipu_app.data.shards import prepare_data
from ipu_app.data.tokenizer import build_standard_tokenizer

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    return build_standard_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def small_documents():
    docs = list(embedded_documents())
    wiki = [d for d in docs if d.source == "wiki"][:150]
    sotu = [d for d in docs if d.source == "sotu"][:3]
    return wiki + sotu


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, small_documents, tokenizer_dir):
    out = tmp_path_factory.mktemp("data")
    prepare_data(small_documents, tokenizer_dir, out, documents_per_shard=40, progress=False)
    return out


@pytest.fixture(params=["sapphire_rapids", "zen4", "zen3", "icelake", "host"])
def cpu_kind(request, monkeypatch):
    """Each CPU kind simulated (see tests/cpu_kinds.py), and the host as it is."""
    from tests.cpu_kinds import KINDS, host_kind, simulate

    if request.param == "host":
        return host_kind()
    return simulate(monkeypatch, KINDS[request.param])


@pytest.fixture(scope="session")
def pipeline(data_dir, tmp_path_factory):
    """The README's chain at test size (tests/readme_chain.py): ROOT/runs/bert_tiny_sparse (phase I),
    ROOT/runs/tiny_512 (phase II), ROOT/tasks/demo, ROOT/runs/ft (the fine-tune); ROOT returned."""
    from tests.readme_chain import run_chain

    root = tmp_path_factory.mktemp("pipeline")
    run_chain(root, data_dir)
    return root
