"""Which attention implementation the encoder runs: Hugging Face's ``sdpa`` (PyTorch's fused
scaled-dot-product attention) or ``eager`` (two batched matrix products around a softmax).

Neither is fastest everywhere: on the CPU, PyTorch's fused attention in bf16 took 64 ms per BERT-Small
layer step (batch 32 x 128 tokens) against 26 ms for the eager products on an AMD Zen 4, while in
fp32 it was the faster (39 ms against 47 ms). ``model.attention: auto`` therefore measures, as the
sparse kernels are chosen (:mod:`ops.autotune`): one forward and backward of each at the run's shape,
the faster kept, cached and recorded in the run. With measuring off, ``auto`` is ``sdpa``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..choices import ATTENTION_IMPLEMENTATIONS
from ..ops import autotune

BASELINE = "sdpa"


@dataclass(frozen=True)
class AttentionKind:
    """What decides the speed of the encoder's attention."""
    batch: int
    heads: int
    seq_len: int
    head_dim: int
    dtype: str
    threads: int

    baseline = BASELINE

    @property
    def key(self) -> str:
        return f"attention B{self.batch} H{self.heads} S{self.seq_len} D{self.head_dim} {self.dtype} t{self.threads}"

    def measure(self) -> autotune.Decision:
        return measure(self)


class _Caller(nn.Module):
    """The module argument Hugging Face's attention functions read (training, is_causal)."""
    is_causal = False


def _functions() -> dict:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.bert.modeling_bert import eager_attention_forward

    return {"sdpa": sdpa_attention_forward, "eager": eager_attention_forward}


def measure(kind: AttentionKind) -> autotune.Decision:
    """One forward and backward of each implementation at the kind's shape, with a padding mask."""
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, kind.dtype)
    batch = max(1, min(kind.batch, autotune.MEASURE_TOKENS // kind.seq_len))  # as many tokens as a layer kind
    shape = (batch, kind.heads, kind.seq_len, kind.head_dim)
    q, k, v = (torch.randn(shape, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    keep = torch.ones(batch, kind.seq_len, dtype=torch.bool)
    keep[:, kind.seq_len * 7 // 8:] = False  # some padding, as batches have
    # the additive mask as the model makes it: in the embeddings' dtype (fp32 under autocast)
    mask = torch.zeros(batch, 1, kind.seq_len, kind.seq_len).masked_fill(
        ~keep[:, None, None, :], torch.finfo(torch.float32).min)
    gy = torch.randn(batch, kind.seq_len, kind.heads, kind.head_dim, generator=gen).to(dtype)
    caller = _Caller().train()

    def step(fn):
        def run():
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                out, _ = fn(caller, q, k, v, mask, scaling=kind.head_dim ** -0.5, dropout=0.0)
            torch.autograd.grad(out, (q, k, v), gy.to(out.dtype))
        return run

    return autotune.fastest(kind, {name: step(fn) for name, fn in _functions().items()})


def set_attention(model: nn.Module, implementation: str) -> None:
    """Run ``model``'s Hugging Face attention as ``implementation`` (read at every forward)."""
    if implementation not in ATTENTION_IMPLEMENTATIONS or implementation == "auto":
        raise ValueError(f"attention implementation {implementation!r}; use sdpa or eager")
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = implementation


def choose_attention(model: nn.Module, setting: str, device: torch.device, dtype: torch.dtype, batch: int,
                     seq_len: int, threads: int | None = None, progress: bool = False,
                     measure: bool = True) -> autotune.Decision | None:
    """Apply ``model.attention`` (``setting``): sdpa or eager as given; ``auto`` measured on a CPU (the
    decision returned), else (or without ``measure``) sdpa."""
    if setting != "auto":
        set_attention(model, setting)
        return None
    hf = model.bert.config
    if device.type != "cpu" or not autotune.enabled() or not measure:
        set_attention(model, BASELINE)
        return None
    kind = AttentionKind(batch, hf.num_attention_heads, seq_len, hf.hidden_size // hf.num_attention_heads,
                         autotune.dtype_name(dtype), threads or torch.get_num_threads())
    decision = autotune.TUNER.decide(kind, progress)
    set_attention(model, decision.choice)
    return decision


def attention_line(model: nn.Module, decisions: list) -> str:
    """The start-up line's part on attention: what runs, and its measured speed where ``auto`` chose."""
    implementation = model.bert.config._attn_implementation
    measured = next((d for d in decisions if isinstance(d.kind, AttentionKind)), None)
    if measured is None:
        return f"attention: {implementation}"
    other = next((k for k in measured.ms if k != measured.choice), None)
    if other is None:
        return f"attention: {implementation}"
    return f"attention: {implementation} (auto: {measured.ms[other] / measured.ms[measured.choice]:.2f}x {other})"
