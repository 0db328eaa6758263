"""Expert parallelism with DeepSpeed-MoE: multi-process runs on CPU (gloo) checked against one process, checkpoints
across expert-parallel sizes, `accelerate launch` with the DeepSpeed plugin on one and two "nodes", and the errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_batch, run_two_nodes, tiny_config, write_swap_pairs
from safetensors.torch import load_file

from hf_switch import SwitchForConditionalGeneration
from hf_switch.training.arguments import resolve_expert_parallel_size

pytest.importorskip("deepspeed")

from hf_switch.expert_parallel import (  # noqa: E402
    check_deepspeed_config,
    deepspeed_checkpoint_state_dict,
    load_deepspeed_checkpoint,
)

ROOT = Path(__file__).parent.parent
WORKER = Path(__file__).parent / "expert_parallel_worker.py"
ENTRY = Path(__file__).parent / "deepspeed_cpu_entry.py"
# More processes than cores: one thread each, or every op waits at OpenMP barriers.
ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}


def run_ranks(ranks: int, scenario: str, directory: Path, expert_parallel_size: int, **options) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    command += [str(WORKER), scenario, str(directory), str(expert_parallel_size), json.dumps(options)]
    subprocess.run(command, check=True, env=ENVIRONMENT, timeout=300)
    return json.loads((directory / f"{scenario}.json").read_text())


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory):
    """ZeRO-2 with the Trainer-style torch optimizer, EP=2 on 2 ranks; later tests reuse its checkpoint."""
    directory = tmp_path_factory.mktemp("engine")
    return directory, run_ranks(2, "engine", directory, 2, stage=2)


@pytest.mark.slow
def test_two_ranks_give_the_logits_gradients_and_generations_of_one_process(tmp_path):
    result = run_ranks(2, "equivalence", tmp_path, 2)
    for case in ("top1_capacity", "top2_dropless_gated_checkpointed"):
        assert result[case]["max_logit_error"] < 1e-5 and result[case]["max_gradient_error"] < 1e-5, result


@pytest.mark.slow
def test_engine_trains_saves_per_expert_files_resumes_and_consolidates(engine_run):
    _, result = engine_run
    assert result["expert_files"] == 16
    assert result["losses"][-1] < result["losses"][0]
    for key in ("consolidated_folder", "consolidated_state_dict", "deepspeed_checkpoint"):
        assert result[key] < 1e-5, (key, result)


@pytest.mark.slow
def test_engine_with_deepspeed_optimizer_under_zero_1(tmp_path):
    # DeepSpeed builds the optimizer and its MoE groups itself (torch's Adam: its own JIT-compiles for minutes).
    result = run_ranks(2, "engine", tmp_path, 2, stage=1, deepspeed_optimizer=True)
    assert result["losses"][-1] < result["losses"][0]


@pytest.mark.slow
def test_four_ranks_expert_and_data_parallel_step_equals_one_process_and_loads_another_size(engine_run):
    """EP=2 x DP=2: expert gradients reduce over the expert-data-parallel group, the rest over all ranks; the
    engine also loads the EP=2-on-2-ranks checkpoint (per-expert files are independent of the size)."""
    directory, _ = engine_run
    result = run_ranks(4, "training_step", directory, 2, checkpoint=str(directory / "deepspeed"))
    assert result["max_parameter_error"] < 1e-5
    # DeepSpeed issue 7156 does not apply: the experts' float32 states are partitioned over their 2 data-parallel
    # ranks, the others over all 4.
    partitions = result["optimizer_partitions"]
    assert {group["experts"] for group in partitions} == {True, False}
    for group in partitions:
        assert group["ranks"] == (2 if group["experts"] else 4), partitions
        assert group["partition"] * group["ranks"] == group["flat"], partitions
    assert result["loaded_checkpoint_of_other_size"]


def test_consolidating_a_checkpoint_with_a_missing_expert_file_names_it(engine_run, tmp_path):
    directory, _ = engine_run
    damaged = tmp_path / "deepspeed"
    shutil.copytree(directory / "deepspeed", damaged)
    (damaged / "global_step3" / "layer_1_expert_2_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(ValueError, match=r"lack experts \[2\]"):
        deepspeed_checkpoint_state_dict(damaged)
    with pytest.raises(FileNotFoundError, match="no 'latest' file"):
        deepspeed_checkpoint_state_dict(damaged / "global_step3")


def test_convert_consolidates_a_deepspeed_checkpoint(engine_run, tmp_path):
    directory, _ = engine_run
    command = [sys.executable, "-m", "hf_switch.cli", "convert", str(directory / "deepspeed"), str(tmp_path / "out")]
    subprocess.run([*command, "--to", "hf_switch", "--config", str(directory / "reference")], check=True, timeout=120)
    written = load_file(tmp_path / "out" / "model.safetensors")
    expected = load_deepspeed_checkpoint(directory / "deepspeed", directory / "reference").state_dict()
    assert all((written[key] == expected[key]).all() for key in written)
    assert SwitchForConditionalGeneration.from_pretrained(tmp_path / "out").config.expert_parallel_size == 1


@pytest.mark.slow
def test_accelerate_deepspeed_plugin_trains_and_two_nodes_resume_it_exactly(tmp_path):
    """`accelerate launch` with the CPU DeepSpeed config runs scripts/train.py with EP=2; a run resumed from its
    checkpoint by two launcher invocations (machine ranks 0 and 1 on loopback) ends with the same weights."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    launch += [str(ROOT / "configs/accelerate/cpu_deepspeed_moe.yaml")]
    train = [str(ENTRY), str(ROOT / "scripts/train.py"), "--preset", "tiny", "--max_steps", "6", "--save_steps", "3"]
    train += ["--per_device_train_batch_size", "4", "--max_eval_samples", "16", "--report_to", "none"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    subprocess.run([*launch, *train, "--output_dir", str(whole)], check=True, env=ENVIRONMENT, timeout=300, cwd=ROOT)

    checkpoint = whole / "checkpoint-3"
    assert len(list((checkpoint / "global_step3").glob("layer_*_expert_*"))) == 8  # 2 sparse layers x 4 experts
    shutil.copytree(checkpoint, resumed / "checkpoint-3")
    resume = [*train, "--output_dir", str(resumed), "--resume_from_checkpoint", str(resumed / "checkpoint-3")]
    two_nodes = [*launch, "--num_processes", "2", "--deepspeed_multinode_launcher", "standard"]
    run_two_nodes(two_nodes, resume, tmp_path, env=ENVIRONMENT, cwd=ROOT)

    final_whole, final_resumed = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert set(final_whole) == set(final_resumed)
    assert all((final_whole[key] == final_resumed[key]).all() for key in final_whole)
    model = SwitchForConditionalGeneration.from_pretrained(whole)  # every expert, in one process
    assert model.config.expert_parallel_size == 1
    assert model.encoder.block[1].layer[-1].mlp.experts.wo.shape[0] == 4


@pytest.mark.slow
def test_zero3_without_expert_parallelism_trains_like_one_process_resumes_and_consolidates(tmp_path):
    """ZeRO-3 on 2 ranks whose tokens leave different experts empty: no hang, the losses of one process on the whole
    batch, an exact resume, and both consolidations (16-bit state dict, zero_to_fp32) with the engine's logits."""
    result = run_ranks(2, "zero3", tmp_path, 1)
    assert result["losses"] == pytest.approx(result["expected"], rel=1e-5)
    assert result["next_losses"][0] == result["next_losses"][1]
    assert max(result["consolidated_folder"], result["zero_to_fp32"]) < 1e-5


@pytest.mark.slow
def test_zero3_through_accelerate_resumes_exactly_under_the_deepspeed_launcher(tmp_path):
    """configs/deepspeed/zero3.json through accelerate's DeepSpeed plugin (the model built partitioned,
    `--zero3_init_flag true`), 4 steps with a checkpoint at step 2; the `deepspeed` launcher resumes that checkpoint
    and ends with the same weights, bit for bit; each output folder holds the gathered weights."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero3_init_flag", "true"]
    launch += ["--deepspeed_config_file", str(ROOT / "configs/deepspeed/zero3.json"), "--num_processes", "2"]
    train = [str(ROOT / "scripts/train.py"), "--preset", "tiny", "--max_steps", "4", "--save_steps", "2"]
    train += ["--per_device_train_batch_size", "4", "--max_eval_samples", "16", "--report_to", "none"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    subprocess.run([*launch, str(ENTRY), *train, "--output_dir", str(whole)], check=True, env=ENVIRONMENT, timeout=300)
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    command = [
        "deepspeed",
        "--num_gpus",
        "2",
        str(ENTRY),
        *train,
        "--deepspeed",
        str(ROOT / "configs/deepspeed/zero3.json"),
    ]
    command += ["--output_dir", str(resumed), "--resume_from_checkpoint", str(resumed / "checkpoint-2")]
    subprocess.run(command, check=True, env=ENVIRONMENT, timeout=300)
    final_whole, final_resumed = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert set(final_whole) == set(final_resumed)
    assert all((final_whole[key] == final_resumed[key]).all() for key in final_whole)
    model = SwitchForConditionalGeneration.from_pretrained(resumed)
    assert all(parameter.numel() > 0 for parameter in model.parameters())


@pytest.mark.slow
def test_deepspeed_launcher_trains_with_deepspeeds_optimizer_section(tmp_path):
    """The `deepspeed` launcher and `--deepspeed` (not accelerate's plugin), with the config whose optimizer DeepSpeed
    builds (its torch Adam here: its own compiles for a minute on a CPU)."""
    config = json.loads((ROOT / "configs/deepspeed/zero2_moe_deepspeed_adamw.json").read_text())
    config["optimizer"]["params"]["torch_adam"] = True
    (tmp_path / "deepspeed.json").write_text(json.dumps(config))
    command = ["deepspeed", "--num_gpus", "2", str(ENTRY), str(ROOT / "scripts/train.py")]
    command += ["--deepspeed", str(tmp_path / "deepspeed.json"), "--preset", "tiny", "--max_steps", "4"]
    command += ["--per_device_train_batch_size", "4", "--max_eval_samples", "16", "--report_to", "none"]
    subprocess.run([*command, "--output_dir", str(tmp_path / "run")], check=True, env=ENVIRONMENT, timeout=300)
    metrics = json.loads((tmp_path / "run" / "all_results.json").read_text())
    assert metrics["train_loss"] > 0 and metrics["eval_loss"] > 0
    assert SwitchForConditionalGeneration.from_pretrained(tmp_path / "run").config.expert_parallel_size == 1


def test_expert_parallelism_without_a_process_group_is_refused():
    with pytest.raises(RuntimeError, match="expert_parallel_size=2 needs an initialised process group"):
        SwitchForConditionalGeneration(tiny_config(expert_parallel_size=2))


def test_expert_parallel_size_must_divide_num_experts():
    # the config refuses it (a strict dataclass error wrapping a ValueError); a loading kwarg, which transformers sets
    # after validation, is refused when the layer is built (tests/expert_parallel_worker.py, equivalence)
    with pytest.raises(Exception, match="expert_parallel_size=3 is invalid.*divisor of num_experts=4"):
        tiny_config(num_experts=4, expert_parallel_size=3)


def test_zero_3_and_missing_deepspeed_are_refused_with_what_to_use():
    with pytest.raises(ValueError, match="do not support ZeRO-3.*zero2_moe.json"):
        check_deepspeed_config({"zero_optimization": {"stage": 3}})
    with pytest.raises(ValueError, match="trains under DeepSpeed only"):
        check_deepspeed_config(None)
    check_deepspeed_config({"zero_optimization": {"stage": 2}})


def test_expert_parallel_size_from_flag_or_deepspeed_config():
    section = {"moe": {"expert_parallel_size": 2}}
    assert resolve_expert_parallel_size(None, section) == 2
    assert resolve_expert_parallel_size(4, {"zero_optimization": {"stage": 2}}) == 4
    assert resolve_expert_parallel_size(None, None) is None
    with pytest.raises(ValueError, match="contradicts"):
        resolve_expert_parallel_size(4, section)
    with pytest.raises(ValueError, match=r"unknown keys \['ep_size'\]"):
        resolve_expert_parallel_size(None, {"moe": {"ep_size": 2}})
    with pytest.raises(ValueError, match="must be a positive integer"):
        resolve_expert_parallel_size(0, None)


@pytest.mark.slow
def test_lora_on_an_expert_parallel_model_trains_resumes_and_saves_every_experts_adapter(tmp_path):
    result = run_ranks(2, "lora", tmp_path, 2)
    assert result["losses"][-1] < result["losses"][0]
    assert result["expert_parallel_reload"] < 1e-5 and result["one_process_reload"] < 1e-5, result


@pytest.mark.slow
def test_lora_finetuning_under_expert_parallelism_resumes_exactly_and_saves_every_experts_adapter(tmp_path):
    """`hf-switch finetune` (scripts/finetune_lora.py) on 2 ranks, 2 experts each, under the `deepspeed` launcher:
    4 steps with a checkpoint at step 2; resuming that checkpoint ends with the same adapter, bit for bit; the
    adapter holds all 4 experts' factors and, merged onto the base in one process, equals the `--merge`d folder."""
    from hf_switch.lora import load_adapter
    from hf_switch.training import main as train

    pairs = write_swap_pairs(tmp_path / "pairs.jsonl")
    common = ["--preset", "tiny", "--report_to", "none", "--eval_strategy", "no", "--objective", "seq2seq"]
    common += ["--train_file", str(pairs), "--per_device_train_batch_size", "4"]
    train([*common, "--max_steps", "1", "--output_dir", str(tmp_path / "base"), "--tokenizer_vocab_size", "120"])
    launch = ["deepspeed", "--num_gpus", "2", str(ENTRY), str(ROOT / "scripts/finetune_lora.py"), *common]
    launch += ["--deepspeed", str(ROOT / "configs/deepspeed/zero2_moe.json"), "--expert_parallel_size", "2"]
    launch += ["--model_name_or_path", str(tmp_path / "base"), "--max_steps", "4", "--save_steps", "2"]
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    subprocess.run([*launch, "--merge", "--output_dir", str(whole)], check=True, env=ENVIRONMENT, timeout=300)
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    command = [*launch, "--output_dir", str(resumed), "--resume_from_checkpoint", str(resumed / "checkpoint-2")]
    subprocess.run(command, check=True, env=ENVIRONMENT, timeout=300)

    adapter = load_file(whole / "adapter_model.safetensors")
    resumed_adapter = load_file(resumed / "adapter_model.safetensors")
    assert adapter.keys() == resumed_adapter.keys()
    assert all(torch.equal(tensor, resumed_adapter[key]) for key, tensor in adapter.items())
    expert_factors = {key: tensor.shape[0] for key, tensor in adapter.items() if ".experts.lora_" in key}
    assert expert_factors and set(expert_factors.values()) == {4}, expert_factors
    merged = load_adapter(SwitchForConditionalGeneration.from_pretrained(tmp_path / "base"), whole).merge_and_unload()
    batch = random_batch(batch=4, seed=3)
    with torch.no_grad():
        expected = SwitchForConditionalGeneration.from_pretrained(whole / "merged").eval()(**batch).logits
        torch.testing.assert_close(merged.eval()(**batch).logits, expected, rtol=0, atol=1e-5)
