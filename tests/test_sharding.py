"""FSDP2 on CPU ranks: a Switch model sharded one unit per block trains like one process on the whole batch, with
ranks routing to different experts, resumes from a distributed checkpoint, and saves one ordinary folder; on one node
and on two (loopback)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import one_process_losses, random_batch, run_two_nodes, tiny_model

from hf_switch import SwitchForConditionalGeneration
from hf_switch.routing import SwitchRouter

ROOT = Path(__file__).parent.parent
WORKER = Path(__file__).parent / "fsdp_worker.py"
ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1"}
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
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER)]
    subprocess.run([*command, str(tmp_path)], check=True, env=ENVIRONMENT, timeout=300)
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


@pytest.mark.slow
def test_fsdp_flags_on_cpu_ranks_are_refused_rather_than_trained_as_ddp(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(ROOT / "scripts/train.py"), "--preset", "tiny", "--max_steps", "1", "--report_to", "none"]
    command += ["--fsdp", "--output_dir", str(tmp_path / "run")]
    result = subprocess.run(command, env=ENVIRONMENT, timeout=300, capture_output=True, text=True)
    assert result.returncode != 0
    assert "--fsdp True: accelerate builds FSDP on accelerator devices only, and this run is MULTI_CPU" in result.stderr
    assert not (tmp_path / "run" / "model.safetensors").exists()
