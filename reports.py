"""What a run writes for people to read, beside its weights: metrics.json's record (build_metrics:
the schema every script shares, with the machine and library versions), the model card (README.md
in the output directory, in the Hugging Face format that the hub and huggingface_hub.ModelCard
read), the charts of its results and the tables the scripts print."""

from __future__ import annotations

import importlib.util
import os
import platform
import shlex
from pathlib import Path
from typing import Any, Iterable

import common

MODEL_CARD_FILE = "README.md"
CONFUSION_MATRIX_FILE = "confusion_matrix.png"
ENTITY_F1_FILE = "entity_f1.png"

# metrics.json "task" -> what the card says of it: pipeline tag, a phrase, and the scores it
# lists as (hub metric type, key in the split's metrics, name).
TASKS = {
    "text-classification": ("text-classification", "text classification",
                            (("accuracy", "accuracy", "accuracy"), ("f1", "f1_macro", "macro F1"))),
    "token-classification": ("token-classification", "named-entity recognition",
                             (("f1", "f1", "entity F1"), ("precision", "precision", "entity precision"),
                              ("recall", "recall", "entity recall"), ("accuracy", "accuracy", "token accuracy"))),
    "text-generation": ("text-generation", "text generation (causal language modelling)",
                        (("perplexity", "perplexity", "perplexity"), ("exact_match", "exact_match", "exact match"),
                         ("rouge", "rougeL", "ROUGE-L"))),
}
AUTO_CLASSES = {"text-classification": "SequenceClassification", "token-classification": "TokenClassification",
                "text-generation": "CausalLM"}


def build_metrics(task: str, method: str, model_name: str, precision: str, params: dict[str, int],
                  train: dict[str, Any], validation: dict[str, Any], test: dict[str, Any] | None,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metrics.json schema shared by every script."""
    metrics = {"task": task, "method": method, "model": model_name, "precision": precision,
               "params": params, "train": train, "validation": validation}
    if test is not None:
        metrics["test"] = test
    metrics.update(extra or {})
    metrics.update(environment_info())
    return metrics


def environment_info() -> dict[str, Any]:
    import accelerate
    import datasets
    import torch
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "datasets": datasets.__version__,
                "accelerate": accelerate.__version__}
    for optional in ("peft", "sklearn", "seqeval"):
        if importlib.util.find_spec(optional):
            module = __import__(optional)
            versions[optional] = getattr(module, "__version__", "unknown")
    hardware = {"platform": platform.platform(), "processor": cpu_name(),
                "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                "cpu_bf16": common.cpu_supports_bf16(),
                "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    return {"versions": versions, "hardware": hardware}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def format_table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain fixed-width text table."""
    cells = [header] + [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def base_model_id(model_name: str) -> str:
    """The hub name of a model as metrics.json records it ("NAME (bundled by PACKAGE)" -> NAME)."""
    return model_name.split(" (bundled by ")[0]


def command_line(argv: list[str]) -> str:
    """The command that produced a run, as a user would type it from the project folder."""
    return " ".join(["python", Path(argv[0]).name, *map(shlex.quote, argv[1:])])


def write_model_card(output_dir: Path, metrics: dict[str, Any], run_config: dict[str, Any]) -> None:
    """README.md in `output_dir`: a YAML metadata block (base model, library, task, metrics) and
    the data, hyperparameters, training time, hardware, results, command and limitations."""
    if not common.is_main_process():
        return
    from huggingface_hub import EvalResult, ModelCardData

    task = metrics["task"]
    pipeline_tag, task_phrase, scores = TASKS[task]
    args = run_config.get("args", {})
    lora = metrics["method"] == "lora"
    splits = [split for split in ("validation", "test") if isinstance(metrics.get(split), dict)]
    results = [EvalResult(task_type=pipeline_tag, dataset_type="custom", dataset_name=str(run_config.get("data")),
                          dataset_split=split, metric_type=hub_type, metric_value=round(float(metrics[split][key]), 4),
                          metric_name=f"{split} {name}")
               for split in splits for hub_type, key, name in scores if key in metrics[split]]
    card = ModelCardData(base_model=base_model_id(metrics["model"]), library_name="peft" if lora else "transformers",
                         pipeline_tag=pipeline_tag, model_name=output_dir.resolve().name, eval_results=results,
                         metrics=sorted({hub_type for hub_type, _, _ in scores}),
                         tags=["lora" if lora else "full-fine-tuning", task, "finetuning-toolkit"])
    body = [f"# {output_dir.resolve().name}", "",
            f"{base_model_id(metrics['model'])} fine-tuned for {task_phrase} with `{Path(run_config['argv'][0]).name}` "
            f"{_method_phrase(metrics, run_config)}."]
    if metrics["model"] != base_model_id(metrics["model"]):
        body.append(f"The weights came from the offline copy: {metrics['model']}.")
    body += ["", "## Data", "", *_data_lines(metrics, run_config), "",
             "## Training", "", "| setting | value |", "|---|---|",
             *[f"| {name} | {value} |" for name, value in _hyperparameters(metrics, run_config, args)], "",
             _time_sentence(metrics), "", "## Results", "", "| split | metric | value |", "|---|---|---|"]
    body += [f"| {split} | {name} | {float(metrics[split][key]):.4f} |"
             for split in splits for _, key, name in scores if key in metrics[split]]
    if task == "text-generation":
        body.append(f"| validation | perplexity before training | {metrics['perplexity_before']:.4f} |")
        body += [f"| validation | {name} before training | {metrics['validation'][key + '_before']:.4f} |"
                 for key, name in (("exact_match", "exact match"), ("rougeL", "ROUGE-L")) if key in metrics["validation"]]
        if "unrelated" in metrics:
            body += [f"| unrelated text | perplexity before training | {metrics['unrelated']['perplexity_before']:.4f} |",
                     f"| unrelated text | perplexity | {metrics['unrelated']['perplexity']:.4f} |"]
    body += ["", "Full figures: `metrics.json`; the training log: `training_log.jsonl`.", "",
             "## Command", "", "```bash", command_line(run_config["argv"]), "```", "",
             "## How to use", "", *_usage_lines(output_dir, metrics, run_config), "",
             "## Intended use and limitations", "", *_limitations(metrics)]
    text = f"---\n{card.to_yaml()}\n---\n\n" + "\n".join(body) + "\n"
    temporary = output_dir / (MODEL_CARD_FILE + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(output_dir / MODEL_CARD_FILE)


def _method_phrase(metrics: dict[str, Any], run_config: dict[str, Any]) -> str:
    if metrics["method"] != "lora":
        return "by full fine-tuning (every weight trained)"
    lora = metrics.get("lora") or {}
    args = run_config.get("args", {})
    targets = lora.get("target_modules") or run_config.get("lora_targets")
    targets = targets if isinstance(targets, str) else ", ".join(targets or [])
    layers = f" of the top {lora['layers']} layers" if lora.get("layers") else ""
    dropout = ", the base model's dropout off" if lora.get("base_dropout") == "off" else ""
    return (f"with LoRA (rank {lora.get('r', args.get('lora_r'))}, alpha {lora.get('alpha', args.get('lora_alpha'))}, "
            f"adapters on {targets}{layers}{dropout}). This folder holds the adapter, which loads on top of the base model")


def _data_lines(metrics: dict[str, Any], run_config: dict[str, Any]) -> list[str]:
    lines = [f"- Source: {run_config.get('data')}"]
    train = metrics["train"]
    if "records" in train:
        lines.append(f"- Instruction records: {train['records']} for training, formatted with {run_config.get('prompt_format')}; "
                     f"the loss covered {'prompts and responses' if run_config['args'].get('train_on_prompts') else 'the responses'}; "
                     f"validation: {metrics['validation']['tokens']:,} response tokens")
    elif metrics["task"] == "text-generation":
        lines.append(f"- Training: {train['blocks']} blocks of {train['block_size']} tokens; validation: "
                     f"{metrics['validation']['tokens']:,} tokens")
    else:
        lines.append(f"- Training: {train['examples']:,} examples ({train.get('tokens', 0):,} tokens per epoch)")
        lines += [f"- {split.capitalize()}: {metrics[split]['examples']:,} examples"
                  for split in ("validation", "test") if isinstance(metrics.get(split), dict)]
        labels = metrics.get("labels") or []
        lines.append(f"- Labels ({len(labels)}): {', '.join(map(str, labels))}")
    return lines


def _hyperparameters(metrics: dict[str, Any], run_config: dict[str, Any], args: dict[str, Any]) -> list[tuple[str, Any]]:
    rows = [("method", "LoRA" if metrics["method"] == "lora" else "full fine-tuning"),
            ("learning rate", f"{args.get('learning_rate'):g}" if args.get("learning_rate") else "?"),
            ("epochs", args.get("epochs")), ("optimizer steps", metrics["train"].get("steps")),
            ("batch size", args.get("batch_size")),
            ("gradient accumulation steps", args.get("gradient_accumulation_steps")),
            ("effective batch size", metrics["train"].get("effective_batch_size")),
            ("gradient checkpointing", args.get("gradient_checkpointing")),
            ("class weights", metrics["train"].get("class_weights")), ("weight decay", args.get("weight_decay")),
            ("warm-up ratio", args.get("warmup_ratio")), ("seed", args.get("seed")),
            ("precision", metrics["precision"]),
            ("trainable parameters", f"{metrics['params']['trainable']:,} of {metrics['params']['total']:,}")]
    if metrics["task"] == "text-generation":
        rows.insert(4, ("block size", run_config.get("block_size")))
    else:
        rows.insert(4, ("max length", args.get("max_length")))
    if metrics["method"] == "lora":
        rows += [("LoRA rank / alpha", f"{args.get('lora_r')} / {args.get('lora_alpha')}"),
                 ("LoRA dropout", args.get("lora_dropout"))]
    return [(name, value) for name, value in rows if value is not None]


def _time_sentence(metrics: dict[str, Any]) -> str:
    train, hardware = metrics["train"], metrics["hardware"]
    device = f"GPU {hardware['gpu']}" if hardware.get("gpu") else f"{hardware['processor']}, {hardware['cpu_count']} CPU cores"
    versions = metrics["versions"]
    return (f"Training took {train['runtime_s']:.1f} s ({train['steps']} optimizer steps, peak memory "
            f"{train['peak_rss_mb']:.0f} MB) on {device}, in {metrics['precision']}; torch {versions['torch']}, "
            f"transformers {versions['transformers']}" + (f", peft {versions['peft']}" if "peft" in versions else "") + ".")


def _usage_lines(output_dir: Path, metrics: dict[str, Any], run_config: dict[str, Any]) -> list[str]:
    script = Path(run_config["argv"][0]).name
    auto = AUTO_CLASSES[metrics["task"]]
    where = str(output_dir)
    labels = {"id2label": dict(enumerate(metrics["labels"]))} if metrics.get("labels") else {}
    if metrics["method"] == "lora":
        arguments = ", ".join([repr(where)] + [f"{key}={value!r}" for key, value in labels.items()])
        load = [f"from peft import AutoPeftModelFor{auto}", "",
                f"model = AutoPeftModelFor{auto}.from_pretrained({arguments})  # the base model, then this adapter"]
    else:
        load = ["from transformers import pipeline", "",
                f"model = pipeline({TASKS[metrics['task']][0]!r}, model={where!r})"]
    flag = "--prompt 'Once upon a time'" if metrics["task"] == "text-generation" else "--predict 'your text here'"
    script_lines = ["```bash", f"python {script} --output-dir {shlex.quote(where)} {flag}", "```"]
    if run_config.get("gguf_file"):  # a GGUF base model loads through the script, which converts it
        return script_lines
    return ["```python", *load, "```", "", "or with the script that trained it:", "", *script_lines]


def _limitations(metrics: dict[str, Any]) -> list[str]:
    unit = next(key for key in ("examples", "records", "blocks") if key in metrics["train"])
    return [f"- Trained on {metrics['train'][unit]:,} {unit} from one "
            "source: it knows that data's domain, language and labelling conventions, and nothing outside "
            "them has been measured. Check it on your own data before relying on it.",
            "- Scores come from one run with one seed; on small data another seed can move them by a point or "
            "more (`lora_finetuning.py --compare --seeds ...` measures that spread).",
            "- The base model's own limitations and biases carry over; read its model card.",
            "- Meant for learning, prototyping and coursework, not for decisions about people."]


# --------------------------------------------------------------------------------------------
# Charts
# --------------------------------------------------------------------------------------------


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(records: Iterable[dict[str, Any]], metric: str, path: Path, title: str) -> None:
    """Training loss per logged step and the validation metric per evaluation, in one PNG
    (written by the main process only)."""
    if not common.is_main_process():
        return
    plt = pyplot()
    records = list(records)
    losses = [(r["epoch"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["epoch"], r[f"eval_{metric}"]) for r in records if f"eval_{metric}" in r]
    fig, loss_axis = plt.subplots(figsize=(7, 4))
    if losses:
        loss_axis.plot(*zip(*losses), color="tab:blue", label="training loss")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("training loss", color="tab:blue")
    metric_axis = loss_axis.twinx()
    if evals:
        metric_axis.plot(*zip(*evals), color="tab:orange", marker="o", label=f"validation {metric}")
    metric_axis.set_ylabel(f"validation {metric}", color="tab:orange")
    loss_axis.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scored_split(metrics: dict[str, Any]) -> str:
    """The split a run's charts and comparisons show: test when it was scored, else validation."""
    return "test" if isinstance(metrics.get("test"), dict) else "validation"


def plot_confusion_matrix(metrics: dict[str, Any], output_dir: Path) -> None:
    """confusion_matrix.png: the classifier's confusion matrix on the test split (else validation)."""
    if not common.is_main_process():
        return
    import numpy as np
    from sklearn.metrics import ConfusionMatrixDisplay

    split = scored_split(metrics)
    labels = [str(label) for label in metrics["labels"]]
    plt = pyplot()
    fig, axis = plt.subplots(figsize=(2.5 + 0.6 * len(labels), 2 + 0.6 * len(labels)))
    ConfusionMatrixDisplay(np.array(metrics[split]["confusion_matrix"]), display_labels=labels).plot(
        ax=axis, cmap="Blues", colorbar=False, xticks_rotation=45 if len(labels) > 4 else "horizontal")
    axis.set_title(f"{split}: accuracy {metrics[split]['accuracy']:.3f}")
    fig.tight_layout()
    fig.savefig(output_dir / CONFUSION_MATRIX_FILE, dpi=110)
    plt.close(fig)


def plot_entity_f1(metrics: dict[str, Any], output_dir: Path) -> None:
    """entity_f1.png: precision, recall and F1 per entity type on the test split (else validation)."""
    if not common.is_main_process():
        return
    split = scored_split(metrics)
    per_type = metrics[split]["per_type"]
    grouped_bars(output_dir / ENTITY_F1_FILE, list(per_type),
                 {score: [per_type[kind][score] for kind in per_type] for score in ("precision", "recall", "f1")},
                 f"{split}: entity F1 {metrics[split]['f1']:.3f} (support per type in metrics.json)", "score")


def grouped_bars(path: Path, groups: list[str], series: dict[str, list[float]], title: str, ylabel: str,
                 errors: dict[str, list[float]] | None = None) -> None:
    """One cluster of bars per group, one bar per series (optional error bars)."""
    import numpy as np

    plt = pyplot()
    positions = np.arange(len(groups))
    width = 0.8 / max(1, len(series))
    fig, axis = plt.subplots(figsize=(max(5.0, 1.2 * len(groups) + 2), 4))
    for i, (name, values) in enumerate(series.items()):
        axis.bar(positions + (i - (len(series) - 1) / 2) * width, values, width, label=name,
                 yerr=(errors or {}).get(name), capsize=3)
    axis.set_xticks(positions, groups)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
