#!/usr/bin/env python
"""Benchmark: text_generation_lora.py on tiny-shakespeare with the bundled SmolLM2-135M.

    python benchmarks/text_generation_shakespeare.py                    # LoRA, the script's defaults
    python benchmarks/text_generation_shakespeare.py --full             # full fine-tuning for comparison
    python benchmarks/text_generation_shakespeare.py -- --max-steps 60  # extra flags go to the script

The first 90% of ../shared/data/tiny_shakespeare/input.txt is the training text and the last 10%
the validation text. Besides validation perplexity before and after, the benchmark measures
perplexity on unrelated text (the project's recipe corpus) with the base and the tuned model, to
show what the fine-tuning cost outside its domain. Results: benchmarks/results/text_generation.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_TEXT = ROOT.parent / "shared" / "data" / "tiny_shakespeare" / "input.txt"
RESULTS = ROOT / "benchmarks" / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-file", default=str(DEFAULT_TEXT))
    parser.add_argument("--full", action="store_true", help="Full fine-tuning instead of LoRA.")
    parser.add_argument("--max-eval-blocks", type=int, default=None,
                        help="Score only this many validation blocks (default: the whole validation text).")
    parser.add_argument("--tag", default=None)
    parser.add_argument("script_args", nargs="*", help="Extra flags for text_generation_lora.py (after --).")
    args = parser.parse_args()
    source = Path(args.text_file)
    if not source.is_file():
        print(f"error: {source} not found; this benchmark needs the shared tiny-shakespeare file.", file=sys.stderr)
        return 2
    text = source.read_text()
    cut = int(len(text) * 0.9)
    work = RESULTS / "shakespeare"
    work.mkdir(parents=True, exist_ok=True)
    (work / "train.txt").write_text(text[:cut])
    (work / "validation.txt").write_text(text[cut:])
    output_dir = RESULTS / ("shakespeare_full" if args.full else "shakespeare_lora")
    command = [sys.executable, str(ROOT / "text_generation_lora.py"), "--train-file", str(work / "train.txt"),
               "--validation-file", str(work / "validation.txt"),
               *(["--max-eval-samples", str(args.max_eval_blocks)] if args.max_eval_blocks else []),
               "--epochs", "1", "--output-dir", str(output_dir), "--overwrite-output-dir",
               "--prompt", "ROMEO:", "--prompt", "First Citizen:", *(["--full"] if args.full else []), *args.script_args]
    print("running:", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - started
    metrics = json.loads((output_dir / "metrics.json").read_text())

    import text_generation_lora as script

    import common

    tuned, tokenizer = script.load_saved(output_dir)
    base = script.load_causal_lm(common.ResolvedModel(path=metrics_path(output_dir), name="base",
                                                      gguf_file=json.loads((output_dir / "run_config.json").read_text())["gguf_file"]))
    unrelated = script.cut_blocks(script.token_stream(tokenizer, [(ROOT / "data" / "text" / "recipes.txt").read_text()]),
                                  256, keep_partial=False)[:30]
    unrelated_base = script.perplexity(base, unrelated, 8, tokenizer.pad_token_id, metrics["precision"])["perplexity"]
    unrelated_tuned = script.perplexity(tuned, unrelated, 8, tokenizer.pad_token_id, metrics["precision"])["perplexity"]
    result = {
        "tag": args.tag or metrics["method"], "command": " ".join(command[1:]), "model": metrics["model"],
        "method": metrics["method"], "precision": metrics["precision"], "steps": metrics["train"]["steps"],
        "train_runtime_s": metrics["train"]["runtime_s"], "tokens_per_s": metrics["train"]["tokens_per_s"],
        "wall_time_s": round(wall, 1), "trainable_params": metrics["params"]["trainable"],
        "validation_perplexity_before": metrics["perplexity_before"], "validation_perplexity_after": metrics["perplexity"],
        "validation_change_pct": round(100 * (metrics["perplexity"] / metrics["perplexity_before"] - 1), 2),
        "unrelated_perplexity_before": unrelated_base, "unrelated_perplexity_after": unrelated_tuned,
        "unrelated_change_pct": round(100 * (unrelated_tuned / unrelated_base - 1), 2),
    }
    results_file = RESULTS / "text_generation.json"
    history = json.loads(results_file.read_text()) if results_file.exists() else []
    results_file.write_text(json.dumps(history + [result], indent=2) + "\n")
    print("\n| run | steps | train time | tokens/s | validation ppl before -> after | unrelated text ppl before -> after |")
    print("|---|---|---|---|---|---|")
    print(f"| {result['tag']} | {result['steps']} | {result['train_runtime_s']:.0f} s | {result['tokens_per_s']:.0f} | "
          f"{result['validation_perplexity_before']:.2f} -> {result['validation_perplexity_after']:.2f} "
          f"({result['validation_change_pct']:+.1f}%) | {unrelated_base:.2f} -> {unrelated_tuned:.2f} "
          f"({result['unrelated_change_pct']:+.1f}%) |")
    return 0


def metrics_path(output_dir: Path) -> str:
    return json.loads((output_dir / "run_config.json").read_text())["model_path"]


if __name__ == "__main__":
    sys.exit(main())
