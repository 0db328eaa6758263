"""FSDP2 on CPU ranks: a Switch model sharded one unit per block trains like one process on the whole batch, with
ranks routing to different experts, resumes from a distributed checkpoint, and saves one ordinary folder; on one node
and on two (loopback)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import one_process_losses, random_batch, run_two_nodes, tiny_model, write_swap_pairs
from safetensors.torch import load_file
from transformers import AutoModelForSeq2SeqLM, T5ForConditionalGeneration

from hf_switch import SwitchForConditionalGeneration
from hf_switch.routing import SwitchRouter

ROOT = Path(__file__).parent.parent
WORKER = Path(__file__).parent / "fsdp_worker.py"
ENTRY = Path(__file__).parent / "fsdp_cpu_entry.py"
ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# Dropless over 8 experts with a global-batch aux loss and the expert bias: every router statistic crosses ranks.
CONFIG = dict(
    num_experts=8,
    capacity_factor=None,
    load_balancing_scope="global_batch",
    router_expert_bias=True,
    router_bias_update_rate=0.05,
)
LEARNING_RATE = 1e-2


def global_batches() -> list[dict]:
    """Three global batches of 2 rows (one per rank), 5 source tokens each: too few for 8 experts."""
    return [random_batch(batch=2, source=5, target=4, seed=seed) for seed in (3, 4, 5)]


def check_run(folder: Path) -> None:
    """The worker's run in `folder` trained like one process on the whole batches, with ranks routing differently,
    resumed to the same loss, and saved one folder with the trained model's logits."""
    run = json.loads((folder / "run.json").read_text())
    model = tiny_model(0, **CONFIG).train()
    losses = one_process_losses(model, global_batches(), LEARNING_RATE)
    torch.testing.assert_close(run["losses"], losses, rtol=1e-5, atol=0)
    assert run["resumed_loss"] == pytest.approx(run["losses"][2], rel=1e-6)
    biases = [module.expert_bias.tolist() for module in model.modules() if isinstance(module, SwitchRouter)]
    torch.testing.assert_close(run["expert_bias"], biases, rtol=0, atol=1e-6)
    assert any(0 in counts for rank in run["tokens_per_expert"] for counts in rank), "some rank leaves an expert empty"
    assert run["tokens_per_expert"][0] != run["tokens_per_expert"][1]

    saved = SwitchForConditionalGeneration.from_pretrained(folder / "model").eval()
    batch = random_batch()
    with torch.no_grad():
        torch.testing.assert_close(saved(**batch).logits, model.eval()(**batch).logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_fsdp2_trains_like_one_process_resumes_and_saves_one_folder(tmp_path):
    subprocess.run([*TORCHRUN, str(WORKER), str(tmp_path)], check=True, env=ENVIRONMENT, timeout=300)
    check_run(tmp_path)


@pytest.mark.slow
def test_fsdp2_on_two_nodes_launched_with_the_fsdp2_accelerate_config(tmp_path):
    """Two `accelerate launch` invocations with configs/accelerate/fsdp2.yaml, machine ranks 0 and 1 on loopback,
    one CPU rank each: the same training, resume and save as on one node. The worker shards with `shard_model`
    (accelerate builds FSDP on accelerator devices only); the launcher's rendezvous and FSDP2's gathers, reductions and
    distributed checkpoint cross the nodes."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    launch += [str(ROOT / "configs/accelerate/fsdp2.yaml"), "--num_processes", "2", "--mixed_precision", "no"]
    run_two_nodes(launch, [str(WORKER), str(tmp_path)], tmp_path, env=ENVIRONMENT, cwd=ROOT)
    check_run(tmp_path)


TRAIN = [str(ROOT / "scripts/train.py"), "--preset", "tiny", "--max_steps", "4", "--save_steps", "2", "--seed", "5"]
TRAIN += ["--logging_steps", "1", "--max_eval_samples", "16", "--report_to", "none", "--disable_tqdm", "true"]
# Global-batch balancing: every router statistic of the two ranks is the one process's.
TRAIN += ["--config_overrides", "dropout_rate=0,router_jitter_noise=0,load_balancing_scope=global_batch"]
FSDP2_CONFIG = dict(version=2, transformer_layer_cls_to_wrap=["SwitchBlock"], reshard_after_forward=True)
TRAINER_FSDP2 = ["--fsdp", "--fsdp_config", json.dumps({**FSDP2_CONFIG, "state_dict_type": "FULL_STATE_DICT"})]
# The shipped config, as is but for its 8 GPUs.
ACCELERATE_FSDP2 = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
ACCELERATE_FSDP2 += [str(ROOT / "configs/accelerate/fsdp2.yaml"), "--num_processes", "2"]


def run_trainer_fsdp2(launcher: list[str], output_dir: Path, *options: str, script: list[str] = TRAIN) -> dict:
    """`script` (a training script and its options) started by `launcher` on 2 CPU ranks, through the Trainer's
    FSDP2 path, the one process's 4 rows per step split over them; returns the run's trainer state."""
    command = [*launcher, str(ENTRY), *script, "--per_device_train_batch_size", "2", "--output_dir", str(output_dir)]
    command += options
    subprocess.run(command, check=True, env={**ENVIRONMENT, "ACCELERATE_USE_CPU": "true"}, timeout=300)
    return json.loads((output_dir / "trainer_state.json").read_text())


def run_one_process(output_dir: Path, script: list[str] = TRAIN) -> dict:
    """`script` in one process on the 4 rows per step the FSDP2 runs split; returns the run's trainer state."""
    command = [sys.executable, *script, "--per_device_train_batch_size", "4", "--output_dir", str(output_dir)]
    subprocess.run(command, check=True, env=ENVIRONMENT, timeout=300)
    return json.loads((output_dir / "trainer_state.json").read_text())


def train_swap_base(tmp_path: Path, name: str, *options: str) -> tuple[list[str], Path]:
    """The options every run on the word-swap pairs shares, and a Switch model trained one step on them (`name`)."""
    from hf_switch.training import main as train

    pairs = write_swap_pairs(tmp_path / "pairs.jsonl")
    common = ["--preset", "tiny", "--report_to", "none", "--eval_strategy", "no", "--objective", "seq2seq"]
    common += ["--train_file", str(pairs)]
    base = tmp_path / name
    train([*common, *options, "--max_steps", "1", "--per_device_train_batch_size", "4", "--output_dir", str(base)])
    return common, base


def _losses_and_evaluation(state: dict) -> tuple[list[float], list[float]]:
    """Each step's training loss, and the first evaluation's cross-entropy and router losses (none if no
    evaluation ran)."""
    history = state["log_history"]
    evaluation = next((entry for entry in history if "eval_loss" in entry), {})
    losses = [entry["loss"] for entry in history if "loss" in entry]
    return losses, [evaluation[key] for key in ("eval_loss", "eval_router_loss") if key in evaluation]


@pytest.mark.slow
def test_trainer_fsdp2_trains_like_one_process_resumes_and_saves_one_folder(tmp_path):
    """The Trainer's FSDP2 path (accelerate's `fsdp2_prepare_model`, FSDP checkpoints, resume, the gathered save) on
    2 CPU ranks (tests/fsdp_cpu_entry.py lets accelerate build FSDP there), with the Trainer's flags under torchrun:
    the losses, evaluation cross-entropy and router losses of one process on the same global batch. Resumed from
    its checkpoint under `accelerate launch` with configs/accelerate/fsdp2.yaml, it ends with the same weights; with
    that config's bfloat16 mixed precision it trains (the router still in float32) and tracks the float32 run."""
    one = tmp_path / "one"
    expected = _losses_and_evaluation(run_one_process(one))
    sharded = run_trainer_fsdp2(TORCHRUN, tmp_path / "fsdp2", *TRAINER_FSDP2)
    for measured, reference in zip(_losses_and_evaluation(sharded), expected, strict=True):
        assert measured == pytest.approx(reference, rel=1e-5)

    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "fsdp2" / "checkpoint-2", resumed / "checkpoint-2")
    resume = ["--resume_from_checkpoint", str(resumed / "checkpoint-2")]
    run_trainer_fsdp2([*ACCELERATE_FSDP2, "--mixed_precision", "no"], resumed, *resume)
    whole, again = load_file(tmp_path / "fsdp2" / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert set(whole) == set(again) and all(torch.equal(whole[key], again[key]) for key in whole)

    saved = SwitchForConditionalGeneration.from_pretrained(tmp_path / "fsdp2").eval()
    reference = SwitchForConditionalGeneration.from_pretrained(one).eval()
    batch = random_batch(seed=7)
    with torch.no_grad():
        torch.testing.assert_close(saved(**batch).logits, reference(**batch).logits, rtol=0, atol=1e-5)

    bfloat16_losses, _ = _losses_and_evaluation(run_trainer_fsdp2(ACCELERATE_FSDP2, tmp_path / "bf16"))
    assert bfloat16_losses == pytest.approx(expected[0], rel=1e-2)


@pytest.mark.slow
def test_lora_finetuning_under_fsdp2_trains_like_one_process_resumes_exactly_and_merges(tmp_path):
    """`hf-switch finetune` (scripts/finetune_lora.py, attention and expert adapters) through the Trainer's FSDP2
    path on 2 CPU ranks: the losses of one process on the same global batch; resumed from its step-2 checkpoint it
    ends with the same adapter, bit for bit; the `--merge`d folder equals the adapter merged onto the base in one
    process."""
    from hf_switch.lora import load_adapter

    common, base = train_swap_base(tmp_path, "base")
    finetune = [str(ROOT / "scripts/finetune_lora.py"), *common, "--model_name_or_path", str(base), "--seed", "3"]
    finetune += ["--max_steps", "4", "--save_steps", "2", "--logging_steps", "1", "--config_overrides"]
    finetune += ["expert_dropout=0,dropout_rate=0,router_jitter_noise=0,load_balancing_scope=global_batch"]
    expected = run_one_process(tmp_path / "one", script=finetune)
    whole = tmp_path / "whole"
    sharded = run_trainer_fsdp2(TORCHRUN, whole, *TRAINER_FSDP2, "--merge", script=finetune)
    assert _losses_and_evaluation(sharded)[0] == pytest.approx(_losses_and_evaluation(expected)[0], rel=1e-5)

    resumed = tmp_path / "resumed"
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    resume = ["--resume_from_checkpoint", str(resumed / "checkpoint-2")]
    run_trainer_fsdp2(TORCHRUN, resumed, *TRAINER_FSDP2, *resume, script=finetune)
    adapter, again = load_file(whole / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert any(".experts.lora_" in key for key in adapter)
    assert adapter.keys() == again.keys() and all(torch.equal(adapter[key], again[key]) for key in adapter)

    merged = load_adapter(SwitchForConditionalGeneration.from_pretrained(base), whole).merge_and_unload().eval()
    batch = random_batch(batch=4, seed=3)
    with torch.no_grad():
        expected_logits = SwitchForConditionalGeneration.from_pretrained(whole / "merged").eval()(**batch).logits
        torch.testing.assert_close(merged(**batch).logits, expected_logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_distillation_under_fsdp2_trains_the_t5_student_like_one_process(tmp_path):
    """`hf-switch distill` through the Trainer's FSDP2 path on 2 CPU ranks, the dense T5 student sharded one unit per
    `T5Block` (its shared embedding tied into both stacks, as a Switch model's): the losses of one process on the
    same global batch, and a student folder that loads as a T5 model."""
    # No dropout, which the student takes from the teacher: each rank would draw its own.
    common, teacher = train_swap_base(tmp_path, "teacher", "--config_overrides", "dropout_rate=0,router_jitter_noise=0")
    distill = [str(ROOT / "scripts/distill.py"), *common, "--model_name_or_path", str(teacher), "--seed", "3"]
    distill += ["--max_steps", "3", "--logging_steps", "1"]
    expected = run_one_process(tmp_path / "one", script=distill)
    student_fsdp2 = [
        "--fsdp",
        "--fsdp_config",
        json.dumps({**FSDP2_CONFIG, "transformer_layer_cls_to_wrap": ["T5Block"]}),
    ]
    sharded = run_trainer_fsdp2(TORCHRUN, tmp_path / "fsdp2", *student_fsdp2, script=distill)
    assert _losses_and_evaluation(sharded)[0] == pytest.approx(_losses_and_evaluation(expected)[0], rel=1e-5)
    assert isinstance(AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "fsdp2"), T5ForConditionalGeneration)


@pytest.mark.slow
def test_fsdp_flags_on_cpu_ranks_are_refused_rather_than_trained_as_ddp(tmp_path):
    command = [*TORCHRUN, str(ROOT / "scripts/train.py"), "--preset", "tiny", "--max_steps", "1", "--report_to", "none"]
    command += ["--fsdp", "--output_dir", str(tmp_path / "run")]
    result = subprocess.run(command, env=ENVIRONMENT, timeout=300, capture_output=True, text=True)
    assert result.returncode != 0
    assert "--fsdp True: accelerate builds FSDP on accelerator devices only, and this run is MULTI_CPU" in result.stderr
    assert not (tmp_path / "run" / "model.safetensors").exists()
