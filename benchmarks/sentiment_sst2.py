#!/usr/bin/env python
"""Benchmark: sentiment_finetuning.py on real SST-2 data, judged on unseen sentences and another domain.

    python benchmarks/sentiment_sst2.py                       # needs ../shared/data/sst2/train.tsv
    python benchmarks/sentiment_sst2.py -- --no-speedups          # extra flags go to the script

SST-2's train.tsv holds every phrase of each sentence, so a random split leaks test sentences into
training through their sub-phrases. This benchmark holds out 1,000 whole sentences (rows that are
no part of a longer row) and removes every training row that is a piece of one of them. The model
is then trained as the acceptance test does (8,000 examples, 1 epoch, batch 32, lr 1e-4), loaded
back with plain AutoModelForSequenceClassification and scored on

  * the held-out SST-2 sentences (sentence-level, unseen), and
  * the project's own review data (data/sentiment, all splits: products, films, restaurants,
    services) as a second corpus from other domains that the model never saw.

Figures go to benchmarks/results/sentiment_sst2.json and are printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SST2 = ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"
RESULTS = ROOT / "benchmarks" / "results"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sst2-file", default=str(DEFAULT_SST2), help="SST-2 train.tsv (sentence<TAB>label).")
    parser.add_argument("--held-out", type=int, default=1000, help="Whole sentences held out for testing.")
    parser.add_argument("--train-samples", type=int, default=8000)
    parser.add_argument("--epochs", default="1")
    parser.add_argument("--batch-size", default="32")
    parser.add_argument("--learning-rate", default="1e-4")
    parser.add_argument("--seed", default="42")
    parser.add_argument("--output-dir", default=str(RESULTS / "sentiment_sst2_model"))
    parser.add_argument("--tag", default="project defaults", help="Name of this run in the results file.")
    parser.add_argument("script_args", nargs="*", help="Extra flags for sentiment_finetuning.py (after --).")
    return parser.parse_args()


def read_sst2(path: Path) -> list[tuple[str, int]]:
    with path.open(encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        return [(sentence.strip(), int(label)) for sentence, label in reader]


def sentence_level_split(rows: list[tuple[str, int]], held_out: int, seed: int = 0):
    """Hold out whole sentences; drop every training row that is a sub-phrase of one of them."""
    # Ties in length are broken by the text: a set's order changes from process to process
    # (string hashing is salted), and with it the held-out sample drawn below.
    by_length = sorted(set(rows), key=lambda row: (-len(row[0]), row))
    longer, roots = "\n", []
    for sentence, label in by_length:
        if len(sentence.split()) < 6:
            break
        if sentence not in longer:  # not part of any longer row: a whole sentence
            roots.append((sentence, label))
        longer += sentence + "\n"
    test = random.Random(seed).sample(roots, held_out)
    joined = "\n".join(sentence for sentence, _ in test)
    train = [row for row in rows if row[0] not in joined]
    return train, test


def write_tsv(path: Path, rows: list[tuple[str, int]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        handle.write("sentence\tlabel\n")
        handle.writelines(f"{sentence}\t{label}\n" for sentence, label in rows)


def accuracy(model_dir: Path, texts: list[str], labels: list[int]) -> float:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(texts), 64):
            batch = tokenizer(texts[start:start + 64], truncation=True, max_length=256, padding=True,
                              return_tensors="pt")
            predicted = model(**batch).logits.argmax(-1).tolist()
            correct += sum(int(p) == y for p, y in zip(predicted, labels[start:start + 64]))
    return correct / len(texts)


def project_reviews() -> tuple[list[str], list[int]]:
    texts, labels = [], []
    for split in ("train", "validation", "test"):
        with (ROOT / "data" / "sentiment" / f"{split}.csv").open(encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                texts.append(row["text"])
                labels.append(1 if row["label"] == "positive" else 0)
    return texts, labels


def main() -> int:
    args = parse_args()
    sst2 = Path(args.sst2_file)
    if not sst2.is_file():
        print(f"error: {sst2} not found; this benchmark needs the shared SST-2 file (--sst2-file).", file=sys.stderr)
        return 2
    work = RESULTS / "sst2_split"
    work.mkdir(parents=True, exist_ok=True)
    train, test = sentence_level_split(read_sst2(sst2), args.held_out)
    write_tsv(work / "train.tsv", train)
    write_tsv(work / "heldout_sentences.tsv", test)
    print(f"split: {len(train)} training rows (after removing sub-phrases of held-out sentences), "
          f"{len(test)} held-out sentences")

    command = [sys.executable, str(ROOT / "sentiment_finetuning.py"), "--train-file", str(work / "train.tsv"),
               "--test-file", str(work / "heldout_sentences.tsv"), "--max-train-samples", str(args.train_samples),
               "--epochs", args.epochs, "--batch-size", args.batch_size, "--learning-rate", args.learning_rate,
               "--seed", args.seed, "--output-dir", args.output_dir, "--overwrite-output-dir", *args.script_args]
    print("running:", " ".join(command))
    started = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - started

    model_dir = Path(args.output_dir)
    metrics = json.loads((model_dir / "metrics.json").read_text())
    review_texts, review_labels = project_reviews()
    result = {
        "tag": args.tag, "command": " ".join(command[1:]),
        "model": metrics["model"], "precision": metrics["precision"],
        "train_examples": metrics["train"]["examples"], "train_runtime_s": metrics["train"]["runtime_s"],
        "samples_per_s": metrics["train"]["samples_per_s"], "wall_time_s": round(wall, 1),
        "sst2_heldout_sentences_accuracy": accuracy(model_dir, [t for t, _ in test], [y for _, y in test]),
        "project_reviews_accuracy": accuracy(model_dir, review_texts, review_labels),
        "hardware": metrics["hardware"], "versions": metrics["versions"],
    }
    results_file = RESULTS / "sentiment_sst2.json"
    history = json.loads(results_file.read_text()) if results_file.exists() else []
    history.append(result)
    results_file.write_text(json.dumps(history, indent=2) + "\n")
    print("\n| run | train time | samples/s | SST-2 held-out sentences | project reviews (other domains) |")
    print("|---|---|---|---|---|")
    print(f"| {args.tag} | {result['train_runtime_s']:.1f} s | {result['samples_per_s']:.0f} | "
          f"{result['sst2_heldout_sentences_accuracy']:.3f} | {result['project_reviews_accuracy']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
