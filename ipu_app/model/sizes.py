"""The BERT family and the names of its sparse layers (no heavy imports: configs use these)."""

# (layers, hidden) of the Turc et al. family; heads = H / 64, FFN = 4 H.
MODEL_SIZES: dict[str, tuple[int, int]] = {
    "tiny": (2, 128),
    "mini": (4, 256),
    "small": (4, 512),
    "medium": (8, 512),
    "base": (12, 768),
}
# The paper uses dropout 0.1 for models larger than BERT-Small and (by implication) none below.
DEFAULT_DROPOUT = {"tiny": 0.0, "mini": 0.0, "small": 0.0, "medium": 0.1, "base": 0.1}
# Paper names of the encoder linears -> module path inside a BertLayer.
SPARSE_MODULES: dict[str, str] = {
    "query": "attention.self.query",
    "key": "attention.self.key",
    "value": "attention.self.value",
    "attention_output": "attention.output.dense",
    "ffn_up": "intermediate.dense",
    "ffn_down": "output.dense",
}
