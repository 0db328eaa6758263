#!/usr/bin/env bash
# The real-data experiments of docs/experiments.md, in order; each run writes eval_results.json and
# train_results.json into its folder under OUTPUT_ROOT. Needs ../shared/data (Multi30k, DialogSum).
# Usage: scripts/experiments.sh [OUTPUT_ROOT] [STEPS]
set -euo pipefail
data="$(cd "$(dirname "$0")/../../shared/data" && pwd)"
root="${1:-outputs/experiments}"
steps="${2:-1000}"
half=$((steps / 2))

# 1. Switch vs the T5 of the same dense dims (same compute per token), same steps and batch: Multi30k en->de.
multi30k=(
  --objective seq2seq
  --train_source_file "$data/multi30k/train.en.gz" --train_target_file "$data/multi30k/train.de.gz"
  --validation_source_file "$data/multi30k/val.en.gz" --validation_target_file "$data/multi30k/val.de.gz"
  --max_source_length 48 --max_target_length 48 --tokenizer_vocab_size 8000
  --per_device_train_batch_size 32 --per_device_eval_batch_size 128 --learning_rate 1e-3 --warmup_steps 100
  --seed 0 --eval_strategy no --save_strategy no --logging_steps 50 --report_to tensorboard
  --predict_with_generate --generation_max_length 48 --metrics bleu,chrf
  --include_num_input_tokens_seen true
)
hf-switch train --preset mini "${multi30k[@]}" --max_steps "$steps" --output_dir "$root/switch"
tokenizer=(--tokenizer_name_or_path "$root/switch")
hf-switch train --preset mini --architecture t5 "${multi30k[@]}" "${tokenizer[@]}" --max_steps "$steps" \
  --output_dir "$root/t5"

# 2. Distillation of the Switch teacher into a dense T5 student (paper Table 6 in miniature).
distill=(--model_name_or_path "$root/switch" "${multi30k[@]}" --max_steps "$steps")
hf-switch distill "${distill[@]}" --expert_init none --distill_alpha 1.0 --output_dir "$root/distill-plain"
hf-switch distill "${distill[@]}" --expert_init fresh --distill_alpha 1.0 --output_dir "$root/distill-init"
hf-switch distill "${distill[@]}" --expert_init fresh --distill_alpha 0.25 --output_dir "$root/distill-init-mix"

# 3. Upcycling: the dense T5 of step 1 trained on for half as many steps again, dense vs upcycled.
hf-switch train --architecture t5 --model_name_or_path "$root/t5" "${multi30k[@]}" "${tokenizer[@]}" \
  --max_steps "$half" --output_dir "$root/t5-continued"
hf-switch train --upcycle_from "$root/t5" "${multi30k[@]}" "${tokenizer[@]}" --max_steps "$half" \
  --output_dir "$root/t5-upcycled"

# 4. Finetuning the step-1 Switch on DialogSum summarisation: LoRA (attention; attention+experts) vs full.
dialogsum=(
  --model_name_or_path "$root/switch" --objective seq2seq --train_file "$data/dialogsum/dialogsum.dev.jsonl"
  --validation_split_percentage 20 --source_column dialogue --target_column summary --source_prefix "summarize: "
  --max_source_length 192 --max_target_length 64 --per_device_train_batch_size 16 --per_device_eval_batch_size 50
  --learning_rate 1e-3 --warmup_steps 20 --max_steps "$half" --seed 0 --eval_strategy no --save_strategy no
  --logging_steps 25 --report_to tensorboard --predict_with_generate --generation_max_length 64 --metrics rouge
)
hf-switch finetune "${dialogsum[@]}" --lora_preset attention --output_dir "$root/dialogsum-lora-attention"
hf-switch finetune "${dialogsum[@]}" --lora_preset attention+experts --output_dir "$root/dialogsum-lora-experts"
hf-switch train "${dialogsum[@]}" --config_overrides expert_dropout=0.4,dropout_rate=0.1 \
  --output_dir "$root/dialogsum-full"

python "$(dirname "$0")/summarize_experiments.py" "$root"
