"""BERT for pre-training with a sparse encoder, built from Hugging Face's own BERT modules.

``SparseBertForPreTraining`` holds ``bert`` (``transformers.BertModel``) and ``cls``
(``BertPreTrainingHeads``) under the same names as ``BertForPreTraining``, so the
state-dict keys are HF's. The six encoder linears of every layer are swapped for
SparseLinear; the MLM head runs only on the masked positions.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel
from transformers.models.bert.modeling_bert import BertOnlyMLMHead, BertPreTrainingHeads

from ..io import atomic_write_bytes, first_line, write_safetensors
from ..sparse.init import DEFAULT_INIT_STD
from .mlm_loss import mlm_loss_and_correct, padded_mlm_loss
from ..choices import SPARSITY_MODES
from ..choices import DEFAULT_DROPOUT, MODEL_SIZES, SPARSE_MODULES
from ..sparse.layer import sparse_weights
from .sparse_linear import SparseLinear, sparsify_

@dataclass
class ModelConfig:
    """Everything needed to rebuild the model (saved as JSON beside the weights)."""

    size: str = "mini"
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    dropout: float | None = None  # None: the paper's default for the size
    nsp: bool = True
    sparsity_mode: str = "dynamic"
    sparsity: float = 0.9
    block_size: int = 1
    init: str = "trunc_normal"
    sparse_modules: list[str] = field(default_factory=lambda: list(SPARSE_MODULES))
    inactive: str = "zero"
    backend: str = "reference"
    seed: int = 0

    def validate(self) -> "ModelConfig":
        if self.size not in MODEL_SIZES:
            raise ValueError(f"unknown model size {self.size!r}; use one of {list(MODEL_SIZES)}")
        if self.sparsity_mode not in SPARSITY_MODES:
            raise ValueError(f"unknown sparsity mode {self.sparsity_mode!r}; use one of {list(SPARSITY_MODES)}")
        unknown = sorted(set(self.sparse_modules) - set(SPARSE_MODULES))
        if unknown:
            raise ValueError(f"unknown sparse module {unknown[0]!r}; use names from {list(SPARSE_MODULES)}")
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        """Read a config written by ``to_json``; a one-line error when it is not one."""
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a valid model config: {exc}") from exc

    @property
    def num_layers(self) -> int:
        return MODEL_SIZES[self.size][0]

    @property
    def hidden_size(self) -> int:
        return MODEL_SIZES[self.size][1]

    def hf_config(self) -> BertConfig:
        """The Hugging Face ``BertConfig`` of this model (SDPA attention)."""
        layers, hidden = MODEL_SIZES[self.size]
        dropout = DEFAULT_DROPOUT[self.size] if self.dropout is None else self.dropout
        config = BertConfig(
            vocab_size=self.vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=hidden // 64,
            intermediate_size=4 * hidden,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            max_position_embeddings=self.max_position_embeddings,
            initializer_range=DEFAULT_INIT_STD,
        )
        config._attn_implementation = "sdpa"
        return config


@dataclass
class PretrainingOutput:
    loss: torch.Tensor
    mlm_loss: torch.Tensor
    nsp_loss: torch.Tensor | None
    mlm_correct: torch.Tensor  # number of masked tokens predicted exactly
    num_masked: int | torch.Tensor  # a tensor on the fixed-size (masked_positions) path
    mlm_logits: torch.Tensor  # [num_masked, vocab]; [B * P, vocab] with padding rows on the fixed-size path
    nsp_logits: torch.Tensor | None


class SparseBertForPreTraining(nn.Module):
    """BERT MLM (+ NSP) pre-training model whose encoder linears are SparseLinear."""

    def __init__(self, config: ModelConfig, *, initialize: bool = True) -> None:
        """``initialize=False`` leaves the weights uninitialised (shapes, patterns and counts are
        those of the initialised model): for ``--describe`` and for loading saved weights."""
        super().__init__()
        self.config = config.validate()
        hf_config = config.hf_config()
        self.hf_config = hf_config
        with contextlib.nullcontext() if initialize else _no_init_weights():
            self.bert = BertModel(hf_config, add_pooling_layer=config.nsp)
            self.cls = BertPreTrainingHeads(hf_config) if config.nsp else BertOnlyMLMHead(hf_config)
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight  # tied
        self.cls.predictions.decoder.bias = self.cls.predictions.bias
        if initialize:
            self.apply(_init_dense)
        if config.sparsity_mode != "dense":
            wanted = {SPARSE_MODULES[m] for m in config.sparse_modules}
            sparsify_(
                self.bert.encoder,
                lambda name, _: name.split(".", 2)[-1] in wanted,
                sparsity=config.sparsity,
                block_size=config.block_size,
                seed=config.seed,
                inactive=config.inactive,
                backend=config.backend,
            )
            if initialize:
                for _, layer in sparse_weights(self):
                    _reinit_sparse(layer, config)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
        nsp_labels: torch.Tensor | None = None,
        masked_positions: torch.Tensor | None = None,
        masked_labels: torch.Tensor | None = None,
    ) -> PretrainingOutput:
        """MLM loss over positions whose label is not -100 (HF convention), plus NSP loss.

        The masked tokens come either from ``mlm_labels [B, S]`` (found with ``nonzero``: exact
        rows, a data-dependent shape) or, for a compiled graph or a GPU, as fixed-size
        ``masked_positions`` / ``masked_labels [B, P]`` (``data.batches.static_batch``; -100 padding,
        the same loss, no host sync, ``num_masked`` a tensor; a 2-D attention mask then becomes the
        4-D boolean mask attention uses, which spares transformers' check for padding)."""
        if masked_positions is not None and attention_mask is not None and attention_mask.dim() == 2:
            # A 4-D mask is used as given; a 2-D one is first checked for padding (a host sync per call).
            length = attention_mask.shape[-1]
            attention_mask = attention_mask[:, None, None, :].bool().expand(-1, 1, length, -1)
        out = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, return_dict=True)
        hidden = out.last_hidden_state
        if masked_positions is not None:
            index = masked_positions.long().unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
            mlm_logits = self.cls.predictions(torch.gather(hidden, 1, index)).flatten(0, 1)
            mlm_loss, correct, num_masked = padded_mlm_loss(mlm_logits, masked_labels)
        else:
            labels = mlm_labels.reshape(-1)
            positions = torch.nonzero(labels != -100).squeeze(1)
            masked_hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
            targets = labels.index_select(0, positions)
            mlm_logits = self.cls.predictions(masked_hidden)
            mlm_loss, correct = mlm_loss_and_correct(mlm_logits, targets)
            num_masked = int(positions.numel())
        loss, nsp_loss, nsp_logits = mlm_loss, None, None
        if self.config.nsp:
            nsp_logits = self.cls.seq_relationship(out.pooler_output)
            if nsp_labels is not None:
                nsp_loss = F.cross_entropy(nsp_logits.float(), nsp_labels)
                loss = mlm_loss + nsp_loss
        return PretrainingOutput(loss, mlm_loss, nsp_loss, correct, num_masked, mlm_logits, nsp_logits)

    def layer_sparsity(self) -> list[dict]:
        """Every encoder fully-connected weight: name, shape, block size, active weights, sparsity."""
        return encoder_layer_sparsity(self.bert)

    def active_encoder_weights(self) -> int:
        """The non-zero encoder fully-connected weights (what the paper's FLOPs count at density)."""
        return sum(row["active_weights"] for row in self.layer_sparsity())

    # -------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike) -> None:
        """Write ``model_config.json`` and ``model.safetensors`` (values and patterns) atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()
                 if k != "cls.predictions.decoder.weight" and k != "cls.predictions.decoder.bias"}
        atomic_write_bytes(directory / "model_config.json", self.config.to_json().encode())
        write_safetensors(state, directory / "model.safetensors", metadata={"format": "pt"})

    @classmethod
    def load(cls, directory: str | os.PathLike, map_location: str = "cpu") -> "SparseBertForPreTraining":
        """Rebuild a model written by ``save`` (no code is executed from the files)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path, weights_path = directory / "model_config.json", directory / "model.safetensors"
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: not a saved SparseBertForPreTraining directory")
        model = cls(ModelConfig.from_json(config_path), initialize=False)
        try:
            state = load_file(str(weights_path), device=map_location)
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{weights_path} is damaged (not a complete safetensors file: "
                             f"{first_line(exc)}); write it again, e.g. by resuming the run") from None
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("cls.predictions.decoder.")]
        if missing or unexpected:
            raise ValueError(f"{weights_path} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
        return model


def _no_init_weights():
    """Hugging Face's switch that turns its own and torch's weight initialisation into no-ops."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers before 5
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _init_dense(module: nn.Module) -> None:
    """BERT's initialisation with the paper's truncated normal (std 0.02, cut at 2 std)."""
    std = DEFAULT_INIT_STD
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.trunc_normal_(module.weight, 0.0, std, -2 * std, 2 * std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _reinit_sparse(layer: SparseLinear, config: ModelConfig) -> None:
    from ..sparse.init import init_values_

    if config.init != "trunc_normal":  # from_linear kept the trunc-normal dense init at the active positions
        init_values_(layer.values, config.init, layer.in_features, layer.out_features, config.sparsity)


def encoder_layer_sparsity(bert: nn.Module) -> list[dict]:
    """Every fully-connected weight of ``bert.encoder`` (any Hugging Face ``BertModel``, sparse layers or
    not): name, shape, block size, active weights, sparsity."""
    rows = []
    for name, module in bert.encoder.named_modules():
        if isinstance(module, SparseLinear):
            p = module.pattern
            active, block = p.nnz * p.block_size**2, p.block_size
        elif isinstance(module, nn.Linear):
            active, block = module.weight.numel(), None
        else:
            continue
        total = module.in_features * module.out_features
        rows.append({"name": f"bert.encoder.{name}", "shape": [module.out_features, module.in_features],
                     "block_size": block, "active_weights": active, "sparsity": 1.0 - active / total})
    return rows
