"""The full-vs-LoRA comparison over seeds (every task), and what every run writes for people: the
model card and the result charts."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
from conftest import build_tiny_encoder, run_script

SCRIPT = "lora_finetuning.py"
ENCODER_FAST = ("--epochs", "1", "--batch-size", "16", "--learning-rate", "5e-3", "--max-train-samples", "64",
                "--max-eval-samples", "32")
GENERATION_FAST = ("--block-size", "64", "--epochs", "1", "--batch-size", "8", "--max-new-tokens", "6",
                   "--max-eval-samples", "4")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_encoder(tmp_path_factory.mktemp("compare-bert"))


def t_interval(differences: list[float]) -> list[float]:
    """The 95% t interval of the mean, computed here independently of the script."""
    from scipy import stats

    mean, sd = statistics.fmean(differences), statistics.stdev(differences)
    half = stats.t.ppf(0.975, len(differences) - 1) * sd / math.sqrt(len(differences))
    return [mean - half, mean + half]


def check_comparison(output_dir: Path, seeds: list[int], metric: str, scale: float, higher_is_better: bool) -> dict:
    """Every promise of comparison.json, checked against the runs' own metrics.json files."""
    comparison = json.loads((output_dir / "comparison.json").read_text())
    split = comparison["compared_on"]
    assert comparison["metric"] == metric and comparison["seeds"] == seeds
    assert comparison["metric_higher_is_better"] is higher_is_better
    per_run = {}
    for method in ("full", "lora"):
        records = comparison["runs"][method]
        assert [record["seed"] for record in records] == seeds
        for record, seed in zip(records, seeds):
            directory = Path(record["output_dir"])
            assert directory == output_dir / method / f"seed-{seed}"
            metrics = json.loads((directory / "metrics.json").read_text())
            config = json.loads((directory / "run_config.json").read_text())
            assert metrics["method"] == method and config["args"]["seed"] == seed
            assert record[metric] == metrics[split][metric]
            assert record["train_runtime_s"] == metrics["train"]["runtime_s"]
            assert record["peak_rss_mb"] == metrics["train"]["peak_rss_mb"]
        values = [record[metric] for record in records]
        per_run[method] = values
        summary = comparison["summary"][method]
        assert summary["metric_mean"] == pytest.approx(statistics.fmean(values), abs=1e-6)
        assert summary["metric_sd"] == pytest.approx(statistics.stdev(values), abs=1e-6)
        assert summary["train_runtime_s_mean"] == pytest.approx(
            statistics.fmean(r["train_runtime_s"] for r in records), abs=0.01)
    differences = [scale * (lora - full) for full, lora in zip(per_run["full"], per_run["lora"])]
    assert comparison["metric_difference_points"] == pytest.approx(statistics.fmean(differences), abs=0.01)
    if statistics.stdev(differences) > 0:
        assert comparison["difference_ci95_points"] == pytest.approx(t_interval(differences), abs=2e-3)
    low, high = comparison["difference_ci95_points"]
    expected = "no clear difference" if low <= 0 <= high else \
        ("lora better" if (low > 0) == higher_is_better else "full better")
    assert comparison["verdict"] == expected
    report = (output_dir / "comparison.md").read_text()
    assert f"**Verdict: {expected}.**" in report and "± " in report
    assert f"--compare --seeds {' '.join(map(str, seeds))}" in report  # the command that reproduces it
    for seed in seeds:
        assert f"--seed {seed} --output-dir {output_dir / 'full' / f'seed-{seed}'}" in report
    for image in ("loss_curves.png", "metric_vs_time.png", "scores.png"):
        assert (output_dir / image).read_bytes()[:4] == b"\x89PNG", image
    return comparison


@pytest.mark.parametrize("task", ["classification", "ner"])
def test_encoder_compare_over_two_seeds(task, tiny_bert, tmp_path):
    result = run_script(SCRIPT, "--task", task, "--compare", "--seeds", "3", "7", "--model-name", tiny_bert,
                        "--output-dir", tmp_path, *ENCODER_FAST)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    metric = "accuracy" if task == "classification" else "f1"
    comparison = check_comparison(tmp_path, [3, 7], metric, 100.0, True)
    assert comparison["compared_on"] == "test"
    full = json.loads((tmp_path / "full" / "seed-3" / "metrics.json").read_text())
    lora = json.loads((tmp_path / "lora" / "seed-3" / "metrics.json").read_text())
    assert full["train"]["examples"] == lora["train"]["examples"] == 64  # same data for every run
    assert comparison["full"]["trainable_params"] == full["params"]["trainable"]
    assert comparison["lora"]["trainable_params"] == lora["params"]["trainable"]
    # The report again from two finished runs: one seed, the same figures for them.
    again = run_script(SCRIPT, "--compare-runs", tmp_path / "full" / "seed-3", tmp_path / "lora" / "seed-3",
                       "--output-dir", tmp_path / "again")
    assert again.returncode == 0, again.stderr[-2000:]
    single = json.loads((tmp_path / "again" / "comparison.json").read_text())
    assert single["seeds"] == [3] and single["difference_ci95_points"] is None
    assert single["verdict"] == "no clear difference" and "one seed" in (tmp_path / "again" / "comparison.md").read_text()
    assert single["full"]["test_" + metric] == full["test"][metric]


def test_generation_compare_over_two_seeds(tiny_gpt2, tmp_path):
    result = run_script(SCRIPT, "--task", "generation", "--compare", "--seeds", "1", "2", "--model-name", tiny_gpt2,
                        "--output-dir", tmp_path, *GENERATION_FAST)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    comparison = check_comparison(tmp_path, [1, 2], "perplexity", 1.0, False)
    full = json.loads((tmp_path / "full" / "seed-1" / "metrics.json").read_text())
    lora = json.loads((tmp_path / "lora" / "seed-1" / "metrics.json").read_text())
    assert full["method"] == "full" and lora["method"] == "lora"
    assert full["train"]["blocks"] == lora["train"]["blocks"]
    # Perplexity on the other embedded corpus (the reviews), before and after, for both methods.
    for metrics in (full, lora):
        assert metrics["unrelated"]["file"].endswith("sentiment/test.csv")
        assert metrics["unrelated"]["perplexity_before"] > 1 and metrics["unrelated"]["perplexity"] > 1
    assert comparison["lora"]["unrelated_perplexity"] == pytest.approx(
        statistics.fmean(json.loads((tmp_path / "lora" / f"seed-{s}" / "metrics.json").read_text())["unrelated"]["perplexity"]
                         for s in (1, 2)), abs=1e-4)
    report = (tmp_path / "comparison.md").read_text()
    assert "Forgetting" in report and "unrelated-text perplexity" in report
    # Samples side by side: the prompt, the base model, full fine-tuning and LoRA in one row.
    prompt = full["samples"][0]["prompt"]
    row = next(line for line in report.splitlines() if line.startswith(f"| {prompt} |"))
    assert row.count(" | ") == 3


# ---- the verdict on constructed numbers -------------------------------------------------------------


def fake_run(directory: Path, method: str, seed: int, accuracy: float, runtime: float) -> Path:
    """A finished classification run with chosen figures, as the scripts write it."""
    directory.mkdir(parents=True)
    scores = {"accuracy": accuracy, "f1_macro": accuracy, "examples": 100,
              "per_class": {name: {"precision": accuracy, "recall": accuracy, "f1": accuracy, "support": 50}
                            for name in ("negative", "positive")}}
    metrics = {"task": "text-classification", "method": method, "model": "tiny", "precision": "fp32",
               "params": {"trainable": 1000 if method == "full" else 100, "total": 1000 if method == "full" else 1100},
               "train": {"runtime_s": runtime, "eval_time_s": 0.0, "samples_per_s": 10.0, "peak_rss_mb": 500.0},
               "validation": scores, "test": scores, "saved_size_mb": 4.0 if method == "full" else 0.4,
               "hardware": {"processor": "cpu", "cpu_count": 2, "gpu": None},
               "versions": {"torch": "x", "transformers": "y", "peft": "z", "python": "3"}}
    (directory / "metrics.json").write_text(json.dumps(metrics))
    (directory / "run_config.json").write_text(json.dumps({"args": {"seed": seed}, "argv": ["sentiment_finetuning.py"]}))
    (directory / "training_log.jsonl").write_text(json.dumps({"epoch": 1.0, "loss": 0.5}) + "\n")
    return directory


@pytest.mark.parametrize("lora_scores, expected", [
    ([0.80, 0.81, 0.79], "full better"),  # 5 points under full fine-tuning, every seed
    ([0.90, 0.91, 0.89], "lora better"),
    ([0.84, 0.87, 0.85], "no clear difference"),  # -1, +1, +1 points: the interval spans zero
])
def test_verdict_from_constructed_runs(lora_scores, expected, tmp_path):
    import lora_finetuning

    seeds, full_scores = [1, 2, 3], [0.85, 0.86, 0.84]
    full = [fake_run(tmp_path / "full" / f"seed-{s}", "full", s, a, 10.0) for s, a in zip(seeds, full_scores)]
    lora = [fake_run(tmp_path / "lora" / f"seed-{s}", "lora", s, a, 6.0) for s, a in zip(seeds, lora_scores)]
    comparison = lora_finetuning.write_comparison(full, lora, tmp_path, "python lora_finetuning.py --compare")
    assert comparison["verdict"] == expected
    differences = [100 * (l - f) for f, l in zip(full_scores, lora_scores)]
    assert comparison["difference_ci95_points"] == pytest.approx(t_interval(differences), abs=2e-3)
    assert comparison["metric_difference_points"] == pytest.approx(statistics.fmean(differences), abs=0.01)
    assert comparison["summary"]["lora"]["metric_mean"] == pytest.approx(statistics.fmean(lora_scores), abs=1e-6)
    assert comparison["summary"]["lora"]["metric_sd"] == pytest.approx(statistics.stdev(lora_scores), abs=1e-6)
    assert comparison["lora_time_ratio"] == pytest.approx(0.6)
    assert comparison["parameter_reduction_pct"] == pytest.approx(90.0)
    assert f"**Verdict: {expected}.**" in (tmp_path / "comparison.md").read_text()


def test_verdict_with_lower_is_better_and_without_an_interval():
    import lora_finetuning

    assert lora_finetuning.verdict([-3.0, -1.0], higher_is_better=False) == "lora better"  # lower perplexity
    assert lora_finetuning.verdict([1.0, 3.0], higher_is_better=False) == "full better"
    assert lora_finetuning.verdict(None, higher_is_better=True) == "no clear difference"  # one seed
    assert lora_finetuning.difference_interval([1.5]) is None


# ---- what every run writes: the model card and the charts -------------------------------------------


def read_model_card(output_dir: Path) -> tuple[dict, str]:
    import yaml

    text = (output_dir / "README.md").read_text()
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def card_metrics(metadata: dict) -> dict[tuple[str, str], float]:
    return {(result["dataset"]["split"], metric["type"]): metric["value"]
            for result in metadata["model-index"][0]["results"] for metric in result["metrics"]}


def test_classification_run_writes_its_model_card_and_confusion_matrix(tiny_bert, tmp_path):
    from huggingface_hub import ModelCard
    from transformers import pipeline

    result = run_script("sentiment_finetuning.py", "--model-name", tiny_bert, "--output-dir", tmp_path, *ENCODER_FAST)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    metadata, body = read_model_card(tmp_path)
    assert metadata["base_model"] == str(tiny_bert)
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "text-classification"
    scores = card_metrics(metadata)
    for split in ("validation", "test"):
        assert scores[(split, "accuracy")] == pytest.approx(metrics[split]["accuracy"], abs=1e-4)
        assert scores[(split, "f1")] == pytest.approx(metrics[split]["f1_macro"], abs=1e-4)
    for fragment in ("## Data", "## Training", "| learning rate | 0.005 |", "| batch size | 16 |", "## Results",
                     f"Training took {metrics['train']['runtime_s']:.1f} s", metrics["hardware"]["processor"],
                     "## Command", f"--output-dir {tmp_path}", "## Intended use and limitations"):
        assert fragment in body, fragment
    assert ModelCard.load(tmp_path / "README.md").data.base_model == str(tiny_bert)
    # The card does not get in the way of loading the folder.
    assert pipeline("text-classification", model=str(tmp_path))("a fine film")[0]["label"] in ("negative", "positive")
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


def test_ner_and_lora_runs_write_their_cards_and_entity_chart(tiny_bert, tmp_path):
    result = run_script(SCRIPT, "--task", "ner", "--model-name", tiny_bert, "--output-dir", tmp_path, *ENCODER_FAST)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    metadata, body = read_model_card(tmp_path)
    assert metadata["library_name"] == "peft" and metadata["pipeline_tag"] == "token-classification"
    assert card_metrics(metadata)[("test", "f1")] == pytest.approx(metrics["test"]["f1"], abs=1e-4)
    assert "LoRA rank / alpha | 16 / 32" in body and "AutoPeftModelForTokenClassification" in body
    assert (tmp_path / "entity_f1.png").read_bytes()[:4] == b"\x89PNG"


def test_generation_run_writes_its_model_card(tiny_gpt2, tmp_path):
    result = run_script("text_generation_lora.py", "--model-name", tiny_gpt2, "--output-dir", tmp_path, *GENERATION_FAST)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    metadata, body = read_model_card(tmp_path)
    assert metadata["pipeline_tag"] == "text-generation" and metadata["library_name"] == "peft"
    assert card_metrics(metadata)[("validation", "perplexity")] == pytest.approx(metrics["perplexity"], abs=1e-3)
    assert f"| validation | perplexity before training | {metrics['perplexity_before']:.4f} |" in body


# ---- the learning rate when the bundled model replaces another --------------------------------------


@pytest.mark.parametrize("script, chosen, expected", [("sentiment_finetuning", 2e-5, 1e-4), ("ner_finetuning", 5e-5, 2e-4)])
def test_a_rate_chosen_for_a_replaced_model_is_scaled(script, chosen, expected, capsys):
    import importlib

    import common
    import encoders

    module = importlib.import_module(script)
    args = module.parse_args(["--model-name", "distilbert-base-uncased", "--learning-rate", str(chosen)])
    substitute = common.ResolvedModel(path="/bundled", name=common.BUNDLED_ENCODER_NAME, fallback=True)
    encoders.settle_learning_rate(args, substitute)
    assert args.learning_rate == pytest.approx(expected)
    note = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: learning rate")]
    assert len(note) == 1 and f"--learning-rate {chosen:g}" in note[0] and "distilbert-base-uncased" in note[0]
    # The user's own choice of model keeps the user's rate.
    args = module.parse_args(["--learning-rate", str(chosen)])
    encoders.settle_learning_rate(args, common.ResolvedModel(path="/some/model", name="/some/model"))
    assert args.learning_rate == chosen


@pytest.mark.parametrize("flags, expected", [((), []), (("--keep-base-dropout",), ["--keep-base-dropout"])])
def test_compare_passes_the_lora_settings_to_the_lora_runs_only(flags, expected):
    import lora_finetuning

    args = lora_finetuning.parse_args(["--compare", "--lora-r", "4", *flags])
    commands = lora_finetuning.method_commands(args, ["--epochs", "1"])
    assert [flag for flag in commands["lora"] if flag == "--keep-base-dropout"] == expected
    assert commands["lora"][commands["lora"].index("--lora-r") + 1] == "4"
    assert not any(flag.startswith("--lora") or flag == "--keep-base-dropout" for flag in commands["full"])
