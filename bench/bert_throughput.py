"""Training-step throughput of our BERT against HF ``BertForPreTraining``, and of the loader.

For each size: one training step (forward, backward, Adam step) on the same real
batch (embedded corpus, 32 x 128) for
  * HF ``BertForPreTraining`` in fp32 eager (its MLM head over all tokens),
  * ours, dense, fp32 (masked-only MLM head),
  * ours, dense, bf16 autocast (when this CPU supports bf16),
and the loader's tokens/s. Prints tokens/s and ratios; timing is never asserted.

    python bench/bert_throughput.py [--sizes mini medium] [--steps 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ipu_app.data.batches import BatchIterator# noqa: E402
from ipu_app.data.sampling import MaskingConfig, PretrainingDataset# noqa: E402
from ipu_app.data.prepare import prepare_embedded  # noqa: E402
from ipu_app.model.bert import ModelConfig, SparseBertForPreTraining  # noqa: E402


def bf16_supported() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def time_steps(step, steps: int) -> float:
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main(argv=None) -> int:
    from transformers import BertForPreTraining
    from transformers.utils import logging

    logging.set_verbosity_error()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["mini", "medium"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    data_dir = prepare_embedded()
    dataset = PretrainingDataset(data_dir, "train", MaskingConfig(), seed=0)
    loader = BatchIterator(dataset, args.batch_size)
    batch = next(loader)
    tokens = batch["input_ids"].numel()
    start = time.perf_counter()
    for _ in range(20):
        next(loader)
    loader_tps = 20 * tokens / (time.perf_counter() - start)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {tuple(batch['input_ids'].shape)}, "
          f"bf16 {'yes' if bf16_supported() else 'no'}; loader {loader_tps:,.0f} tokens/s")
    print(f"{'size':>7} {'variant':>22} {'tokens/s':>10} {'vs HF':>7} {'loader/model':>13}")
    for size in args.sizes:
        ours = SparseBertForPreTraining(ModelConfig(size=size, sparsity_mode="dense"))
        hf = BertForPreTraining(ours.config.hf_config())
        hf.load_state_dict(ours.state_dict(), strict=False)
        hf.tie_weights()

        def hf_step(model=hf, opt=torch.optim.AdamW(hf.parameters(), lr=1e-4)):
            out = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                        token_type_ids=batch["token_type_ids"], labels=batch["mlm_labels"],
                        next_sentence_label=batch["nsp_labels"])
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()

        def our_step(bf16: bool, model=ours, opt=torch.optim.AdamW(ours.parameters(), lr=1e-4)):
            context = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
            with context:
                out = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                            batch["mlm_labels"], batch["nsp_labels"])
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()

        t_hf = time_steps(hf_step, args.steps)
        rows = [("HF fp32 eager", t_hf), ("ours fp32", time_steps(lambda: our_step(False), args.steps))]
        if bf16_supported():
            rows.append(("ours bf16 autocast", time_steps(lambda: our_step(True), args.steps)))
        for name, t in rows:
            tps = tokens / t
            print(f"{size:>7} {name:>22} {tps:>10,.0f} {t_hf / t:>6.2f}x {loader_tps / tps:>12.0f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
