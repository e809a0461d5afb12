"""sentiment_finetuning.py end to end on tiny models, plus its data handling and error paths."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
from conftest import (DATA, EXPECTED_PRECISION, ROOT, assert_clean_error, build_tiny_encoder, assert_saved_then_evaluated_once, requires_bundled_encoder,
                      run_command, run_script, training_log, write_rows)

SCRIPT = "sentiment_finetuning.py"
FAST = ("--epochs", "1", "--batch-size", "16", "--learning-rate", "1e-3")


def sample_rows(split: str) -> list[dict]:
    with (DATA / "sentiment" / f"{split}.csv").open(encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def train(tiny_encoder: Path, output_dir: Path, *extra: str):
    result = run_script(SCRIPT, "--model-name", tiny_encoder, "--output-dir", output_dir, *FAST, *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((output_dir / "metrics.json").read_text()), result


@pytest.fixture(scope="module")
def trained(tiny_encoder, tmp_path_factory):
    """One real run on the embedded sample data, shared by the tests that only read its outputs."""
    output_dir = tmp_path_factory.mktemp("sentiment-run")
    metrics, result = train(tiny_encoder, output_dir, "--epochs", "2")
    return output_dir, metrics, result


# ---- end to end on the embedded data -------------------------------------------------------


def test_embedded_run_writes_every_output(trained):
    output_dir, _, result = trained
    for name in ("config.json", "model.safetensors", "tokenizer.json", "metrics.json", "run_config.json",
                 "training_log.jsonl", "training_curves.png"):
        assert (output_dir / name).is_file(), name
    assert (output_dir / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (output_dir / "checkpoints").exists(), "checkpoints are cleaned up after a successful run"
    assert "embedded sample data" in result.stdout


def test_metrics_schema(trained, tiny_encoder):
    _, metrics, _ = trained
    assert metrics["task"] == "text-classification"
    assert metrics["method"] == "full"
    assert metrics["model"] == str(tiny_encoder)
    assert metrics["precision"] == EXPECTED_PRECISION
    assert metrics["params"]["trainable"] == metrics["params"]["total"] > 0
    for key in ("runtime_s", "samples_per_s", "tokens_per_s", "peak_rss_mb"):
        assert metrics["train"][key] > 0
    # The tiny BERT has a [CLS] classifier and trainable word embeddings: every encoder trick applies.
    assert set(metrics["train"]["speedups"]) >= {"first_token_last_layer", "cpu_attention", "embedding_gradient_buffer"}
    for split in ("validation", "test"):
        size = len(sample_rows(split))
        block = metrics[split]
        assert block["examples"] == size
        assert 0 <= block["accuracy"] <= 1 and 0 <= block["f1_macro"] <= 1
        assert set(block["per_class"]) == {"negative", "positive"}
        assert sum(v["support"] for v in block["per_class"].values()) == size
        matrix = block["confusion_matrix"]
        assert len(matrix) == 2 and sum(map(sum, matrix)) == size
        assert block["accuracy"] == pytest.approx((matrix[0][0] + matrix[1][1]) / size)
    assert {"torch", "transformers", "python"} <= set(metrics["versions"])
    assert "processor" in metrics["hardware"]


def test_training_log_has_an_evaluation_per_epoch(trained):
    output_dir, _, _ = trained
    records = training_log(output_dir)
    evaluations = [r for r in records if "eval_accuracy" in r]
    assert [round(r["epoch"]) for r in evaluations] == [1, 2]
    assert any("loss" in r for r in records)


def test_validation_figures_are_those_of_the_saved_model(tiny_encoder, tmp_path):
    """The validation figures reuse the best checkpoint's evaluation during training (no second
    pass): they must be exactly what the saved model scores when evaluated afresh."""
    import csv

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    metrics, _ = train(tiny_encoder, tmp_path, "--epochs", "3", "--fp32", "--metric-for-best-model", "loss")
    log = training_log(tmp_path)
    assert len([r for r in log if "eval_loss" in r]) == 3
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    with open(ROOT / "data" / "sentiment" / "validation.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    labels = torch.tensor([model.config.label2id[row["label"]] for row in rows])
    with torch.inference_mode():
        logits = model(**tokenizer([row["text"] for row in rows], padding=True, return_tensors="pt")).logits
    assert metrics["validation"]["accuracy"] == (logits.argmax(-1) == labels).double().mean().item()
    assert metrics["validation"]["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(),
                                                          rel=1e-4)
    assert metrics["validation"]["loss"] == pytest.approx(min(r["eval_loss"] for r in log if "eval_loss" in r),
                                                          rel=1e-4)


def test_saved_model_loads_with_plain_transformers_and_pipeline(trained):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    output_dir, _, _ = trained
    model = AutoModelForSequenceClassification.from_pretrained(output_dir)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert model.config.label2id == {"negative": 0, "positive": 1}
    classifier = pipeline("text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(output_dir))
    assert classifier("the food was great")[0]["label"] in {"negative", "positive"}


def test_predict_prints_label_names_matching_the_model(trained, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    output_dir, _, _ = trained
    texts = ["what a great film", "the battery died after a day", "service was slow and rude"]
    (tmp_path / "texts.txt").write_text("\n".join(texts[1:]) + "\n\n")
    result = run_script(SCRIPT, "--output-dir", output_dir, "--predict", texts[0], "--predict", f"@{tmp_path / 'texts.txt'}")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    model = AutoModelForSequenceClassification.from_pretrained(output_dir).eval()
    with torch.inference_mode():
        expected = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    for line, text, row in zip(lines, texts, expected):
        label, score, printed_text = line.split(maxsplit=2)
        assert printed_text == text
        assert label == model.config.id2label[int(row.argmax())]
        assert float(score) == pytest.approx(float(row.max()), abs=2e-3)


def test_existing_model_is_not_overwritten(trained, tiny_encoder):
    output_dir, _, _ = trained
    before = (output_dir / "model.safetensors").read_bytes()
    result = run_script(SCRIPT, "--model-name", tiny_encoder, "--output-dir", output_dir, *FAST)
    assert_clean_error(result, "already holds a trained model", "--overwrite-output-dir")
    assert (output_dir / "model.safetensors").read_bytes() == before


# ---- data formats, labels, splits ------------------------------------------------------------


def review_rows(n_per_class: int, labels=("bad", "good")) -> list[dict]:
    words = {0: "terrible awful broken rude slow", 1: "great lovely fast friendly tasty", 2: "okay fine average plain middling"}
    rows = []
    for i in range(n_per_class):
        for index, label in enumerate(labels):
            rows.append({"review": f"{words[index].split()[i % 5]} item number {i}", "stars": label})
    return rows


def test_every_file_format_reads_the_same_examples(tmp_path, capsys):
    """CSV, TSV, JSON and JSON Lines give the same examples, labels and split (one of them trains below)."""
    import sentiment_finetuning as script

    loaded = {}
    for fmt in ("csv", "tsv", "json", "jsonl"):
        train_file = write_rows(tmp_path / f"train.{fmt}", review_rows(20))
        data = script.load_data(script.parse_args(["--train-file", str(train_file), "--batch-size", "4"]))
        loaded[fmt] = (data.splits, data.label_names)
    assert loaded["tsv"] == loaded["csv"] == loaded["json"] == loaded["jsonl"]
    assert len(loaded["csv"][0]["train"]) == 36 and len(loaded["csv"][0]["validation"]) == 4


def test_a_table_file_trains(tiny_encoder, tmp_path):
    train_file = write_rows(tmp_path / "train.tsv", review_rows(20))
    metrics, result = train(tiny_encoder, tmp_path / "out", "--train-file", train_file)
    assert "held out 4 of the training examples" in result.stdout
    assert metrics["validation"]["examples"] == 4
    assert metrics["train"]["examples"] == 36
    assert "test" not in metrics


def test_integer_labels_multiclass_and_explicit_columns(tiny_encoder, tmp_path):
    rows = [{"body": r["review"], "y": r["stars"], "other": "x"} for r in review_rows(12, labels=(0, 1, 2))]
    train_file = write_rows(tmp_path / "train.jsonl", rows)
    validation_file = write_rows(tmp_path / "validation.csv", rows[:9])
    metrics, _ = train(tiny_encoder, tmp_path / "out", "--train-file", train_file, "--validation-file",
                       validation_file, "--text-column", "body", "--label-column", "y")
    assert metrics["labels"] == ["0", "1", "2"]
    assert len(metrics["validation"]["confusion_matrix"]) == 3
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["id2label"] == {"0": "0", "1": "1", "2": "2"}


def test_string_labels_three_classes(tiny_encoder, tmp_path):
    train_file = write_rows(tmp_path / "train.csv", review_rows(10, labels=("neg", "pos", "neutral")))
    metrics, _ = train(tiny_encoder, tmp_path / "out", "--train-file", train_file, "--validation-split", "0.3")
    assert metrics["labels"] == ["neg", "neutral", "pos"]
    assert metrics["validation"]["examples"] == 9
    assert all(v["support"] == 3 for v in metrics["validation"]["per_class"].values()), "stratified split"


def test_validation_split_is_stratified_and_seeded():
    import sentiment_finetuning as script

    examples = [(f"text {i}", 0 if i < 80 else 1) for i in range(100)]
    train_a, validation_a = script.split_validation(examples, 0.2, seed=3)
    train_b, validation_b = script.split_validation(examples, 0.2, seed=3)
    _, validation_c = script.split_validation(examples, 0.2, seed=4)
    assert validation_a == validation_b and validation_a != validation_c
    assert sorted(label for _, label in validation_a) == [0] * 16 + [1] * 4
    assert not set(validation_a) & set(train_a) and len(train_a) + len(validation_a) == 100


def test_max_samples_limit_train_and_eval(tiny_encoder, tmp_path):
    metrics, _ = train(tiny_encoder, tmp_path / "out", "--max-train-samples", "50", "--max-eval-samples", "30")
    assert metrics["train"]["examples"] == 50
    assert metrics["validation"]["examples"] == 30 and metrics["test"]["examples"] == 30


def test_one_epoch_run_saves_its_model_then_evaluates_it(tiny_encoder, tmp_path):
    metrics, result = train(tiny_encoder, tmp_path / "out")
    assert_saved_then_evaluated_once(tmp_path / "out", "accuracy", metrics["validation"]["accuracy"])
    assert "checkpoints: none in a run of one epoch" in result.stdout
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_length_grouped_order_is_a_seeded_permutation_with_similar_lengths():
    from encoders import length_grouped_order

    lengths = [(i * 37) % 101 + 1 for i in range(1000)]
    order = length_grouped_order(lengths, batch_size=10, seed=1)
    assert sorted(order) == list(range(1000))
    assert order == length_grouped_order(lengths, batch_size=10, seed=1)
    assert order != length_grouped_order(lengths, batch_size=10, seed=2)
    batches = [order[i:i + 10] for i in range(0, 1000, 10)]
    grouped_padding = sum(10 * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)
    random_batches = [list(range(i, i + 10)) for i in range(0, 1000, 10)]
    random_padding = sum(10 * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in random_batches)
    assert grouped_padding < random_padding / 2


@pytest.mark.parametrize("epochs", ["200", "1"])  # a one-epoch run writes no checkpoint unless interrupted
def test_interrupt_saves_a_checkpoint_and_prints_the_resume_command(epochs, tiny_encoder, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from conftest import OFFLINE_ENV, ROOT

    output_dir = tmp_path / "out"
    data = [] if epochs != "1" else ["--train-file", str(write_rows(tmp_path / "long.csv", review_rows(2500)))]
    process = subprocess.Popen([sys.executable, str(ROOT / SCRIPT), "--model-name", str(tiny_encoder), "--output-dir",
                                str(output_dir), "--epochs", epochs, "--batch-size", "8", *data],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=OFFLINE_ENV)
    log = output_dir / "training_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().strip()):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "--resume-from-checkpoint" in stderr
    checkpoints = list((output_dir / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "model.safetensors").is_file()
    assert not (output_dir / "metrics.json").exists(), "an interrupted run saves no final model"


# ---- bad input: one clear line, non-zero exit, no traceback -------------------------------------


@pytest.fixture
def good_train(tmp_path) -> Path:
    return write_rows(tmp_path / "good.csv", review_rows(10))


def test_missing_file(tiny_encoder, tmp_path):
    result = run_script(SCRIPT, "--model-name", tiny_encoder, "--train-file", tmp_path / "nope.csv", "--output-dir", tmp_path / "o")
    assert_clean_error(result, "--train-file", "no such file")


def test_unknown_extension(tiny_encoder, tmp_path):
    (tmp_path / "data.xlsx").write_text("a,b\n")
    result = run_script(SCRIPT, "--model-name", tiny_encoder, "--train-file", tmp_path / "data.xlsx", "--output-dir", tmp_path / "o")
    assert_clean_error(result, "unsupported file type", ".csv")


def test_missing_column_lists_available_columns(tiny_encoder, good_train, tmp_path):
    result = run_script(SCRIPT, "--model-name", tiny_encoder, "--train-file", good_train, "--label-column", "grade", "--output-dir", tmp_path / "o")
    assert_clean_error(result, "no column 'grade'", "review", "stars")


def test_undetectable_columns_list_available_columns(tiny_encoder, tmp_path):
    train_file = write_rows(tmp_path / "t.csv", [{"foo": "x", "bar": "y"}] * 4)
    result = run_script(SCRIPT, "--model-name", tiny_encoder, "--train-file", train_file, "--output-dir", tmp_path / "o")
    assert_clean_error(result, "foo, bar", "--text-column")


def test_empty_dataset(tiny_encoder, tmp_path):
    (tmp_path / "empty.csv").write_text("text,label\n")
    result = run_script(SCRIPT, "--model-name", tiny_encoder, "--train-file", tmp_path / "empty.csv", "--output-dir", tmp_path / "o")
    assert_clean_error(result, "no examples")


def test_single_class(tiny_encoder, tmp_path):
    train_file = write_rows(tmp_path / "one.csv", [{"text": f"fine {i}", "label": "pos"} for i in range(10)])
    result = run_script(SCRIPT, "--model-name", tiny_encoder, "--train-file", train_file, "--output-dir", tmp_path / "o")
    assert_clean_error(result, "single class")


def test_unseen_validation_label(tiny_encoder, good_train, tmp_path):
    validation = write_rows(tmp_path / "v.csv", [{"review": "meh", "stars": "so-so"}, {"review": "ok", "stars": "good"}])
    result = run_script(SCRIPT, "--model-name", tiny_encoder, "--train-file", good_train, "--validation-file", validation, "--output-dir", tmp_path / "o")
    assert_clean_error(result, "never seen in training", "so-so")


def test_undecodable_text(tiny_encoder, tmp_path):
    (tmp_path / "latin1.csv").write_bytes("text,label\ncaf\xe9 au lait,good\n".encode("latin-1"))
    result = run_script(SCRIPT, "--model-name", tiny_encoder, "--train-file", tmp_path / "latin1.csv", "--output-dir", tmp_path / "o")
    assert_clean_error(result, "not valid UTF-8")


def test_ragged_csv(tiny_encoder, tmp_path):
    (tmp_path / "ragged.csv").write_text("text,label\ngood film,pos\ngood, bad film,neg\n")
    result = run_script(SCRIPT, "--model-name", tiny_encoder, "--train-file", tmp_path / "ragged.csv", "--output-dir", tmp_path / "o")
    assert_clean_error(result, "row 3 has 3 fields")


def test_model_directory_that_does_not_exist(tmp_path):
    result = run_script(SCRIPT, "--model-name", tmp_path / "no-model", "--output-dir", tmp_path / "o")
    assert_clean_error(result, "no such directory")


def test_unreachable_model_without_fallback(tmp_path):
    result = run_script(SCRIPT, "--model-name", "distilbert-base-uncased", "--no-fallback", "--output-dir", tmp_path / "o")
    assert_clean_error(result, "cannot be reached", "--no-fallback")


def test_predict_imports_only_what_prediction_needs(trained, tmp_path):
    """--predict is a start-up-bound command: no training, data or plotting libraries."""
    output_dir, _, _ = trained
    listing = tmp_path / "modules.json"
    code = ("import atexit, json, runpy, sys; "
            f"atexit.register(lambda: open({str(listing)!r}, 'w').write(json.dumps(sorted(sys.modules)))); "
            f"sys.argv = [{SCRIPT!r}, '--output-dir', {str(output_dir)!r}, '--predict', 'what a great film']; "
            f"runpy.run_path({str(ROOT / SCRIPT)!r}, run_name='__main__')")
    result = run_command([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr
    imported = set(json.loads(listing.read_text()))
    assert "transformers.models.bert.modeling_bert" in imported  # the listing holds what was imported
    assert not imported & {"datasets", "peft", "transformers.trainer", "sklearn", "matplotlib"}


def test_predict_without_a_model(tmp_path):
    result = run_script(SCRIPT, "--output-dir", tmp_path, "--predict", "hello")
    assert_clean_error(result, "holds no trained model")


def test_output_dir_is_a_file(tiny_encoder, tmp_path):
    (tmp_path / "file").write_text("x")
    result = run_script(SCRIPT, "--model-name", tiny_encoder, "--output-dir", tmp_path / "file")
    assert_clean_error(result, "is a file")


# ---- precision choice ---------------------------------------------------------------------------


def test_precision_choice_without_cuda(monkeypatch, capsys):
    import torch

    import common

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for has_bf16, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(common, "cpu_supports_bf16", lambda: has_bf16)
        assert common.choose_precision("auto") == expected
        assert common.choose_precision("fp16") == expected
        assert "--fp16 needs a CUDA GPU" in capsys.readouterr().out
        assert common.choose_precision("bf16") == expected
        assert common.choose_precision("fp32") == "fp32"


def test_fp16_flag_on_cpu_does_not_crash(tiny_encoder, tmp_path):
    metrics, result = train(tiny_encoder, tmp_path / "out", "--fp16", "--max-train-samples", "40")
    assert "--fp16 needs a CUDA GPU" in result.stdout
    assert metrics["precision"] == EXPECTED_PRECISION


# ---- the real bundled encoder -------------------------------------------------------------------


@pytest.mark.real_model
@requires_bundled_encoder
def test_offline_fallback_to_the_bundled_encoder_trains_and_predicts(tmp_path):
    result = run_script(SCRIPT, "--output-dir", tmp_path / "out", "--epochs", "1", "--batch-size", "32",
                        "--max-train-samples", "128", "--max-eval-samples", "32")
    assert result.returncode == 0, result.stderr
    assert "using the bundled sentence-transformers/all-MiniLM-L6-v2" in result.stdout
    assert "learning rate 0.0001" in result.stdout
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert "all-MiniLM-L6-v2" in metrics["model"]
    assert metrics["params"]["total"] > 20_000_000
    predicted = run_script(SCRIPT, "--output-dir", tmp_path / "out", "--predict", "I loved it")
    assert predicted.stdout.split()[0] in ("negative", "positive")


@requires_bundled_encoder
@pytest.mark.parametrize("script", ["sentiment_finetuning", "ner_finetuning"])
def test_the_bundled_encoder_gets_its_learning_rate_however_it_is_named(script, tmp_path, capsys):
    import importlib

    import common
    import encoders
    import lora_finetuning

    module = importlib.import_module(script)
    bundled = common.bundled_encoder_dir()
    (tmp_path / "link").symlink_to(bundled, target_is_directory=True)
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "config.json").write_text((bundled / "config.json").read_text())
    cases = {str(bundled): True, str(tmp_path / "link"): True, common.BUNDLED_ENCODER_HUB_NAME: True,
             str(copy): False, "distilbert-base-uncased": False}
    for path, is_bundled in cases.items():
        args = module.build_parser().parse_args([])
        encoders.settle_learning_rate(args, common.ResolvedModel(path=path, name=path))
        expected = args.fallback_learning_rate if is_bundled else args.default_learning_rate
        assert args.learning_rate == expected, path
        assert ("a small model that needs a higher rate" in capsys.readouterr().out) == is_bundled, path
    assert module.build_parser().parse_args([]).fallback_learning_rate != module.build_parser().parse_args([]).default_learning_rate
    lora_args = lora_finetuning.parse_args(["--model-name", str(bundled)])  # LoRA's rate is the same for every model
    encoders.settle_learning_rate(lora_args, common.ResolvedModel(path=str(bundled), name="bundled"))
    assert lora_args.learning_rate == lora_args.default_learning_rate and "higher rate" not in capsys.readouterr().out
    args = module.build_parser().parse_args(["--learning-rate", "3e-3"])
    encoders.settle_learning_rate(args, common.ResolvedModel(path=str(bundled), name="bundled"))
    assert args.learning_rate == 3e-3


# ---- the default model's architecture ------------------------------------------------------------


def test_a_tiny_distilbert_trains_through_the_cli(tmp_path):
    """DistilBERT, the default model's architecture: trained through the command line with every
    encoder speed trick (its first-token last layer is DistilBERT's own block), saved, and loaded
    back by a plain transformers pipeline."""
    from transformers import pipeline

    model_dir = build_tiny_encoder(tmp_path / "tiny-distilbert", kind="distilbert")
    metrics, result = train(model_dir, tmp_path / "out", "--epochs", "2")
    assert metrics["model"] == str(model_dir) and metrics["precision"] == EXPECTED_PRECISION
    assert set(metrics["train"]["speedups"]) >= {"first_token_last_layer", "cpu_attention", "embedding_gradient_buffer"}
    assert "switched off" not in result.stdout
    assert metrics["train"]["steps"] == 2 * math.ceil(len(sample_rows("train")) / 16)
    classify = pipeline("text-classification", model=str(tmp_path / "out"), tokenizer=str(tmp_path / "out"))
    assert classify("a lovely film")[0]["label"] in ("negative", "positive")
