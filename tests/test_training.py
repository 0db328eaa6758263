"""`hf-switch train` end to end on tiny models and tiny data (CPU, offline)."""

import gzip
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SWAP_WORDS, write_swap_pairs
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

import hf_switch
from hf_switch.training import main
from hf_switch.training.data import embedded_corpus, sentinel_ids, train_tokenizer
from hf_switch.training.train import FROM_SCRATCH_DEFAULTS, parse_arguments

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
TINY = ["--preset", "tiny", "--report_to", "none", "--per_device_train_batch_size", "4", "--logging_steps", "1"]
# Two DDP processes on CPU (gloo); one thread each, as more processes than cores need.
DDP_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
DDP_LAUNCH += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
DDP_ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "false"}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("\n".join(embedded_corpus()[:300]))
    return path


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    words = [*SWAP_WORDS, "tree", "river"]
    return write_swap_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl", words)


def _arguments(output_dir, *extra):
    return [*TINY, "--output_dir", str(output_dir), "--tokenizer_vocab_size", "300", *extra]


def test_span_corruption_run_saves_a_loadable_model_dashboards_and_plots(tmp_path, text_file, capsys):
    output = tmp_path / "run"
    metrics = main(
        _arguments(output, "--train_file", str(text_file), "--max_steps", "4", "--max_source_length", "32")
        + ["--report_to", "tensorboard", "--eval_strategy", "steps", "--eval_steps", "2"]
    )
    assert metrics["eval_loss"] > 0 and "train_seconds" not in metrics  # the clock stays out of the metrics
    model = AutoModelForSeq2SeqLM.from_pretrained(output)
    assert isinstance(model, hf_switch.SwitchForConditionalGeneration)
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert len(sentinel_ids(tokenizer)) == 100
    history = json.loads((output / "routing_stats.json").read_text())["history"]
    assert [entry["step"] for entry in history] == [1, 2, 3, 4]
    layer = history[0]["layers"]["encoder.1"]
    assert sum(layer["expert_counts"]) > 0 and layer["load_max_over_mean"] >= 1
    assert (output / "loss_curves.png").stat().st_size > 0 and (output / "expert_load.png").stat().st_size > 0
    logged = json.loads((output / "trainer_state.json").read_text())["log_history"]
    assert any("eval_loss" in entry for entry in logged)
    events = list((output / "runs").rglob("events.out.tfevents*"))
    assert events and any(b"routing/encoder.1/dropped_fraction" in path.read_bytes() for path in events)
    # The console gets one routing entry per log, and the run ends with where things are and how to load them.
    printed = capsys.readouterr().out
    assert "routing/" not in printed and "'routing': 'dropped 0.0% (" in printed
    summary = printed[printed.index("hf-switch train: done, 4 steps") :]
    assert f"saved to:      {output}" in summary and f"{output / 'expert_load.png'}" in summary
    assert f'model = AutoModelForSeq2SeqLM.from_pretrained("{output}")' in summary
    assert f"hf-switch publish {output} --repo-id ORG/NAME" in summary


def test_seq2seq_run_with_generation_metrics_from_a_yaml_file(tmp_path, pairs_file):
    config = tmp_path / "train.yaml"
    config.write_text(
        "\n".join(
            [
                "preset: tiny",
                "objective: seq2seq",
                f"train_file: {pairs_file}",
                "source_prefix: 'swap: '",
                f"output_dir: {tmp_path / 'run'}",
                "max_steps: 3",
                "per_device_train_batch_size: 8",
                "predict_with_generate: true",
                "generation_max_length: 8",
                "tokenizer_vocab_size: 60",
                "report_to: none",
            ]
        )
    )
    metrics = main([str(config)])
    assert {"eval_bleu", "eval_chrf", "eval_rouge1", "eval_loss"} <= set(metrics)
    # The saved folder generates with the run's length on its own (transformers' default would stop at 20 tokens).
    assert GenerationConfig.from_pretrained(tmp_path / "run").max_length == 8
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "run")
    generated = model.generate(
        **AutoTokenizer.from_pretrained(tmp_path / "run")(["swap: red cat"], return_tensors="pt")
    )
    assert generated.shape[1] <= 8


def test_resume_from_checkpoint_reproduces_the_uninterrupted_losses(tmp_path, text_file):
    common = ["--train_file", str(text_file), "--max_source_length", "24", "--max_steps", "6", "--seed", "3"]
    common += ["--save_steps", "3", "--eval_strategy", "no", "--tokenizer_name_or_path"]
    tokenizer_dir = tmp_path / "tokenizer"
    train_tokenizer(embedded_corpus()[:300], 300).save_pretrained(tokenizer_dir)
    common.append(str(tokenizer_dir))
    main(_arguments(tmp_path / "straight", *common))
    # A run interrupted after its step-3 checkpoint, resumed elsewhere.
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    main(_arguments(tmp_path / "resumed", *common, "--resume_from_checkpoint", str(checkpoint)))

    def losses(folder):
        history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
        return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}

    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert len(straight) == 6
    assert {step: loss for step, loss in resumed.items() if step > 3} == {
        step: loss for step, loss in straight.items() if step > 3
    }
    # The training clock continues from the checkpoint's last logged value instead of restarting at zero.
    clock = {
        entry["step"]: entry["train_seconds"]
        for entry in json.loads((tmp_path / "resumed" / "trainer_state.json").read_text())["log_history"]
        if "loss" in entry
    }
    assert list(clock) == [1, 2, 3, 4, 5, 6]
    seconds = list(clock.values())
    assert all(earlier < later for earlier, later in zip(seconds, seconds[1:], strict=False))
    # The routing history continues from the checkpoint's too.
    routing = [json.loads((tmp_path / run / "routing_stats.json").read_text()) for run in ("straight", "resumed")]
    assert [entry["step"] for entry in routing[1]["history"]] == [1, 2, 3, 4, 5, 6]
    assert routing[1] == routing[0]


@pytest.mark.parametrize(
    ("model_flags", "from_scratch"),
    [([], True), (["--model_name_or_path", "some/model"], False), (["--upcycle_from", "some/t5"], False)],
)
def test_from_scratch_defaults_apply_to_presets_only_and_flags_override_them(text_file, model_flags, from_scratch):
    data = ["--train_file", str(text_file), "--output_dir", "unused"]
    training_args = parse_arguments([*data, *model_flags])[2]
    expected = FROM_SCRATCH_DEFAULTS if from_scratch else {"learning_rate": 5e-5, "per_device_train_batch_size": 8}
    for field, value in expected.items():
        assert getattr(training_args, field) == value, field
    assert parse_arguments([*data, *model_flags, "--learning_rate", "3e-4"])[2].learning_rate == 3e-4


@pytest.mark.parametrize(
    ("extra", "error", "message"),
    [
        (["--train_file", "missing.txt"], FileNotFoundError, "--train_file: no file at 'missing.txt'"),
        (["--objective", "seq2seq"], ValueError, "no column 'source'"),
        (["--train_source_file", "a.txt"], ValueError, "must be given together"),
        (["--preset", "huge"], ValueError, "--preset='huge'"),
        (["--config_overrides", "experts=3"], ValueError, "'experts' is not a SwitchConfig field; did you mean"),
        (["--config_overrides", "num_experts"], ValueError, "'num_experts' is not 'field=value'"),
        (["--config_overrides", "num_experts=0"], Exception, "num_experts"),
    ],
)
def test_bad_arguments_name_what_is_wrong(tmp_path, text_file, extra, error, message):
    arguments = _arguments(tmp_path, "--max_steps", "1", "--train_file", str(text_file), *extra)
    with pytest.raises(error, match=message):
        main(arguments)


def test_empty_data_is_refused(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        main(_arguments(tmp_path / "run", "--max_steps", "1", "--train_file", str(empty)))


def test_a_tokenizer_without_sentinels_is_refused_for_span_corruption(tmp_path, text_file):
    backend = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, "the": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    plain.save_pretrained(tmp_path / "plain")
    arguments = [
        "--max_steps",
        "1",
        "--train_file",
        str(text_file),
        "--tokenizer_name_or_path",
        str(tmp_path / "plain"),
    ]
    with pytest.raises(ValueError, match="has no sentinel tokens"):
        main(_arguments(tmp_path / "run", *arguments))


@pytest.mark.slow
def test_two_processes_report_the_loss_of_one_process_with_the_same_global_batch(tmp_path, text_file):
    tokenizer_dir = tmp_path / "tokenizer"
    train_tokenizer(embedded_corpus()[:300], 300).save_pretrained(tokenizer_dir)
    common = ["--train_file", str(text_file), "--max_source_length", "24", "--max_steps", "2", "--seed", "5"]
    common += ["--tokenizer_name_or_path", str(tokenizer_dir), "--eval_strategy", "no", "--save_strategy", "no"]
    # No dropout or jitter: each process draws its own random numbers.
    common += ["--config_overrides", "dropout_rate=0,router_jitter_noise=0"]
    single = [*TINY, "--per_device_train_batch_size", "8", "--output_dir", str(tmp_path / "one"), *common]
    main(single)
    double = [*TINY, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "two"), *common]
    subprocess.run([*DDP_LAUNCH, str(SCRIPTS / "train.py"), *double], check=True, env=DDP_ENVIRONMENT, timeout=600)

    def first_loss(folder):
        history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
        return next(entry["loss"] for entry in history if "loss" in entry)

    assert first_loss(tmp_path / "two") == pytest.approx(first_loss(tmp_path / "one"), rel=1e-3)


@pytest.mark.slow
def test_two_processes_evaluate_with_generation_like_one_process(tmp_path):
    """Evaluation with generation metrics on 2 processes, whose batches of 3 split the 4 validation pairs unevenly:
    accelerate repeats the first pairs to even them out and Seq2SeqTrainer gathers the repeats too (this failed with
    6 predictions for 4 references). The metrics drop them: the scores are one process's. (The loss counts them, as
    transformers computes it: 1.03 against 1.20 here.)"""
    pairs = write_swap_pairs(tmp_path / "pairs.jsonl")
    common = ["--objective", "seq2seq", "--train_file", str(pairs), "--report_to", "none", "--logging_steps", "1"]
    main([*TINY, *common, "--max_steps", "80", "--learning_rate", "5e-3", "--output_dir", str(tmp_path / "base")])
    # One step at learning rate 0: both runs evaluate the same model.
    evaluate = [str(SCRIPTS / "train.py"), *common, "--model_name_or_path", str(tmp_path / "base"), "--max_steps", "1"]
    evaluate += ["--learning_rate", "0", "--eval_strategy", "steps", "--eval_steps", "1", "--predict_with_generate"]
    evaluate += ["--generation_max_length", "8", "--per_device_eval_batch_size", "3", "--save_strategy", "no"]
    single = [sys.executable, *evaluate, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "one")]
    subprocess.run(single, check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    double = [*DDP_LAUNCH, *evaluate, "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / "two")]
    subprocess.run(double, check=True, env=DDP_ENVIRONMENT, timeout=600)

    one, two = (json.loads((tmp_path / run / "eval_results.json").read_text()) for run in ("one", "two"))
    assert one["eval_gen_len"] > 0 and one["eval_chrf"] > 0
    for name in ("eval_bleu", "eval_chrf", "eval_rouge1", "eval_gen_len"):
        assert two[name] == pytest.approx(one[name], rel=1e-5), name


@pytest.mark.slow
def test_accelerate_launch_that_starts_one_of_two_processes_fails_with_the_command_that_works(tmp_path):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPTS / "train.py"), *TINY]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    finished = subprocess.run(
        [*launch, "--output_dir", str(tmp_path)], env=environment, timeout=300, capture_output=True, text=True
    )
    assert finished.returncode != 0
    assert "hf-switch train: error: accelerate launch asked for 2 processes but started one" in finished.stderr
    assert "Run: accelerate launch --multi_gpu --num_processes 2 --num_machines 1" in finished.stderr
    assert not (tmp_path / "config.json").exists()


def test_the_embedded_default_job_is_reproducible(tmp_path):
    arguments = ["--preset", "tiny", "--report_to", "none", "--max_steps", "3", "--logging_steps", "1"]
    arguments += ["--eval_strategy", "no", "--save_strategy", "no", "--max_train_samples", "96"]
    losses = []
    for run in ("first", "second"):
        main([*arguments, "--output_dir", str(tmp_path / run)])
        history = json.loads((tmp_path / run / "trainer_state.json").read_text())["log_history"]
        losses.append([entry["loss"] for entry in history if "loss" in entry])
    assert len(losses[0]) == 3 and losses[0] == losses[1]


@pytest.mark.parametrize(
    "text",
    ["Příliš žluťoučký kůň úpěl ďábelské ódy.", "東京は日本の首都です 😀", "Ελληνικά и русский", "a <0x41> literal"],
)
def test_trained_tokenizers_fall_back_to_bytes_instead_of_losing_characters(text, tmp_path):
    """Trained on English only, the tokenizer still round-trips accented and non-Latin text without `<unk>`."""
    train_tokenizer(embedded_corpus()[:300], 300).save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_unknown_tokens_in_the_validation_data_are_reported(tmp_path, pairs_file, caplog, capsys):
    """A tokenizer without byte fallback turns unseen characters into `<unk>`: the run says how many."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, "red": 3}, unk_token="<unk>")),
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    with caplog.at_level("WARNING"):
        main(
            _arguments(tmp_path / "run", "--objective", "seq2seq", "--train_file", str(pairs_file), "--max_steps", "1")
            + ["--tokenizer_name_or_path", str(tmp_path / "tokenizer")]
        )
    assert re.search(r"<unk> is \d+\.\d % of the validation tokens \(\d+ of \d+\)", caplog.text), caplog.text
    share = json.loads((tmp_path / "run" / "train_results.json").read_text())["validation_unk_share"]
    assert 0 < share <= 1
    assert f"tokenizer:     <unk> is {share:.2%} of the validation tokens" in capsys.readouterr().out
