"""The options every script shares: gradient accumulation, gradient checkpointing, TensorBoard,
and class weights for classification."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import run_main, run_script, write_rows

SENTIMENT, NER, GENERATION = "sentiment_finetuning.py", "ner_finetuning.py", "text_generation_lora.py"
DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "resid_pdrop",
                "embd_pdrop", "attn_pdrop", "summary_first_dropout")


def without_dropout(model_dir: Path, directory: Path) -> Path:
    """A copy of a saved model with every dropout probability set to 0, for runs that must agree exactly."""
    shutil.copytree(model_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    config.update({key: 0.0 for key in DROPOUT_KEYS})
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def saved_weights(output_dir: Path) -> dict:
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (output_dir / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(output_dir / name)


def tensorboard_scalars(output_dir: Path) -> dict[str, list[float]]:
    """The scalars of the TensorBoard event files under OUTPUT_DIR/runs, read back with tensorboard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output_dir / "runs"))
    events.Reload()
    return {tag: [event.value for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def instruction_rows(count: int) -> list[dict[str, str]]:
    """Records of unequal lengths, so that micro-batches hold unequal numbers of response tokens."""
    return [{"prompt": "How long " + "and why " * (i % 4) + f"do I cook dish {i}?",
             "response": f"Short answer: {i % 5 + 2} minutes." + " Stir it." * (i % 3)} for i in range(count)]


@pytest.fixture(scope="module")
def sentiment_data(tmp_path_factory) -> tuple[Path, Path]:
    """Imbalanced training data (6 positive, 2 negative) and a small validation set."""
    folder = tmp_path_factory.mktemp("imbalanced")
    texts = ["a warm and funny film", "the cast is superb", "I loved every minute", "a moving, clever story",
             "great music and pace", "a joy from start to end", "dull and far too long", "the plot makes no sense"]
    train = write_rows(folder / "train.csv", [{"text": t, "label": "positive" if i < 6 else "negative"}
                                              for i, t in enumerate(texts)])
    validation = write_rows(folder / "validation.csv", [{"text": "a lovely film", "label": "positive"},
                                                        {"text": "boring", "label": "negative"}])
    return train, validation


def runs_for(script: str, model: Path, data: dict, tmp_path: Path) -> dict[str, Path]:
    """The same data and seed, once as one batch of 8 and once as 4 accumulated batches of 2 with
    gradient checkpointing and TensorBoard on; fp32, no dropout, one optimizer step."""
    common_flags = ["--model-name", model, "--precision", "fp32", *data["flags"]]
    variants = {"batch 8": ["--batch-size", "8"],
                "batch 2 x 4": ["--batch-size", "2", "--gradient-accumulation-steps", "4", "--gradient-checkpointing",
                                "--report-to", "tensorboard"]}
    directories = {}
    for name, flags in variants.items():
        directories[name] = tmp_path / name.replace(" ", "")
        result = run_main(script, *common_flags, *flags, "--output-dir", directories[name])
        assert result.returncode == 0, result.stdout + result.stderr
    return directories


@pytest.mark.parametrize("script", [SENTIMENT, NER, GENERATION])
def test_four_accumulated_batches_of_two_train_as_one_batch_of_eight(script, tiny_encoder, tiny_gpt2, sentiment_data,
                                                                        tmp_path):
    """Gradient accumulation normalises the loss over the whole optimizer step (NER's tokens and the
    response tokens of instruction records are unevenly spread over the micro-batches), gradient
    checkpointing changes nothing but memory, and TensorBoard gets the loss, the learning rate and
    the validation metrics. Tolerance: 1e-5 absolute on every saved weight (fp32)."""
    import torch

    if script == GENERATION:
        model = without_dropout(tiny_gpt2, tmp_path / "model")
        data = write_rows(tmp_path / "records.jsonl", instruction_rows(24))
        flags = ["--train-file", data, "--max-steps", "1", "--max-eval-samples", "2", "--max-new-tokens", "4"]
        validation_metric = "eval/rougeL"
    else:
        model = without_dropout(tiny_encoder, tmp_path / "model")
        flags = ["--epochs", "1", "--max-eval-samples", "16"]
        if script == SENTIMENT:
            flags += ["--train-file", sentiment_data[0], "--validation-file", sentiment_data[1],
                      "--class-weights", "balanced"]
        else:
            flags += ["--max-train-samples", "8"]
        validation_metric = "eval/f1" if script == NER else "eval/accuracy"
    runs = runs_for(script, model, {"flags": flags}, tmp_path)
    one, accumulated = (json.loads((runs[name] / "metrics.json").read_text())["train"] for name in runs)
    assert one["steps"] == accumulated["steps"] == 1
    assert (accumulated["gradient_accumulation_steps"], accumulated["effective_batch_size"],
            accumulated["gradient_checkpointing"]) == (4, 8, True)
    assert (one["gradient_accumulation_steps"], one["effective_batch_size"], one["gradient_checkpointing"]) == (1, 8, False)
    first, second = saved_weights(runs["batch 8"]), saved_weights(runs["batch 2 x 4"])
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(second[name], first[name], atol=1e-5, rtol=0, msg=name)
    scalars = tensorboard_scalars(runs["batch 2 x 4"])
    for tag in ("train/loss", "train/learning_rate", validation_metric):
        assert scalars.get(tag), f"{tag} missing from the event files: {sorted(scalars)}"
    assert not (runs["batch 8"] / "runs").exists(), "TensorBoard files without --report-to tensorboard"


def test_balanced_class_weights_are_recorded_and_weigh_the_training_loss_only(sentiment_data, tiny_encoder, tmp_path):
    import numpy
    import torch
    from sklearn.utils.class_weight import compute_class_weight

    import encoders

    output_dir = tmp_path / "weighted"
    result = run_main(SENTIMENT, "--model-name", tiny_encoder, "--train-file", sentiment_data[0], "--validation-file",
                        sentiment_data[1], "--epochs", "1", "--batch-size", "4", "--class-weights", "balanced",
                        "--output-dir", output_dir)
    assert result.returncode == 0, result.stderr
    labels = numpy.array([1] * 6 + [0] * 2)  # ids in sorted label order: negative 0, positive 1
    expected = compute_class_weight("balanced", classes=numpy.array([0, 1]), y=labels)
    recorded = json.loads((output_dir / "metrics.json").read_text())["train"]["class_weights"]
    assert recorded == pytest.approx({"negative": expected[0], "positive": expected[1]}, abs=1e-4)
    assert json.loads((output_dir / "run_config.json").read_text())["class_weights"] == recorded
    assert "class weights: negative 2.000, positive 0.667" in result.stdout

    weights = torch.tensor([2.0, 0.5])
    logits, labels = torch.randn(4, 2), torch.tensor([0, 1, 1, 0])
    model = torch.nn.Linear(1, 1)
    loss = encoders.cross_entropy_loss(model, weights)
    outputs = type("Outputs", (), {"logits": logits})()
    each = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    model.train()
    torch.testing.assert_close(loss(outputs, labels), (weights[labels] * each).sum() / 4)
    torch.testing.assert_close(loss(outputs, labels, num_items_in_batch=8), (weights[labels] * each).sum() / 8)
    model.eval()
    torch.testing.assert_close(loss(outputs, labels), each.mean())


def test_gradient_checkpointing_reaches_the_layers_of_a_lora_model(tiny_encoder):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(tiny_encoder, num_labels=2),
                           LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"]))
    model.activation_checkpointing_enable()
    layers = model.get_base_model().bert.encoder.layer
    assert all(layer.gradient_checkpointing for layer in layers)


def test_the_help_of_every_script_stays_short():
    """At most 35 options per script (45 for lora_finetuning.py), the shared new ones included."""
    import re

    for script, limit in ((SENTIMENT, 35), (NER, 35), (GENERATION, 35), ("lora_finetuning.py", 45)):
        result = run_script(script, "--help")
        options = [line.split()[0].rstrip(",") for line in result.stdout.splitlines() if re.match(r"^  (-\w, )?--\w", line)]
        options = [option for option in options if option not in ("-h", "--help")]
        assert len(options) <= limit, (script, len(options))
        assert {"--gradient-accumulation-steps", "--gradient-checkpointing", "--report-to"} <= set(options), script
