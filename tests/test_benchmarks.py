"""The benchmark harness (benchmarks/): the same SST-2 split in every process; the step anatomy."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT, run_script

SPLIT = '''
import json, sys
sys.path.insert(0, sys.argv[1])
import sentiment_sst2
words = ["good", "bad", "film", "plot", "cast", "score", "scene", "story"]
rows = [(" ".join(words[(i + k) % 8] for k in range(6 + i % 3)) + f" {i}", i % 2) for i in range(400)]
rows += [(sentence.rsplit(" ", 2)[0], label) for sentence, label in rows[:50]]  # sub-phrases
train, test = sentiment_sst2.sentence_level_split(rows, held_out=20, seed=3)
print(json.dumps([train, test]))
'''


def test_sst2_sentence_split_is_the_same_in_every_process():
    """Many held-out candidates share a length; their order must not come from string hashing,
    which Python salts per process (PYTHONHASHSEED)."""
    splits = []
    for hash_seed in ("1", "2", "3"):
        result = subprocess.run([sys.executable, "-c", SPLIT, str(ROOT / "benchmarks")], capture_output=True,
                                text=True, check=True, env={**os.environ, "PYTHONHASHSEED": hash_seed})
        splits.append(json.loads(result.stdout))
    assert splits[0] == splits[1] == splits[2]
    train, test = splits[0]
    assert len(test) == 20 and not {sentence for sentence, _ in test} & {sentence for sentence, _ in train}


def test_step_anatomy_times_both_steps_and_records_the_products_each_really_runs(tiny_encoder, tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import step_anatomy
    import torch

    models = step_anatomy.load_models(str(tiny_encoder))
    batch = step_anatomy.make_batch(torch.Generator().manual_seed(0), models["stock"].config.vocab_size, 4, 6)
    stock = step_anatomy.linear_shapes(models["stock"], batch, "fp32")
    project = step_anatomy.linear_shapes(models["project"], batch, "fp32")
    # 2 layers x (query, key, value, attention output, intermediate, output), then pooler and classifier.
    assert stock == [(24, 32, 32)] * 4 + [(24, 32, 64), (24, 64, 32)] + [(24, 32, 32)] * 4 \
        + [(24, 32, 64), (24, 64, 32), (4, 32, 32), (4, 32, 2)]
    # The project's last layer runs its query, attention output and feed-forward block on the first
    # token only; its keys and values still cover every token.
    assert project == stock[:6] + [(4, 32, 32), (24, 32, 32), (24, 32, 32), (4, 32, 32), (4, 32, 64), (4, 64, 32)] \
        + stock[-2:]

    result = run_script("benchmarks/step_anatomy.py", "--model-name", tiny_encoder, "--batch-size", 4,
                        "--lengths", 6, 9, "--steps", 2, "--rounds", 1, "--json", tmp_path / "anatomy.json")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "anatomy.json").read_text())
    assert [(row["length"], row["run"]) for row in report["results"]] == [
        (6, "project"), (6, "stock"), (9, "project"), (9, "stock")]
    for row in report["results"]:
        phases = [row[f"{phase}_ms"] for phase in step_anatomy.PHASES]
        assert all(value > 0 for value in phases) and row["linear_products_ms"] > 0
        assert abs(sum(phases) - row["step_ms"]) < 0.05
    assert result.stdout.count("| project |") == 2 and "| stock |" in result.stdout
