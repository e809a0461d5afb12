#!/usr/bin/env python
"""LoRA fine-tuning for text and token classification, and an honest full-vs-LoRA comparison.

    python lora_finetuning.py                                    # LoRA on the embedded sentiment data
    python lora_finetuning.py --train-file my.csv --output-dir ./lora
    python lora_finetuning.py --task ner --output-dir ./lora_ner # LoRA on the embedded NER data
    python lora_finetuning.py --compare --output-dir ./compare   # full and LoRA, same data/split/seed/epochs
    python lora_finetuning.py --compare-runs ./full_run ./lora_run --output-dir ./compare
    python lora_finetuning.py --output-dir ./lora --predict "great value for money"
    python lora_finetuning.py --adapter ./lora_a --adapter ./lora_b --predict "..."   # switch adapters
    python lora_finetuning.py --output-dir ./lora --merge-adapter                     # plain-transformers model

Data, training, precision and output flags are those of sentiment_finetuning.py (--task
classification, the default) or ner_finetuning.py (--task ner); LoRA adds --lora-r, --lora-alpha,
--lora-dropout, --lora-target-modules, --use-rslora and --use-dora. The modules that the task head
adds at load time (DistilBERT's pre_classifier and classifier, BERT's classifier, RoBERTa's
classifier.dense/out_proj) are trained and saved in full with the adapter, so a reloaded adapter
predicts exactly what the trained one did.
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
import ner_finetuning as ner
import sentiment_finetuning as classification
from common import UserError

TASKS = {"classification": classification, "ner": ner}
# The metrics a comparison reports per task, the first being the one the methods are judged on.
# Keyed by the "task" of metrics.json.
TASK_METRICS = {"text-classification": (("accuracy", "accuracy"), ("f1_macro", "macro-F1")),
                "token-classification": (("f1", "entity F1"), ("accuracy", "token accuracy"))}

MERGED_SUBDIR = "merged"
COMPARISON_JSON = "comparison.json"
COMPARISON_MD = "comparison.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # The task decides which script's data flags apply, so it is read first.
    task_parser = common.ArgumentParser(add_help=False)
    task_parser.add_argument("--task", choices=tuple(TASKS), default="classification")
    task = task_parser.parse_known_args(argv)[0].task
    if task == "ner":
        parser = ner.build_parser(__doc__, learning_rate=1e-3, fallback_learning_rate=1e-3, output_dir="./lora_ner")
    else:
        parser = classification.build_parser(__doc__, learning_rate=1e-3, fallback_learning_rate=1e-3,
                                             head_lr_multiplier=1.0, output_dir="./lora")
    parser.add_argument("--task", choices=tuple(TASKS), default="classification",
                        help="classification: text classification, the data flags of sentiment_finetuning.py; "
                             "ner: token classification, the data flags of ner_finetuning.py.")
    # Rank 32 for classification: on SST-2 (8,000 phrases, one epoch) it closed about half of rank 8's
    # 3-point gap to full fine-tuning at the same speed (README, "Full fine-tuning vs LoRA").
    common.add_lora_args(parser, dropout=0.0, rank=8 if task == "ner" else 32)
    lora = parser.add_argument_group("adapters and comparison")
    lora.add_argument("--adapter", action="append", metavar="DIR",
                      help="With --predict: load these adapters on one base model and predict with each in "
                           "turn, switching adapters without reloading the base (repeatable).")
    lora.add_argument("--merge-adapter", action="store_true",
                      help=f"Write the adapter merged into its base model to OUTPUT_DIR/{MERGED_SUBDIR} (loads with "
                           "plain transformers). Alone on an existing adapter directory: merge only.")
    lora.add_argument("--compare", action="store_true",
                      help="Run full fine-tuning and LoRA on the same data, split, seed and epochs "
                           "(OUTPUT_DIR/full, OUTPUT_DIR/lora) and write the comparison report.")
    lora.add_argument("--compare-runs", nargs=2, metavar=("FULL_DIR", "LORA_DIR"),
                      help="Build the comparison report from two finished run directories.")
    lora.add_argument("--full-learning-rate", type=common.positive_float,
                      help="With --compare: learning rate of the full fine-tuning run "
                           "(default: sentiment_finetuning.py's default for the model).")
    args = parser.parse_args(argv)
    encoders.check_encoder_args(parser, args)
    if not 0 <= args.lora_dropout < 1:
        parser.error("--lora-dropout must be in [0, 1)")
    if args.adapter and not (args.predict or args.predict_file):
        parser.error("--adapter needs --predict or --predict-file")
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
    """The command line minus the flags that only concern this script's own mode."""
    own = {"--compare": 0, "--compare-runs": 2, "--output-dir": 1, "--full-learning-rate": 1, "--merge-adapter": 0,
           "--task": 1, "--lora-r": 1, "--lora-alpha": 1, "--lora-dropout": 1, "--use-rslora": 0,
           "--use-dora": 0, "--learning-rate": 1}
    kept = []
    i = 0
    while i < len(argv):
        flag = argv[i].split("=", 1)[0]
        if flag in own:
            i += 1 + (own[flag] if "=" not in argv[i] else 0)
            continue
        if flag == "--lora-target-modules":
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                i += 1
            continue
        kept.append(argv[i])
        i += 1
    return kept


def run_compare(args: argparse.Namespace, argv: list[str]) -> None:
    """Full fine-tuning and LoRA as two fresh processes (clean timing and peak memory), then the report."""
    output_dir = common.prepare_output_dir(args.output_dir, True, False)
    shared = data_flags(argv)
    if "--overwrite-output-dir" not in shared:
        shared.append("--overwrite-output-dir")
    here = Path(__file__).resolve().parent
    full_script = "ner_finetuning.py" if args.task == "ner" else "sentiment_finetuning.py"
    full_cmd = [sys.executable, str(here / full_script), *shared, "--output-dir", str(output_dir / "full")]
    if args.full_learning_rate:
        full_cmd += ["--learning-rate", str(args.full_learning_rate)]
    lora_cmd = [sys.executable, str(here / "lora_finetuning.py"), "--task", args.task, *shared,
                "--output-dir", str(output_dir / "lora"),
                "--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha), "--lora-dropout", str(args.lora_dropout)]
    if args.learning_rate:
        lora_cmd += ["--learning-rate", str(args.learning_rate)]
    if args.lora_target_modules:
        lora_cmd += ["--lora-target-modules", *args.lora_target_modules]
    lora_cmd += [flag for flag, on in (("--use-rslora", args.use_rslora), ("--use-dora", args.use_dora)) if on]
    for label, command in (("full fine-tuning", full_cmd), ("LoRA", lora_cmd)):
        print(f"\n=== {label}: {' '.join(command[1:])}\n", flush=True)
        if subprocess.run(command).returncode != 0:
            raise UserError(f"the {label} run failed (see above); no comparison written.")
    write_comparison(output_dir / "full", output_dir / "lora", output_dir)


def load_run(directory: Path, expected_method: str) -> dict[str, Any]:
    metrics = common.read_json(directory / common.METRICS_FILE)
    if not metrics:
        raise UserError(f"{directory} holds no metrics.json; pass a finished run directory.")
    if metrics.get("method") != expected_method:
        raise UserError(f"{directory} is a '{metrics.get('method')}' run; expected '{expected_method}' "
                        "(--compare-runs FULL_DIR LORA_DIR).")
    metrics["log"] = common.read_jsonl(directory / common.TRAINING_LOG_FILE)
    return metrics


def write_comparison(full_dir: Path, lora_dir: Path, output_dir: Path) -> dict[str, Any]:
    full, lora = load_run(full_dir, "full"), load_run(lora_dir, "lora")
    if full.get("task") != lora.get("task") or full.get("task") not in TASK_METRICS:
        raise UserError(f"cannot compare a '{full.get('task')}' run with a '{lora.get('task')}' run; "
                        "pass two runs of the same classification or NER task.")
    split = "test" if "test" in full and "test" in lora else "validation"
    scored = TASK_METRICS[full["task"]]
    primary = scored[0][0]

    def row(metrics):
        return {"trainable_params": metrics["params"]["trainable"], "total_params": metrics["params"]["total"],
                "trainable_share_pct": round(100 * metrics["params"]["trainable"] / metrics["params"]["total"], 3),
                "saved_size_mb": metrics.get("saved_size_mb"), "train_runtime_s": metrics["train"]["runtime_s"],
                "eval_time_s": metrics["train"].get("eval_time_s", 0.0), "train_steps_time_s": round(steps_time(metrics), 2),
                "samples_per_s": metrics["train"]["samples_per_s"], "peak_rss_mb": metrics["train"]["peak_rss_mb"],
                **{f"{part}_{key}": metrics[part][key] for part in ("validation", "test") if part in metrics
                   for key, _ in scored}}

    comparison = {
        "full": row(full), "lora": row(lora),
        "parameter_reduction_pct": round(100 * (1 - lora["params"]["trainable"] / full["params"]["trainable"]), 3),
        # The methods differ in their training steps; the per-epoch evaluation costs both the same.
        "lora_time_ratio": round(steps_time(lora) / steps_time(full), 3),
        "lora_time_ratio_with_evaluation": round(lora["train"]["runtime_s"] / full["train"]["runtime_s"], 3),
        "metric": primary,
        "metric_difference_points": round(100 * (lora[split][primary] - full[split][primary]), 2),
        "compared_on": split, "task": full["task"], "model": full["model"], "precision": {"full": full["precision"], "lora": lora["precision"]},
        "lora_settings": lora.get("lora"), "hardware": full["hardware"], "versions": full["versions"],
        "runs": {"full": str(full_dir), "lora": str(lora_dir)},
    }
    common.write_json(output_dir / COMPARISON_JSON, comparison)
    plot_comparison(full, lora, output_dir, scored[0])
    (output_dir / COMPARISON_MD).write_text(comparison_markdown(comparison, full, lora, split, scored))
    print((output_dir / COMPARISON_MD).read_text())
    return comparison


def steps_time(metrics: dict[str, Any]) -> float:
    """Training time without the per-epoch evaluation."""
    return max(metrics["train"]["runtime_s"] - metrics["train"].get("eval_time_s", 0.0), 1e-6)


def plot_comparison(full: dict, lora: dict, output_dir: Path, metric: tuple[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4))
    for name, metrics in (("full fine-tuning", full), ("LoRA", lora)):
        points = [(r["epoch"], r["loss"]) for r in metrics["log"] if "loss" in r]
        if points:
            axis.plot(*zip(*points), label=name)
    axis.set_xlabel("epoch")
    axis.set_ylabel("training loss")
    axis.set_title("Training loss")
    axis.legend()
    fig.tight_layout()
    fig.savefig(output_dir / "loss_curves.png", dpi=110)
    plt.close(fig)

    fig, axis = plt.subplots(figsize=(7, 4))
    for name, metrics in (("full fine-tuning", full), ("LoRA", lora)):
        evaluations = [r for r in metrics["log"] if f"eval_{metric[0]}" in r]
        if not evaluations:
            continue
        per_step = metrics["train"]["runtime_s"] / max(1, metrics["train"]["steps"])
        axis.plot([r["step"] * per_step for r in evaluations], [r[f"eval_{metric[0]}"] for r in evaluations],
                  marker="o", label=name)
    axis.set_xlabel("training time (s)")
    axis.set_ylabel(f"validation {metric[1]}")
    axis.set_title(f"Validation {metric[1]} vs training time")
    axis.legend()
    fig.tight_layout()
    fig.savefig(output_dir / "metric_vs_time.png", dpi=110)
    plt.close(fig)


def comparison_markdown(c: dict, full: dict, lora: dict, split: str, scored) -> str:
    f, l = c["full"], c["lora"]
    lines = [
        "# Full fine-tuning vs LoRA", "",
        f"Model: {c['model']}. Same data, split, seed and epochs for both runs. Precision: full {full['precision']}, "
        f"LoRA {lora['precision']}. Machine: {full['hardware']['processor']} ({full['hardware']['cpu_count']} CPUs"
        f"{', GPU ' + full['hardware']['gpu'] if full['hardware'].get('gpu') else ''}). "
        f"torch {full['versions']['torch']}, transformers {full['versions']['transformers']}, "
        f"peft {lora['versions'].get('peft', '?')}.", "",
        "| | full fine-tuning | LoRA |", "|---|---|---|",
        f"| trainable parameters | {f['trainable_params']:,} | {l['trainable_params']:,} |",
        f"| total parameters | {f['total_params']:,} | {l['total_params']:,} |",
        f"| trainable share | {f['trainable_share_pct']:.2f}% | {l['trainable_share_pct']:.2f}% |",
        f"| saved size (safetensors) | {f['saved_size_mb']} MB | {l['saved_size_mb']} MB |",
        f"| training time (with the evaluations during training) | {f['train_runtime_s']:.1f} s | {l['train_runtime_s']:.1f} s |",
        f"| of which evaluation | {f['eval_time_s']:.1f} s | {l['eval_time_s']:.1f} s |",
        f"| training steps alone | {f['train_steps_time_s']:.1f} s | {l['train_steps_time_s']:.1f} s |",
        f"| samples/s | {f['samples_per_s']:.1f} | {l['samples_per_s']:.1f} |",
        f"| peak memory (RSS) | {f['peak_rss_mb']:.0f} MB | {l['peak_rss_mb']:.0f} MB |",
    ]
    for part in ("validation", "test"):
        lines += [f"| {part} {title} | {f[f'{part}_{key}']:.4f} | {l[f'{part}_{key}']:.4f} |"
                  for key, title in scored if f"{part}_{key}" in f and f"{part}_{key}" in l]
    settings = c.get("lora_settings") or {}
    lines += [
        "",
        f"* LoRA trains {l['trainable_share_pct']:.2f}% of its model's parameters "
        f"({c['parameter_reduction_pct']:.2f}% fewer than full fine-tuning) and its saved adapter is "
        f"{l['saved_size_mb']} MB against {f['saved_size_mb']} MB for the full model.",
        f"* Training time: LoRA's training steps took {c['lora_time_ratio']:.2f}x the time of full fine-tuning's "
        f"({c['lora_time_ratio_with_evaluation']:.2f}x with the per-epoch evaluation, which costs both the same).",
        f"* {split.capitalize()} {scored[0][1]}: LoRA {'+' if c['metric_difference_points'] >= 0 else ''}"
        f"{c['metric_difference_points']:.2f} points against full fine-tuning.",
        f"* LoRA settings: r={settings.get('r')}, alpha={settings.get('alpha')}, dropout={settings.get('dropout')}, "
        f"targets={settings.get('target_modules')}, trained in full: {settings.get('modules_to_save')}.",
        "", "![training loss](loss_curves.png)", "", f"![validation {scored[0][1]} vs training time](metric_vs_time.png)", "",
    ]
    return "\n".join(lines)


def main() -> int:
    argv = sys.argv[1:]
    args = parse_args(argv)
    common.set_trust_remote_code(args.trust_remote_code)
    if args.compare_runs:
        common.prepare_output_dir(args.output_dir, True, False)
        write_comparison(Path(args.compare_runs[0]), Path(args.compare_runs[1]), Path(args.output_dir))
        return 0
    common.quiet_libraries()
    if args.predict or args.predict_file:
        predict_with_adapters(args)
        return 0
    if args.compare:
        run_compare(args, argv)
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
