#!/usr/bin/env bash
# The paper's Figure 1 in miniature: a Switch model and the T5 of the same dense dims (same compute per token),
# trained for the same steps and batch on Multi30k en->de, then scored on the validation set (loss, BLEU, chrF).
# Usage: scripts/multi30k_switch_vs_t5.sh [OUTPUT_ROOT] [STEPS]
set -euo pipefail
data="$(dirname "$0")/../../shared/data/multi30k"
root="${1:-outputs/multi30k}"
steps="${2:-1500}"
common=(
  --objective seq2seq --preset small
  --train_source_file "$data/train.en.gz" --train_target_file "$data/train.de.gz"
  --validation_source_file "$data/val.en.gz" --validation_target_file "$data/val.de.gz"
  --max_source_length 48 --max_target_length 48 --tokenizer_vocab_size 8000
  --max_steps "$steps" --per_device_train_batch_size 32 --per_device_eval_batch_size 128
  --learning_rate 1e-3 --warmup_steps 100 --lr_scheduler_type linear --seed 0
  --eval_strategy no --save_strategy no --logging_steps 50 --report_to tensorboard
  --predict_with_generate --generation_max_length 48
)
hf-switch train "${common[@]}" --output_dir "$root/switch"
hf-switch train "${common[@]}" --architecture t5 --tokenizer_name_or_path "$root/switch" --output_dir "$root/t5"
for run in switch t5; do
  echo "$run: $(cat "$root/$run/eval_results.json")"
done
