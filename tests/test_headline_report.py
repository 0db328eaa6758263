"""scripts/headline.py's report reads the validation cross-entropy: for runs logged before `SwitchTrainer` reported
it, the weighted router losses of the training log (TensorBoard) are subtracted at each evaluation's step."""

import importlib.util
import json
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

SCRIPT = Path(__file__).parent.parent / "scripts" / "headline.py"


@pytest.fixture(scope="module")
def headline():
    spec = importlib.util.spec_from_file_location("headline_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(folder: Path, evals: list[dict], routing: dict[int, tuple[float, float]], sessions: int = 1) -> Path:
    """A run folder: config.json, trainer_state.json with `evals`, and TensorBoard logs of per-layer aux and z losses
    (`routing[step] = (aux, z)` for each of two layers), split over `sessions` as a resumed run's are."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"router_aux_loss_coef": 0.01, "router_z_loss_coef": 0.001}))
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": evals}))
    steps = sorted(routing)
    for session in range(sessions):
        writer = SummaryWriter(folder / "runs" / f"session{session}")
        for step in steps[session * len(steps) // sessions :]:  # a resumed session logs its steps again
            for layer in ("encoder.1", "decoder.1"):
                writer.add_scalar(f"train/routing/{layer}/aux_loss", routing[step][0], step)
                writer.add_scalar(f"train/routing/{layer}/z_loss", routing[step][1], step)
        writer.close()
    return folder


def test_router_losses_of_the_training_log_are_subtracted_from_old_eval_losses(headline, tmp_path):
    routing = {250: (1.5, 4.0), 500: (1.0, 2.0)}
    evals = [{"step": 250, "eval_loss": 6.0}, {"step": 500, "eval_loss": 5.0}]
    run = _run(tmp_path / "switch-8-seed0", evals, routing, sessions=2)
    summary = headline.summarize(run)
    # two layers x (0.01 aux + 0.001 z)
    assert summary["eval_router_loss"] == pytest.approx([2 * (0.015 + 0.004), 2 * (0.01 + 0.002)])
    assert summary["eval_loss"] == pytest.approx([6.0 - 0.038, 5.0 - 0.024])


def test_eval_losses_logged_as_cross_entropy_are_kept(headline, tmp_path):
    evals = [{"step": 250, "eval_loss": 6.0, "eval_router_loss": 0.04}, {"step": 500, "eval_loss": 5.0}]
    run = _run(tmp_path / "switch-8-seed0", evals, {250: (1.5, 4.0), 500: (1.0, 2.0)})
    summary = headline.summarize(run)  # a run resumed across the change: each evaluation as it was logged
    assert summary["eval_loss"] == pytest.approx([6.0, 5.0 - 0.024])


def test_a_dense_run_is_read_as_logged_and_a_missing_router_log_is_an_error(headline, tmp_path):
    dense = tmp_path / "t5-seed0"
    dense.mkdir()
    (dense / "config.json").write_text(json.dumps({"model_type": "t5"}))
    (dense / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 250, "eval_loss": 6.0}]}))
    assert headline.summarize(dense)["eval_loss"] == [6.0]
    evals = [{"step": 250, "eval_loss": 6.0}, {"step": 300, "eval_loss": 5.9}]
    switch = _run(tmp_path / "switch-8-seed0", evals, {250: (1.5, 4.0)})
    with pytest.raises(ValueError, match=r"no router losses logged at evaluation steps \[300\]"):
        headline.summarize(switch)
