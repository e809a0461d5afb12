#!/usr/bin/env python
"""The project's scripts at another commit against the current ones and the stock Trainer (b).

    python benchmarks/before_after.py --ref 3bcccb2 --tasks sentiment ner --rounds 2

REF is checked out into a temporary git worktree. Each round then runs, one process at a time:
REF's script, the current script and baseline (b), with run_all.py's data, settings and commands
(the order reversed every other round, since a run's place in a sequence shifts its time on a
shared machine). It prints every run's end-to-end time (process start to the saved weights) and
training time, then the medians, their ratios to (b) and the current run's time over REF's round by
round. REF's script runs with its own defaults, as the current one does; (b) copies the current
script's settings. Timings on a 2-core machine drift by 10% or more between runs: compare medians
of two rounds or more, and more rounds for differences under about 10%.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run_all  # noqa: E402

TASKS = ("sentiment", "ner", "lora")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", required=True, help="The commit (or tag, branch) to compare with.")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=["sentiment", "ner"])
    parser.add_argument("--rounds", type=run_all.common.positive_int, default=2,
                        help="Rounds; each runs the three in turn.")
    parser.add_argument("--data-dir", default=str(run_all.ROOT.parent / "shared" / "data"),
                        help="Folder holding sst2/ and wnut17/.")
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "finetune-before-after"),
                        help="Data splits, the worktree of REF, saved models and logs.")
    parser.add_argument("--sst2-train", type=run_all.common.positive_int, default=run_all.FULL["sst2_train"],
                        help="SST-2 training examples (sentiment, LoRA).")
    defaults = run_all.parse_args([])  # run_all.py's settings at their defaults (the full benchmark)
    return argparse.Namespace(**{**vars(defaults), **vars(parser.parse_args())})


def main() -> int:
    args = parse_args()
    data_dir, work = Path(args.data_dir), Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    reference = work / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    subprocess.run(["git", "worktree", "prune"], cwd=run_all.ROOT, check=True)
    subprocess.run(["git", "worktree", "add", "--detach", str(reference), args.ref], cwd=run_all.ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    encoder = str(run_all.common.bundled_encoder_dir())
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    try:
        for task in args.tasks:
            files = (run_all.prepare_wnut(data_dir, work, None, None) if task == "ner" else
                     run_all.prepare_sst2(data_dir, work, args.sst2_train, args.sst2_held_out, args.seed))
            rows: dict[str, list[dict]] = {"reference": [], "current": [], "tuned": []}
            run_config = None  # the current run's settings, which (b) copies
            for round_number in range(args.rounds):
                order = list(rows) if round_number % 2 == 0 else list(rows)[::-1]
                for run in order:
                    output_dir = work / "runs" / task / run
                    shutil.rmtree(output_dir, ignore_errors=True)
                    output_dir.mkdir(parents=True)
                    if run == "tuned":
                        model, lora = run_all.project_settings(task, run_config, encoder, encoder, None)
                        command = run_all.baseline_command(task, "tuned", files, output_dir, args, model, lora, None)
                    else:
                        command = run_all.project_command(task, files, output_dir, args, encoder)
                        if run == "reference":
                            command[1] = str(reference / Path(command[1]).name)
                    process = run_all.run_process(command, work / "runs" / task / f"{run}.log", env)
                    metrics = run_all.common.read_json(output_dir / "metrics.json")
                    if process["returncode"] != 0 or metrics is None:
                        print(f"[{task}] {run} failed (exit {process['returncode']}): "
                              f"{work / 'runs' / task / f'{run}.log'}", file=sys.stderr)
                        return 1
                    if run == "current":
                        run_config = run_all.common.read_json(output_dir / "run_config.json")
                    row = run_all.summarise(task, "project" if run != "tuned" else run, process, metrics, output_dir)
                    rows[run].append(row)
                    print(f"[{task}] round {round_number + 1} {run:9} end to end {row['end_to_end_s']:6.1f} s  "
                          f"training {row['train_s']:6.1f} s  quality {row['quality']:.4f}", flush=True)
            medians = {run: {key: statistics.median(r[key] for r in runs) for key in ("end_to_end_s", "train_s")}
                       for run, runs in rows.items()}
            for run in ("reference", "current"):
                print(f"[{task}] {run}: median end to end {medians[run]['end_to_end_s']:.1f} s, training "
                      f"{medians[run]['train_s']:.1f} s; (b) / {run}: "
                      f"{medians['tuned']['end_to_end_s'] / medians[run]['end_to_end_s']:.2f}x end to end, "
                      f"{medians['tuned']['train_s'] / medians[run]['train_s']:.2f}x training")
            # Round by round, since drift between rounds can move both medians more than a change does.
            ratios = [current["end_to_end_s"] / reference["end_to_end_s"]
                      for reference, current in zip(rows["reference"], rows["current"])]
            print(f"[{task}] current / reference end to end, round by round: "
                  f"{', '.join(f'{ratio:.2f}' for ratio in ratios)} "
                  f"(current slower in {sum(ratio > 1 for ratio in ratios)} of {len(ratios)})")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(reference)], cwd=run_all.ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
