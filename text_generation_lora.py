#!/usr/bin/env python
"""Causal language-model fine-tuning with LoRA (GPT-2 by default): perplexity before and after,
and samples from the base and the fine-tuned model side by side.

    python text_generation_lora.py                                   # embedded recipe corpus
    python text_generation_lora.py --model-name gpt2 --train-file corpus.txt --epochs 3 --output-dir ./gen
    python text_generation_lora.py --output-dir ./gen --prompt "Once upon a time" --max-new-tokens 80

Steps: read the text -> tokenize, join documents with EOS and cut into blocks -> load the model
and add LoRA adapters (or --full) -> perplexity and samples before -> train -> perplexity and
samples after -> save the adapter (and optionally a merged model), metrics and logs -> report.
Offline, the bundled SmolLM2-135M replaces an unreachable hub model.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any

import common
import reports
import speedups
from common import UserError

DEFAULT_MODEL = "gpt2"
DEFAULT_CORPUS = common.DATA_DIR / "text" / "recipes.txt"
DEFAULT_PROMPTS = common.DATA_DIR / "text" / "prompts.txt"
TEXT_EXTENSIONS = (".txt", ".text", ".md")
CORPUS_EXTENSIONS = TEXT_EXTENSIONS + common.TABLE_EXTENSIONS
TEXT_COLUMNS = ("text", "content", "document", "body", "story", "passage")
SAMPLES_FILE = "samples.md"
MERGED_SUBDIR = "merged"


def build_parser(description: str = __doc__, output_dir: str = "./gen") -> argparse.ArgumentParser:
    """The text-generation flags; lora_finetuning.py --task generation builds on the same parser."""
    parser = common.ArgumentParser(description=description, formatter_class=common.HelpFormatter)
    common.add_model_args(parser, DEFAULT_MODEL)
    data = parser.add_argument_group("data")
    data.add_argument("--train-file", nargs="+", metavar="PATH",
                      help="Training text: .txt files or folders of them (one document per file), or "
                           ".csv/.tsv/.json/.jsonl with a text column (one document per row). "
                           "Default: the embedded recipe corpus under data/text/.")
    data.add_argument("--validation-file", nargs="+", metavar="PATH", help="Validation text, same formats.")
    common.add_dataset_arg(data)
    data.add_argument("--text-column", help="Column holding the text in table files (auto-detected).")
    data.add_argument("--validation-split", type=common.fraction, default=0.1,
                      help="Share of the training tokens, taken from the end, used for validation when no "
                           "validation data is given (a split by position, so validation text is unseen).")
    data.add_argument("--block-size", type=common.positive_int,
                      help="Tokens per training block (default: 256 on CPU, 1024 on GPU, at most the "
                           "model's context).")
    data.add_argument("--max-eval-samples", type=common.positive_int, help="Evaluate on at most this many blocks.")
    data.add_argument("--unrelated-file", metavar="PATH",
                      help="Text unlike the training data (same formats): its perplexity before and after "
                           "training shows what fine-tuning costs the model elsewhere.")

    training = parser.add_argument_group("training")
    training.add_argument("--epochs", type=common.positive_float, default=3.0, help="Number of training epochs.")
    training.add_argument("--max-steps", type=common.positive_int, help="Stop after this many optimizer steps (overrides --epochs).")
    training.add_argument("--batch-size", type=common.positive_int, default=8, help="Training blocks per batch.")
    training.add_argument("--learning-rate", type=common.positive_float,
                          help="Peak learning rate (default: LoRA 1e-3 on attention projections alone, 3e-4 "
                               "when feed-forward projections are adapted too; 5e-5 with --full).")
    training.add_argument("--seed", type=int, default=42, help="Random seed (training order, sampling).")
    common.add_resume_arg(training)
    training.add_argument("--full", action="store_true", help="Full fine-tuning instead of LoRA (for comparison).")
    # No weight decay and no warm-up: both measured worse for LoRA on SmolLM2 (BENCHMARKS.md).
    parser.set_defaults(eval_batch_size=8, weight_decay=0.0, warmup_ratio=0.0, max_train_samples=None,
                        repetition_penalty=1.1)  # a mild penalty keeps short samples from looping
    common.add_lora_args(parser, variants=False)
    common.add_precision_args(parser)

    output = common.add_output_args(parser, output_dir)
    parser.set_defaults(save_total_limit=1)  # a checkpoint of a causal LM is large; resuming needs the latest only
    output.add_argument("--merge-adapter", action="store_true",
                        help=f"Also write the adapter merged into the base model to OUTPUT_DIR/{MERGED_SUBDIR} "
                             "(loads with AutoModelForCausalLM alone, no peft needed).")

    generation = parser.add_argument_group("generation (with --prompt and no training data: use the model in --output-dir)")
    generation.add_argument("--prompt", action="append", metavar="TEXT", help="A prompt (repeatable).")
    generation.add_argument("--prompt-file", help="A file with one prompt per line.")
    generation.add_argument("--max-new-tokens", type=common.positive_int, default=80, help="Tokens to generate per prompt.")
    sampling = generation.add_mutually_exclusive_group()
    sampling.add_argument("--greedy", dest="do_sample", action="store_false", default=True,
                          help="Greedy decoding (default: sampling with --temperature, --top-k and --top-p).")
    sampling.add_argument("--do-sample", dest="do_sample", action="store_true", help=argparse.SUPPRESS)  # the default
    generation.add_argument("--temperature", type=common.positive_float, default=0.8, help="Sampling temperature.")
    generation.add_argument("--top-k", type=int, default=50, help="Sample among the k most likely tokens (0: off).")
    generation.add_argument("--top-p", type=common.positive_float, default=0.95, help="Nucleus sampling threshold.")
    generation.add_argument("--num-return-sequences", type=common.positive_int, default=1, help="Samples per prompt.")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks argparse cannot make."""
    common.settle_dataset_args(parser, args)
    if not args.do_sample and args.num_return_sequences > 1:
        parser.error("--greedy gives one sequence per prompt; drop --num-return-sequences or --greedy")
    if args.top_p > 1:
        parser.error("--top-p must be at most 1")
    if args.dataset and args.train_file:
        parser.error("--dataset and --train-file are mutually exclusive")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


# --------------------------------------------------------------------------------------------
# Data: documents -> token stream -> blocks
# --------------------------------------------------------------------------------------------


def expand_paths(paths: list[str], flag: str) -> list[Path]:
    """Files as given, and the text files inside any folder given (sorted, not recursive into data)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_EXTENSIONS)
            if not found:
                raise UserError(f"{flag} {raw}: the folder holds no {'/'.join(TEXT_EXTENSIONS)} files.")
            files += found
        else:
            files.append(common.check_input_file(raw, flag, CORPUS_EXTENSIONS))
    return files


def read_documents(paths: list[str], flag: str, text_column: str | None) -> list[str]:
    documents = []
    for file in expand_paths(paths, flag):
        if file.suffix.lower() in TEXT_EXTENSIONS:
            documents.append(common.read_text_file(file, flag))
            continue
        rows = common.read_table(str(file), flag)
        column = common.detect_column(list(rows[0]), text_column, TEXT_COLUMNS, "text", "--text-column", str(file))
        documents += [str(row.get(column) or "") for row in rows]
    documents = [doc.strip() for doc in documents if doc and doc.strip()]
    if not documents:
        raise UserError(f"{flag}: the corpus is empty (no text found).")
    return documents


def load_documents(args: argparse.Namespace) -> tuple[list[str], list[str] | None, str]:
    """Training documents, validation documents (or None) and a description of the source."""
    if args.dataset:
        hub = common.load_hub_dataset(args.dataset, args.dataset_config)
        column = common.detect_column(hub["train"].column_names, args.text_column, TEXT_COLUMNS, "text",
                                      "--text-column", f"--dataset {args.dataset}")
        train = [t for t in hub["train"][column] if t and t.strip()]
        split = next((s for s in ("validation", "valid", "test") if s in hub), None)
        validation = [t for t in hub[split][column] if t and t.strip()] if split else None
        return train, validation, f"hub dataset {args.dataset}"
    if args.validation_file and not args.train_file:
        raise UserError("--validation-file needs --train-file as well.")
    train_paths = args.train_file or [str(DEFAULT_CORPUS)]
    train = read_documents(train_paths, "--train-file", args.text_column)
    validation = read_documents(args.validation_file, "--validation-file", args.text_column) if args.validation_file else None
    source = ", ".join(train_paths) if args.train_file else f"embedded recipe corpus ({DEFAULT_CORPUS})"
    return train, validation, source


def token_stream(tokenizer, documents: list[str]) -> list[int]:
    """All documents as one token sequence with EOS after each document."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for encoded in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        ids += encoded + [eos]
    return ids


def cut_blocks(ids: list[int], block_size: int, keep_partial: bool) -> list[list[int]]:
    """Consecutive blocks of block_size tokens; the last partial block is kept only if asked."""
    blocks = [ids[i:i + block_size] for i in range(0, len(ids), block_size)]
    if blocks and len(blocks[-1]) < block_size and (not keep_partial or len(blocks[-1]) < 2):
        blocks.pop()
    return blocks


def build_blocks(args, tokenizer, train_docs, validation_docs, block_size: int) -> dict[str, list[list[int]]]:
    train_ids = token_stream(tokenizer, train_docs)
    if validation_docs is None:
        cut = int(len(train_ids) * (1 - args.validation_split))
        train_ids, validation_ids = train_ids[:cut], train_ids[cut:]
        print(f"validation: the last {len(validation_ids):,} tokens ({args.validation_split:.0%}) of the training "
              "text, split by position.")
    else:
        validation_ids = token_stream(tokenizer, validation_docs)
    train_blocks = cut_blocks(train_ids, block_size, keep_partial=False)
    if not train_blocks:
        held_out = f" (after holding out --validation-split {args.validation_split})" if validation_docs is None else ""
        raise UserError(f"the training text has {len(train_ids)} tokens{held_out}, fewer than one block of "
                        f"{block_size}; add text or lower --block-size{' or --validation-split' if held_out else ''}.")
    validation_blocks = cut_blocks(validation_ids, block_size, keep_partial=True)
    if not validation_blocks:
        raise UserError("the validation text is too short to score (fewer than 2 tokens); add text or "
                        "raise --validation-split.")
    used = len(train_blocks) * block_size
    print(f"tokens: {len(train_ids):,} training tokens in {len(train_blocks)} blocks of {block_size} "
          f"(dropped the last {len(train_ids) - used} that do not fill a block); "
          f"{len(validation_ids):,} validation tokens in {len(validation_blocks)} blocks.")
    train_blocks = common.seeded_subset(train_blocks, args.max_train_samples, common.DATA_SEED)
    validation_blocks = validation_blocks[:args.max_eval_samples] if args.max_eval_samples else validation_blocks
    return {"train": train_blocks, "validation": validation_blocks}


def collate_blocks(blocks: list[Any], pad_id: int):
    """Right-pad blocks; padding is masked out of attention and labels (real EOS tokens keep theirs)."""
    import torch

    blocks = [b["input_ids"] if isinstance(b, dict) else b for b in blocks]
    width = max(len(b) for b in blocks)
    input_ids = torch.full((len(blocks), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(blocks), width), dtype=torch.long)
    for row, block in enumerate(blocks):
        input_ids[row, :len(block)] = torch.tensor(block)
        attention[row, :len(block)] = 1
    labels = input_ids.masked_fill(attention == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def load_causal_lm(resolved: common.ResolvedModel, dtype=None):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.path, gguf_file=resolved.gguf_file, dtype=dtype,
                                                     **common.pretrained_kwargs())
    except (OSError, ValueError) as error:
        raise UserError(f"could not load '{resolved.name}' as a causal language model: {common.first_line(error)}") from None
    if getattr(model, "hf_quantizer", None) is not None:
        # GGUF weights arrive de-quantized to float; drop the quantizer so Trainer and
        # save_pretrained treat the model as a plain one.
        model.hf_quantizer.remove_quantization_config(model)
    return model


def convert_gguf(resolved: common.ResolvedModel, directory: Path) -> None:
    """Write a GGUF model as an ordinary checkpoint (safetensors and tokenizer) to `directory`."""
    common.load_tokenizer(resolved).save_pretrained(directory)
    load_causal_lm(resolved).save_pretrained(directory)


def prepare_tokenizer(tokenizer):
    """Give tokenizers without a pad token (GPT-2) one, and pad on the left for batched generation."""
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no end-of-sequence token; documents cannot be separated.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # labels come from the attention mask, so EOS still counts
    tokenizer.padding_side = "left"
    return tokenizer


def context_length(model, tokenizer) -> int:
    candidates = [getattr(model.config, name, None) for name in ("n_positions", "max_position_embeddings", "n_ctx")]
    candidates = [c for c in candidates if isinstance(c, int) and c > 0]
    return min(candidates) if candidates else min(tokenizer.model_max_length, 2048)


# --------------------------------------------------------------------------------------------
# Perplexity and generation
# --------------------------------------------------------------------------------------------


def perplexity(model, blocks: list[list[int]], batch_size: int, pad_id: int, precision: str,
               chunked_loss: bool = False) -> dict[str, float]:
    """exp(total NLL / total predicted tokens) over all blocks: padding never counts, and the
    result does not depend on the batch size. With `chunked_loss` (the speedup) the full logits are
    never built, as in training."""
    import torch

    device = next(model.parameters()).device
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    total_nll, total_tokens = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(blocks), batch_size):
            batch = {k: v.to(device) for k, v in collate_blocks(blocks[start:start + batch_size], pad_id).items()}
            targets = batch["labels"][:, 1:]
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                if chunked_loss:
                    nll = speedups.chunked_next_token_nll(model, batch, autocast_dtype or torch.float32)
                else:
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(),
                                                            ignore_index=-100, reduction="sum")
            total_nll += float(nll)
            total_tokens += int((targets != -100).sum())
    model.train(was_training)
    loss = total_nll / total_tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": total_tokens}


def read_prompts(args: argparse.Namespace, default: bool) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompt_file:
        file = common.check_input_file(args.prompt_file, "--prompt-file", TEXT_EXTENSIONS)
        prompts += [line.strip() for line in common.read_text_file(file, "--prompt-file").splitlines() if line.strip()]
    if not prompts and default:
        prompts = [line.strip() for line in DEFAULT_PROMPTS.read_text().splitlines() if line.strip()][:3]
    return prompts


def generate(model, tokenizer, prompts: list[str], args: argparse.Namespace) -> list[list[str]]:
    """Continuations for each prompt (num_return_sequences each), batched with left padding."""
    import torch
    from transformers import set_seed

    limit = context_length(model, tokenizer)
    for prompt in prompts:
        length = len(tokenizer(prompt)["input_ids"])
        if length + args.max_new_tokens > limit:
            raise UserError(f"the prompt '{prompt[:40]}...' is {length} tokens; with --max-new-tokens "
                            f"{args.max_new_tokens} that exceeds the model's context of {limit} tokens.")
    set_seed(args.seed)
    device = next(model.parameters()).device
    inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                   num_return_sequences=args.num_return_sequences, repetition_penalty=args.repetition_penalty,
                   pad_token_id=tokenizer.pad_token_id)
    if args.do_sample:
        options.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        output = model.generate(**inputs, **options)
    model.train(was_training)
    texts = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    n = args.num_return_sequences
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


def generate_from_saved(args: argparse.Namespace) -> None:
    """--prompt without training data: load the model or adapter in --output-dir and generate."""
    model_dir = Path(args.output_dir)
    prompts = read_prompts(args, default=False)
    if not prompts:
        raise UserError("no prompt given: pass --prompt TEXT or --prompt-file FILE.")
    model, tokenizer = load_saved(model_dir, gguf_cache=not args.no_speedups)
    model.to(common.inference_device())
    for prompt, samples in zip(prompts, generate(model, tokenizer, prompts, args)):
        for sample in samples:
            print(f"{prompt}{sample}\n{'-' * 60}")


def load_saved(model_dir: Path, gguf_cache: bool = True):
    """Load a saved output directory: a LoRA adapter on its base model, or a full/merged model."""
    from transformers import AutoTokenizer

    if (model_dir / "adapter_config.json").is_file():
        from peft import PeftModel

        record = common.read_json(model_dir / common.RUN_CONFIG_FILE) or {}
        base = common.ResolvedModel(path=record.get("model_path") or common.read_json(model_dir / "adapter_config.json")["base_model_name_or_path"],
                                    name=record.get("model", "base model"), gguf_file=record.get("gguf_file"))
        if not Path(base.path).exists() and base.path.startswith(("/", ".")):
            raise UserError(f"the adapter's base model {base.path} is missing; reinstall it or retrain.")
        base = speedups.cached_checkpoint(base, convert_gguf, gguf_cache)
        model = PeftModel.from_pretrained(load_causal_lm(base), model_dir)
    elif (model_dir / "config.json").is_file():
        model = load_causal_lm(common.ResolvedModel(path=str(model_dir), name=str(model_dir)))
    else:
        raise UserError(f"--output-dir {model_dir} holds no trained model or adapter; train one first "
                        "(pass --train-file or no data flag) or point --output-dir at it.")
    return model, prepare_tokenizer(AutoTokenizer.from_pretrained(model_dir, **common.pretrained_kwargs()))


def write_samples(path: Path, prompts: list[str], before: list[list[str]], after: list[list[str]], method: str) -> None:
    lines = ["# Samples: base model vs fine-tuned", ""]
    for prompt, base, tuned in zip(prompts, before, after):
        lines += [f"## Prompt: `{prompt}`", "", "### Base model", ""]
        lines += [f"```text\n{prompt}{text}\n```\n" for text in base]
        lines += [f"### Fine-tuned ({method})", ""]
        lines += [f"```text\n{prompt}{text}\n```\n" for text in tuned]
    path.write_text("\n".join(lines))


# Projections of the feed-forward block, by architecture: adapting them too means adapting about
# three times as many weights, which call for a lower learning rate.
FEED_FORWARD_PROJECTIONS = {"gate_proj", "up_proj", "down_proj", "c_fc", "fc1", "fc2", "fc_in", "fc_out",
                            "dense_h_to_4h", "dense_4h_to_h", "w1", "w2", "w3"}


def default_learning_rate(lora_targets: list[str] | str | None) -> float:
    """5e-5 for full fine-tuning; for LoRA 1e-3 on attention projections alone, 3e-4 when the
    feed-forward projections are adapted as well (measured on SmolLM2: README, "Expected results")."""
    if lora_targets is None:
        return 5e-5
    if lora_targets == "all-linear" or FEED_FORWARD_PROJECTIONS & set(lora_targets):
        return 3e-4
    return 1e-3


def build_trainer(args, trainer_base, model, tokenizer, blocks, precision: str, output_dir: Path):
    """The Trainer on `trainer_base` (the Trainer, or speedups.trainer_class() of it), with the JSONL
    log and graceful Ctrl-C; returns it and the interrupt callback."""
    from transformers import TrainingArguments

    # Checkpoints every epoch, or every --save-steps steps; with --max-steps alone, half-way and at the end.
    save_steps = args.save_steps or (max(1, args.max_steps // 2) if args.max_steps else None)
    training_args = TrainingArguments(
        output_dir=str(output_dir / common.CHECKPOINT_SUBDIR),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps or -1,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_ratio,
        eval_strategy="no",
        save_strategy="steps" if save_steps else "epoch",
        save_steps=save_steps or 500,  # 500: the Trainer's default, unused with per-epoch saving
        save_total_limit=args.save_total_limit,
        logging_steps=max(1, min(25, len(blocks["train"]) // max(1, args.batch_size) // 5)),
        report_to="none",
        seed=args.seed,
        **common.precision_training_kwargs(precision),
    )
    log_callback, interrupt_callback = common.make_callbacks(output_dir)
    trainer = trainer_base(model=model, args=training_args, train_dataset=[{"input_ids": b} for b in blocks["train"]],
                           data_collator=lambda batch: collate_blocks(batch, tokenizer.pad_token_id),
                           callbacks=[log_callback, interrupt_callback])
    print(common.describe_checkpoints(output_dir, args.save_steps, args.save_total_limit))
    return trainer, interrupt_callback


def report(metrics: dict[str, Any], output_dir: Path) -> None:
    print()
    print(f"model       {metrics['model']} ({metrics['method']}, {metrics['precision']})")
    print(f"            {common.describe_parameters(metrics['params'])}")
    train = metrics["train"]
    print(f"training    {train['runtime_s']:.1f} s, {train['steps']} steps, {train['tokens_per_s']:.0f} tokens/s, "
          f"peak memory {train['peak_rss_mb']:.0f} MB")
    change = 100 * (metrics["perplexity"] / metrics["perplexity_before"] - 1)
    print(f"perplexity  {metrics['perplexity_before']:.2f} before -> {metrics['perplexity']:.2f} after "
          f"({change:+.1f}%) on {metrics['validation']['tokens']:,} validation tokens")
    if "unrelated" in metrics:
        unrelated = metrics["unrelated"]
        print(f"            {unrelated['perplexity_before']:.2f} before -> {unrelated['perplexity']:.2f} after on "
              f"unrelated text ({unrelated['file']})")
    print(f"\nsaved to {output_dir} (samples in {SAMPLES_FILE})")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    output_dir = common.prepare_output_dir(args.output_dir, args.overwrite_output_dir, bool(args.resume_from_checkpoint))
    resume = common.resolve_resume_checkpoint(args.resume_from_checkpoint, output_dir)
    common.quiet_libraries()
    precision = common.choose_precision(args.precision)
    applied = speedups.for_process(not args.no_speedups)  # the engine room's speed tricks (--no-speedups: none)
    method = "full" if args.full else "lora"

    # 1. Read the text.
    train_docs, validation_docs, source = load_documents(args)
    unrelated_docs = read_documents([args.unrelated_file], "--unrelated-file", None) if args.unrelated_file else None
    print(f"data: {source}: {len(train_docs)} training document(s)"
          + (f", {len(validation_docs)} validation document(s)" if validation_docs else ""))

    # 2. Model and tokenizer; blocks.
    resolved = common.resolve_model(args.model_name, allow_fallback=not args.no_fallback, kind="causal-lm")
    model, tokenizer = load_model_and_tokenizer(args, resolved, seed=args.seed)
    block_size = choose_block_size(args, model, tokenizer)
    print(f"model: {resolved.name}  method: {method}  precision: {precision}")
    blocks = build_blocks(args, tokenizer, train_docs, validation_docs, block_size)
    if unrelated_docs:
        blocks["unrelated"] = cut_blocks(token_stream(tokenizer, unrelated_docs), block_size, keep_partial=True)
        blocks["unrelated"] = blocks["unrelated"][:args.max_eval_samples or len(blocks["validation"])]
        if not blocks["unrelated"]:
            raise UserError(f"--unrelated-file {args.unrelated_file}: too short to score (fewer than 2 tokens).")
    common.check_one_batch(len(blocks["train"]), args.batch_size, f"blocks of {block_size} tokens",
                           "add text, lower --block-size")

    # 3. LoRA adapters (or full fine-tuning), and the speed tricks for this model, each checked on
    # two training blocks against the stock computation.
    model, targets = add_adapters(args, model)
    params = common.count_parameters(model)
    print(common.describe_parameters(params))
    probe = collate_blocks([block[:64] for block in blocks["train"][:2]], tokenizer.pad_token_id)
    applied += speedups.for_model(model, probe, precision, "causal-lm", not args.no_speedups)
    chunked = "chunked_loss" in applied

    # 4. Perplexity and samples before training. LoRA leaves the base weights as they are, so it
    # measures them after training with the adapters switched off, once the adapter is saved; full
    # fine-tuning changes them and measures now.
    prompts = read_prompts(args, default=not (args.train_file or args.dataset)) or sample_prompts(tokenizer, validation_docs or train_docs)

    def measure(when: str) -> tuple[dict[str, float], list[list[str]]]:
        result = perplexity(model, blocks["validation"], args.eval_batch_size, tokenizer.pad_token_id, precision, chunked)
        line = f"perplexity {when} training: {result['perplexity']:.2f}"
        if "unrelated" in blocks:
            result["unrelated"] = perplexity(model, blocks["unrelated"], args.eval_batch_size, tokenizer.pad_token_id,
                                             precision, chunked)
            line += f" (unrelated text: {result['unrelated']['perplexity']:.2f})"
        print(line)
        return result, generate(model, tokenizer, prompts, args)

    if args.full:
        before, samples_before = measure("before")

    # 5. Train; save the adapter (or model) as soon as it is trained, before anything else can fail.
    common.save_run_config(output_dir, args, {"model": resolved.name, "model_path": resolved.path,
                                              "gguf_file": resolved.gguf_file, "precision": precision,
                                              "method": method, "block_size": block_size, "data": source,
                                              "lora_targets": targets, "speedups": applied})
    from transformers import Trainer

    trainer, interrupt = build_trainer(args, speedups.trainer_class(Trainer, applied, precision), model, tokenizer,
                                       blocks, precision, output_dir)
    trained = common.train(trainer, interrupt, resume, output_dir, speedups.for_training(model, applied))
    if trained is None:
        return 130
    result, runtime = trained
    speedups.restore_attention(model)
    common.save_atomically(output_dir, lambda staging: (model.save_pretrained(staging), tokenizer.save_pretrained(staging)))

    # 6. Perplexity and samples (before, for LoRA; after), the merged model, metrics, report.
    if not args.full:
        with model.disable_adapter():
            before, samples_before = measure("before")
    after, samples_after = measure("after")
    common.save_atomically(output_dir, lambda staging: write_samples(staging / SAMPLES_FILE, prompts, samples_before,
                                                                     samples_after, method))
    if args.merge_adapter and not args.full:
        save_merged(model, tokenizer, output_dir)
    if not common.keeps_checkpoints(args) and common.is_main_process():
        import shutil

        shutil.rmtree(output_dir / common.CHECKPOINT_SUBDIR, ignore_errors=True)
    trained_tokens = result.global_step * args.batch_size * trainer.args.world_size * block_size  # every process trains a batch per step
    train_stats = {"runtime_s": round(runtime, 2), "steps": result.global_step,
                   "samples_per_s": round(trained_tokens / block_size / runtime, 2),
                   "tokens_per_s": round(trained_tokens / runtime, 1), "blocks": len(blocks["train"]),
                   "block_size": block_size, "final_loss": round(result.training_loss, 4),
                   "chunked_loss": chunked, "fast_attention": "cpu_attention" in applied, "speedups": applied,
                   "peak_rss_mb": common.peak_rss_mb(), "wall_time_s": round(time.perf_counter() - started, 2)}
    saved_size_mb = common.directory_size_mb(output_dir)
    metrics = common.build_metrics(
        "text-generation", method, resolved.name, precision, params, train_stats,
        {"loss": after["loss"], "perplexity": after["perplexity"], "tokens": after["tokens"]}, None,
        {"perplexity_before": before["perplexity"], "perplexity": after["perplexity"],
         "eval_loss_before": before["loss"], "eval_loss": after["loss"],
         "adapter_size_mb": saved_size_mb if not args.full else None, "saved_size_mb": saved_size_mb,
         "samples": [{"prompt": prompt, "before": base, "after": tuned}
                     for prompt, base, tuned in zip(prompts, samples_before, samples_after)]})
    if "unrelated" in blocks:
        metrics["unrelated"] = {"file": args.unrelated_file, "perplexity_before": before["unrelated"]["perplexity"],
                                "perplexity": after["unrelated"]["perplexity"], "tokens": after["unrelated"]["tokens"]}
    common.write_json(output_dir / common.METRICS_FILE, metrics)
    reports.plot_training_curves(common.read_jsonl(output_dir / common.TRAINING_LOG_FILE), "loss",
                                 output_dir / common.PLOT_FILE, f"{Path(resolved.name).name}: {method}")
    reports.write_model_card(output_dir, metrics, common.read_json(output_dir / common.RUN_CONFIG_FILE))
    report(metrics, output_dir)
    return 0


def load_model_and_tokenizer(args: argparse.Namespace, resolved: common.ResolvedModel, seed: int):
    import transformers

    # A GGUF model (the bundled SmolLM2) converted once to an ordinary checkpoint: loads in ~1 s, not ~18 s.
    source = speedups.cached_checkpoint(resolved, convert_gguf, not args.no_speedups)
    tokenizer = prepare_tokenizer(common.load_tokenizer(source))
    transformers.set_seed(seed)
    model = load_causal_lm(source)
    model.name_or_path = model.config.name_or_path = resolved.path  # what adapters name as their base, not the cache
    return model, tokenizer


def choose_block_size(args: argparse.Namespace, model, tokenizer) -> int:
    import torch

    limit = context_length(model, tokenizer)
    block_size = args.block_size or min(limit, 1024 if torch.cuda.is_available() else 256)
    if block_size > limit:
        raise UserError(f"--block-size {block_size} exceeds the model's context of {limit} tokens.")
    return block_size


def add_adapters(args: argparse.Namespace, model):
    """LoRA adapters on `model` (unless --full) and the learning rate that goes with them; returns
    the model and the adapted modules (None for full fine-tuning)."""
    import torch

    targets = None
    if not args.full:
        model, targets = common.apply_lora(model, args, task_type="CAUSAL_LM")
        print(f"LoRA: r={args.lora_r}, alpha={args.lora_alpha:g}, targets: {targets if isinstance(targets, str) else ' '.join(targets)}")
    if args.learning_rate is None:
        args.learning_rate = default_learning_rate(targets)
    print(f"learning rate: {args.learning_rate:g}")
    if torch.cuda.is_available():
        # Under torchrun each process has its own GPU (LOCAL_RANK); the Trainer uses the same one.
        model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return model, targets


def save_merged(model, tokenizer, output_dir: Path) -> None:
    merged = model.merge_and_unload()
    common.save_atomically(output_dir, lambda staging: (
        (staging / MERGED_SUBDIR).mkdir(), merged.save_pretrained(staging / MERGED_SUBDIR),
        tokenizer.save_pretrained(staging / MERGED_SUBDIR)))


def main(args: argparse.Namespace | None = None) -> int:
    args = args or parse_args()
    common.set_trust_remote_code(args.trust_remote_code)
    if (args.prompt or args.prompt_file) and not (args.train_file or args.dataset):
        common.quiet_libraries()
        generate_from_saved(args)
        return 0
    return run(args)


def sample_prompts(tokenizer, documents: list[str], count: int = 3, words: int = 6) -> list[str]:
    """Prompts for samples.md when the user gave none: the opening words of a few documents."""
    starts = [" ".join(doc.split()[:words]) for doc in documents[:count]]
    return [s for s in starts if s] or ["The"]


if __name__ == "__main__":
    common.run_cli(main)
