"""Test-set prediction in training runs and `hf-switch predict`: order, scores, saved settings, errors."""

import io
import json
import re

import pytest
import sacrebleu
from conftest import tiny_t5
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, EvalPrediction

from hf_switch.cli import main as cli
from hf_switch.prediction import generate_predictions, score_predictions
from hf_switch.training import main as train
from hf_switch.training.metrics import generation_metrics

WORDS = "red green blue small large cat dog house tree river".split()
PREFIX = "swap: "


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny Switch model trained 3 steps with a source prefix, its test set predicted after training."""
    root = tmp_path_factory.mktemp("prediction")
    # Sources of 2 to 6 words, so that length-sorted batches reorder them.
    rows = [
        {"source": " ".join([a, b] * (1 + i % 3)), "target": f"{b} {a}"}
        for i, (a, b) in enumerate((a, b) for a in WORDS for b in WORDS)
    ]
    (root / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    sources, references = [row["source"] for row in rows[:23]], [row["target"] for row in rows[:23]]
    (root / "test.en").write_text("\n".join(sources) + "\n")
    (root / "test.de").write_text("\n".join(references) + "\n")
    arguments = [
        "--preset", "tiny", "--objective", "seq2seq", "--train_file", str(root / "pairs.jsonl"),
        "--source_prefix", PREFIX, "--max_steps", "3", "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "5", "--tokenizer_vocab_size", "60", "--report_to", "none",
        "--generation_max_length", "7", "--do_predict", "--test_source_file", str(root / "test.en"),
        "--test_target_file", str(root / "test.de"), "--output_dir", str(root / "run"),
    ]  # fmt: skip
    train(arguments)
    return root


def one_at_a_time(model, tokenizer, sources, prefix):
    outputs = []
    for source in sources:
        generated = model.generate(**tokenizer([prefix + source], return_tensors="pt"))
        outputs.append(tokenizer.decode(generated[0], skip_special_tokens=True).strip())
    return outputs


def test_a_run_predicts_its_test_set_in_order_and_scores_the_raw_references(run):
    folder = run / "run"
    predictions = (folder / "generated_predictions.txt").read_text().splitlines()
    sources = (run / "test.en").read_text().splitlines()
    references = (run / "test.de").read_text().splitlines()
    model, tokenizer = AutoModelForSeq2SeqLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    # Batches of 5 sorted by length, written back in input order: each line is its source's prediction alone.
    assert predictions == one_at_a_time(model, tokenizer, sources, PREFIX)
    results = json.loads((folder / "predict_results.json").read_text())
    assert results["predict_bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score, abs=1e-4)
    assert results["predict_chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, [references]).score, abs=1e-4)
    assert results["predict_bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert "predict_bleu" in json.loads((folder / "all_results.json").read_text())


def test_the_saved_folder_carries_the_prefix_and_generation_length(run):
    folder = run / "run"
    model = AutoModelForSeq2SeqLM.from_pretrained(folder)
    assert model.config.prefix == PREFIX
    assert model.generation_config.max_length == 7
    batch = AutoTokenizer.from_pretrained(folder)([PREFIX + "red cat dog"], return_tensors="pt")
    assert model.generate(**batch).shape[1] <= 7


def test_predict_applies_the_saved_prefix_and_scores(run, tmp_path, capsys):
    folder = run / "run"
    output = tmp_path / "out" / "predictions.txt"
    cli(
        ["predict", str(folder), str(run / "test.en"), "--output", str(output), "--references", str(run / "test.de")]
        + ["--batch_size", "4", "--quiet"]
    )
    predictions = output.read_text().splitlines()
    assert predictions == (folder / "generated_predictions.txt").read_text().splitlines()
    written = json.loads((tmp_path / "out" / "predictions.txt.metrics.json").read_text())
    assert written["bleu"] == pytest.approx(json.loads((folder / "predict_results.json").read_text())["predict_bleu"])
    assert "hf-switch predict: 23 predictions; bleu" in capsys.readouterr().err
    assert sorted(path.name for path in output.parent.iterdir()) == ["predictions.txt", "predictions.txt.metrics.json"]


def test_predict_reads_json_lines_and_stdin_and_takes_generation_overrides(run, tmp_path, monkeypatch, capsys):
    folder = run / "run"
    sources = (run / "test.en").read_text().splitlines()[:4]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": source}) + "\n" for source in sources))
    cli(["predict", str(folder), str(tmp_path / "in.jsonl"), "--source_column", "text", "--quiet"]
        + ["--output", str(tmp_path / "out.jsonl"), "--num_beams", "2", "--max_new_tokens", "3"])  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [row["source"] for row in rows] == sources
    model, tokenizer = AutoModelForSeq2SeqLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    generated = [model.generate(**tokenizer([PREFIX + s], return_tensors="pt"), num_beams=2, max_new_tokens=3)[0]
                 for s in sources]  # fmt: skip
    expected = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in generated]
    assert [row["prediction"] for row in rows] == expected
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(sources) + "\n"))
    cli(["predict", str(folder), "--quiet", "--source_prefix", ""])
    assert capsys.readouterr().out.splitlines() == one_at_a_time(model, tokenizer, sources, "")


def test_predict_works_on_a_dense_t5_folder(run, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(run / "run")
    t5 = tiny_t5(vocab_size=len(tokenizer), pad_token_id=0, eos_token_id=1)
    t5.generation_config.max_length = 6
    t5.save_pretrained(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    cli(["predict", str(tmp_path / "t5"), str(run / "test.en"), "--output", str(tmp_path / "t5.txt"), "--quiet"])
    sources = (run / "test.en").read_text().splitlines()
    assert (tmp_path / "t5.txt").read_text().splitlines() == one_at_a_time(t5, tokenizer, sources, "")


def test_scores_equal_sacrebleu_on_the_same_lists():
    predictions = ["the cat sat on the mat", "a dog runs", "Straße und Café"]
    references = ["the cat is on the mat", "the dog runs", "Strasse und Café"]
    scores = score_predictions(predictions, references, "bleu,chrf")
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score, abs=1e-4)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, [references]).score, abs=1e-4)


def test_generate_predictions_refuses_a_batch_size_below_one(run):
    model, tokenizer = AutoModelForSeq2SeqLM.from_pretrained(run / "run"), AutoTokenizer.from_pretrained(run / "run")
    with pytest.raises(ValueError, match="batch_size=0"):
        generate_predictions(model, tokenizer, ["red cat"], batch_size=0)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing input", "input: no file at"),
        ("reference count", "--references .*: 2 references for 23 sources"),
        ("empty line", "input: .* line 2 is empty"),
        ("not a model", "holds no config.json"),
        ("results without references", "--results holds scores, which need --references"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(run, tmp_path, capsys, case, message):
    folder, output = str(run / "run"), tmp_path / "predictions.txt"
    source = str(run / "test.en")
    (tmp_path / "two.de").write_text("a\nb\n")
    (tmp_path / "blank.en").write_text("red cat\n\ndog\n")
    arguments = {
        "missing input": [folder, str(tmp_path / "nothing.en")],
        "reference count": [folder, source, "--references", str(tmp_path / "two.de")],
        "empty line": [folder, str(tmp_path / "blank.en")],
        "not a model": [str(tmp_path), source],
        "results without references": [folder, source, "--results", str(tmp_path / "r.json")],
    }[case]
    with pytest.raises(SystemExit) as exit_info:
        cli(["predict", *arguments, "--output", str(output), "--quiet"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 2  # the message and the --debug hint
    assert re.search(message, error), error
    assert not output.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--do_predict"], "--do_predict needs a test set"),
        (["--test_file", "t.jsonl"], "without --do_predict"),
        (["--do_predict", "--test_source_file", "t.en"], "must be given together"),
    ],
)
def test_training_refuses_incomplete_prediction_arguments(tmp_path, extra, message):
    (tmp_path / "t.en").write_text("red\n")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"source": "a", "target": "b"}) + "\n")
    arguments = ["--preset", "tiny", "--objective", "seq2seq", "--train_file", str(tmp_path / "pairs.jsonl")]
    extra = [str(tmp_path / value) if value in ("t.en", "t.jsonl") else value for value in extra]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train([*arguments, *extra, "--max_steps", "1", "--report_to", "none", "--output_dir", str(tmp_path / "o")])


def test_a_published_folder_predicts_with_remote_code_and_its_card_shows_the_prefix(run, tmp_path):
    cli(["publish", str(run / "run"), "--repo-id", "org/swap", "--dry-run", "--local-dir", str(tmp_path / "pub")])
    card = (tmp_path / "pub" / "README.md").read_text()
    assert 'inputs = tokenizer(["swap: Your text here."], return_tensors="pt")' in card
    assert 'trained with the source prefix "swap: "' in card
    assert "hf-switch predict org/swap inputs.txt --output predictions.txt" in card
    output = tmp_path / "remote.txt"
    cli(["predict", str(tmp_path / "pub"), str(run / "test.en"), "--output", str(output), "--trust_remote_code"]
        + ["--quiet"])  # fmt: skip
    assert output.read_text() == (run / "run" / "generated_predictions.txt").read_text()


def test_evaluation_scores_compare_with_the_raw_references(run):
    """`--predict_with_generate` during training scores against the raw validation targets, not the labels decoded
    back through the tokenizer (NFKC turns the ligature "ﬁ" into "fi", which would flatter the score)."""
    tokenizer = AutoTokenizer.from_pretrained(run / "run")
    references = ["the ﬁsh swims in the river", "a red cat sleeps in the house"]
    predictions = ["the fish swims in the river", "a red cat sleeps in the house"]
    encode = lambda texts: tokenizer(texts, padding=True, return_tensors="np")["input_ids"]  # noqa: E731
    evaluation = EvalPrediction(predictions=encode(predictions), label_ids=encode(references))
    raw = generation_metrics(tokenizer, "bleu,chrf", references=references)(evaluation)
    assert raw["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score, abs=1e-4)
    assert raw["chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, [references]).score, abs=1e-4)
    decoded = generation_metrics(tokenizer, "bleu,chrf")(evaluation)
    assert decoded["bleu"] == pytest.approx(100.0) and raw["bleu"] < 100
    with pytest.raises(ValueError, match="2 predictions for 3 references"):
        generation_metrics(tokenizer, "bleu", references=[*references, "extra"])(evaluation)

    # Several processes' even batches repeat the first samples after the last; the scores leave them out.
    rows = [0, 1, 0, 1, 0]
    padded = EvalPrediction(predictions=evaluation.predictions[rows], label_ids=evaluation.label_ids[rows])
    assert generation_metrics(tokenizer, "bleu,chrf", references=references)(padded) == raw
    others = EvalPrediction(predictions=evaluation.predictions[rows], label_ids=evaluation.label_ids[[0, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match="5 predictions for 2 references"):
        generation_metrics(tokenizer, "bleu", references=references)(others)
