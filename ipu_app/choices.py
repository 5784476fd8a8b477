"""The names a config or a command line may choose from, importable without torch.

``config`` checks its values against these, and ``--help`` lists them; the modules that implement
each choice import their names from here, so there is one list of each.
"""

SPARSITY_MODES = ("dense", "static", "dynamic")  # sparsity.mode (model/bert.py, sparse/updater.py)
PATTERN_MODES = SPARSITY_MODES[1:]  # the modes with a block pattern: what PatternUpdater runs
INACTIVE_MODES = ("zero", "frozen")  # what the inactive weights hold (model/sparse_linear.py)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # training.precision (train/precision.py)
ATTENTION_IMPLEMENTATIONS = ("auto", "sdpa", "eager")  # model.attention (model/attention.py)
BIAS_CORRECTIONS = ("auto", "global", "per_slot")  # Adam's bias correction of regrown weights (train/optim.py)
SUPPORTED_BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64)  # sparse block edge (sparse/pattern.py)
FREEZE_MODES = ("none", "early", "late")  # half-run untrained subset (sparse/freeze.py)
VALUE_INITS = ("trunc_normal", "trunc_normal_rescaled", "glorot", "glorot_rescaled")  # sparse/init.py
BLOCK_METRICS = ("l1", "l2", "linf")  # block norm that pruning ranks by (sparse/scoring.py)
REGROWTH_RULES = ("random", "gradient")  # sparse/scoring.py
PRUNING_SCHEDULES = ("cosine", "constant")  # pr(t) (sparse/schedule.py)
# With training.init_from: the source's pattern where it fits (auto), always (keep), the largest blocks of
# the source's weight (magnitude) or the run's own random pattern (random) (train/init_from.py)
INIT_PATTERNS = ("auto", "keep", "magnitude", "random")
# finetune --pattern: the pre-trained pattern kept, or pruned and regrown on (finetune/tuner.py)
FINETUNE_PATTERNS = ("fixed", "dynamic")
FINETUNE_SAVES = ("last", "best")
FINETUNE_TASK_TYPES = ("auto", "classification", "regression")
SPARSE_BACKENDS = ("reference", "cpu", "triton")  # ops/<name>.py
BACKEND_NAMES = ("auto", *SPARSE_BACKENDS)
# ``bench kernels`` shapes: name -> (in_features, out_features) of the BERT FFN linears.
BENCH_SHAPES = {
    "medium_up": (512, 2048), "medium_down": (2048, 512),
    "base_up": (768, 3072), "base_down": (3072, 768),
}
BENCH_DTYPES = ("fp32", "bf16", "fp16")

# model.size: the BERT family (model/bert.py), and the names of its sparse layers (sparsity.modules).
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
