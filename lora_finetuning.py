#!/usr/bin/env python
"""LoRA fine-tuning, and an honest full-vs-LoRA comparison for text classification, NER and text generation.

    python lora_finetuning.py                                    # LoRA on the embedded sentiment data
    python lora_finetuning.py --train-file my.csv --output-dir ./lora
    python lora_finetuning.py --task ner --output-dir ./lora_ner # LoRA on the embedded NER data
    python lora_finetuning.py --compare --seeds 1 2 3 --output-dir ./compare   # full and LoRA, 3 seeds each
    python lora_finetuning.py --task generation --compare --output-dir ./compare_gen
    python lora_finetuning.py --compare-runs ./full_run ./lora_run --output-dir ./compare
    python lora_finetuning.py --output-dir ./lora --predict "great value for money"
    python lora_finetuning.py --adapter ./lora_a --adapter ./lora_b --predict "..."   # switch adapters
    python lora_finetuning.py --output-dir ./lora --merge-adapter                     # plain-transformers model

Data, training, precision and output flags are those of sentiment_finetuning.py (--task
classification, the default), ner_finetuning.py (--task ner) or text_generation_lora.py (--task
generation, which that script runs); LoRA adds --lora-r, --lora-alpha, --lora-dropout,
--lora-target-modules, --lora-variant and --keep-base-dropout. By default every linear layer of
each transformer block (classification: of the top two thirds of the blocks) gets an adapter of
rank 16, and the base model's dropout is off. The modules that the task head adds at load time
(DistilBERT's pre_classifier and classifier, BERT's classifier, RoBERTa's classifier.dense/out_proj)
are trained and saved in full with the adapter, so a reloaded adapter predicts exactly what the
trained one did.

--compare trains both methods once per seed, each run in its own process, and writes
comparison.json, comparison.md (the report to hand in) and its plots.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common
import encoders
import reports
import ner_finetuning as ner
import sentiment_finetuning as classification
import text_generation_lora as text_generation
from common import UserError

TASKS = {"classification": classification, "ner": ner, "generation": text_generation}
# The metrics a comparison reports per task, the first being the one the methods are judged on.
# Keyed by the "task" of metrics.json.
TASK_METRICS = {"text-classification": (("accuracy", "accuracy"), ("f1_macro", "macro-F1")),
                "token-classification": (("f1", "entity F1"), ("accuracy", "token accuracy")),
                "text-generation": (("perplexity", "perplexity"),)}
LOWER_IS_BETTER = {"perplexity"}

MERGED_SUBDIR = "merged"
COMPARISON_JSON = "comparison.json"
COMPARISON_MD = "comparison.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # The task decides which script's data flags apply, so it is read first.
    task_parser = common.ArgumentParser(add_help=False)
    task_parser.add_argument("--task", choices=tuple(TASKS), default="classification")
    task = task_parser.parse_known_args(argv)[0].task
    if task == "generation":
        parser = text_generation.build_parser(__doc__, output_dir="./lora_gen")
    elif task == "ner":
        parser = ner.build_parser(__doc__, learning_rate=2e-3, fallback_learning_rate=2e-3, output_dir="./lora_ner")
    else:
        parser = classification.build_parser(__doc__, learning_rate=1e-3, fallback_learning_rate=1e-3,
                                             head_lr_multiplier=None, output_dir="./lora")
    parser.add_argument("--task", choices=tuple(TASKS), default="classification",
                        help="classification: text classification, the data flags of sentiment_finetuning.py; "
                             "ner: token classification, those of ner_finetuning.py; generation: causal language "
                             "modelling, those of text_generation_lora.py.")
    lora = parser.add_argument_group("adapters and comparison")
    if task != "generation":  # text_generation_lora.py's parser has its LoRA flags and --merge-adapter
        # Every linear layer of each block at rank 16 (classification: of the top two thirds of the blocks,
        # encoders.default_lora_layers), the base model's dropout off: on SST-2 and WikiANN-en within a
        # point of full fine-tuning in under 0.7x its time; query and value alone stay 1.6 (SST-2) to 18
        # (WikiANN-en) points under it (BENCHMARKS.md).
        common.add_lora_args(parser, dropout=0.0, rank=16, block_targets=True)
        lora.add_argument("--keep-base-dropout", action="store_true",
                          help="Keep the base model's dropout while training the adapters (default: off, which "
                               "scored the same in BENCHMARKS.md's runs; its random masks take about a seventh "
                               "of a LoRA step on a CPU).")
        lora.add_argument("--adapter", action="append", metavar="DIR",
                          help="With --predict: load these adapters on one base model and predict with each in "
                               "turn, switching adapters without reloading the base (repeatable).")
        lora.add_argument("--merge-adapter", action="store_true",
                          help=f"Write the adapter merged into its base model to OUTPUT_DIR/{MERGED_SUBDIR} (loads "
                               "with plain transformers). Alone on an existing adapter directory: merge only.")
    lora.add_argument("--compare", action="store_true",
                      help="Run full fine-tuning and LoRA on the same data, split, seed and epochs "
                           "(OUTPUT_DIR/full, OUTPUT_DIR/lora) and write the comparison report.")
    lora.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                      help="With --compare: train each method once per seed (OUTPUT_DIR/full/seed-N, ...; the data "
                           "split stays the same) and report the mean, the spread and a 95%% interval of the difference.")
    lora.add_argument("--compare-runs", nargs=2, metavar=("FULL_DIR", "LORA_DIR"),
                      help="Build the comparison report from two finished run directories.")
    if task != "classification":  # accepted, to say in one line that it does not apply
        parser.add_argument("--class-weights", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if task != "classification" and args.class_weights:
        parser.error(f"--class-weights applies to --task classification only (one label per text), not --task {task}; "
                     "drop it")
    if args.seeds and not args.compare:
        parser.error("--seeds needs --compare")
    if args.seeds and len(set(args.seeds)) != len(args.seeds):
        parser.error("--seeds: each seed once")
    if task == "generation":
        text_generation.check_args(parser, args)
        if args.full and args.compare:
            parser.error("--full and --compare: the comparison runs both methods; drop --full")
        return args
    encoders.check_encoder_args(parser, args)
    if not 0 <= args.lora_dropout < 1:
        parser.error("--lora-dropout must be in [0, 1)")
    if args.adapter and not args.predict:
        parser.error("--adapter needs --predict TEXT (or --predict @FILE)")
    return args


# --------------------------------------------------------------------------------------------
# Loading adapters
# --------------------------------------------------------------------------------------------


def adapter_record(adapter_dir: Path) -> dict[str, Any]:
    """What an adapter directory says about itself: task, base model path and label names."""
    if not (adapter_dir / "adapter_config.json").is_file():
        if (adapter_dir / "config.json").is_file():
            raise UserError(f"{adapter_dir} holds a full model, not a LoRA adapter; use it directly with "
                            "sentiment_finetuning.py/ner_finetuning.py --predict, or train an adapter with "
                            "lora_finetuning.py.")
        raise UserError(f"{adapter_dir} holds no LoRA adapter (no adapter_config.json); train one first.")
    record = common.read_json(adapter_dir / common.RUN_CONFIG_FILE) or {}
    adapter_config = common.read_json(adapter_dir / "adapter_config.json") or {}
    base = record.get("model_path") or adapter_config.get("base_model_name_or_path")
    labels = record.get("labels")
    if not base or not labels:
        raise UserError(f"{adapter_dir}: run_config.json with the base model and labels is missing; "
                        "the adapter was not written by this toolkit.")
    if base.startswith(("/", ".")) and not Path(base).exists():
        raise UserError(f"the base model of {adapter_dir} ({base}) is missing; reinstall it or retrain the adapter.")
    return {"base": base, "labels": labels, "name": record.get("model", base),
            "task": record.get("task", "classification")}


def load_base(base: str, labels: list[str], task: str):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    auto_class = AutoModelForTokenClassification if task == "ner" else AutoModelForSequenceClassification
    try:
        return auto_class.from_pretrained(
            base, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)}, **common.pretrained_kwargs())
    except (OSError, ValueError) as error:
        raise UserError(f"could not load the base model {base}: {common.first_line(error)}") from None


def load_adapters(adapter_dirs: list[Path]):
    """One base model with every adapter attached under its own name. All must share the base."""
    from peft import PeftModel

    records = [adapter_record(directory) for directory in adapter_dirs]
    bases = {record["base"] for record in records}
    if len(bases) > 1:
        raise UserError(f"the adapters were trained on different base models ({', '.join(sorted(bases))}); "
                        "adapters can only be switched on the base they were trained on.")
    label_sets = {(record["task"], tuple(record["labels"])) for record in records}
    if len(label_sets) > 1:
        raise UserError("the adapters were trained with different label sets; switch only between adapters "
                        "of the same task.")
    names = [f"adapter{i}" for i in range(len(adapter_dirs))]
    try:
        base = load_base(records[0]["base"], records[0]["labels"], records[0]["task"])
        model = PeftModel.from_pretrained(base, adapter_dirs[0], adapter_name=names[0])
        for name, directory in zip(names[1:], adapter_dirs[1:]):
            model.load_adapter(directory, adapter_name=name)
    except (RuntimeError, ValueError, KeyError) as error:
        raise UserError(f"the adapter does not fit its base model: {common.first_line(error)}") from None
    return model.eval(), names, records[0]


def predict_with_adapters(args: argparse.Namespace) -> None:
    """Predict with each adapter in turn; the task (classification or NER) is the one the adapters
    were trained for, whatever --task says."""
    import torch
    from transformers import AutoTokenizer

    adapter_dirs = [Path(d) for d in (args.adapter or [args.output_dir])]
    task = adapter_record(adapter_dirs[0])["task"]
    texts = TASKS[task].read_predict_texts(args)
    started = time.perf_counter()
    model, names, record = load_adapters(adapter_dirs)
    model.to(common.inference_device())
    if task == "ner":
        tokenizer = ner.load_word_tokenizer(str(adapter_dirs[0]))

        def predict():
            return ner.predict_entities(model, tokenizer, texts, args.max_length, args.eval_batch_size)

        def show(entities) -> None:
            ner.print_entities(texts, entities)
    else:
        tokenizer = AutoTokenizer.from_pretrained(adapter_dirs[0], **common.pretrained_kwargs())
        inputs = tokenizer(texts, truncation=True, max_length=args.max_length, padding=True,
                           return_tensors="pt").to(model.device)

        def predict():
            with torch.inference_mode():
                return model(**inputs).logits.float().softmax(-1)

        def show(probabilities) -> None:
            for text, row in zip(texts, probabilities):
                score, index = row.max(-1)
                print(f"{record['labels'][int(index)]}  {float(score):.3f}  {text}")
    print(f"loaded the base model and {len(names)} adapter(s) in {time.perf_counter() - started:.1f} s")
    for name, directory in zip(names, adapter_dirs):
        switch = time.perf_counter()
        model.set_adapter(name)
        predictions = predict()
        if len(names) > 1:
            print(f"\nadapter {directory} (switched in {1000 * (time.perf_counter() - switch):.0f} ms, base not reloaded)")
        show(predictions)


def merge_adapter(adapter_dir: Path) -> Path:
    """Merge the adapter into its base and save a model that plain transformers can load."""
    from transformers import AutoTokenizer

    model, _, record = load_adapters([adapter_dir])
    merged = model.merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir, **common.pretrained_kwargs())
    target = adapter_dir / MERGED_SUBDIR
    target.mkdir(exist_ok=True)
    common.save_atomically(target, lambda staging: (merged.save_pretrained(staging), tokenizer.save_pretrained(staging)))
    auto_class = "AutoModelForTokenClassification" if record["task"] == "ner" else "AutoModelForSequenceClassification"
    print(f"merged model written to {target} (load it with {auto_class}, no peft needed)")
    return target


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------


def data_flags(argv: list[str]) -> list[str]:
    """The command line minus the flags that only concern this script's own mode, the method or the seed."""
    own = {"--compare": 0, "--compare-runs": 2, "--output-dir": 1, "--merge-adapter": 0,
           "--task": 1, "--lora-r": 1, "--lora-alpha": 1, "--lora-dropout": 1, "--use-rslora": 0,
           "--use-dora": 0, "--lora-variant": 1, "--learning-rate": 1, "--seed": 1, "--full": 0, "--lora-layers": 1}
    kept = []
    i = 0
    while i < len(argv):
        flag = argv[i].split("=", 1)[0]
        if flag in own:
            i += 1 + (own[flag] if "=" not in argv[i] else 0)
            continue
        if flag in ("--lora-target-modules", "--seeds"):
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                i += 1
            continue
        kept.append(argv[i])
        i += 1
    return kept


def method_commands(args: argparse.Namespace, shared: list[str]) -> dict[str, list[str]]:
    """The command of each method (without --seed and --output-dir), same data and flags."""
    here = Path(__file__).resolve().parent
    lora_flags = ["--lora-r", str(args.lora_r), "--lora-alpha", f"{args.lora_alpha:g}"]
    if args.task == "generation":
        full = [str(here / "text_generation_lora.py"), "--full", *shared]
        lora = [str(here / "text_generation_lora.py"), *shared, *lora_flags]
    else:
        full = [str(here / ("ner_finetuning.py" if args.task == "ner" else "sentiment_finetuning.py")), *shared]
        lora = [str(here / "lora_finetuning.py"), "--task", args.task, *shared, *lora_flags,
                "--lora-dropout", str(args.lora_dropout)]
        lora += ["--lora-variant", args.lora_variant]
        lora += ["--lora-layers", str(args.lora_layers)] if args.lora_layers else []
        lora += ["--keep-base-dropout"] if args.keep_base_dropout else []
    if args.learning_rate:
        lora += ["--learning-rate", str(args.learning_rate)]
    if args.lora_target_modules:
        lora += ["--lora-target-modules", *args.lora_target_modules]
    return {"full": full, "lora": lora}


def run_compare(args: argparse.Namespace, argv: list[str]) -> None:
    """Full fine-tuning and LoRA once per seed, each run a fresh process (clean timing and peak
    memory), on the same data and split; then the report. One seed writes OUTPUT_DIR/full and
    OUTPUT_DIR/lora, several OUTPUT_DIR/full/seed-N and OUTPUT_DIR/lora/seed-N."""
    output_dir = common.prepare_output_dir(args.output_dir, True, False)
    seeds = args.seeds or [args.seed]
    shared = data_flags(argv)
    if "--overwrite-output-dir" not in shared:
        shared.append("--overwrite-output-dir")
    if args.task == "generation" and not args.unrelated_file:
        shared += ["--unrelated-file", str(default_unrelated_text(args))]
    commands = method_commands(args, shared)
    directories: dict[str, list[Path]] = {"full": [], "lora": []}
    for seed in seeds:
        for method, label in (("full", "full fine-tuning"), ("lora", "LoRA")):
            directory = output_dir / method / (f"seed-{seed}" if len(seeds) > 1 else "")
            command = [sys.executable, *commands[method], "--seed", str(seed), "--output-dir", str(directory)]
            print(f"\n=== {label}, seed {seed}: {reports.command_line(command[1:])}\n", flush=True)
            if subprocess.run(command).returncode != 0:
                raise UserError(f"the {label} run with seed {seed} failed (see above); no comparison written.")
            directories[method].append(directory)
    write_comparison(directories["full"], directories["lora"], output_dir, reports.command_line([__file__, *argv]))


def default_unrelated_text(args: argparse.Namespace) -> Path:
    """Text unlike the training data, to see what fine-tuning costs elsewhere: the embedded reviews
    when training on the embedded recipes, else the recipes."""
    if args.train_file or args.dataset:
        return text_generation.DEFAULT_CORPUS
    return common.DATA_DIR / "sentiment" / "test.csv"


def load_run(directory: Path, expected_method: str) -> dict[str, Any]:
    metrics = common.read_json(directory / common.METRICS_FILE)
    if not metrics:
        raise UserError(f"{directory} holds no metrics.json; pass a finished run directory.")
    if metrics.get("method") != expected_method:
        raise UserError(f"{directory} is a '{metrics.get('method')}' run; expected '{expected_method}' "
                        "(--compare-runs FULL_DIR LORA_DIR).")
    metrics["log"] = common.read_jsonl(directory / common.TRAINING_LOG_FILE)
    metrics["config"] = common.read_json(directory / common.RUN_CONFIG_FILE) or {}
    metrics["directory"] = str(directory)
    return metrics


def mean_and_sd(values: list[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (0 for a single value)."""
    import statistics

    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def difference_interval(differences: list[float], confidence: float = 0.95) -> list[float] | None:
    """The t interval of the mean of paired differences (one per seed); None below two seeds."""
    import math

    from scipy import stats

    if len(differences) < 2:
        return None
    mean, sd = mean_and_sd(differences)
    half = stats.t.ppf((1 + confidence) / 2, len(differences) - 1) * sd / math.sqrt(len(differences))
    return [mean - half, mean + half]


def verdict(interval: list[float] | None, higher_is_better: bool) -> str:
    """"lora better", "full better" or "no clear difference", from the interval of LoRA minus full."""
    if interval is None or interval[0] <= 0 <= interval[1]:
        return "no clear difference"
    lora_ahead = interval[0] > 0 if higher_is_better else interval[1] < 0
    return "lora better" if lora_ahead else "full better"


def steps_time(metrics: dict[str, Any]) -> float:
    """Training time without the per-epoch evaluation."""
    return max(metrics["train"]["runtime_s"] - metrics["train"].get("eval_time_s", 0.0), 1e-6)


def method_row(runs: list[dict[str, Any]], scored) -> dict[str, Any]:
    """One method's figures, averaged over its runs (one per seed)."""
    def mean(get) -> float:
        return mean_and_sd([float(get(run)) for run in runs])[0]

    first = runs[0]
    row = {"trainable_params": first["params"]["trainable"], "total_params": first["params"]["total"],
           "trainable_share_pct": round(100 * first["params"]["trainable"] / first["params"]["total"], 3),
           "saved_size_mb": mean(lambda r: r.get("saved_size_mb") or 0.0),
           "train_runtime_s": mean(lambda r: r["train"]["runtime_s"]),
           "eval_time_s": mean(lambda r: r["train"].get("eval_time_s", 0.0)),
           "train_steps_time_s": mean(steps_time),
           "samples_per_s": mean(lambda r: r["train"]["samples_per_s"]),
           "peak_rss_mb": mean(lambda r: r["train"]["peak_rss_mb"])}
    for part in ("validation", "test"):
        for key, _ in scored:
            if all(isinstance(r.get(part), dict) and key in r[part] for r in runs):
                row[f"{part}_{key}"] = mean(lambda r: r[part][key])
    if first["task"] == "text-generation":
        row["perplexity_before"] = mean(lambda r: r["perplexity_before"])
        if all("unrelated" in r for r in runs):
            row["unrelated_perplexity_before"] = mean(lambda r: r["unrelated"]["perplexity_before"])
            row["unrelated_perplexity"] = mean(lambda r: r["unrelated"]["perplexity"])
    return row


def write_comparison(full_dirs: list[Path], lora_dirs: list[Path], output_dir: Path, command: str) -> dict[str, Any]:
    """comparison.json, comparison.md and the plots, from finished runs (full_dirs[i] and
    lora_dirs[i] share a seed)."""
    full = [load_run(directory, "full") for directory in full_dirs]
    lora = [load_run(directory, "lora") for directory in lora_dirs]
    tasks = {run.get("task") for run in full + lora}
    if len(tasks) > 1 or not tasks <= set(TASK_METRICS):
        raise UserError(f"cannot compare a '{full[0].get('task')}' run with a '{lora[0].get('task')}' run; "
                        "pass runs of the same task.")
    task = tasks.pop()
    scored = TASK_METRICS[task]
    primary, title = scored[0]
    split = "test" if all(isinstance(run.get("test"), dict) for run in full + lora) else "validation"
    higher_is_better = primary not in LOWER_IS_BETTER
    scale = 100.0 if higher_is_better else 1.0  # fractions in points; perplexity as it is

    def records(runs: list[dict]) -> list[dict[str, Any]]:
        return [{"seed": run["config"].get("args", {}).get("seed"), primary: run[split][primary],
                 "train_runtime_s": run["train"]["runtime_s"], "peak_rss_mb": run["train"]["peak_rss_mb"],
                 "output_dir": run["directory"]} for run in runs]

    def summary(runs: list[dict]) -> dict[str, float]:
        metric_mean, metric_sd = mean_and_sd([run[split][primary] for run in runs])
        return {"metric_mean": round(metric_mean, 6), "metric_sd": round(metric_sd, 6),
                "train_runtime_s_mean": round(mean_and_sd([run["train"]["runtime_s"] for run in runs])[0], 2),
                "peak_rss_mb_mean": round(mean_and_sd([run["train"]["peak_rss_mb"] for run in runs])[0], 1)}

    differences = [scale * (l[split][primary] - f[split][primary]) for f, l in zip(full, lora)]
    interval = difference_interval(differences)
    full_row, lora_row = method_row(full, scored), method_row(lora, scored)
    runs = {"full": records(full), "lora": records(lora)}
    comparison = {
        "full": full_row, "lora": lora_row,
        "parameter_reduction_pct": round(100 * (1 - lora_row["trainable_params"] / full_row["trainable_params"]), 3),
        # The methods differ in their training steps; the per-epoch evaluation costs both the same.
        "lora_time_ratio": round(lora_row["train_steps_time_s"] / full_row["train_steps_time_s"], 3),
        "lora_time_ratio_with_evaluation": round(lora_row["train_runtime_s"] / full_row["train_runtime_s"], 3),
        "metric": primary, "metric_higher_is_better": higher_is_better,
        "metric_difference_points": round(mean_and_sd(differences)[0], 2),
        "compared_on": split, "task": task, "model": full[0]["model"],
        "precision": {"full": full[0]["precision"], "lora": lora[0]["precision"]},
        "lora_settings": lora[0].get("lora") or {"r": lora[0]["config"].get("args", {}).get("lora_r"),
                                                 "alpha": lora[0]["config"].get("args", {}).get("lora_alpha"),
                                                 "target_modules": lora[0]["config"].get("lora_targets")},
        "hardware": full[0]["hardware"], "versions": full[0]["versions"],
        "seeds": [record["seed"] for record in runs["full"]],
        "runs": runs,
        "summary": {"full": summary(full), "lora": summary(lora)},
        "difference_ci95_points": [round(bound, 3) for bound in interval] if interval else None,
        "difference_method": "paired t interval (95%) over the seeds of LoRA minus full fine-tuning, "
                             + ("in points of the metric" if higher_is_better else "in units of the metric"),
        "verdict": verdict(interval, higher_is_better),
        "command": command,
    }
    common.write_json(output_dir / COMPARISON_JSON, comparison)
    plot_comparison(full, lora, output_dir, split, scored[0])
    (output_dir / COMPARISON_MD).write_text(comparison_markdown(comparison, full, lora, split, scored))
    print((output_dir / COMPARISON_MD).read_text())
    return comparison


def plot_comparison(full: list[dict], lora: list[dict], output_dir: Path, split: str, metric: tuple[str, str]) -> None:
    """loss_curves.png (one line per seed), metric_vs_time.png (one point per run) and
    scores.png (per class, per entity type, or perplexity before and after)."""
    plt = reports.pyplot()
    colours = {"full fine-tuning": "tab:blue", "LoRA": "tab:orange"}
    methods = (("full fine-tuning", full), ("LoRA", lora))
    fig, axis = plt.subplots(figsize=(7, 4))
    for name, runs in methods:
        for i, run in enumerate(runs):
            points = [(r["epoch"], r["loss"]) for r in run["log"] if "loss" in r and "epoch" in r]
            if points:
                axis.plot(*zip(*points), color=colours[name], alpha=0.8 if len(runs) == 1 else 0.5,
                          label=name if i == 0 else None)
    axis.set(xlabel="epoch", ylabel="training loss", title=f"Training loss ({len(full)} seed(s) per method)")
    axis.legend()
    fig.tight_layout()
    fig.savefig(output_dir / "loss_curves.png", dpi=110)
    plt.close(fig)

    fig, axis = plt.subplots(figsize=(7, 4))
    for name, runs in methods:
        axis.scatter([steps_time(run) for run in runs], [run[split][metric[0]] for run in runs],
                     color=colours[name], label=name)
    axis.set(xlabel="training time, steps alone (s)", ylabel=f"{split} {metric[1]}",
             title=f"{split.capitalize()} {metric[1]} against training time (one point per run)")
    axis.legend()
    fig.tight_layout()
    fig.savefig(output_dir / "metric_vs_time.png", dpi=110)
    plt.close(fig)

    if full[0]["task"] == "text-generation":
        groups = ["validation"] + (["unrelated text"] if all("unrelated" in run for run in full + lora) else [])

        def perplexities(run, after: bool) -> list[float]:
            values = [run["perplexity"] if after else run["perplexity_before"]]
            if len(groups) > 1:
                values.append(run["unrelated"]["perplexity" if after else "perplexity_before"])
            return values

        series = {"base model": perplexities(full[0], False),
                  **{name: [mean_and_sd(list(v))[0] for v in zip(*(perplexities(run, True) for run in runs))]
                     for name, runs in methods}}
        reports.grouped_bars(output_dir / "scores.png", groups, series, "Perplexity (lower is better)", "perplexity")
        return
    per = "per_class" if full[0]["task"] == "text-classification" else "per_type"
    groups = list(full[0][split][per])
    series, errors = {}, {}
    for name, runs in methods:
        stats = [mean_and_sd([run[split][per].get(group, {}).get("f1", 0.0) for run in runs]) for group in groups]
        series[name], errors[name] = [m for m, _ in stats], [sd for _, sd in stats]
    reports.grouped_bars(output_dir / "scores.png", groups, series,
                         f"{split.capitalize()} F1 per {'class' if per == 'per_class' else 'entity type'} "
                         f"(mean{' and sd' if len(full) > 1 else ''} over seeds)", "F1", errors)


VERDICT_SENTENCES = {"lora better": "LoRA scores higher than full fine-tuning",
                     "full better": "full fine-tuning scores higher than LoRA",
                     "no clear difference": "neither method scores clearly higher"}


def comparison_markdown(c: dict, full: list[dict], lora: list[dict], split: str, scored) -> str:
    """The report a student hands in: results with their spread, the verdict, the findings in
    sentences, every run, the machine, the commands and the plots."""
    f, l = c["full"], c["lora"]
    primary, title = scored[0]
    seeds = len(c["seeds"])
    digits = 2 if primary in LOWER_IS_BETTER else 4
    unit = " points" if c["metric_higher_is_better"] else ""
    difference = f"{c['metric_difference_points']:+.2f}{unit}"
    interval = c["difference_ci95_points"]
    if interval:
        evidence = (f"over {seeds} seeds, LoRA minus full fine-tuning is {difference} in {split} {title}, 95% interval "
                    f"[{interval[0]:+.2f}, {interval[1]:+.2f}]")
    else:
        evidence = (f"with one seed, LoRA minus full fine-tuning is {difference} in {split} {title}, which one run "
                    "cannot tell apart from seed noise (--seeds 1 2 3 gives an interval)")
    hardware, versions = c["hardware"], c["versions"]

    def spread(runs: list[dict], get) -> str:
        mean, sd = mean_and_sd([float(get(run)) for run in runs])
        return f"{mean:.{digits}f} ± {sd:.{digits}f}" if seeds > 1 else f"{mean:.{digits}f}"

    lines = [f"# Full fine-tuning vs LoRA: {c['model']}", "",
             f"**Verdict: {c['verdict']}.** {VERDICT_SENTENCES[c['verdict']].capitalize()}: {evidence}.", "",
             f"## Results ({f'mean ± sd over {seeds} seeds' if seeds > 1 else 'one seed'})", "",
             "| | full fine-tuning | LoRA |", "|---|---|---|"]
    for part in ("validation", "test"):
        lines += [f"| {part} {name} | {spread(full, lambda r: r[part][key])} | {spread(lora, lambda r: r[part][key])} |"
                  for key, name in scored if f"{part}_{key}" in f and f"{part}_{key}" in l]
    if "perplexity_before" in f:
        lines.append(f"| validation perplexity before training | {f['perplexity_before']:.2f} | {l['perplexity_before']:.2f} |")
    forgetting = "unrelated_perplexity" in f and "unrelated_perplexity" in l
    if forgetting:
        lines += [f"| unrelated-text perplexity before | {f['unrelated_perplexity_before']:.2f} | {l['unrelated_perplexity_before']:.2f} |",
                  f"| unrelated-text perplexity after | {f['unrelated_perplexity']:.2f} | {l['unrelated_perplexity']:.2f} |"]
    lines += [
        f"| training time (with the evaluations during training) | {f['train_runtime_s']:.1f} s | {l['train_runtime_s']:.1f} s |",
        f"| training steps alone | {f['train_steps_time_s']:.1f} s | {l['train_steps_time_s']:.1f} s |",
        f"| samples/s | {f['samples_per_s']:.1f} | {l['samples_per_s']:.1f} |",
        f"| peak memory (RSS) | {f['peak_rss_mb']:.0f} MB | {l['peak_rss_mb']:.0f} MB |",
        f"| trainable parameters | {f['trainable_params']:,} ({f['trainable_share_pct']:.2f}%) | "
        f"{l['trainable_params']:,} ({l['trainable_share_pct']:.2f}%) |",
        f"| total parameters | {f['total_params']:,} | {l['total_params']:,} |",
        f"| saved size (safetensors) | {f['saved_size_mb']:.2f} MB | {l['saved_size_mb']:.2f} MB |",
        "", "## Findings", "",
        f"- Parameters: LoRA trains {l['trainable_params']:,} of {l['total_params']:,} parameters "
        f"({l['trainable_share_pct']:.2f}%), {c['parameter_reduction_pct']:.1f}% fewer than full fine-tuning's "
        f"{f['trainable_params']:,}.",
        f"- Time: LoRA's training steps take {c['lora_time_ratio']:.2f}x the time of full fine-tuning's "
        f"({l['train_steps_time_s']:.1f} s against {f['train_steps_time_s']:.1f} s; "
        f"{c['lora_time_ratio_with_evaluation']:.2f}x with the evaluations during training, which cost both the same).",
        f"- Quality: {evidence}; {VERDICT_SENTENCES[c['verdict']]}.",
        f"- Memory: LoRA's process peaks at {l['peak_rss_mb']:.0f} MB against {f['peak_rss_mb']:.0f} MB "
        f"({l['peak_rss_mb'] / f['peak_rss_mb']:.2f}x).",
        f"- Size: the LoRA adapter takes {l['saved_size_mb']:.2f} MB on disk against {f['saved_size_mb']:.2f} MB for the "
        f"full model ({f['saved_size_mb'] / max(l['saved_size_mb'], 1e-9):.0f} times smaller), and runs on top of the base model."]
    if forgetting:
        lines.append(f"- Forgetting: on unrelated text the perplexity goes from {f['unrelated_perplexity_before']:.2f} "
                     f"to {f['unrelated_perplexity']:.2f} with full fine-tuning and to {l['unrelated_perplexity']:.2f} "
                     "with LoRA.")
    settings = c.get("lora_settings") or {}
    lines += [f"- LoRA settings: r={settings.get('r')}, alpha={settings.get('alpha')}, "
              f"targets={settings.get('target_modules')}"
              + (f" in the top {settings['layers']} layers" if settings.get("layers") else "")
              + (f", trained in full: {settings['modules_to_save']}" if settings.get("modules_to_save") else "")
              + (f", base model's dropout {settings['base_dropout']}" if settings.get("base_dropout") else "") + ".",
              "", "## Every run", "", f"| method | seed | {split} {title} | training time | peak memory | folder |",
              "|---|---|---|---|---|---|"]
    for method, records in c["runs"].items():
        lines += [f"| {method} | {r['seed']} | {r[primary]:.{digits}f} | {r['train_runtime_s']:.1f} s | "
                  f"{r['peak_rss_mb']:.0f} MB | `{r['output_dir']}` |" for r in records]
    if full[0].get("samples") and lora[0].get("samples"):
        lines += ["", f"## Samples (seed {c['seeds'][0]})", "", "| prompt | base model | full fine-tuning | LoRA |",
                  "|---|---|---|---|"]
        lines += ["| " + " | ".join(_cell(text) for text in (base["prompt"], base["before"], base["after"],
                                                               tuned["after"])) + " |"
                  for base, tuned in zip(full[0]["samples"], lora[0]["samples"])]
    lines += ["", "## How the verdict is reached", "",
              f"Each seed trains both methods: the seed sets the initialisation, the batch order and dropout, while the "
              f"data and its split stay the same. The difference LoRA minus full fine-tuning in {split} {title} is "
              "taken per seed, and the 95% t interval of its mean decides: entirely on the better side of zero, that "
              "method is better; containing zero, there is no clear difference. One seed gives no interval.",
              "", "## Machine and versions", "",
              f"{hardware['processor']}, {hardware['cpu_count']} CPUs"
              + (f", GPU {hardware['gpu']}" if hardware.get("gpu") else ", no GPU")
              + f"; precision: full {c['precision']['full']}, LoRA {c['precision']['lora']}; python {versions.get('python')}, "
              f"torch {versions['torch']}, transformers {versions['transformers']}, peft {lora[0]['versions'].get('peft', '?')}.",
              "", "## Reproduce", "", "```bash", c["command"], "```", "", "The runs, one by one:", "", "```bash"]
    lines += [reports.command_line(run["config"]["argv"]) for run in full + lora if run["config"].get("argv")]
    lines += ["```", "", "## Plots", "", "![training loss](loss_curves.png)", "",
              f"![{split} {title} against training time](metric_vs_time.png)", "",
              "![scores side by side](scores.png)", ""]
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Text for one cell of a Markdown table."""
    return " ".join(text.split()).replace("|", "\\|")


def main() -> int:
    argv = sys.argv[1:]
    args = parse_args(argv)
    common.set_trust_remote_code(args.trust_remote_code)
    if args.compare_runs:
        common.prepare_output_dir(args.output_dir, True, False)
        write_comparison([Path(args.compare_runs[0])], [Path(args.compare_runs[1])], Path(args.output_dir),
                         reports.command_line([__file__, *argv]))
        return 0
    if args.compare:
        common.quiet_libraries()
        run_compare(args, argv)
        return 0
    if args.task == "generation":
        return text_generation.main(args)
    common.quiet_libraries()
    if args.predict:
        predict_with_adapters(args)
        return 0
    output_dir = Path(args.output_dir)
    training_data_given = args.train_file or args.dataset
    if args.merge_adapter and not training_data_given and (output_dir / "config.json").is_file() \
            and not (output_dir / "adapter_config.json").is_file():
        adapter_record(output_dir)  # raises: a full model, not an adapter
    if args.merge_adapter and (output_dir / "adapter_config.json").is_file() and not args.overwrite_output_dir \
            and not training_data_given:
        merge_adapter(output_dir)
        return 0
    metrics = TASKS[args.task].run(args, method="lora")
    if metrics is None:
        return 130
    if args.merge_adapter:
        merge_adapter(output_dir)
    return 0


if __name__ == "__main__":
    common.run_cli(main)
