"""What the encoder scripts share: sentiment_finetuning.py, ner_finetuning.py and
lora_finetuning.py (which trains either task with LoRA).

run_encoder_task() is their run, step by step: load and check the data -> tokenize every split
once -> load the pretrained encoder with a fresh task head (and LoRA adapters) -> train, evaluating
every epoch and keeping the best checkpoint -> save the model -> evaluate it on validation and
test -> metrics.json, training log, plot -> report. Each script hands it an EncoderTask: its own
data reading, encoding, metrics and report. Also here: their flags, the Trainer they train with
(length-grouped batches that resume exactly, a faster-learning fresh head) and LoRA's head modules.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import common
import reports
from common import ResolvedModel, UserError


EVAL_BATCH_SIZE = 64  # evaluation needs no gradients: a larger batch than training's fits in the same memory


def add_training_args(parser: argparse.ArgumentParser, learning_rate: float, fallback_learning_rate: float,
                      warmup_ratio: float = 0.1) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=common.positive_float, default=3.0, help="Number of training epochs.")
    group.add_argument("--batch-size", type=common.positive_int, default=8, help="Training batch size per device.")
    group.add_argument("--learning-rate", type=common.positive_float,
                       help=f"Peak learning rate (default: {learning_rate:g}; {fallback_learning_rate:g} for the "
                            "small bundled offline model, which needs a higher rate, however it is named).")
    parser.set_defaults(default_learning_rate=learning_rate, fallback_learning_rate=fallback_learning_rate,
                        eval_batch_size=EVAL_BATCH_SIZE)
    group.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay.")
    group.add_argument("--warmup-ratio", type=float, default=warmup_ratio,
                       help="Fraction of the training steps spent warming the learning rate up.")
    group.add_argument("--max-length", type=common.positive_int, default=128, help="Maximum tokens per input.")
    group.add_argument("--seed", type=int, default=42,
                       help="Random seed: initialisation, batch order, dropout (not the validation split).")
    group.add_argument("--early-stopping-patience", type=common.positive_int,
                       help="Stop after this many evaluations without improvement.")
    common.add_batch_scaling_args(group)
    common.add_resume_arg(group)
    return group


def check_encoder_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks argparse cannot make on the data and training flags of the encoder scripts."""
    common.settle_dataset_args(parser, args)
    if args.max_length < 8:
        parser.error("--max-length must be at least 8")
    if args.dataset and args.train_file:
        parser.error("--dataset and --train-file are mutually exclusive")
    if not 0 <= args.warmup_ratio < 1:
        parser.error("--warmup-ratio must be in [0, 1)")


def is_bundled_encoder(model: ResolvedModel) -> bool:
    """Whether `model` is the bundled MiniLM: the offline fallback, its directory named with
    --model-name, or the same weights by their hub name."""
    if model.fallback or model.path == common.BUNDLED_ENCODER_HUB_NAME:
        return True
    bundled = common.bundled_encoder_dir()
    local = Path(model.path).expanduser()
    return bundled is not None and local.is_dir() and bundled.is_dir() and local.samefile(bundled)


def settle_learning_rate(args: argparse.Namespace, model: ResolvedModel) -> None:
    """Fill in --learning-rate when the user left it out. The bundled MiniLM gets its own rate
    however it was named, and the script says so. A rate the user chose for a model that the
    bundled one replaces (the hub unreachable) is scaled by the ratio of the two defaults: a rate
    tuned for DistilBERT leaves the smaller MiniLM far from converged in the same epochs (the
    quick start's figures are in BENCHMARKS.md)."""
    if args.learning_rate is not None:
        scale = args.fallback_learning_rate / args.default_learning_rate
        if model.fallback and scale != 1:
            chosen, args.learning_rate = args.learning_rate, args.learning_rate * scale
            print(f"note: learning rate {args.learning_rate:g} instead of --learning-rate {chosen:g}, which was chosen for "
                  f"{args.model_name}: the bundled {common.BUNDLED_ENCODER_HUB_NAME} that replaces it needs a {scale:g}x "
                  "higher rate (name the bundled model with --model-name to keep your rate).")
        return
    if args.fallback_learning_rate != args.default_learning_rate and is_bundled_encoder(model):
        args.learning_rate = args.fallback_learning_rate
        print(f"note: learning rate {args.learning_rate:g} for {common.BUNDLED_ENCODER_HUB_NAME}, a small model that "
              "needs a higher rate (pass --learning-rate to choose another).")
    else:
        args.learning_rate = args.default_learning_rate


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int,
                         window_batches: int = 50) -> list[int]:
    """A random example order whose consecutive batches hold inputs of similar length.

    The data is shuffled, cut into windows of `window_batches` batches, each window is sorted by
    length and cut into batches, and the batches are shuffled. 50-batch windows (the size of the
    stock sampler's mega-batches) leave almost no padding: on 16,000 SST-2 phrases they pad to
    1.05x the real tokens, 4-batch windows to 1.54x, random batches to 3.0x. Unlike the stock
    sampler, the order depends only on the seed and the epoch, so a resumed run replays it.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * window_batches
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    # Keep a short final batch last so that only one batch per epoch is short.
    last = batches.pop() if batches and len(batches[-1]) < batch_size else None
    rng.shuffle(batches)
    if last:
        batches.append(last)
    return [index for batch in batches for index in batch]


def make_trainer_class(base, fresh_parameters: Sequence[str] = (), head_lr_multiplier: float = 1.0):
    """Subclass a Trainer class with the project's training choices.

    - training batches come from length_grouped_order(): similar lengths, little padding. The
      stock LengthGroupedSampler draws its order from the global random state, which a resumed run
      does not replay; this one depends only on the seed and the epoch, so a resumed run trains on
      exactly the batches the interrupted one would have (tests/test_resume.py);
    - fresh_parameters / head_lr_multiplier: parameters that the task head adds at load time (not
      in the pretrained checkpoint) learn `head_lr_multiplier` times faster than the pretrained
      body, so a randomly initialised head catches up with the body within a few steps instead of
      dragging the pretrained features around while it is still random.
    """
    import torch

    class LengthGroupedSampler(torch.utils.data.Sampler):
        def __init__(self, lengths: list[int], batch_size: int, seed: int):
            self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

        def __len__(self) -> int:
            return len(self.lengths)

        def set_epoch(self, epoch: int) -> None:  # called by the Trainer, also when it resumes
            self.epoch = epoch

        def __iter__(self):
            return iter(length_grouped_order(self.lengths, self.batch_size, self.seed + self.epoch))

    fresh = set(fresh_parameters)

    class ProjectTrainer(base):
        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            lengths = [len(example["input_ids"]) for example in dataset]
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return LengthGroupedSampler(lengths, batch, self.args.seed)

        def create_optimizer(self, model=None):
            if self.optimizer is not None or head_lr_multiplier == 1.0 or not fresh:
                return super().create_optimizer(model)
            model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(model))
            groups: dict[tuple[float, bool], list] = {}
            for name, parameter in model.named_parameters():
                if parameter.requires_grad:
                    plain = name.replace("modules_to_save.default.", "")  # PEFT's copy of a head
                    is_head = any(plain == f or plain.endswith("." + f) for f in fresh)
                    scale = head_lr_multiplier if is_head else 1.0
                    groups.setdefault((scale, name in decay), []).append(parameter)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            self.optimizer = optimizer_cls(
                [{"params": params, "weight_decay": self.args.weight_decay if decays else 0.0,
                  "lr": self.args.learning_rate * scale}
                 for (scale, decays), params in groups.items()], **optimizer_kwargs)
            return self.optimizer

    return ProjectTrainer


def load_with_fresh_head(auto_class, model: ResolvedModel, label_names: list[str], task: str):
    """Load a pretrained encoder with a task head for `label_names`; return it and the names of
    the parameters the head added (missing from the checkpoint, or resized). The library's load
    report, which lists those as missing, is replaced by one line that says what they are."""
    import logging

    def drop_load_report(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)

    handlers = logging.getLogger("transformers").handlers
    for handler in handlers:
        handler.addFilter(drop_load_report)
    try:
        loaded, info = auto_class.from_pretrained(
            model.path, num_labels=len(label_names),
            id2label=dict(enumerate(label_names)), label2id={name: i for i, name in enumerate(label_names)},
            ignore_mismatched_sizes=True,  # a model fine-tuned before may have another label set
            output_loading_info=True, **common.pretrained_kwargs())
    except (OSError, ValueError) as error:
        raise UserError(f"could not load '{model.name}' for {task}: {common.first_line(error)}") from None
    finally:
        for handler in handlers:
            handler.removeFilter(drop_load_report)
    fresh = list(info["missing_keys"]) + [key for key, *_ in info["mismatched_keys"]]
    unused = sorted({key.rsplit(".", 2)[0] for key in info["unexpected_keys"]})
    print(f"head: {', '.join(fresh) or 'none'} initialised at random for {len(label_names)} labels"
          + (f"; pretrained weights left unused: {', '.join(unused)}" if unused else ""))
    return loaded, fresh


def save_trained(trainer, tokenizer, output_dir: Path, keep_checkpoints: bool) -> None:
    """Save the best model (or adapter) and the tokenizer atomically; drop the checkpoints.
    Every process of a distributed run calls this; the main one writes."""
    import shutil

    if not common.is_main_process():
        # FSDP and DeepSpeed gather the full weights with collective calls that every process must
        # join; under DDP (and on this process) save_model writes nothing.
        trainer.save_model(str(output_dir / common.STAGING_SUBDIR))
    common.save_atomically(output_dir, lambda staging: (trainer.save_model(str(staging)),
                                                 tokenizer.save_pretrained(str(staging))))
    if not keep_checkpoints and common.is_main_process():
        shutil.rmtree(output_dir / common.CHECKPOINT_SUBDIR, ignore_errors=True)


def cross_entropy_loss(model, class_weights=None):
    """The training loss, for the Trainer's compute_loss_func: cross-entropy summed over the labelled
    examples (tokens, for NER) and divided by their count in the whole optimizer step, which the
    Trainer passes as num_items_in_batch. With --gradient-accumulation-steps this gives the gradient
    of one large batch; the models' own loss, a mean per micro-batch, weighs the tokens of short and
    long NER batches unequally. `class_weights` (one per label) weigh each example's loss while
    `model` trains; validation losses stay unweighted, comparable between runs."""
    import torch

    def compute_loss(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits.float()
        weight = class_weights.to(logits.device) if class_weights is not None and model.training else None
        total = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                  weight=weight, ignore_index=-100, reduction="sum")
        return total / (num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum())

    return compute_loss


def build_classifier_trainer(args: argparse.Namespace, trainer_base, model, fresh_parameters: Sequence[str],
                             tokenizer, train_dataset, eval_dataset, data_collator, compute_metrics, precision: str,
                             output_dir: Path, class_weights=None):
    """A Trainer for the encoder tasks (sequence and token classification), set up the same way:
    evaluation and a checkpoint every epoch (or every --save-steps steps), the best checkpoint kept
    (neither in a run that evaluates once: evaluates_once()), the JSONL log, graceful Ctrl-C,
    optional early stopping, length-grouped batches and the head learning-rate multiplier, on
    `trainer_base` (the Trainer, or speedups.trainer_class() of it). Returns the trainer and the interrupt callback (whose `interrupted` tells how training ended)."""
    from transformers import EarlyStoppingCallback, TrainingArguments

    steps_per_epoch = max(1, -(-len(train_dataset) // (args.batch_size * args.gradient_accumulation_steps)))
    # load_best_model_at_end needs the evaluations to land on the checkpoints: with --save-steps,
    # evaluate on the same steps (the Trainer also evaluates and saves after the last step).
    once = evaluates_once(args)
    if args.save_steps:
        schedule = {"eval_strategy": "steps", "eval_steps": args.save_steps,
                    "save_strategy": "steps", "save_steps": args.save_steps, "load_best_model_at_end": True}
    elif once:
        # Nothing to choose between: no checkpoint of a model about to be saved, and the run
        # evaluates it after saving it, as the example scripts do.
        schedule = {"eval_strategy": "no", "save_strategy": "no", "load_best_model_at_end": False}
    else:
        schedule = {"eval_strategy": "epoch", "save_strategy": "epoch", "load_best_model_at_end": True}
    training_args = TrainingArguments(
        output_dir=str(output_dir / common.CHECKPOINT_SUBDIR),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_ratio,
        **schedule,
        save_total_limit=args.save_total_limit,
        metric_for_best_model=args.metric_for_best_model,
        greater_is_better=args.metric_for_best_model != "loss",
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        activation_checkpointing=args.gradient_checkpointing,  # transformers' name for gradient checkpointing
        logging_steps=max(1, min(50, steps_per_epoch // 5)),
        report_to="none",  # --report-to tensorboard: the callback of make_callbacks()
        seed=args.seed,
        dataloader_num_workers=0,
        **common.precision_training_kwargs(precision),
    )
    callbacks, interrupt_callback = common.make_callbacks(output_dir, args.report_to)
    if args.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=args.early_stopping_patience))
    trainer_class = make_trainer_class(trainer_base, fresh_parameters, getattr(args, "head_lr_multiplier", 1.0))
    trainer = trainer_class(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                            data_collator=data_collator, processing_class=tokenizer, compute_metrics=compute_metrics,
                            compute_loss_func=cross_entropy_loss(model, class_weights), callbacks=callbacks)
    # The loss is cross_entropy_loss(); the models need not see the Trainer's token count.
    trainer.model_accepts_loss_kwargs = False
    print(common.describe_batch(args))
    print(common.describe_checkpoints(output_dir, args.save_steps, args.save_total_limit, once))
    return trainer, interrupt_callback


def evaluates_once(args: argparse.Namespace) -> bool:
    """Whether an encoder run evaluates only after its last step: one epoch or less, no --save-steps,
    no early stopping."""
    return args.epochs <= 1 and not args.save_steps and not args.early_stopping_patience


def evaluation_seconds_during_training(records: Sequence[dict[str, Any]]) -> float:
    """The time that the evaluations logged during training took (those logged after the training
    summary, such as a one-epoch run's evaluation after saving, are not part of its runtime)."""
    seconds = 0.0
    for record in records:
        if "train_runtime" in record:
            break
        seconds += float(record.get("eval_runtime", 0))
    return seconds


def print_run_summary(metrics: dict[str, Any], rate_key: str, rate_unit: str) -> None:
    """The header every encoder script prints after training: model, precision, parameters, time."""
    train = metrics["train"]
    print()
    print(f"model      {metrics['model']}")
    print(f"precision  {metrics['precision']}")
    print(common.describe_parameters(metrics["params"]))
    evaluation = f" (of which evaluation {train['eval_time_s']:.1f} s)" if train["eval_time_s"] else ""
    print(f"training   {train['runtime_s']:.1f} s{evaluation}, "
          f"{train[rate_key]:.1f} {rate_unit}/s, peak memory {train['peak_rss_mb']:.0f} MB")


def fresh_modules(model, fresh_parameters: Sequence[str]) -> list[str]:
    """The outermost modules made only of parameters that the task head added at load time
    (DistilBERT's pre_classifier and classifier, RoBERTa's classifier, ...): LoRA must train and
    save them in full (modules_to_save), or a reloaded adapter would get a random head."""
    fresh = set(fresh_parameters)
    names = [name for name, _ in model.named_parameters()]
    modules = set()
    for parameter in fresh:
        parts = parameter.split(".")[:-1]
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth]) + "."
            if all(name in fresh for name in names if name.startswith(prefix)):
                modules.add(prefix[:-1])
                break
    return sorted(modules)


def prepare_for_method(model, fresh_parameters: Sequence[str], args: argparse.Namespace, method: str,
                       task_type: str) -> tuple[Any, dict[str, Any] | None]:
    """For method "lora", wrap the model in LoRA with the task head trained in full; full
    fine-tuning keeps it as it is. Returns the model and the LoRA record for metrics.json (None for
    full fine-tuning)."""
    if method != "lora":
        return model, None
    keep_dropout = args.keep_base_dropout
    if not keep_dropout:
        switch_off_dropout(model)
    head_modules = lora_head_modules(model, fresh_parameters)
    top_layers = args.lora_layers or default_lora_layers(model, task_type)
    model, targets = common.apply_lora(model, args, task_type, head_modules, top_layers)
    return model, {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                   "target_modules": targets, "layers": top_layers, "modules_to_save": head_modules,
                   "base_dropout": "kept" if keep_dropout else "off"}


def default_lora_layers(model, task_type: str) -> int | None:
    """How many of the top layers LoRA adapts by default: the top two thirds for sequence
    classification, whose label is read at the top of the network (on SST-2 0.6 points under full
    fine-tuning in about half its time: the layers below need no backward pass); every layer (None)
    for token classification, which needs the lower layers too (on WikiANN-en the top two thirds
    fall 1.7 points under full fine-tuning). BENCHMARKS.md has both."""
    if task_type != "SEQ_CLS":
        return None
    return math.ceil(2 * model.config.num_hidden_layers / 3)


def switch_off_dropout(model) -> None:
    """Set every dropout module of `model` to p = 0 (the attention reads its module's p, too). LoRA
    trains without the base model's dropout: on SST-2 and WikiANN-en it scored as with it, and on a
    CPU the masks took about a seventh of a step (BENCHMARKS.md). The config on disk is unchanged."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def lora_head_modules(model, fresh_parameters: Sequence[str]) -> list[str]:
    """The modules LoRA trains and saves in full beside the adapters: those the task head added at
    load time, plus a pretrained pooler that the head reads (BERT's [CLS] pooler was trained for
    next-sentence prediction, or not at all; frozen, it limits what the classifier can learn)."""
    modules = fresh_modules(model, fresh_parameters)
    for name, module in model.named_modules():
        covered = any(name == m or name.startswith(m + ".") for m in modules)
        if name.rsplit(".", 1)[-1] == "pooler" and not covered and next(module.parameters(), None) is not None:
            modules.append(name.rsplit(".", 1)[-1])
    return sorted(modules)


def weights_record(class_weights, label_names: list[str]) -> dict[str, float] | None:
    """Class weights by label name (None: unweighted)."""
    return None if class_weights is None else {name: round(float(w), 4) for name, w in zip(label_names, class_weights)}


@dataclass
class EncoderData:
    """A task's checked data: its splits (the task's own objects), label names and source."""

    splits: Any
    label_names: list[str]
    source: str
    record: dict[str, Any]  # more entries for run_config.json and metrics.json (NER: the tag scheme)


@dataclass
class EncoderTask:
    """What differs between text classification and NER; run_encoder_task() does the rest."""

    name: str  # run_config.json "task" (and an adapter's): "classification" or "ner"
    metrics_task: str  # metrics.json "task"
    kind: str  # for speedups.for_model(): "sequence-classification" or "token-classification"
    peft_task_type: str  # "SEQ_CLS" or "TOKEN_CLS"
    auto_class: str  # the transformers class that loads the model with its head
    logged_metrics: tuple[str, ...]  # validation metrics in the training log; the first is plotted
    rate: tuple[str, str]  # the throughput the summary prints: metrics key, unit
    load_data: Callable[[argparse.Namespace], EncoderData]
    class_weights: Callable[[argparse.Namespace, Any, list[str]], Any]  # (args, train split, labels) -> tensor or None
    load_tokenizer: Callable[[ResolvedModel], Any]
    encode: Callable[[Any, EncoderData, argparse.Namespace], dict[str, Any]]  # split -> object with .features
    collator: Callable[[Any], Any]
    compute_metrics: Callable[[Any, list[str]], Callable]  # (validation split, labels) -> the Trainer's
    evaluate: Callable[[Any, Any, list[str]], dict[str, Any]]  # (trainer, split, labels) -> metrics
    counts: Callable[[Any, float, float], dict[str, Any]]  # (train split, epochs, seconds) -> examples, rates
    plot_results: Callable[[dict[str, Any], Path], None]  # (metrics, output dir): the task's chart
    report: Callable[[dict[str, Any], Path], None]


def run_encoder_task(args: argparse.Namespace, method: str, task: EncoderTask) -> dict[str, Any] | None:
    """Fine-tune an encoder for `task`, fully or with LoRA (`method` "full" or "lora"): load the
    data, tokenize it once, build the model, train, save the best model, evaluate it on validation
    and test, write metrics.json and report. Returns the metrics, or None when training was
    interrupted (a checkpoint was saved)."""
    import speedups
    import transformers

    started = time.perf_counter()
    output_dir = common.prepare_output_dir(args.output_dir, args.overwrite_output_dir, bool(args.resume_from_checkpoint))
    resume = common.resolve_resume_checkpoint(args.resume_from_checkpoint, output_dir)

    # 1. Load and check the data (before the heavy imports: bad input fails fast).
    data = task.load_data(args)

    # 2. Resolve the model and tokenize every split once.
    common.quiet_libraries()
    precision = common.choose_precision(args.precision)
    applied = speedups.for_process(not args.no_speedups)  # the engine room's speed tricks (--no-speedups: none)
    resolved = common.resolve_model(args.model_name, allow_fallback=not args.no_fallback)
    settle_learning_rate(args, resolved)
    print(f"model: {resolved.name}  method: {method}  precision: {precision}  learning rate: {args.learning_rate:g}")
    tokenizer = task.load_tokenizer(resolved)
    splits = task.encode(tokenizer, data, args)

    # 3. Build the model (with LoRA adapters when asked).
    transformers.set_seed(args.seed)
    model, fresh = load_with_fresh_head(getattr(transformers, task.auto_class), resolved, data.label_names, task.name)
    model, lora = prepare_for_method(model, fresh, args, method, task.peft_task_type)
    collator = task.collator(tokenizer)
    class_weights = task.class_weights(args, splits["train"], data.label_names)
    weights = weights_record(class_weights, data.label_names)  # by label name, for run_config.json and metrics.json
    if args.gradient_checkpointing:  # before the speed tricks check themselves, so that the check covers it
        model.activation_checkpointing_enable()
    # Speed tricks for this model, each checked on a few training examples against the stock computation.
    applied += speedups.for_model(model, collator(splits["train"].features[:4]), precision, task.kind,
                                  not args.no_speedups)
    params = common.count_parameters(model)
    print(common.describe_parameters(params))
    common.save_run_config(output_dir, args, {"model": resolved.name, "model_path": resolved.path, "method": method,
                                       "task": task.name, "precision": precision, "labels": data.label_names,
                                       "data": data.source, "lora_targets": lora and lora["target_modules"],
                                       "lora_layers": lora and lora["layers"],
                                       "class_weights": weights,
                                       "speedups": applied, **data.record})

    # 4. Train, then save the best model (or adapter) before anything else can fail.
    trainer, interrupt = build_classifier_trainer(
        args, speedups.trainer_class(transformers.Trainer, applied, precision), model, fresh, tokenizer,
        splits["train"].features, splits["validation"].features, collator,
        task.compute_metrics(splits["validation"], data.label_names), precision, output_dir, class_weights)
    trained = common.train(trainer, interrupt, resume, output_dir, speedups.for_training(model, applied))
    if trained is None:
        return None
    result, runtime = trained
    save_trained(trainer, tokenizer, output_dir, common.keeps_checkpoints(args))

    # 5. Evaluate it on validation and test; metrics, log, plot, report.
    validation = task.evaluate(trainer, splits["validation"], data.label_names)
    if evaluates_once(args):  # the run's only evaluation: into the training log, as an epoch's would be
        trainer.log({"eval_loss": validation["loss"], **{f"eval_{k}": validation[k] for k in task.logged_metrics}})
    test = task.evaluate(trainer, splits["test"], data.label_names) if "test" in splits else None
    records = common.read_jsonl(output_dir / common.TRAINING_LOG_FILE)
    train_seconds = max(runtime - evaluation_seconds_during_training(records), 1e-6)  # the steps alone
    tokens = sum(len(feature["input_ids"]) for feature in splits["train"].features) * args.epochs  # no padding
    train_stats = {"runtime_s": round(runtime, 2), "eval_time_s": round(runtime - train_seconds, 2),
                   **task.counts(splits["train"], args.epochs, train_seconds),
                   "tokens": round(tokens), "tokens_per_s": round(tokens / train_seconds, 1),
                   "steps": result.global_step, "epochs": args.epochs, "final_loss": round(result.training_loss, 4),
                   **common.batch_scaling(args), "class_weights": weights,
                   "speedups": applied, "peak_rss_mb": common.peak_rss_mb(),
                   "wall_time_s": round(time.perf_counter() - started, 2)}
    extra = {"labels": data.label_names, **data.record, "saved_size_mb": common.directory_size_mb(output_dir)}
    if lora:
        extra["lora"] = lora
    metrics = reports.build_metrics(task.metrics_task, method, resolved.name, precision, params, train_stats, validation,
                            test, extra)
    common.write_json(output_dir / common.METRICS_FILE, metrics)
    title = "full fine-tuning" if method == "full" else f"LoRA r={args.lora_r}"
    reports.plot_training_curves(records, task.logged_metrics[0], output_dir / common.PLOT_FILE, f"{Path(resolved.name).name}: {title}")
    task.plot_results(metrics, output_dir)
    reports.write_model_card(output_dir, metrics, common.read_json(output_dir / common.RUN_CONFIG_FILE))
    task.report(metrics, output_dir)
    return metrics
