#!/usr/bin/env python
"""The two stock-Trainer recipes that the project's scripts are measured against.

benchmarks/run_all.py runs them next to the project's scripts; they can also be run alone:

    python benchmarks/baselines.py classification --recipe tuned --model-name DIR \\
        --train-file train.tsv --validation-file heldout.tsv --output-dir out/
    python benchmarks/baselines.py classification --lora ...            # PEFT LoRA, same recipe
    python benchmarks/baselines.py ner --train-file train.conll --validation-file dev.conll \\
        --test-file test.conll ...
    python benchmarks/baselines.py causal-lm --model-name DIR --gguf-file F.gguf --lora \\
        --train-file train.txt --validation-file validation.txt --max-steps 20 ...

Recipes:

  plain  what the transformers example scripts (run_glue.py, run_ner.py, run_clm.py) do by
         default: fp32, every input padded to --max-length (default_data_collator), random
         batches, the library's defaults for everything else.
  tuned  the best a user gets from the stock Trainer with standard flags: bf16 autocast where the
         hardware computes in bf16 natively (bf16=True, with use_cpu=True on a CPU with AVX-512
         BF16 or AMX), dynamic padding (DataCollatorWithPadding /
         DataCollatorForTokenClassification) and train_sampling_strategy="group_by_length".

Everything not set here is the library's default: fused AdamW, linear decay without warm-up, no
weight decay, evaluation batch 8, a checkpoint every 500 steps. Model, data, epochs, batch size,
learning rate and seed come from the command line, so that run_all.py gives all runs the same.

Each run trains, saves the model (as the example scripts do, before evaluating: end to end stops
there), scores held-out data with the metric the project's script reports (accuracy; strict IOB2
entity F1 with seqeval, decoding each word by the argmax of its first sub-token; or
perplexity = exp(total NLL / predicted tokens)), then writes OUTPUT_DIR/metrics.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402  (the project's helpers: its bf16 check, the bundled-model paths)
import flops  # noqa: E402  (FLOP counting)

RECIPES = ("plain", "tuned")
TASKS = ("classification", "ner", "causal-lm")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("--recipe", choices=RECIPES, required=True, help="plain: (a); tuned: (b) (see above).")
    parser.add_argument("--model-name", required=True, help="Local model directory (the bundled models in a benchmark).")
    parser.add_argument("--gguf-file", help="GGUF file name inside --model-name (the bundled SmolLM2).")
    parser.add_argument("--train-file", required=True,
                        help="classification: TSV with header sentence<TAB>label; ner: CoNLL (token<TAB>tag); "
                             "causal-lm: plain text.")
    parser.add_argument("--validation-file", required=True, help="Held-out data, same format; scored after training.")
    parser.add_argument("--test-file", help="A second held-out file (NER), also scored after training.")
    parser.add_argument("--output-dir", required=True, help="Where the model and metrics.json go.")
    parser.add_argument("--epochs", type=float, default=1.0, help="Training epochs.")
    parser.add_argument("--max-steps", type=int, default=-1,
                        help="Stop after this many optimizer steps (causal-lm's fixed budget; run_all.py also "
                             "uses it to cut the slow plain recipe short and extrapolate its time).")
    parser.add_argument("--batch-size", type=int, default=32, help="Training batch size.")
    parser.add_argument("--learning-rate", type=float, required=True, help="Peak learning rate (linear decay, no warm-up).")
    parser.add_argument("--seed", type=int, default=42, help="Seeds the head, the adapters and the data order.")
    parser.add_argument("--max-length", type=int, default=128,
                        help="Token limit per input (classification, ner); the plain recipe pads every input to it.")
    parser.add_argument("--block-size", type=int, default=256, help="Tokens per block (causal-lm).")
    parser.add_argument("--max-eval-blocks", type=int, help="Score only the first N validation blocks (causal-lm).")
    lora = parser.add_argument_group("LoRA (PEFT, as in its examples)")
    lora.add_argument("--lora", action="store_true", help="Train LoRA adapters instead of every weight.")
    lora.add_argument("--lora-r", type=int, default=8, help="Rank.")
    lora.add_argument("--lora-alpha", type=float, default=16, help="Scaling numerator (scale = alpha / r).")
    lora.add_argument("--lora-dropout", type=float, default=0.0, help="Dropout on the adapter input.")
    lora.add_argument("--lora-layers", type=int, metavar="N", help="Adapt the top N layers only (default: all).")
    lora.add_argument("--no-base-dropout", action="store_true",
                      help="Train with the base model's dropout off, as lora_finetuning.py does by default.")
    lora.add_argument("--lora-target-modules", nargs="+", default=["query", "value"], metavar="NAME",
                      help="Modules to adapt (run_all.py passes those of the project's run).")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------
# The recipe: precision, padding, batch order
# --------------------------------------------------------------------------------------------


def recipe_precision(recipe: str) -> str:
    """fp32 for the plain recipe; bf16 for the tuned one where the hardware has native bf16."""
    import torch

    if recipe == "plain":
        return "fp32"
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if common.cpu_supports_bf16() else "fp32"


def training_arguments(args: argparse.Namespace, precision: str):
    """The stock TrainingArguments: the shared settings, the recipe's, and library defaults otherwise."""
    import torch
    from transformers import TrainingArguments

    recipe = {}
    if args.recipe == "tuned":
        recipe["train_sampling_strategy"] = "group_by_length"
    if precision in ("bf16", "fp16"):
        # On a CPU the Trainer's autocast needs use_cpu=True; on a GPU it is the default.
        recipe.update({precision: True, "use_cpu": not torch.cuda.is_available()})
    return TrainingArguments(
        output_dir=str(Path(args.output_dir) / "checkpoints"),
        num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate, seed=args.seed,
        report_to="none", disable_tqdm=True, **recipe)


def add_lora(model, args: argparse.Namespace, task_type: str):
    import torch
    from peft import LoraConfig, get_peft_model

    layers = model.config.num_hidden_layers
    if args.no_base_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    config = LoraConfig(task_type=task_type, r=args.lora_r, lora_alpha=args.lora_alpha,
                        lora_dropout=args.lora_dropout, target_modules=list(args.lora_target_modules),
                        layers_to_transform=list(range(layers - args.lora_layers, layers)) if args.lora_layers else None)
    return get_peft_model(model, config)


def step_timer():
    """A callback that records when each optimizer step ends, so that a run cut short with
    --max-steps can be extrapolated from its steady per-step time (run_all.py)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def summary(self) -> dict[str, float | None]:
            # The first step carries one-off costs (allocations, first batch); the rest are steady.
            steady = (self.ends[-1] - self.ends[0]) / (len(self.ends) - 1) if len(self.ends) > 1 else None
            return {"first_step_s": round(self.ends[0] - self.begin, 3) if self.ends else None,
                    "steady_step_s": round(steady, 4) if steady else None}

    return StepTimer()


def train_stock(args: argparse.Namespace, precision: str, model, train_dataset, data_collator, tokenizer):
    """The stock Trainer with the recipe's arguments, trained and timed.
    Returns the trainer, the train() result, the training time and the step timer."""
    from transformers import Trainer

    timer = step_timer()
    trainer = Trainer(model=model, args=training_arguments(args, precision), train_dataset=train_dataset,
                      data_collator=data_collator, processing_class=tokenizer, callbacks=[timer])
    started = time.perf_counter()
    result = trainer.train()
    return trainer, result, time.perf_counter() - started, timer


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def real_tokens(features, epochs: float) -> int:
    """Real (non-padding) tokens of the training inputs over all epochs."""
    return round(sum(sum(mask) for mask in features["attention_mask"]) * epochs)


def count_parameters(model) -> dict[str, int]:
    return {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total": sum(p.numel() for p in model.parameters())}


def epoch_steps(examples: int, args: argparse.Namespace) -> int:
    """Optimizer steps of the whole run as planned by --epochs (what the Trainer computes)."""
    return math.ceil(math.ceil(examples / args.batch_size) * args.epochs)


def write_metrics(args: argparse.Namespace, precision: str, model, result, runtime: float, timer,
                  tokens: int, examples: int, planned: int, scores: dict[str, Any], eval_time: float) -> None:
    """OUTPUT_DIR/metrics.json: what run_all.py reads. `tokens` and `examples` describe the
    planned run (all epochs); when --max-steps cut it short, the rates count the share of it that
    ran, and `planned_steps` tells run_all.py how far to extrapolate the time."""
    steps = result.global_step
    train = {"runtime_s": round(runtime, 2), "steps": steps, "planned_steps": planned,
             "examples": examples, "epochs": args.epochs, "final_loss": round(result.training_loss, 4),
             # Work done: planned examples/tokens scaled by the share of steps run.
             "samples_per_s": round(examples * steps / planned / runtime, 2),
             "tokens_per_s": round(tokens * steps / planned / runtime, 1),
             "tokens": tokens, **timer.summary(), "eval_time_s": round(eval_time, 2), "peak_rss_mb": peak_rss_mb()}
    metrics = {"recipe": args.recipe, "task": args.task, "method": "lora" if args.lora else "full",
               "model": args.model_name, "precision": precision, "params": count_parameters(model),
               "train": train, **scores}
    (Path(args.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
# Text classification (run_glue.py)
# --------------------------------------------------------------------------------------------


def read_tsv(path: str) -> tuple[list[str], list[int]]:
    with open(path, encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        rows = [(sentence.strip(), int(label)) for sentence, label in reader]
    return [text for text, _ in rows], [label for _, label in rows]


def run_classification(args: argparse.Namespace) -> None:
    import datasets
    import numpy as np
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              default_data_collator)

    precision = recipe_precision(args.recipe)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name)
    padding = "max_length" if args.recipe == "plain" else False

    def preprocess(batch):
        return tokenizer(batch["sentence"], padding=padding, max_length=args.max_length, truncation=True)

    splits = {}
    for name, path in (("train", args.train_file), ("validation", args.validation_file)):
        texts, labels = read_tsv(path)
        raw = datasets.Dataset.from_dict({"sentence": texts, "label": labels})
        splits[name] = raw.map(preprocess, batched=True, remove_columns=["sentence"])
    num_labels = len(set(splits["train"]["label"]))
    model = AutoModelForSequenceClassification.from_pretrained(args.model_name, num_labels=num_labels)
    if args.lora:
        model = add_lora(model, args, "SEQ_CLS")
    collator = default_data_collator if args.recipe == "plain" else DataCollatorWithPadding(tokenizer)
    trainer, result, runtime, timer = train_stock(args, precision, model, splits["train"], collator, tokenizer)
    trainer.save_model(args.output_dir)  # as run_glue.py does: save, then evaluate

    started = time.perf_counter()
    prediction = trainer.predict(splits["validation"])
    accuracy = float((np.asarray(prediction.predictions).argmax(-1) == prediction.label_ids).mean())
    eval_time = time.perf_counter() - started
    examples = len(splits["train"])
    write_metrics(args, precision, model, result, runtime, timer, real_tokens(splits["train"], args.epochs),
                  round(examples * args.epochs), epoch_steps(examples, args),
                  {"validation": {"accuracy": accuracy, "examples": len(splits["validation"])}}, eval_time)


# --------------------------------------------------------------------------------------------
# Token classification (run_ner.py)
# --------------------------------------------------------------------------------------------


def read_conll(path: str) -> list[tuple[list[str], list[str]]]:
    """Sentences of (tokens, tags) from a token<TAB>tag file with blank lines between sentences."""
    sentences, tokens, tags = [], [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines() + [""]:
        line = line.strip(" \t\r\n")  # only ASCII blanks separate columns: odd tokens stay tokens
        if not line:
            if tokens:
                sentences.append((tokens, tags))
            tokens, tags = [], []
            continue
        fields = re.split(r"[ \t]+", line)
        tokens.append(fields[0])
        tags.append(fields[-1])
    return sentences


def run_ner(args: argparse.Namespace) -> None:
    import datasets
    import numpy as np
    from seqeval.metrics import f1_score
    from seqeval.scheme import IOB2
    from transformers import (AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification,
                              default_data_collator)

    precision = recipe_precision(args.recipe)
    files = {"train": args.train_file, "validation": args.validation_file}
    if args.test_file:
        files["test"] = args.test_file
    sentences = {name: read_conll(path) for name, path in files.items()}
    label_names = sorted({tag for _, tags in sentences["train"] for tag in tags})
    label_id = {name: i for i, name in enumerate(label_names)}
    tokenizer = AutoTokenizer.from_pretrained(args.model_name)
    padding = "max_length" if args.recipe == "plain" else False

    def tokenize_and_align_labels(batch):
        # run_ner.py: the first sub-token of a word carries its tag, the others and the special
        # tokens -100; a tag unseen in training is ignored (-100) as well.
        encoded = tokenizer(batch["tokens"], padding=padding, truncation=True, max_length=args.max_length,
                            is_split_into_words=True)
        labels = []
        for i, tags in enumerate(batch["tags"]):
            previous, row = None, []
            for word in encoded.word_ids(batch_index=i):
                row.append(label_id.get(tags[word], -100) if word is not None and word != previous else -100)
                previous = word
            labels.append(row)
        encoded["labels"] = labels
        # Kept for scoring every word (the Trainer drops columns the model does not take).
        encoded["word_ids"] = [[-1 if w is None else w for w in encoded.word_ids(batch_index=i)]
                               for i in range(len(batch["tokens"]))]
        return encoded

    splits = {}
    for name, items in sentences.items():
        raw = datasets.Dataset.from_dict({"tokens": [t for t, _ in items], "tags": [g for _, g in items]})
        splits[name] = raw.map(tokenize_and_align_labels, batched=True, remove_columns=["tokens", "tags"])
    model = AutoModelForTokenClassification.from_pretrained(
        args.model_name, num_labels=len(label_names), id2label=dict(enumerate(label_names)), label2id=label_id)
    if args.lora:
        model = add_lora(model, args, "TOKEN_CLS")
    collator = default_data_collator if args.recipe == "plain" else DataCollatorForTokenClassification(tokenizer)
    trainer, result, runtime, timer = train_stock(args, precision, model, splits["train"], collator, tokenizer)
    trainer.save_model(args.output_dir)  # as run_ner.py does: save, then evaluate

    started = time.perf_counter()
    scores = {}
    # With train_sampling_strategy="group_by_length", transformers 5 also length-groups the
    # evaluation batches, so predictions come back in another order than the dataset's rows. The
    # labels travel with them (classification accuracy is unaffected), but the per-word decoding
    # below reads the words of row i: predict in row order.
    trainer.args.train_sampling_strategy = "random"
    for name in files:
        if name == "train":
            continue
        prediction = trainer.predict(splits[name])
        predicted_ids = np.asarray(prediction.predictions).argmax(-1)
        word_ids, predicted = splits[name]["word_ids"], []
        for row, (words, _) in enumerate(sentences[name]):
            # Each word gets the argmax at its first sub-token; a word with no sub-token (cut off
            # by truncation, or characters the tokenizer drops) is predicted O. Every word is
            # scored, as the project's script does.
            tags = ["O"] * len(words)
            seen = set()
            for position, word in enumerate(word_ids[row]):
                if word >= 0 and word not in seen:
                    seen.add(word)
                    tags[word] = label_names[predicted_ids[row][position]]
            predicted.append(tags)
        gold = [tags for _, tags in sentences[name]]
        scores[name] = {"f1": float(f1_score(gold, predicted, mode="strict", scheme=IOB2, zero_division=0)),
                        "f1_lenient": float(f1_score(gold, predicted, zero_division=0)),
                        "examples": len(gold)}
    eval_time = time.perf_counter() - started
    examples = len(splits["train"])
    write_metrics(args, precision, model, result, runtime, timer, real_tokens(splits["train"], args.epochs),
                  round(examples * args.epochs), epoch_steps(examples, args), scores, eval_time)


# --------------------------------------------------------------------------------------------
# Causal language modelling (run_clm.py)
# --------------------------------------------------------------------------------------------


def load_causal_lm(args: argparse.Namespace):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_name, gguf_file=args.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(args.model_name, gguf_file=args.gguf_file)
    if getattr(model, "hf_quantizer", None) is not None:
        # GGUF weights arrive de-quantized to float; without this the Trainer refuses the model
        # as "purely quantized".
        model.hf_quantizer.remove_quantization_config(model)
    return model, tokenizer


def text_blocks(tokenizer, path: str, block_size: int, keep_partial: bool) -> list[list[int]]:
    """run_clm.py's group_texts on one document: the text's tokens and an EOS, cut into blocks
    (the last partial block kept only for scoring). The text is tokenized as one document, not
    line by line as run_clm.py does, so that every run sees exactly the same tokens."""
    ids = tokenizer(Path(path).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    ids.append(tokenizer.eos_token_id)
    blocks = [ids[i:i + block_size] for i in range(0, len(ids), block_size)]
    if blocks and len(blocks[-1]) < block_size and (not keep_partial or len(blocks[-1]) < 2):
        blocks.pop()
    return blocks


def perplexity(model, blocks: list[list[int]], precision: str, batch_size: int = 8) -> dict[str, float]:
    """exp(total NLL / total predicted tokens): the honest perplexity (a mean of per-batch mean
    losses would weigh a short last block like a full one)."""
    import torch

    device = next(model.parameters()).device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    total_nll, total_tokens = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(blocks), batch_size):
            batch = blocks[start:start + batch_size]
            width = max(len(b) for b in batch)
            input_ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for row, block in enumerate(batch):
                input_ids[row, :len(block)] = torch.tensor(block)
                mask[row, :len(block)] = 1
            input_ids, mask = input_ids.to(device), mask.to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(input_ids=input_ids, attention_mask=mask).logits
            targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            total_nll += float(torch.nn.functional.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"))
            total_tokens += int((targets != -100).sum())
    return {"loss": total_nll / total_tokens, "perplexity": math.exp(total_nll / total_tokens), "tokens": total_tokens}


def run_causal_lm(args: argparse.Namespace) -> None:
    import datasets
    from transformers import default_data_collator

    precision = recipe_precision(args.recipe)
    model, tokenizer = load_causal_lm(args)
    train_blocks = text_blocks(tokenizer, args.train_file, args.block_size, keep_partial=False)
    validation_blocks = text_blocks(tokenizer, args.validation_file, args.block_size, keep_partial=True)
    validation_blocks = validation_blocks[:args.max_eval_blocks] if args.max_eval_blocks else validation_blocks
    # Full blocks: there is no padding to remove, so the tuned recipe differs only by bf16 here.
    train = datasets.Dataset.from_dict({"input_ids": train_blocks, "labels": train_blocks,
                                        "attention_mask": [[1] * len(b) for b in train_blocks]})
    if args.lora:
        model = add_lora(model, args, "CAUSAL_LM")
    trainer, result, runtime, timer = train_stock(args, precision, model, train, default_data_collator, tokenizer)
    trainer.save_model(args.output_dir)  # as run_clm.py does: save, then evaluate

    started = time.perf_counter()
    after = perplexity(model, validation_blocks, precision)
    eval_time = time.perf_counter() - started
    trained_blocks = result.global_step * args.batch_size
    # The fixed step budget is the plan here: figures are per trained block, not per epoch.
    write_metrics(args, precision, model, result, runtime, timer, trained_blocks * args.block_size, trained_blocks,
                  result.global_step,
                  {"perplexity": after["perplexity"], "validation": after}, eval_time)


# --------------------------------------------------------------------------------------------
# FLOP accounting (used by run_all.py)
# --------------------------------------------------------------------------------------------


def flop_shape(task: str, model_name: str, gguf_file: str | None = None, lora_targets: list[str] | None = None,
               lora_r: int = 8) -> dict[str, int]:
    """flops.matmul_shape() of the task's model built on the meta device (no weights are
    loaded), with LoRA adapters when `lora_targets` is given (the base weights then count as frozen)."""
    import torch
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoModelForTokenClassification)

    auto = {"classification": AutoModelForSequenceClassification, "ner": AutoModelForTokenClassification,
            "causal-lm": AutoModelForCausalLM}[task]
    config = AutoConfig.from_pretrained(model_name, gguf_file=gguf_file)
    with torch.device("meta"):
        model = auto.from_config(config)
        if lora_targets:
            from peft import LoraConfig, get_peft_model

            task_type = {"classification": "SEQ_CLS", "ner": "TOKEN_CLS", "causal-lm": "CAUSAL_LM"}[task]
            model = get_peft_model(model, LoraConfig(task_type=task_type, r=lora_r, target_modules=lora_targets))
    return flops.matmul_shape(model, sequence_head=task == "classification")


def main() -> int:
    args = parse_args()
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    {"classification": run_classification, "ner": run_ner, "causal-lm": run_causal_lm}[args.task](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
