#!/usr/bin/env bash
# The one-command demo (README command #1): a tokenizer check, pretraining, SFT and a LoRA adapter for a
# small MiniMind on the built-in demo corpus, then a scripted chat on questions held out of training.
# Offline, CPU only, about 10 minutes on 2 cores. Weights go to out/, resume files to checkpoints/,
# curves to out/demo_loss.png (README's images/demo_loss.png is a committed picture of one run).
# Afterwards: python eval_llm.py --weight full_sft
#
# Every step is one command below. The DEMO_* variables exist so the test suite can run the same
# script in seconds (tests/test_demo.py); leave them unset for the real demo.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DEMO_DATA:-dataset/demo}                # demo corpus folder
OUT=${DEMO_OUT:-out}                           # weights (+ .json configs, metrics)
CKPT=${DEMO_CKPT:-checkpoints}                 # resume files
PLOTS=${DEMO_PLOTS:-$OUT}                      # loss curves (run outputs stay under out/)
SIZE=${DEMO_SIZE:-"--hidden_size 256 --num_hidden_layers 4"}   # 4.5M parameters: a CPU-sized MiniMind
SCALE=${DEMO_SCALE:-1}                         # corpus size factor
STEPS=${DEMO_MAX_STEPS:-0}                     # 0 = full epochs
# Defaults that matter here: --packing 1 (each micro-batch's samples packed into rows, each attending only to
# itself), --dtype auto (bf16 where the CPU has bf16 matrix units, else fp32). --num_workers 0: on 2 cores a
# loader process only takes CPU time from the training threads. --batch_size counts samples (8-9 per step, as
# the original's batch of 8): on a corpus this small the number of optimizer steps, not the tokens per step, is
# what teaches the model.
RUN="--device cpu $SIZE --checkpoint_dir $CKPT --max_steps $STEPS --num_workers 0 --log_interval 50"
start=$(date +%s)

# 1. Demo data: facts, small arithmetic, instructions and identity dialogues in Chinese and English,
#    written by dataset/demo_data.py (deterministic; the eval questions never appear in training).
python dataset/demo_data.py --out_dir "$DATA" --scale "$SCALE"

# 2. Tokenizer check: how one SFT sample is tokenized, and which tokens the loss supervises.
python scripts/inspect_data.py --data_path "$DATA/sft.jsonl" --kind sft --show 0 --max_lines 200

# 3. Pretraining from random weights: learn to continue the demo text (next-token prediction).
python trainer/train_pretrain.py $RUN --save_dir "$OUT" --data_path "$DATA/pretrain.jsonl" \
    --epochs 2 --batch_size 8 --max_seq_len 256 --accumulation_steps 1 --learning_rate 2e-3

# 4. SFT: learn to answer in the chat template (loss on the assistant's replies only).
python trainer/train_full_sft.py $RUN --save_dir "$OUT" --data_path "$DATA/sft.jsonl" \
    --epochs 5 --batch_size 9 --max_seq_len 512 --learning_rate 1e-3

# 5. The scripted chat: answers to the held-out questions, and the accuracy.
python scripts/eval_demo.py --save_dir "$OUT" --weight full_sft $SIZE --eval_path "$DATA/eval.jsonl" --show 12

# 6. Post-training: a LoRA adapter (base weights frozen) trained on who the model is; identity questions before and after.
python scripts/eval_demo.py --save_dir "$OUT" --weight full_sft $SIZE --eval_path "$DATA/eval.jsonl" --kinds identity --show 4
python trainer/train_lora.py $RUN --save_dir "$OUT/lora" --from_dir "$OUT" --data_path "$DATA/lora_identity.jsonl" \
    --lora_name lora_identity --epochs 6 --batch_size 5 --max_seq_len 128 --learning_rate 2e-3 --save_interval 1000
python scripts/eval_demo.py --save_dir "$OUT" --weight full_sft $SIZE --lora_weight lora_identity \
    --eval_path "$DATA/eval.jsonl" --kinds identity --show 4

# 7. Loss, learning-rate and speed curves of pretraining then SFT.
python scripts/plot_metrics.py "$OUT"/pretrain_*_metrics.jsonl "$OUT"/full_sft_*_metrics.jsonl --out "$PLOTS/demo_loss.png"

echo "demo finished in $(( $(date +%s) - start )) s. Chat with it: python eval_llm.py --save_dir $OUT --weight full_sft $SIZE"
