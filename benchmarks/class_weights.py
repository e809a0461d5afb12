#!/usr/bin/env python
"""Benchmark: --class-weights balanced on imbalanced training data, scored on balanced data.

    python benchmarks/class_weights.py                      # seeds 1 2, 3,300 training phrases
    python benchmarks/class_weights.py --seeds 1 2 3 --positives 6000

SST-2 (../shared/data/sst2, nothing copied into the project), benchmarks/sentiment_sst2.py's
split: whole sentences are held out and their sub-phrases removed from training. From the
training phrases, --positives positive and a tenth as many negative ones train the model (10:1);
400 positive and 400 negative held-out sentences are the test set, 200 + 200 other phrases the
validation set. sentiment_finetuning.py runs with its defaults (the bundled MiniLM offline), one
epoch, batch 32, once with --class-weights none and once with balanced per seed. The table is
printed and written to benchmarks/results/class_weights.json.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from sentiment_sst2 import read_sst2, sentence_level_split, write_tsv  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", default=["1", "2"])
    parser.add_argument("--positives", type=int, default=3000, help="Positive training phrases (negatives: a tenth).")
    parser.add_argument("--data-dir", default=str(SHARED), help="Folder holding sst2/.")
    return parser.parse_args()


def balanced(rows: list[tuple[str, int]], per_class: int, rng: random.Random) -> list[tuple[str, int]]:
    return [row for label in (0, 1) for row in rng.sample([r for r in rows if r[1] == label], per_class)]


def write_data(data_dir: Path, positives: int) -> list[str]:
    work = RESULTS / "class_weights_data"
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    train, held_out = sentence_level_split(read_sst2(data_dir / "sst2" / "train.tsv"), 2000)
    test = balanced(held_out, 400, rng)
    rng.shuffle(train)
    validation = balanced(train[:5000], 200, rng)
    rest = train[5000:]
    imbalanced = ([r for r in rest if r[1] == 1][:positives] + [r for r in rest if r[1] == 0][:positives // 10])
    for name, rows in (("train", imbalanced), ("validation", validation), ("test", test)):
        write_tsv(work / f"{name}.tsv", rows)
    return ["--train-file", str(work / "train.tsv"), "--validation-file", str(work / "validation.tsv"),
            "--test-file", str(work / "test.tsv")]


def main() -> int:
    args = parse_args()
    data = write_data(Path(args.data_dir), args.positives)
    scores: dict[str, list[dict]] = {"none": [], "balanced": []}
    for seed in args.seeds:
        for weights in scores:
            output_dir = RESULTS / "class_weights" / f"{weights}-seed-{seed}"
            command = [sys.executable, str(ROOT / "sentiment_finetuning.py"), *data, "--epochs", "1", "--batch-size", "32",
                       "--class-weights", weights, "--metric-for-best-model", "f1_macro", "--seed", seed,
                       "--output-dir", str(output_dir), "--overwrite-output-dir"]
            print("$", " ".join(command[1:]), flush=True)
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            test = json.loads((output_dir / "metrics.json").read_text())["test"]
            scores[weights].append({"seed": seed, "f1_macro": test["f1_macro"], "accuracy": test["accuracy"]})
    table = {weights: {"f1_macro_mean": round(statistics.mean(r["f1_macro"] for r in runs), 4),
                       "accuracy_mean": round(statistics.mean(r["accuracy"] for r in runs), 4), "runs": runs}
             for weights, runs in scores.items()}
    result = {"command": "python benchmarks/class_weights.py " + " ".join(sys.argv[1:]), "positives": args.positives,
              "negatives": args.positives // 10, "test": "400 positive + 400 negative held-out SST-2 sentences",
              "results": table}
    (RESULTS / "class_weights.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'class weights':<14} {'test macro-F1':>14} {'test accuracy':>14}")
    for weights, row in table.items():
        print(f"{weights:<14} {row['f1_macro_mean']:>14.4f} {row['accuracy_mean']:>14.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
