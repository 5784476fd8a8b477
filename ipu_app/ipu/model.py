"""The pre-training model as a PopTorch graph: static shapes, pipeline blocks, recomputation.

``SparseBertForPreTraining.forward`` selects the masked positions with ``nonzero`` (a data-dependent
shape). A compiled IPU graph needs fixed shapes, so :class:`IpuPretrainingModel` takes the masked
positions as a fixed ``[batch, max_predictions]`` input (padded, label ``-100``) and gathers them;
its losses equal the model's own (tested). The sparse layers run the reference op inside the graph
(compressed values scattered into a dense weight: the masked path, which any SDK compiles).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.mlm_loss import padded_mlm_loss
from .options import Placement


class _Heads(nn.Module):
    """The MLM head on the gathered positions and the NSP head: one pipeline block on IPU 0."""

    def __init__(self, predictions: nn.Module, seq_relationship: nn.Module | None) -> None:
        super().__init__()
        self.predictions = predictions
        self.seq_relationship = seq_relationship

    def forward(self, masked_hidden, pooled):
        mlm_logits = self.predictions(masked_hidden)
        nsp_logits = self.seq_relationship(pooled) if self.seq_relationship is not None else None
        return mlm_logits, nsp_logits


class IpuPretrainingModel(nn.Module):
    """Returns ``(loss, mlm_loss, nsp_loss, mlm_correct, num_masked)``, all tensors, loss first."""

    def __init__(self, model, poptorch=None) -> None:
        super().__init__()
        self.model = model
        self.heads = _Heads(model.cls.predictions, getattr(model.cls, "seq_relationship", None))
        self._poptorch = poptorch

    def forward(self, input_ids, token_type_ids, attention_mask, masked_positions, masked_labels, nsp_labels=None):
        out = self.model.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, return_dict=True)
        hidden = out.last_hidden_state
        index = masked_positions.long().unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        masked_hidden = torch.gather(hidden, 1, index)
        mlm_logits, nsp_logits = self.heads(masked_hidden, out.pooler_output)
        mlm_loss, correct, num_masked = padded_mlm_loss(mlm_logits, masked_labels)
        loss, nsp_loss = mlm_loss, torch.zeros_like(mlm_loss)
        if nsp_logits is not None and nsp_labels is not None:
            nsp_loss = F.cross_entropy(nsp_logits.float(), nsp_labels.long())
            loss = mlm_loss + nsp_loss
        correct, num_masked = correct.float(), num_masked.float()
        if self._poptorch is not None:
            loss = self._poptorch.identity_loss(loss, reduction="none")
        return loss, mlm_loss.detach(), nsp_loss.detach(), correct, num_masked


def parallelize(wrapper: IpuPretrainingModel, placement: Placement, poptorch, *,
                recompute_every_layer: bool = True) -> list:
    """Put every block of ``wrapper`` on its IPU (``poptorch.BeginBlock``) and, with pipelining,
    store each encoder layer's output for recomputation; returns the hook handles."""
    model = wrapper.model
    poptorch.BeginBlock(model.bert.embeddings, "Embedding", ipu_id=placement.ipu_of("Embedding"))
    handles = []
    for i, layer in enumerate(model.bert.encoder.layer):
        poptorch.BeginBlock(layer, f"Encoder{i}", ipu_id=placement.ipu_of(f"Encoder{i}"))
        if recompute_every_layer and placement.num_ipus > 1:
            handles.append(layer.register_forward_hook(_checkpoint_output(poptorch)))
    if model.bert.pooler is not None:
        poptorch.BeginBlock(model.bert.pooler, "Pooler", ipu_id=placement.ipu_of("Pooler"))
    poptorch.BeginBlock(wrapper.heads, "Heads", ipu_id=placement.ipu_of("Heads"))
    return handles


def _checkpoint_output(poptorch):
    def hook(module, inputs, output):
        if isinstance(output, tuple):
            return (poptorch.recomputationCheckpoint(output[0]), *output[1:])
        return poptorch.recomputationCheckpoint(output)

    return hook
