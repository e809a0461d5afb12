#!/usr/bin/env python
"""Full fine-tuning of a pretrained encoder for text classification (sentiment by default).

    python sentiment_finetuning.py                                   # embedded sample data
    python sentiment_finetuning.py --train-file my.csv --epochs 3 --output-dir ./results
    python sentiment_finetuning.py --output-dir ./results --predict "what a great film"

Steps: load data -> tokenize once -> build model -> train (evaluating every epoch, keeping the
best checkpoint) -> save the model -> evaluate on validation and test -> metrics and logs ->
report. This file holds what is particular to text classification (the data, the metrics, the
report); the run itself, shared with ner_finetuning.py, is encoders.run_encoder_task().
Works offline: when the hub is unreachable the bundled MiniLM encoder is used (see README).
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
import encoders
import reports
from common import UserError

DEFAULT_MODEL = "distilbert-base-uncased"
DEFAULT_DATA = common.DATA_DIR / "sentiment"
TEXT_COLUMNS = ("text", "sentence", "review", "content", "document", "body", "comment", "tweet",
                "utterance", "review_text", "sentence1")
LABEL_COLUMNS = ("label", "labels", "sentiment", "class", "target", "category", "polarity",
                 "rating", "stars")


def build_parser(description: str = __doc__, learning_rate: float = 2e-5, fallback_learning_rate: float = 1e-4,
                 head_lr_multiplier: float | None = 30.0, output_dir: str = "./results") -> argparse.ArgumentParser:
    """The classification flags; lora_finetuning.py builds on the same parser (without
    --head-lr-multiplier when `head_lr_multiplier` is None: the head learns at the run's rate)."""
    parser = common.ArgumentParser(description=description, formatter_class=common.HelpFormatter)
    common.add_model_args(parser, DEFAULT_MODEL)
    common.add_data_args(parser)
    columns = parser.add_argument_group("columns")
    columns.add_argument("--text-column", help=f"Column with the text (auto: one of {', '.join(TEXT_COLUMNS[:5])}, ...).")
    columns.add_argument("--label-column", help=f"Column with the label (auto: one of {', '.join(LABEL_COLUMNS[:5])}, ...).")
    training = encoders.add_training_args(parser, learning_rate=learning_rate, fallback_learning_rate=fallback_learning_rate)
    if head_lr_multiplier is None:
        parser.set_defaults(head_lr_multiplier=1.0)
    else:
        training.add_argument("--head-lr-multiplier", type=common.positive_float, default=head_lr_multiplier,
                              help="Learning-rate multiplier for the freshly initialised classification head "
                                   "(parameters missing from the pretrained checkpoint).")
    training.add_argument(
        "--metric-for-best-model", choices=("accuracy", "f1_macro", "loss"), default="accuracy",
        help="Validation metric that picks the checkpoint kept at the end.")
    training.add_argument("--class-weights", choices=("none", "balanced"), default="none",
                          help="balanced: weigh each class's loss by n_examples / (n_classes x its count), so rare "
                               "classes count as much as common ones (for imbalanced data, with --metric-for-best-model f1_macro).")
    common.add_precision_args(parser)
    common.add_output_args(parser, output_dir)
    predict = parser.add_argument_group("prediction (uses the model saved in --output-dir)")
    predict.add_argument("--predict", action="append", metavar="TEXT",
                         help="Classify this text and exit (repeatable; @FILE: every non-empty line of the file).")
    predict.add_argument("--predict-file", dest="predict", action="append", type="@{}".format,
                         help=argparse.SUPPRESS)  # the older spelling of --predict @FILE
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    encoders.check_encoder_args(parser, args)
    return args


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def load_splits(args: argparse.Namespace) -> tuple[dict[str, list[dict]], str]:
    """Return {'train', 'validation'?, 'test'?} lists of raw rows and a description of the source."""
    if args.dataset:
        hub = common.load_hub_dataset(args.dataset, args.dataset_config)
        names = {"validation": ("validation", "valid", "dev"), "test": ("test",)}
        splits = {"train": list(hub["train"])} if "train" in hub else {}
        if not splits:
            raise UserError(f"--dataset {args.dataset} has no 'train' split (has: {', '.join(hub)}).")
        for split, aliases in names.items():
            found = next((a for a in aliases if a in hub), None)
            if found:
                rows = list(hub[found])
                # GLUE-style test splits carry no labels (-1): they cannot be scored.
                if not all(row.get(args.label_column or "label", 0) == -1 for row in rows[:50]):
                    splits[split] = rows
        label_feature = hub["train"].features.get(args.label_column or "label")
        args.hub_label_names = getattr(label_feature, "names", None)
        return splits, f"hub dataset {args.dataset}"
    if not args.train_file and (args.validation_file or args.test_file):
        raise UserError("--validation-file/--test-file need --train-file as well.")
    train_file = args.train_file or str(DEFAULT_DATA / "train.csv")
    splits = {"train": common.read_table(train_file, "--train-file")}
    validation_file = args.validation_file or (None if args.train_file else str(DEFAULT_DATA / "validation.csv"))
    test_file = args.test_file or (None if args.train_file else str(DEFAULT_DATA / "test.csv"))
    if validation_file:
        splits["validation"] = common.read_table(validation_file, "--validation-file")
    if test_file:
        splits["test"] = common.read_table(test_file, "--test-file")
    return splits, train_file if args.train_file else f"embedded sample data ({DEFAULT_DATA})"


def normalise_label(value: Any) -> Any:
    """Integers stay integers (also when read as text from a CSV); anything else becomes a string."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    return text


def extract_examples(rows: list[dict], split: str, text_column: str, label_column: str) -> list[tuple[str, Any]]:
    examples = []
    for number, row in enumerate(rows, start=1):
        if text_column not in row or label_column not in row:
            missing = text_column if text_column not in row else label_column
            raise UserError(f"{split} data: row {number} has no '{missing}' field.")
        text, label = row[text_column], row[label_column]
        if label is None or str(label).strip() == "":
            raise UserError(f"{split} data: row {number} has an empty label.")
        if text is None or not str(text).strip():
            continue  # empty texts carry no signal; counted and reported below
        examples.append((str(text).strip(), normalise_label(label)))
    dropped = len(rows) - len(examples)
    if dropped:
        print(f"note: {split} data: skipped {dropped} row(s) with empty text.")
    if not examples:
        every = f": the text column '{text_column}' is empty in every row" if rows else ""
        raise UserError(f"{split} data holds no usable examples{every}.")
    return examples


def build_label_mapping(train_labels: list[Any], names: list[str] | None) -> list[str]:
    """Label names in id order. Integer labels 0..K-1 keep their ids; others are sorted."""
    distinct = set(train_labels)
    if len({type(label) for label in distinct}) > 1:
        raise UserError(f"training labels mix numbers and text ({sorted(map(str, distinct))[:6]}); "
                        "use one kind.")
    if len(distinct) < 2:
        raise UserError(f"the training data has a single class ({next(iter(distinct))!r}); "
                        "classification needs at least two.")
    ordered = sorted(distinct)
    if names and all(isinstance(label, int) and 0 <= label < len(names) for label in ordered):
        return list(names)
    return [str(label) for label in ordered]


def load_data(args: argparse.Namespace) -> encoders.EncoderData:
    """Read, check and split the data; print what it holds."""
    raw, source = load_splits(args)
    examples, label_names = prepare_examples(args, raw)
    if len(examples["train"]) < len(label_names):
        raise UserError(f"only {len(examples['train'])} training examples for {len(label_names)} classes: too few "
                        "to learn every class; add data or pass --validation-file.")
    common.check_one_batch(len(examples["train"]), args.batch_size, "examples")
    sizes = ", ".join(f"{split} {len(items)}" for split, items in examples.items())
    print(f"data: {source}: {sizes} examples; {len(label_names)} classes: {', '.join(label_names)}")
    return encoders.EncoderData(examples, label_names, source, {})


def prepare_examples(args: argparse.Namespace, raw: dict[str, list[dict]]) -> tuple[dict[str, list[tuple[str, int]]], list[str]]:
    """Pick columns, map labels to ids, check them, split off validation and subsample."""
    columns = list(raw["train"][0].keys())
    text_column = common.detect_column(columns, args.text_column, TEXT_COLUMNS, "text", "--text-column", "training data")
    label_column = common.detect_column(columns, args.label_column, LABEL_COLUMNS, "label", "--label-column", "training data")
    if text_column == label_column:
        raise UserError(f"the text and label columns are both '{text_column}'; set --text-column and --label-column.")
    examples = {split: extract_examples(rows, split, text_column, label_column) for split, rows in raw.items()}
    label_names = build_label_mapping([label for _, label in examples["train"]], getattr(args, "hub_label_names", None))
    index_of = {name: i for i, name in enumerate(label_names)}
    if getattr(args, "hub_label_names", None):
        index_of = {i: i for i in range(len(label_names))}

    encoded: dict[str, list[tuple[str, int]]] = {}
    for split, items in examples.items():
        unseen = sorted({str(label) for _, label in items} - {str(k) for k in index_of})
        if unseen:
            raise UserError(f"{split} data has label(s) never seen in training: {', '.join(unseen[:10])} "
                            f"(training labels: {', '.join(label_names)}).")
        encoded[split] = [(text, index_of[label if label in index_of else str(label)]) for text, label in items]

    if "validation" not in encoded:
        encoded["train"], encoded["validation"] = split_validation(encoded["train"], args.validation_split, common.DATA_SEED)
        print(f"validation: held out {len(encoded['validation'])} of the training examples "
              f"(--validation-split {args.validation_split}, stratified, seed {common.DATA_SEED}).")
    encoded["train"] = common.seeded_subset(encoded["train"], args.max_train_samples, common.DATA_SEED)
    for split in ("validation", "test"):
        if split in encoded:
            encoded[split] = common.seeded_subset(encoded[split], args.max_eval_samples, common.DATA_SEED)
    if len({label for _, label in encoded["train"]}) < 2:
        raise UserError("after subsampling, the training data has a single class; raise --max-train-samples.")
    return encoded, label_names


def split_validation(examples: list[tuple[str, int]], fraction: float, seed: int):
    from sklearn.model_selection import train_test_split

    counts = Counter(label for _, label in examples)
    n_validation = max(1, round(len(examples) * fraction))
    if len(examples) - n_validation < 2:
        raise UserError(f"only {len(examples)} training examples: too few to hold out a validation "
                        "set; add data or pass --validation-file.")
    stratify = [label for _, label in examples]
    if min(counts.values()) < 2 or n_validation < len(counts):
        print("note: some classes are too rare to stratify the validation split; splitting at random.")
        stratify = None
    train, validation = train_test_split(examples, test_size=n_validation, random_state=seed, stratify=stratify)
    return train, validation


@dataclass
class Encoded:
    """A tokenized split: one feature dict (input ids, attention mask, label) per example."""

    features: list[dict]


def tokenize(tokenizer, examples: list[tuple[str, int]], max_length: int) -> tuple[list[dict], int]:
    """Tokenize a split once (no padding: batches are padded dynamically). Returns rows and #truncated."""
    texts = [text for text, _ in examples]
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    rows = []
    for i, (_, label) in enumerate(examples):
        row = {key: values[i] for key, values in encoded.items()}
        row["labels"] = label
        rows.append(row)
    truncated = sum(1 for row in rows if len(row["input_ids"]) >= max_length)
    return rows, truncated


def encode_splits(tokenizer, data: encoders.EncoderData, args: argparse.Namespace) -> dict[str, Encoded]:
    encoded = {}
    for split, items in data.splits.items():
        rows, truncated = tokenize(tokenizer, items, args.max_length)
        if truncated:
            print(f"note: {truncated} {split} example(s) were cut to --max-length {args.max_length} tokens.")
        if split != "train":
            # Evaluation batches of similar lengths carry little padding; the metrics do not depend on order.
            rows.sort(key=lambda row: len(row["input_ids"]))
        encoded[split] = Encoded(rows)
    return encoded


# --------------------------------------------------------------------------------------------
# Metrics and evaluation
# --------------------------------------------------------------------------------------------


def classification_metrics(logits, labels, label_names: list[str]) -> dict[str, Any]:
    import numpy as np
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    predictions = np.asarray(logits).argmax(-1)
    ids = list(range(len(label_names)))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predictions, labels=ids, zero_division=0)
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "f1_macro": float(f1_score(labels, predictions, labels=ids, average="macro", zero_division=0)),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                             "f1": float(f1[i]), "support": int(support[i])}
                      for i, name in enumerate(label_names)},
        "confusion_matrix": confusion_matrix(labels, predictions, labels=ids).tolist(),
    }


def trainer_metrics(validation: Encoded, label_names: list[str]):
    """The validation metrics the Trainer logs and picks the best checkpoint by."""
    def compute_metrics(prediction):
        metrics = classification_metrics(prediction.predictions, prediction.label_ids, label_names)
        return {"accuracy": metrics["accuracy"], "f1_macro": metrics["f1_macro"]}
    return compute_metrics


def evaluate(trainer, split: Encoded, label_names: list[str]) -> dict[str, Any]:
    """Metrics of the trained model on `split`."""
    import torch

    prediction = trainer.predict(split.features)
    metrics = classification_metrics(prediction.predictions, prediction.label_ids, label_names)
    # The mean loss over the examples, from the gathered logits: under torchrun the Trainer's
    # test_loss averages per-batch losses, one of which includes the examples repeated to even out
    # the last batch across processes.
    metrics["loss"] = float(torch.nn.functional.cross_entropy(torch.as_tensor(prediction.predictions).float(),
                                                              torch.as_tensor(prediction.label_ids).long()))
    metrics["examples"] = len(split.features)
    return metrics


def class_weights(args: argparse.Namespace, train: Encoded, label_names: list[str]):
    """--class-weights balanced: scikit-learn's balanced weights from the training labels (a label
    absent from the training split keeps weight 1), as a tensor; else None."""
    if args.class_weights == "none":
        return None
    import numpy
    import torch
    from sklearn.utils.class_weight import compute_class_weight

    labels = numpy.array([feature["labels"] for feature in train.features])
    present = numpy.unique(labels)
    weights = numpy.ones(len(label_names))
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    print("class weights: " + ", ".join(f"{name} {w:.3f}" for name, w in zip(label_names, weights)))
    return torch.tensor(weights, dtype=torch.float32)


def counts(train: Encoded, epochs: float, seconds: float) -> dict[str, Any]:
    return {"examples": len(train.features), "samples_per_s": round(len(train.features) * epochs / seconds, 2)}


# --------------------------------------------------------------------------------------------
# Prediction with a saved model
# --------------------------------------------------------------------------------------------


def read_predict_texts(args: argparse.Namespace) -> list[str]:
    texts = common.read_texts(args.predict or [], "--predict", (".txt", ".text", ".csv", ".tsv"))
    if not texts:
        raise UserError("nothing to classify: --predict was empty (or its @FILE had no lines).")
    return texts


def predict(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = read_predict_texts(args)
    model_dir = Path(args.output_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"--output-dir {args.output_dir} holds no trained model; train one first "
                        "(run without --predict) or point --output-dir at it.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, **common.pretrained_kwargs())
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, **common.pretrained_kwargs()).eval()
    except (OSError, ValueError) as error:
        raise UserError(f"could not load the model in {model_dir}: {common.first_line(error)}") from None
    model.to(common.inference_device())
    results = []
    with torch.inference_mode():
        for start in range(0, len(texts), args.eval_batch_size):
            batch = texts[start:start + args.eval_batch_size]
            inputs = tokenizer(batch, truncation=True, max_length=args.max_length, padding=True,
                               return_tensors="pt").to(model.device)
            probabilities = model(**inputs).logits.float().softmax(-1)
            for text, row in zip(batch, probabilities):
                score, index = row.max(-1)
                results.append((model.config.id2label[int(index)], float(score), text))
    width = max(len(label) for label, _, _ in results)
    for label, score, text in results:
        print(f"{label:<{width}}  {score:.3f}  {text}")


# --------------------------------------------------------------------------------------------
# Saving and reporting
# --------------------------------------------------------------------------------------------


def report(metrics: dict[str, Any], output_dir: Path) -> None:
    encoders.print_run_summary(metrics, "samples_per_s", "samples")
    rows = []
    for split in ("validation", "test"):
        if split in metrics:
            rows.append([split, metrics[split]["examples"], metrics[split]["accuracy"], metrics[split]["f1_macro"]])
    print()
    print(reports.format_table(rows, ["split", "examples", "accuracy", "f1_macro"]))
    last = metrics.get("test", metrics["validation"])
    print()
    print(reports.format_table(
        [[name, v["precision"], v["recall"], v["f1"], v["support"]] for name, v in last["per_class"].items()],
        ["class", "precision", "recall", "f1", "support"]))
    print(f"\nsaved to {output_dir}: model, model card (README.md), metrics.json, run_config.json, training log, "
          f"{common.PLOT_FILE} and {reports.CONFUSION_MATRIX_FILE}")


def data_collator(tokenizer):
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer)


TASK = encoders.EncoderTask(
    name="classification", metrics_task="text-classification", kind="sequence-classification",
    peft_task_type="SEQ_CLS", auto_class="AutoModelForSequenceClassification",
    logged_metrics=("accuracy", "f1_macro"), rate=("samples_per_s", "samples"),
    load_data=load_data, class_weights=class_weights, load_tokenizer=common.load_tokenizer, encode=encode_splits,
    collator=data_collator,
    compute_metrics=trainer_metrics, evaluate=evaluate, counts=counts,
    plot_results=reports.plot_confusion_matrix, report=report)


def run(args: argparse.Namespace, method: str = "full") -> dict[str, Any] | None:
    """Train and evaluate; `method` is "full" or "lora" (lora_finetuning.py). Returns the metrics,
    or None when training was interrupted (a checkpoint was saved)."""
    return encoders.run_encoder_task(args, method, TASK)


def main() -> int:
    args = parse_args()
    common.set_trust_remote_code(args.trust_remote_code)
    if args.predict:
        common.quiet_libraries()
        predict(args)
        return 0
    return 0 if run(args) is not None else 130


if __name__ == "__main__":
    common.run_cli(main)
