#!/usr/bin/env python
"""Benchmark: ner_finetuning.py on real NER corpora with the bundled encoder.

    python benchmarks/ner_benchmark.py                         # both corpora, project defaults
    python benchmarks/ner_benchmark.py --datasets wnut17 --tag "lr 1e-4" -- --learning-rate 1e-4

Corpora (from ../shared/data; nothing is copied into the project):

  * wnut17      WNUT 2017 emerging entities (noisy user text, 6 types): trained on
                wnut17train.conll, validated on emerging.dev.conll, tested on emerging.test.annotated.
  * wikiann_en  WikiANN English (PER/ORG/LOC, silver labels): a seeded subset of `train`
                (--wikiann-train-samples), validated on the first half of `dev` and tested on the
                second half (the corpus has no test file; the halves are written to
                benchmarks/results/wikiann_en/). Its tokens carry an `en:` prefix, which the script
                detects and strips.

Each corpus is trained as the acceptance test does (3 epochs, --batch-size 32, the script's default
learning rate for the model); extra flags after `--` go to ner_finetuning.py. Figures go to
benchmarks/results/ner.json (one entry per run, appended) and are printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
CORPORA = {
    "wnut17": {"train": "wnut17/wnut17train.conll", "validation": "wnut17/emerging.dev.conll",
               "test": "wnut17/emerging.test.annotated"},
    "wikiann_en": {"train": "wikiann_en/train", "dev": "wikiann_en/dev"},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=sorted(CORPORA), default=sorted(CORPORA, reverse=True))
    parser.add_argument("--data-dir", default=str(SHARED), help="Folder holding wnut17/ and wikiann_en/.")
    parser.add_argument("--epochs", default="3")
    parser.add_argument("--batch-size", default="32")
    parser.add_argument("--wikiann-train-samples", default="5000",
                        help="Seeded subset of WikiANN's 20,000 training sentences (keeps the run short).")
    parser.add_argument("--seed", default="42")
    parser.add_argument("--model-name", default="bert-base-cased",
                        help="Passed to the script; offline this falls back to the bundled encoder.")
    parser.add_argument("--output-root", default=str(RESULTS / "ner_models"))
    parser.add_argument("--tag", default="project defaults", help="Name of this run in the results file.")
    parser.add_argument("script_args", nargs="*", help="Extra flags for ner_finetuning.py (after --).")
    return parser.parse_args()


def split_dev(dev: Path, work: Path) -> tuple[Path, Path]:
    """Write the first and second halves of a CoNLL dev file (whole sentences) as validation/test."""
    sentences = [block for block in dev.read_text(encoding="utf-8").split("\n\n") if block.strip()]
    half = len(sentences) // 2
    work.mkdir(parents=True, exist_ok=True)
    validation, test = work / "dev_first_half.conll", work / "dev_second_half.conll"
    validation.write_text("\n\n".join(sentences[:half]) + "\n", encoding="utf-8")
    test.write_text("\n\n".join(sentences[half:]) + "\n", encoding="utf-8")
    return validation, test


def run_corpus(name: str, args: argparse.Namespace, data_dir: Path) -> dict:
    files = {split: data_dir / path for split, path in CORPORA[name].items()}
    extra = []
    if name == "wikiann_en":
        validation, test = split_dev(files.pop("dev"), RESULTS / "wikiann_en")
        files.update(validation=validation, test=test)
        extra = ["--max-train-samples", args.wikiann_train_samples]
    output_dir = Path(args.output_root) / name
    command = [sys.executable, str(ROOT / "ner_finetuning.py"), "--model-name", args.model_name,
               "--train-file", str(files["train"]), "--validation-file", str(files["validation"]),
               "--test-file", str(files["test"]), "--epochs", args.epochs, "--batch-size", args.batch_size,
               "--seed", args.seed, "--output-dir", str(output_dir), "--overwrite-output-dir", *extra,
               *args.script_args]
    print("running:", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - started
    metrics = json.loads((output_dir / "metrics.json").read_text())
    return {
        "tag": args.tag, "dataset": name, "command": " ".join(command[1:]),
        "model": metrics["model"], "precision": metrics["precision"], "epochs": metrics["train"]["epochs"],
        "learning_rate": json.loads((output_dir / "run_config.json").read_text())["args"]["learning_rate"],
        "train_sentences": metrics["train"]["examples"], "train_runtime_s": metrics["train"]["runtime_s"],
        "eval_time_s": metrics["train"].get("eval_time_s"),
        "sentences_per_s": metrics["train"]["sentences_per_s"], "wall_time_s": round(wall, 1),
        "dev_f1": metrics["validation"]["f1"], "dev_accuracy": metrics["validation"]["accuracy"],
        "test_f1": metrics["test"]["f1"], "test_accuracy": metrics["test"]["accuracy"],
        "test_precision": metrics["test"]["precision"], "test_recall": metrics["test"]["recall"],
        "test_per_type": metrics["test"]["per_type"], "scheme": metrics["scheme"],
        "hardware": metrics["hardware"], "versions": metrics["versions"],
    }


def main() -> int:
    args = parse_args()
    data_dir = Path(args.data_dir)
    missing = [str(data_dir / path) for name in args.datasets for path in CORPORA[name].values()
               if not (data_dir / path).is_file()]
    if missing:
        print(f"error: {missing[0]} not found; this benchmark needs the shared NER corpora under {data_dir} "
              "(../shared/data/wnut17 and ../shared/data/wikiann_en, or --data-dir).", file=sys.stderr)
        return 2
    results = [run_corpus(name, args, data_dir) for name in args.datasets]
    RESULTS.mkdir(parents=True, exist_ok=True)
    results_file = RESULTS / "ner.json"
    history = json.loads(results_file.read_text()) if results_file.exists() else []
    results_file.write_text(json.dumps(history + results, indent=2) + "\n")
    print("\n| run | dataset | model | epochs | lr | train sentences | train time | sentences/s "
          "| entity F1 dev | entity F1 test | token acc. dev | token acc. test |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['tag']} | {r['dataset']} | {r['model'].split(' ')[0]} | {r['epochs']:g} | {r['learning_rate']:g} "
              f"| {r['train_sentences']} | {r['train_runtime_s']:.0f} s | {r['sentences_per_s']:.1f} "
              f"| {r['dev_f1']:.3f} | {r['test_f1']:.3f} | {r['dev_accuracy']:.3f} | {r['test_accuracy']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
