import pytest
import torch
from transformers import BertForPreTraining
from transformers.utils import logging

from ipu_app.model.bert import MODEL_SIZES, SPARSE_MODULES, ModelConfig, SparseBertForPreTraining
from ipu_app.model.sparse_linear import SparseLinear
from ipu_app.sparse.layer import sparse_weights
from ipu_app.sparse.flops import non_embedding_params

logging.set_verbosity_error()


def batch(vocab=30522, b=3, s=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (b, s), generator=g)
    attention = torch.ones_like(ids)
    attention[0, -5:] = 0  # padding in one sequence
    labels = torch.full_like(ids, -100)
    pick = torch.rand(b, s, generator=g) < 0.2
    pick[:, 1] = True
    labels[pick & attention.bool()] = ids[pick & attention.bool()]
    types = torch.zeros_like(ids)
    types[:, s // 2 :] = 1
    return ids, types, attention, labels, torch.tensor([0, 1, 0][:b])


def test_dense_loss_equals_hf_bert_for_pretraining():
    model = SparseBertForPreTraining(ModelConfig(size="tiny", sparsity_mode="dense")).eval()
    hf = BertForPreTraining(model.config.hf_config()).eval()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("cls.predictions.decoder") for k in missing)
    ids, types, attention, labels, nsp = batch()
    ours = model(ids, types, attention, labels, nsp)
    theirs = hf(ids, attention_mask=attention, token_type_ids=types, labels=labels, next_sentence_label=nsp)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-6, atol=1e-6)
    assert ours.num_masked == int((labels != -100).sum())
    masked_logits = theirs.prediction_logits.reshape(-1, 30522)[(labels != -100).flatten()]
    torch.testing.assert_close(ours.mlm_logits, masked_logits, rtol=1e-5, atol=1e-5)
    assert int(ours.mlm_correct) == int((masked_logits.argmax(-1) == labels[labels != -100]).sum())


@pytest.mark.parametrize("size", list(MODEL_SIZES))
def test_sizes_and_sparse_modules(size):
    layers, hidden = MODEL_SIZES[size]
    config = ModelConfig(size=size, sparsity=0.9, block_size=16 if size != "tiny" else 4)
    hf_config = config.hf_config()
    assert (hf_config.num_hidden_layers, hf_config.hidden_size, hf_config.num_attention_heads,
            hf_config.intermediate_size) == (layers, hidden, hidden // 64, 4 * hidden)
    assert hf_config.hidden_dropout_prob == (0.1 if size in ("medium", "base") else 0.0)
    if size in ("tiny", "mini"):
        model = SparseBertForPreTraining(config)
        sparse = sparse_weights(model)
        assert len(sparse) == 6 * layers
        suffixes = {name.split(".", 4)[-1] for name, _ in sparse}
        assert suffixes == set(SPARSE_MODULES.values())
        assert sum(m.in_features * m.out_features for _, m in sparse) == non_embedding_params(layers, hidden)
        assert all(m.sparsity == pytest.approx(0.9, abs=0.01) for _, m in sparse)
        # patterns differ between layers; the decoder is tied to the word embeddings
        assert not sparse[0][1].pattern.equal(sparse[1][1].pattern)
        assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight


def test_choose_sparse_modules_and_no_nsp():
    model = SparseBertForPreTraining(ModelConfig(size="tiny", sparse_modules=["ffn_up", "ffn_down"], nsp=False))
    names = [n for n, _ in sparse_weights(model)]
    # ffn_down is layer.N.output.dense, not layer.N.attention.output.dense (which stays dense)
    assert sorted(names) == [f"bert.encoder.layer.{i}.{m}" for i in range(2) for m in ("intermediate.dense", "output.dense")]
    assert type(model.bert.encoder.layer[0].attention.output.dense) is torch.nn.Linear
    assert type(model.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear
    ids, types, attention, labels, nsp = batch()
    out = model(ids, types, attention, labels, nsp)
    assert out.nsp_loss is None and out.nsp_logits is None and torch.equal(out.loss, out.mlm_loss)
    with pytest.raises(ValueError, match="unknown sparse module 'fc1'"):
        ModelConfig(sparse_modules=["fc1"]).validate()
    with pytest.raises(ValueError, match="unknown model size"):
        ModelConfig(size="huge").validate()


def test_training_step_reaches_sparse_values_only_at_active_blocks():
    model = SparseBertForPreTraining(ModelConfig(size="tiny", block_size=4))
    ids, types, attention, labels, nsp = batch()
    model(ids, types, attention, labels, nsp).loss.backward()
    layer = model.bert.encoder.layer[0].intermediate.dense
    assert isinstance(layer, SparseLinear)
    # The values' gradient is the dense weight gradient read at the active blocks, and nothing else
    # carries a gradient for the inactive positions.
    dense = torch.nn.Linear(layer.in_features, layer.out_features)
    with torch.no_grad():
        dense.weight.copy_(layer.to_dense())
        dense.bias.copy_(layer.bias)
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(0))
    layer.values.grad = None
    layer(x).pow(2).sum().backward()
    dense(x).pow(2).sum().backward()
    mask = layer.mask()
    torch.testing.assert_close(layer.pattern.to_dense(layer.values.grad)[mask], dense.weight.grad[mask])
    assert torch.count_nonzero(layer.pattern.to_dense(layer.values.grad)[~mask]) == 0
    assert dense.weight.grad[~mask].abs().sum() > 0  # the inactive positions would have had a gradient
    assert [n for n, p in layer.named_parameters()] == ["values", "bias"]  # no dense weight to train


def test_save_and_load_round_trip(tmp_path):
    model = SparseBertForPreTraining(ModelConfig(size="tiny", block_size=4, init="glorot")).eval()
    model.save(tmp_path / "m")
    loaded = SparseBertForPreTraining.load(tmp_path / "m").eval()
    ids, types, attention, labels, nsp = batch()
    torch.testing.assert_close(model(ids, types, attention, labels, nsp).loss, loaded(ids, types, attention, labels, nsp).loss)
    assert all(a.pattern.equal(b.pattern) for (_, a), (_, b) in zip(sparse_weights(model), sparse_weights(loaded)))
    with pytest.raises(FileNotFoundError, match="model_config.json is missing"):
        SparseBertForPreTraining.load(tmp_path)
