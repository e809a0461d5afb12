#!/usr/bin/env python
"""Benchmark: LoRA's defaults against full fine-tuning on real data, several seeds each.

    python benchmarks/lora_vs_full.py                          # SST-2 and WikiANN-en, seeds 1 2 3
    python benchmarks/lora_vs_full.py --tasks sst2 -- --lora-r 16 --learning-rate 2e-3   # flags for lora_finetuning.py

Each task is one `lora_finetuning.py --compare --seeds ...` run with the defaults of both methods
(the bundled MiniLM; nothing is copied into the project):

  * sst2     SST-2 phrases, benchmarks/sentiment_sst2.py's split: 1,000 whole sentences held out for
             the score, their sub-phrases removed from training; 8,000 training phrases, 1 epoch,
             batch 32.
  * wikiann  WikiANN-en (PER/ORG/LOC): 5,000 training sentences, the first half of `dev` for
             validation and the second half for the score (benchmarks/ner_benchmark.py's split),
             1 epoch, batch 32.

Each comparison folder (benchmarks/results/lora_vs_full/TASK) holds comparison.md, comparison.json,
the plots and every run; the table printed at the end is also written to
benchmarks/results/lora_vs_full.json (one row per task, the latest run of each).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from ner_benchmark import split_dev  # noqa: E402
from sentiment_sst2 import read_sst2, sentence_level_split, write_tsv  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=("sst2", "wikiann"), default=["sst2", "wikiann"])
    parser.add_argument("--seeds", nargs="+", default=["1", "2", "3"])
    parser.add_argument("--data-dir", default=str(SHARED), help="Folder holding sst2/ and wikiann_en/.")
    parser.add_argument("--output-root", default=str(RESULTS / "lora_vs_full"))
    parser.add_argument("script_args", nargs="*", help="Extra flags for lora_finetuning.py (after --).")
    return parser.parse_args()


def task_flags(task: str, data_dir: Path) -> list[str]:
    if task == "sst2":
        work = RESULTS / "sst2_split"
        work.mkdir(parents=True, exist_ok=True)
        train, test = sentence_level_split(read_sst2(data_dir / "sst2" / "train.tsv"), 1000)
        write_tsv(work / "train.tsv", train)
        write_tsv(work / "heldout_sentences.tsv", test)
        return ["--train-file", str(work / "train.tsv"), "--test-file", str(work / "heldout_sentences.tsv"),
                "--max-train-samples", "8000"]
    validation, test = split_dev(data_dir / "wikiann_en" / "dev", RESULTS / "wikiann_en")
    return ["--task", "ner", "--train-file", str(data_dir / "wikiann_en" / "train"), "--validation-file",
            str(validation), "--test-file", str(test), "--max-train-samples", "5000"]


def main() -> int:
    args = parse_args()
    data_dir = Path(args.data_dir)
    needed = {"sst2": data_dir / "sst2" / "train.tsv", "wikiann": data_dir / "wikiann_en" / "train"}
    missing = [str(needed[task]) for task in args.tasks if not needed[task].is_file()]
    if missing:
        print(f"error: {missing[0]} not found; this benchmark needs the shared corpora under {data_dir} "
              "(--data-dir).", file=sys.stderr)
        return 2
    rows = []
    for task in args.tasks:
        output_dir = Path(args.output_root) / task
        command = [sys.executable, str(ROOT / "lora_finetuning.py"), "--compare", "--seeds", *args.seeds,
                   *task_flags(task, data_dir), "--epochs", "1", "--batch-size", "32", "--output-dir", str(output_dir),
                   *args.script_args]
        print("running:", " ".join(command[1:]), flush=True)
        subprocess.run(command, check=True)
        comparison = json.loads((output_dir / "comparison.json").read_text())
        summary = comparison["summary"]
        rows.append({"task": task, "command": " ".join(command[1:]), "metric": comparison["metric"],
                     "full_mean": summary["full"]["metric_mean"], "full_sd": summary["full"]["metric_sd"],
                     "lora_mean": summary["lora"]["metric_mean"], "lora_sd": summary["lora"]["metric_sd"],
                     "difference_points": comparison["metric_difference_points"],
                     "difference_ci95_points": comparison["difference_ci95_points"],
                     "verdict": comparison["verdict"], "lora_time_ratio": comparison["lora_time_ratio"],
                     "lora_settings": comparison["lora_settings"], "hardware": comparison["hardware"]})
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = RESULTS / "lora_vs_full.json"  # the other tasks' rows stay as their last run left them
    kept = [row for row in (json.loads(results.read_text()) if results.is_file() else []) if row["task"] not in args.tasks]
    rows = sorted(kept + rows, key=lambda row: row["task"])
    results.write_text(json.dumps(rows, indent=2) + "\n")
    print("\n| task | metric | full fine-tuning | LoRA | LoRA - full (95% interval) | LoRA time / full | verdict |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        low, high = r["difference_ci95_points"] or (float("nan"), float("nan"))
        print(f"| {r['task']} | {r['metric']} | {r['full_mean']:.4f} ± {r['full_sd']:.4f} | {r['lora_mean']:.4f} ± "
              f"{r['lora_sd']:.4f} | {r['difference_points']:+.2f} [{low:+.2f}, {high:+.2f}] | "
              f"{r['lora_time_ratio']:.2f}x | {r['verdict']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
