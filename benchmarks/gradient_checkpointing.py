#!/usr/bin/env python
"""Benchmark: what --gradient-checkpointing saves in memory and costs in time.

    python benchmarks/gradient_checkpointing.py              # 2 alternating rounds
    python benchmarks/gradient_checkpointing.py --rounds 3

Two workloads, each run with and without --gradient-checkpointing, alternating (off, on, off,
on, ...), each run its own process:

  * text generation: text_generation_lora.py at its defaults (the bundled SmolLM2 offline, LoRA on
    all seven projections, the embedded recipes, block size 256 on a CPU, batch 8), 8 optimizer
    steps;
  * classification: sentiment_finetuning.py at its defaults (the bundled MiniLM, full fine-tuning,
    batch 8, max length 128) with batch 32 on 1,024 embedded reviews, one epoch.

Reported per workload: the median peak resident memory of the process (train.peak_rss_mb: the
model, the optimizer and the largest training step; a CPU process has no separate accelerator
memory) and the median seconds per optimizer step. Written to
benchmarks/results/gradient_checkpointing.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WORKLOADS = {
    "text generation (SmolLM2 LoRA, block 256, batch 8)":
        ["text_generation_lora.py", "--max-steps", "8", "--max-eval-samples", "2", "--max-new-tokens", "4"],
    "classification (MiniLM full, batch 32, 1,024 reviews)":
        ["sentiment_finetuning.py", "--epochs", "1", "--batch-size", "32", "--max-train-samples", "1024",
         "--max-eval-samples", "64"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    rounds = parser.parse_args().rounds
    table = {}
    for workload, command in WORKLOADS.items():
        runs: dict[str, list[dict]] = {"off": [], "on": []}
        for _ in range(rounds):
            for setting in runs:
                output_dir = RESULTS / "gradient_checkpointing" / setting
                flags = ["--gradient-checkpointing"] if setting == "on" else []
                full = [sys.executable, str(ROOT / command[0]), *command[1:], *flags, "--output-dir", str(output_dir),
                        "--overwrite-output-dir"]
                print("$", " ".join(full[1:]), flush=True)
                subprocess.run(full, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                train = json.loads((output_dir / "metrics.json").read_text())["train"]
                runs[setting].append({"peak_rss_mb": train["peak_rss_mb"], "seconds_per_step": train["runtime_s"] / train["steps"]})
        table[workload] = {setting: {"peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in records),
                                     "seconds_per_step": round(statistics.median(r["seconds_per_step"] for r in records), 3),
                                     "runs": records}
                           for setting, records in runs.items()}
    result = {"command": "python benchmarks/gradient_checkpointing.py " + " ".join(sys.argv[1:]), "results": table}
    (RESULTS / "gradient_checkpointing.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'workload':<55} {'peak MB off':>12} {'peak MB on':>11} {'s/step off':>11} {'s/step on':>10}")
    for workload, row in table.items():
        print(f"{workload:<55} {row['off']['peak_rss_mb']:>12.0f} {row['on']['peak_rss_mb']:>11.0f} "
              f"{row['off']['seconds_per_step']:>11.3f} {row['on']['seconds_per_step']:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
