"""Resuming, for every script: a real run is stopped mid-way (SIGTERM: the graceful stop saves a
checkpoint after the current step), resumed with --resume-from-checkpoint auto, and the resumed
process trains only the remaining optimizer steps (its own log line says which) and ends with the
metrics of a run that was never stopped."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import OFFLINE_ENV, ROOT, run_script

# Loaded into the stopped run only: each optimizer step also sleeps 100 ms, so that the signal
# arrives while training is under way, whatever the machine's speed. Timing only: no result changes.
SLOW_STEPS = '''
import time
import transformers

_training_step = transformers.Trainer.training_step


def _slow_training_step(self, *args, **kwargs):
    time.sleep(0.1)
    return _training_step(self, *args, **kwargs)


transformers.Trainer.training_step = _slow_training_step
'''
TRAINED = re.compile(r"optimizer steps (\d+)-(\d+) of (\d+) in this process")


def steps_trained(stdout: str) -> tuple[int, int, int]:
    """(first, last, total) of the 'optimizer steps A-B of N in this process' line."""
    found = TRAINED.findall(stdout)
    assert len(found) == 1, stdout[-2000:]
    return tuple(map(int, found[0]))


def stop_mid_way(script: str, flags: list[str], output_dir: Path, tmp_path: Path) -> int:
    """Start a run, stop it with SIGTERM once it has written its first checkpoint; return the step
    of the checkpoint it saved when it stopped."""
    hook = tmp_path / "slow-steps"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SLOW_STEPS)
    env = {**OFFLINE_ENV, "PYTHONPATH": str(hook)}
    process = subprocess.Popen([sys.executable, str(ROOT / script), *flags, "--output-dir", str(output_dir)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if any((output_dir / "checkpoints").glob("checkpoint-*/trainer_state.json")):
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 130, stdout[-2000:] + stderr[-3000:]
    assert "Traceback" not in stderr and "--resume-from-checkpoint" in stderr
    assert not (output_dir / "metrics.json").exists(), "a stopped run saves no final model"
    steps = sorted(int(p.name.split("-")[1]) for p in (output_dir / "checkpoints").glob("checkpoint-*"))
    assert steps, "the stop saved a checkpoint"
    return steps[-1]


def check_resume(script: str, flags: list[str], tmp_path: Path, same: list[tuple[str, ...]]) -> None:
    reference = run_script(script, *flags, "--output-dir", tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr
    expected = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    first, last, total = steps_trained(reference.stdout)
    assert (first, last) == (1, total) == (1, expected["train"]["steps"])

    output_dir = tmp_path / "stopped"
    checkpoint = stop_mid_way(script, flags, output_dir, tmp_path)
    assert 0 < checkpoint < total, "stopped mid-way"
    resumed = run_script(script, *flags, "--output-dir", output_dir, "--resume-from-checkpoint", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert steps_trained(resumed.stdout) == (checkpoint + 1, total, total), "only the remaining steps"
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["train"]["steps"] == total
    for path in same:
        got, want = metrics, expected
        for key in path:
            got, want = got[key], want[key]
        assert got == pytest.approx(want, rel=1e-4), path


def test_sentiment_resumes_with_the_remaining_steps(tiny_encoder, tmp_path):
    flags = ["--model-name", str(tiny_encoder), "--epochs", "3", "--batch-size", "8", "--learning-rate", "1e-3",
             "--max-train-samples", "96", "--max-eval-samples", "40", "--save-steps", "4"]
    check_resume("sentiment_finetuning.py", flags, tmp_path,
                 [("validation", "accuracy"), ("validation", "loss"), ("test", "accuracy")])


def test_lora_resumes_with_the_remaining_steps(tiny_encoder, tmp_path):
    flags = ["--model-name", str(tiny_encoder), "--epochs", "3", "--batch-size", "8", "--learning-rate", "5e-3",
             "--max-train-samples", "96", "--max-eval-samples", "40", "--save-steps", "4"]
    check_resume("lora_finetuning.py", flags, tmp_path,
                 [("validation", "accuracy"), ("validation", "loss"), ("test", "accuracy")])


def test_ner_resumes_with_the_remaining_steps(tiny_encoder, tmp_path):
    flags = ["--model-name", str(tiny_encoder), "--epochs", "2", "--batch-size", "8", "--learning-rate", "1e-3",
             "--max-train-samples", "96", "--max-eval-samples", "30"]
    check_resume("ner_finetuning.py", flags, tmp_path,
                 [("validation", "f1"), ("validation", "loss"), ("test", "f1")])


def test_text_generation_resumes_with_the_remaining_steps(tiny_gpt2, tmp_path):
    flags = ["--model-name", str(tiny_gpt2), "--block-size", "64", "--max-steps", "24", "--batch-size", "4",
             "--max-new-tokens", "4", "--save-steps", "4", "--greedy"]
    check_resume("text_generation_lora.py", flags, tmp_path,
                 [("perplexity",), ("perplexity_before",)])
