#!/usr/bin/env bash
# The whole GPU check in one call (a CUDA GPU, torch with CUDA, triton; ~8 minutes on one H200),
# run from the tree with nothing installed:  OUT=... bash bench/gpu_check.sh
# DATA=FOLDER uses prepared data (prepare-data's output) instead of preparing the embedded corpus, for a
# machine without the corpus's data packages (the lent GPU's image has none).
#   1. the Triton kernels against the reference op on the GPU (and the compile tests);
#   2. bench kernels, bf16, at BERT-Base shapes (s = 0.9 and 0.99, b = 16 / 32 / 64);
#   3. bench train on BERT-Mini and -Base (SIZES="mini medium base" adds Medium), interleaved in one run each: HF BertForPreTraining
#      eager bf16, ours dense (eager and compiled), ours sparse at s = 0.9, b = 16 and 32 (Triton,
#      eager and compiled), with the share of the step spent in the sparse linears;
#   4. one real run end to end: BERT-Mini at 16x16 blocks, 200 steps, a pattern update and a checkpoint at
#      step 100, then evaluate of the final model (the trainer itself, not only the bench).
# Every step has its own time limit, so a slow one cannot eat the others' time; results go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-bench_results/gpu}"
mkdir -p "$out"
step() {  # step NAME SECONDS COMMAND...: run with a limit, keep its output, go on after a failure
    local name=$1 limit=$2; shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi  # ONLY="NAME ...": just these steps
    echo "=== $name (limit ${limit}s): $*" | tee -a "$out/gpu_check.log"
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.txt" | tee -a "$out/gpu_check.log"
    echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$out/gpu_check.log"
}
step env 30 python -c "import torch, triton, transformers; assert torch.cuda.is_available(), 'no CUDA GPU'; \
print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__)"
data_set=()
if [ -n "${DATA:-}" ]; then data_set=(--set "data.dir=$DATA"); else
step prepare 90 python -c "from ipu_app.data.prepare import prepare_embedded; print(prepare_embedded('bert-base-uncased', 30522, progress=False))"
fi
step triton_tests 120 python -m pytest -q -x -p no:cacheprovider tests/ops/test_triton_kernels.py tests/train/test_compile.py -k "not training"
step kernels 60 python -m ipu_app bench kernels --device cuda --dtype bf16 --shapes base_up base_down \
    --tokens ${KERNEL_TOKENS:-8192 32768} --sparsity ${KERNEL_SPARSITY:-0.9 0.99} --block-size ${KERNEL_BLOCKS:-16 32 64} --repeats 10 --output "$out/kernels"
for size in ${SIZES:-mini base}; do
    step "train_$size" 100 python -m ipu_app bench train --device cuda --config "bert_${size}_sparse_b16" \
        "${data_set[@]}" --set training.batch_size=64 --set training.micro_batch_size=64 --set training.precision=bf16 --backends triton --block-size 16 32 \
        --hf --compile --fractions --steps 8 --output "$out/train_$size"
done
run="$out/run_mini"; rm -rf "$run"
step train_run 90 python run_pretraining.py --config bert_mini_sparse_b16 --steps 200 \
    --set training.checkpoint_every=100 "${data_set[@]}" --output-dir "$run" --no-progress
step evaluate_run 45 python -m ipu_app evaluate --run "$run" --no-progress
