"""A few-minute, offline demonstration: train a small Switch model with `Seq2SeqTrainer` to reverse text.

The text is the Zen of Python, which ships with every Python (`this` module); tokens are bytes, so no tokenizer or
download is needed. The run shows the whole loop: train with a progress bar, evaluate, read the routing
statistics, generate, save, and reload through `AutoModelForSeq2SeqLM`.
"""

import codecs
import contextlib
import importlib
import io
import random
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForSeq2SeqLM, Seq2SeqTrainer, Seq2SeqTrainingArguments

from .configuration_switch import SwitchConfig
from .modeling_switch import SwitchForConditionalGeneration

PAD, EOS, BYTE_OFFSET = 0, 1, 2


def encode(text: str) -> list[int]:
    return [byte + BYTE_OFFSET for byte in text.encode("utf-8")] + [EOS]


def decode(ids) -> str:
    return bytes(i - BYTE_OFFSET for i in ids if i >= BYTE_OFFSET).decode("utf-8", errors="replace")


def reversal_examples(count: int, seed: int) -> Dataset:
    """`count` (span of the Zen of Python, the span reversed) pairs as token ids."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the poem
        zen_rot13 = importlib.import_module("this").s
    zen = " ".join(codecs.decode(zen_rot13, "rot13").split())
    rng = random.Random(seed)
    sources, targets = [], []
    for _ in range(count):
        length = rng.randint(6, 24)
        start = rng.randrange(len(zen) - length)
        span = zen[start : start + length]
        sources.append(encode(span))
        targets.append(encode(span[::-1]))
    return Dataset.from_dict({"input_ids": sources, "labels": targets})


def collate(features: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad sources with PAD and labels with -100."""
    batch = {}
    for key, pad in (("input_ids", PAD), ("labels", -100)):
        width = max(len(feature[key]) for feature in features)
        batch[key] = torch.tensor([feature[key] + [pad] * (width - len(feature[key])) for feature in features])
    batch["attention_mask"] = (batch["input_ids"] != PAD).long()
    return batch


def demo_config() -> SwitchConfig:
    return SwitchConfig(
        vocab_size=256 + BYTE_OFFSET,
        d_model=128,
        d_kv=32,
        d_ff=256,
        num_layers=4,
        num_heads=4,
        num_experts=8,
        num_sparse_encoder_layers=2,
        num_sparse_decoder_layers=2,
        dropout_rate=0.0,
        pad_token_id=PAD,
        eos_token_id=EOS,
        decoder_start_token_id=PAD,
    )


def run_demo(output_dir: str, max_steps: int, seed: int = 0) -> dict:
    """Train, evaluate, generate, save and reload; returns the figures it printed."""
    torch.manual_seed(seed)
    model = SwitchForConditionalGeneration(demo_config())
    arguments = Seq2SeqTrainingArguments(
        output_dir=output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        learning_rate=3e-3,
        lr_scheduler_type="linear",
        warmup_steps=max(1, max_steps // 20),
        logging_steps=max(1, max_steps // 10),
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Seq2SeqTrainer(
        model=model,
        args=arguments,
        train_dataset=reversal_examples(32 * max_steps, seed),
        eval_dataset=reversal_examples(256, seed + 1),
        data_collator=collate,
    )
    trainer.train()
    metrics = trainer.evaluate()

    model.eval()
    probe = collate([{"input_ids": encode("Simple is better than"), "labels": [EOS]}])
    with torch.no_grad():
        routing = model(**probe)
        generated = model.generate(probe["input_ids"], max_new_tokens=40, do_sample=False)
    model.save_pretrained(output_dir)
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(output_dir).eval()
    with torch.no_grad():
        reload_difference = (reloaded(**probe).logits - routing.logits).abs().max().item()

    figures = {
        "eval_loss": metrics["eval_loss"],
        "reversed": decode(generated[0].tolist()),
        "encoder_expert_counts": routing.encoder_expert_counts.tolist(),
        "decoder_dropped_fraction": routing.decoder_dropped_fraction.tolist(),
        "reload_max_logit_difference": reload_difference,
        "saved_to": str(Path(output_dir).resolve()),
    }
    for name, value in figures.items():
        print(f"{name}: {value}")
    return figures
