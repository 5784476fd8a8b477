"""Training FLOPs, counted as the paper counts them, plus a fuller ledger.

The paper's metric is the *non-embedding* training FLOPs per sequence: the six
sparse encoder matmuls at density ``1 - s`` (forward, input gradient and sampled
weight gradient: ``3 x 2 x tokens x weights``) plus the dense ``QK^T`` and ``AV``
attention matmuls. Embeddings, heads, softmax, LayerNorm and biases are excluded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


def non_embedding_params(num_layers: int, hidden: int) -> int:
    """Encoder fully-connected weights: ``12 L H^2`` (Q, K, V, O: 4H^2; FFN up and down: 8H^2)."""
    return 12 * num_layers * hidden * hidden


def non_embedding_training_flops_per_sequence(num_layers: int, hidden: int, seq_len: int, sparsity: float) -> float:
    """The paper's count: ``6 (1 - s) 12 L H^2 S + 12 L S^2 H``."""
    return 6.0 * (1.0 - sparsity) * non_embedding_params(num_layers, hidden) * seq_len + 12.0 * num_layers * seq_len**2 * hidden


@dataclass(frozen=True)
class FlopsLedger:
    """Training FLOPs of one sequence by component (multiply-add = 2 FLOPs, backward = 2x forward)."""

    sparse_linears: float
    attention: float
    embeddings: float
    mlm_head: float
    nsp_head: float

    @property
    def non_embedding(self) -> float:
        """The paper's metric."""
        return self.sparse_linears + self.attention

    @property
    def total(self) -> float:
        return self.sparse_linears + self.attention + self.embeddings + self.mlm_head + self.nsp_head

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "non_embedding": self.non_embedding, "total": self.total}


def training_flops_ledger(
    num_layers: int,
    hidden: int,
    seq_len: int,
    sparsity: float,
    vocab_size: int = 30522,
    masked_per_sequence: float = 20.0,
    nsp: bool = True,
) -> FlopsLedger:
    """Per-sequence FLOPs of one training step by component.

    Embeddings are lookups (no matmul FLOPs; only the embedding LayerNorm is not
    counted either). The MLM head runs on ``masked_per_sequence`` positions: an
    ``H x H`` transform and the tied ``H x V`` decoder. The NSP head is the pooler
    (``H x H``) and a 2-way classifier on one token.
    """
    return FlopsLedger(
        sparse_linears=6.0 * (1.0 - sparsity) * non_embedding_params(num_layers, hidden) * seq_len,
        attention=12.0 * num_layers * seq_len**2 * hidden,
        embeddings=0.0,
        mlm_head=6.0 * masked_per_sequence * (hidden * hidden + hidden * vocab_size),
        nsp_head=6.0 * (hidden * hidden + 2 * hidden) if nsp else 0.0,
    )


def rigl_dense_gradient_flops(num_layers: int, hidden: int, seq_len: int) -> float:
    """Extra FLOPs per sequence on a RigL update step: the dense weight gradient ``dY^T X``
    of every sparse weight (``2 x tokens x weights``) on top of the sampled one."""
    return 2.0 * non_embedding_params(num_layers, hidden) * seq_len


def run_flops(num_layers: int, hidden: int, seq_len: int, active_weights: int, steps: int,
              sequences_per_step: int, dense_gradient_steps: int = 0) -> dict:
    """A run's FLOPs as its summary and ``--describe`` report them: the paper's non-embedding FLOPs
    per sequence at the model's actual density (``active_weights`` non-zero encoder weights), and the
    run's total (``dense_gradient_steps`` RigL update steps add the dense-gradient cost)."""
    sparsity = 1.0 - active_weights / non_embedding_params(num_layers, hidden)
    per_sequence = non_embedding_training_flops_per_sequence(num_layers, hidden, seq_len, sparsity)
    extra = rigl_dense_gradient_flops(num_layers, hidden, seq_len) * dense_gradient_steps * sequences_per_step
    return {"non_embedding_flops_per_sequence": per_sequence, "non_embedding_nonzero_params": active_weights,
            "total_training_flops": per_sequence * steps * sequences_per_step + extra,
            "dense_gradient_steps": dense_gradient_steps}


def total_training_flops(
    num_layers: int,
    hidden: int,
    seq_len: int,
    sparsity: float,
    steps: int,
    sequences_per_step: int,
    dense_gradient_steps: int = 0,
    non_embedding_only: bool = True,
    **ledger_kwargs,
) -> float:
    """FLOPs of a whole run; ``dense_gradient_steps`` RigL update steps add the dense-gradient cost."""
    ledger = training_flops_ledger(num_layers, hidden, seq_len, sparsity, **ledger_kwargs)
    per_sequence = ledger.non_embedding if non_embedding_only else ledger.total
    extra = rigl_dense_gradient_flops(num_layers, hidden, seq_len) * dense_gradient_steps * sequences_per_step
    return per_sequence * steps * sequences_per_step + extra


def auto_learning_rate(size: str, sparsity: float) -> float:
    """``training.learning_rate: auto``. Paper §2.3: the dense law ``exp(-0.44 ln N - 0.47)`` (N =
    non-embedding parameters of the dense model) times Eq. 3's factor ``exp(1.969 s^2 + 0.2905 s)``."""
    import math

    from ..choices import MODEL_SIZES

    layers, hidden = MODEL_SIZES[size]
    dense = math.exp(-0.44 * math.log(non_embedding_params(layers, hidden)) - 0.47)
    return dense * math.exp(1.969 * sparsity**2 + 0.2905 * sparsity)
