import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from transformers import (
    SwitchTransformersConfig,
    SwitchTransformersForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
)

from hf_switch import SwitchConfig, SwitchForConditionalGeneration
from hf_switch.routing import end_balancing_step

# The suite runs on CPU; HF_SWITCH_TEST_DEVICE=cuda runs it unchanged with every model and tensor on an accelerator
# (benchmarks/gpu.sh).
if os.environ.get("HF_SWITCH_TEST_DEVICE"):
    torch.set_default_device(os.environ["HF_SWITCH_TEST_DEVICE"])

VOCAB = 64
# The dimensions of every tiny model: hf_switch's, transformers' Switch and T5.
TINY_DIMENSIONS = dict(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2, dropout_rate=0.0)


def tiny_config(**overrides) -> SwitchConfig:
    """A 2+2-layer model with one sparse layer per stack, no dropout and no jitter."""
    fields = dict(
        **TINY_DIMENSIONS,
        num_experts=4,
        num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1,
        router_jitter_noise=0.0,
    )
    fields.update(overrides)
    return SwitchConfig(**fields)


def tiny_model(seed=0, **overrides) -> SwitchForConditionalGeneration:
    torch.manual_seed(seed)
    return SwitchForConditionalGeneration(tiny_config(**overrides)).eval()


def reference_model(seed=0, **overrides) -> SwitchTransformersForConditionalGeneration:
    """transformers' own Switch model with the tiny dimensions."""
    fields = dict(
        **TINY_DIMENSIONS,
        num_decoder_layers=2,
        num_experts=4,
        num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1,
        router_jitter_noise=0.0,
        decoder_start_token_id=0,
    )
    fields.update(overrides)
    torch.manual_seed(seed)
    return SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(**fields)).eval()


def tiny_t5(seed=0, **overrides) -> T5ForConditionalGeneration:
    """transformers' T5 with the tiny dimensions (2+2 layers, relu unless overridden)."""
    fields = dict(**TINY_DIMENSIONS, decoder_start_token_id=0)
    fields.update(overrides)
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(**fields)).eval()


def random_batch(batch=3, source=11, target=9, seed=1, pad_last=0):
    """Token ids avoiding pad (0) and eos (1); the last `pad_last` source positions of row 0 are padding."""
    generator = torch.Generator(device=torch.get_default_device()).manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (batch, source), generator=generator)
    labels = torch.randint(2, VOCAB, (batch, target), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    if pad_last:
        input_ids[0, -pad_last:] = 0
        attention_mask[0, -pad_last:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def accumulating_trainer(model, output_dir, callbacks=(), **arguments):
    """A `SwitchTrainer` of two optimizer steps, each of two micro-batches of 2 sequences (6 source, 5 target
    tokens), on 8 random rows."""
    from transformers import Seq2SeqTrainingArguments

    from hf_switch.training import SwitchTrainer

    batch = random_batch(batch=8, source=6, target=5)
    rows = [{name: tensor[row] for name, tensor in batch.items() if name != "attention_mask"} for row in range(8)]
    settings = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2, report_to=[])
    settings.update(use_cpu=True, save_strategy="no", disable_tqdm=True, **arguments)
    training_arguments = Seq2SeqTrainingArguments(output_dir, **settings)
    return SwitchTrainer(model=model, args=training_arguments, train_dataset=rows, callbacks=list(callbacks))


@pytest.fixture
def batch():
    return random_batch()


def one_process_losses(model, batches, learning_rate: float) -> list[float]:
    """The losses of AdamW steps of `model` on `batches` in one process, each step closing the balancing step: the
    reference that multi-process runs on split batches are compared with."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        end_balancing_step(model)
        losses.append(loss.item())
    return losses


SWAP_WORDS = "red green blue small large cat dog house".split()


def write_swap_pairs(path: Path, words=SWAP_WORDS) -> Path:
    """A JSON-lines file of every pair "a b" -> "b a" of `words`: a seq2seq task tiny models learn in a few steps."""
    path.write_text("\n".join(json.dumps({"source": f"{a} {b}", "target": f"{b} {a}"}) for a in words for b in words))
    return path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_all(processes: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Return codes once every process ended; the first failure or the timeout stops the rest (`None`): a node
    whose peer failed waits for it, in a collective or in torchrun's exit barrier (5 minutes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(process.poll() is None for process in processes):
        if any(process.poll() not in (None, 0) for process in processes):
            break
        time.sleep(0.5)
    return_codes = [process.poll() for process in processes]
    for process, return_code in zip(processes, return_codes, strict=True):
        if return_code is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return return_codes


def run_two_nodes(launch: list[str], script: list[str], log_folder: Path, **popen_options) -> None:
    """Run `accelerate launch` (`launch`: the command up to its own options) as machine ranks 0 and 1 of a
    two-"node" job on loopback, each starting `script`; fail with both nodes' logs unless both succeed."""
    nodes_options = ["--num_machines", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port())]
    logs = [log_folder / f"node{rank}.log" for rank in (0, 1)]
    nodes = []
    for rank, log in enumerate(logs):
        with log.open("w") as output:  # the child keeps its own descriptor
            command = [*launch, *nodes_options, "--machine_rank", str(rank), *script]
            # A process group per node, so that a stopped node takes its workers along.
            nodes.append(
                subprocess.Popen(
                    command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True, **popen_options
                )
            )
    # Longer than torchrun's exit barrier (300 s): when the agents race on its store (pytorch#69520) one node waits
    # it out, then both succeed. A failed node still stops the test at once.
    return_codes = _wait_for_all(nodes, timeout=420)
    outputs = (
        f"--- node {rank}, return code {code}:\n{log.read_text()[-5000:]}"
        for rank, (code, log) in enumerate(zip(return_codes, logs, strict=True))
    )
    assert return_codes == [0, 0], "\n".join(outputs)
