"""Long runs: checkpoints every N steps with bounded disk use, and repeatable results from a seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_script, training_log

FAST = ("--batch-size", "8", "--learning-rate", "1e-3", "--max-train-samples", "40",
        "--max-eval-samples", "40")


def run(script: str, model: Path, output_dir: Path, *extra: str) -> tuple[dict, str]:
    result = run_script(script, "--model-name", model, "--output-dir", output_dir, *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads((output_dir / "metrics.json").read_text()), result.stdout


def checkpoint_steps(output_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (output_dir / "checkpoints").glob("checkpoint-*"))


def test_save_steps_evaluates_and_checkpoints_every_n_steps_and_keeps_at_most_the_limit(tiny_encoder, tmp_path):
    output_dir = tmp_path / "out"
    metrics, stdout = run("sentiment_finetuning.py", tiny_encoder, output_dir, *FAST, "--epochs", "2",
                          "--save-steps", "3")
    assert f"checkpoints: every 3 steps to {output_dir / 'checkpoints'}, at most 2 on disk; kept after the run" in stdout
    steps = metrics["train"]["steps"]
    assert steps == 10  # 40 examples in batches of 8, 2 epochs
    records = training_log(output_dir)
    # Evaluations land on the checkpoints (the best one is picked by its score), plus one after the last step.
    assert [r["step"] for r in records if "eval_accuracy" in r] == [3, 6, 9, 10]
    kept = checkpoint_steps(output_dir)
    assert 1 <= len(kept) <= 2 and kept[-1] == 10  # the latest, and the best when it is another
    state = json.loads((output_dir / "checkpoints" / "checkpoint-10" / "trainer_state.json").read_text())
    assert int(Path(state["best_model_checkpoint"]).name.split("-")[1]) in kept


def test_text_generation_save_steps_and_limit(tiny_gpt2, tmp_path):
    output_dir = tmp_path / "gen"
    metrics, stdout = run("text_generation_lora.py", tiny_gpt2, output_dir, "--block-size", "64", "--epochs", "1",
                          "--batch-size", "8", "--max-new-tokens", "8", "--max-steps", "5",
                          "--save-steps", "2")
    assert metrics["train"]["steps"] == 5
    assert f"checkpoints: every 2 steps to {output_dir / 'checkpoints'}, at most 1 on disk; kept after the run" in stdout
    assert checkpoint_steps(output_dir) == [5]  # saved at 2, 4 and after the last step; the older ones deleted


def test_same_seed_gives_the_same_metrics(tiny_encoder, tmp_path):
    """Two CPU runs with the same seed and data: identical scores, losses and training log."""
    first, _ = run("sentiment_finetuning.py", tiny_encoder, tmp_path / "a", *FAST, "--epochs", "2", "--seed", "7")
    second, _ = run("sentiment_finetuning.py", tiny_encoder, tmp_path / "b", *FAST, "--epochs", "2", "--seed", "7")
    for split in ("validation", "test"):
        for key in ("accuracy", "f1_macro", "loss"):
            assert second[split][key] == pytest.approx(first[split][key], abs=1e-6), (split, key)
        assert second[split]["confusion_matrix"] == first[split]["confusion_matrix"]
    assert second["train"]["final_loss"] == pytest.approx(first["train"]["final_loss"], abs=1e-6)
    assert second["train"]["steps"] == first["train"]["steps"]

    def scores(output_dir: Path) -> list[dict]:
        records = training_log(output_dir)
        return [{k: v for k, v in r.items() if k in ("step", "loss", "grad_norm", "eval_loss", "eval_accuracy")}
                for r in records]

    for a, b in zip(scores(tmp_path / "a"), scores(tmp_path / "b"), strict=True):
        assert b == pytest.approx(a, abs=1e-6)
    # A different seed changes the data order and the head's initialisation: the check above can fail.
    third, _ = run("sentiment_finetuning.py", tiny_encoder, tmp_path / "c", *FAST, "--epochs", "2", "--seed", "8")
    assert third["validation"]["loss"] != first["validation"]["loss"]
