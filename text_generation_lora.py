#!/usr/bin/env python
"""Causal language-model fine-tuning with LoRA (GPT-2 by default), on plain text or on
instruction data (prompt/response pairs): perplexity before and after, and the base and the
fine-tuned model's answers side by side.

    python text_generation_lora.py                                   # embedded recipe corpus
    python text_generation_lora.py --model-name gpt2 --train-file corpus.txt --epochs 3 --output-dir ./gen
    python text_generation_lora.py --train-file data/instructions/train.jsonl --output-dir ./chef
    python text_generation_lora.py --output-dir ./gen --prompt "Once upon a time" --max-new-tokens 80

Steps: read the data -> tokenize (plain text: join documents with EOS and cut into blocks;
instruction records: format each with the chat template, loss on the response only) -> load the
model and add LoRA adapters (or --full) -> perplexity and samples before -> train -> perplexity
and samples after (instruction data: answers to the validation prompts, scored by exact match and
ROUGE-L) -> save the adapter (and optionally a merged model), metrics and logs -> report.
Offline, the bundled SmolLM2-135M replaces an unreachable hub model.
"""

from __future__ import annotations

import argparse
import math
import os
import random
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
# The fields of instruction records, in the order they are looked for (read_records()).
RECORD_FIELDS = (("messages",), ("prompt", "response"), ("instruction", "output"))
RECORD_SHAPES = "'prompt' and 'response', 'instruction' (and 'input') and 'output', or a 'messages' list"
SCORED_PROMPTS = 50  # validation prompts answered and scored before and after training, unless --max-eval-samples
SAMPLES_FILE = "samples.md"
MERGED_SUBDIR = "merged"


def build_parser(description: str = __doc__, output_dir: str = "./gen") -> argparse.ArgumentParser:
    """The text-generation flags; lora_finetuning.py --task generation builds on the same parser."""
    parser = common.ArgumentParser(description=description, formatter_class=common.HelpFormatter)
    common.add_model_args(parser, DEFAULT_MODEL)
    data = parser.add_argument_group("data")
    data.add_argument("--train-file", nargs="+", metavar="PATH",
                      help="Training text: .txt files or folders of them (one document per file), or "
                           ".csv/.tsv/.json/.jsonl with a text column (one document per row), or instruction "
                           f"records with {RECORD_SHAPES}. Default: the embedded recipe corpus under data/text/.")
    data.add_argument("--validation-file", nargs="+", metavar="PATH", help="Validation text, same formats.")
    common.add_dataset_arg(data)
    data.add_argument("--text-column", help="Column holding the text in table files (auto-detected).")
    data.add_argument("--validation-split", type=common.fraction, default=0.1,
                      help=argparse.SUPPRESS)  # without --validation-file: 10% of the text (the end) or of the records
    data.add_argument("--block-size", type=common.positive_int,
                      help="Tokens per training block (default: 256 on CPU, 1024 on GPU, at most the "
                           "model's context).")
    data.add_argument("--max-eval-samples", type=common.positive_int,
                      help=f"Evaluate on at most this many blocks or records (and answer at most this many validation "
                           f"prompts of instruction data; default {SCORED_PROMPTS}).")
    data.add_argument("--train-on-prompts", action="store_true",
                      help="Instruction data: train on the prompt tokens as well (default: the loss covers the responses).")
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
    common.add_batch_scaling_args(training)
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
    generation.add_argument("--prompt", action="append", metavar="TEXT",
                            help="A prompt (repeatable; a prompt given twice is sampled twice); @FILE reads one per line. "
                                 "A model trained on instruction data gets its prompt template.")
    generation.add_argument("--prompt-file", dest="prompt", action="append", type="@{}".format,
                            help=argparse.SUPPRESS)  # the older spelling of --prompt @FILE
    generation.add_argument("--max-new-tokens", type=common.positive_int, default=80, help="Tokens to generate per prompt.")
    generation.add_argument("--temperature", type=common.non_negative_float, default=0.8,
                            help="Sampling temperature; 0: greedy decoding (the most likely token each time).")
    generation.add_argument("--greedy", dest="temperature", action="store_const", const=0.0,
                            help=argparse.SUPPRESS)  # the older spelling of --temperature 0
    generation.add_argument("--top-k", type=int, default=50, help="Sample among the k most likely tokens (0: off).")
    generation.add_argument("--top-p", type=common.positive_float, default=0.95, help="Nucleus sampling threshold.")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks argparse cannot make."""
    common.settle_dataset_args(parser, args)
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


def read_documents(paths: list[str], flag: str, text_column: str | None) -> list:
    """Plain documents (strings), or instruction records (see read_records) when the table files
    hold prompts and responses."""
    documents: list = []
    for file in expand_paths(paths, flag):
        if file.suffix.lower() in TEXT_EXTENSIONS:
            documents.append(common.read_text_file(file, flag).strip())
            continue
        rows = common.read_table(str(file), flag)
        records = None if text_column else read_records(rows, f"{flag} {file}")
        if records is not None:
            documents += records
            continue
        fields = list(rows[0])
        if not text_column and not {f.lower() for f in fields} & set(TEXT_COLUMNS):
            raise UserError(f"{flag} {file}: unknown record shape (fields: {', '.join(fields)}); expected a text column "
                            f"(name it with --text-column) or instruction records with {RECORD_SHAPES}.")
        column = common.detect_column(fields, text_column, TEXT_COLUMNS, "text", "--text-column", str(file))
        documents += [str(row.get(column) or "").strip() for row in rows]
    if len({isinstance(doc, str) for doc in documents}) > 1:
        raise UserError(f"{flag}: mixes plain text and instruction records; train on one kind at a time.")
    documents = [doc for doc in documents if doc]
    if not documents:
        raise UserError(f"{flag}: the corpus is empty (no text found).")
    return documents


def record_shape(fields) -> tuple[str, ...] | None:
    """The instruction-record fields among a table's `fields`, or None for plain documents."""
    return next((shape for shape in RECORD_FIELDS if set(fields) & set(shape)), None)


def read_records(rows: list[dict[str, Any]], source: str) -> list[tuple[list[dict[str, str]], str]] | None:
    """Instruction records as (the conversation up to the answer, the answer), or None when the rows
    have none of the record shapes (plain documents). A chat record's answer is its last message,
    which must be the assistant's; the turns before it are the context the answer follows."""
    shape = record_shape(rows[0])
    if shape is None:
        return None
    records = []
    for number, row in enumerate(rows, start=1):
        where = f"{source}: record {number}"
        if shape == ("messages",):
            messages = row.get("messages")
            if not (isinstance(messages, list) and len(messages) >= 2
                    and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                            for m in messages) and messages[-1]["role"] == "assistant"):
                raise UserError(f"{where}: 'messages' must be a list of {{\"role\", \"content\"}} objects that ends "
                                "with the assistant's answer.")
            context, answer = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]], messages[-1]["content"]
        else:
            missing = [field for field in shape if row.get(field) is None]
            if missing:
                raise UserError(f"{where} has no '{missing[0]}' field; every record needs "
                                f"'{shape[0]}' and '{shape[1]}' (shapes read: {RECORD_SHAPES}).")
            prompt = str(row[shape[0]]).strip()
            if shape[0] == "instruction" and str(row.get("input") or "").strip():
                prompt += "\n\n" + str(row["input"]).strip()
            if not prompt:
                raise UserError(f"{where}: the {shape[0]} is empty; fill it in or remove the record.")
            context, answer = [{"role": "user", "content": prompt}], str(row[shape[1]])
        if not answer.strip():
            raise UserError(f"{where}: the response is empty; fill it in or remove the record.")
        records.append((context, answer.strip()))
    return records


def load_documents(args: argparse.Namespace) -> tuple[list, list | None, str]:
    """Training data, validation data (or None) and a description of the source: plain documents,
    or instruction records."""
    if args.dataset:
        hub = common.load_hub_dataset(args.dataset, args.dataset_config)
        split = next((s for s in ("validation", "valid", "test") if s in hub), None)
        if not args.text_column and record_shape(hub["train"].column_names):
            train = read_records(hub["train"].to_list(), f"--dataset {args.dataset} train")
            validation = read_records(hub[split].to_list(), f"--dataset {args.dataset} {split}") if split else None
            return train, validation, f"hub dataset {args.dataset}"
        column = common.detect_column(hub["train"].column_names, args.text_column, TEXT_COLUMNS, "text",
                                      "--text-column", f"--dataset {args.dataset}")
        train = [t for t in hub["train"][column] if t and t.strip()]
        validation = [t for t in hub[split][column] if t and t.strip()] if split else None
        return train, validation, f"hub dataset {args.dataset}"
    if args.validation_file and not args.train_file:
        raise UserError("--validation-file needs --train-file as well.")
    train_paths = args.train_file or [str(DEFAULT_CORPUS)]
    train = read_documents(train_paths, "--train-file", args.text_column)
    validation = read_documents(args.validation_file, "--validation-file", args.text_column) if args.validation_file else None
    if validation is not None and isinstance(validation[0], str) != isinstance(train[0], str):
        raise UserError("--train-file and --validation-file hold different kinds of data (plain text and instruction "
                        "records); give both of one kind.")
    source = ", ".join(train_paths) if args.train_file else f"embedded recipe corpus ({DEFAULT_CORPUS})"
    return train, validation, source


def is_instruction_data(documents: list) -> bool:
    return not isinstance(documents[0], str)


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


# The prompt template of instruction data for tokenizers without a chat template of their own, as a
# chat template: saved with the tokenizer, it formats prompts the same way wherever the model goes.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}### Response:\n{{ message['content'] }}{{ eos_token }}\n\n"
    "{% else %}### {{ 'Instruction' if message['role'] == 'user' else message['role'] | capitalize }}:\n"
    "{{ message['content'] }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}")


def format_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The text an answer to `messages` follows, by the tokenizer's chat template."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_records(tokenizer, records: list, max_tokens: int, train_on_prompts: bool) -> tuple[list[dict], int]:
    """Each record as one example: the formatted prompt, then the answer with the template's end of
    turn. The labels of the prompt tokens are -100 (no loss) unless `train_on_prompts`. A record
    longer than `max_tokens` is skipped, never cut; returns the examples and how many were skipped."""
    examples, skipped = [], 0
    for context, answer in records:
        prompt = format_prompt(tokenizer, context)
        full = tokenizer.apply_chat_template(context + [{"role": "assistant", "content": answer}], tokenize=False)
        # A template that renders the earlier turns differently once answered: the answer and EOS alone.
        completion = full[len(prompt):] if full.startswith(prompt) else answer + tokenizer.eos_token
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if len(prompt_ids) + len(answer_ids) > max_tokens:
            skipped += 1
            continue
        examples.append({"input_ids": prompt_ids + answer_ids, "prompt": prompt, "question": context[-1]["content"],
                         "reference": answer, "reference_tokens": len(answer_ids),
                         "labels": (prompt_ids if train_on_prompts else [-100] * len(prompt_ids)) + answer_ids})
    return examples, skipped


def build_examples(args, tokenizer, train_records: list, validation_records: list | None, max_tokens: int) -> dict[str, list]:
    """Training and validation examples of instruction records; without validation records, 10% of
    the training records (seeded) are held out."""
    if validation_records is None:
        count = max(1, round(len(train_records) * args.validation_split))
        if len(train_records) - count < 1:
            raise UserError(f"only {len(train_records)} instruction record(s): too few to hold out a validation set; "
                            "add records or pass --validation-file.")
        order = random.Random(common.DATA_SEED).sample(range(len(train_records)), len(train_records))
        validation_records = [train_records[i] for i in order[:count]]
        train_records = [train_records[i] for i in order[count:]]
        print(f"validation: {count} of the training records ({args.validation_split:.0%}, seeded), held out.")
    examples = {}
    for split, records in (("train", train_records), ("validation", validation_records)):
        examples[split], skipped = encode_records(tokenizer, records, max_tokens, args.train_on_prompts and split == "train")
        if not examples[split]:
            raise UserError(f"every {split} record is longer than --block-size {max_tokens} tokens once formatted; "
                            "raise --block-size (up to the model's context) or shorten the records.")
        if skipped:
            print(f"note: skipped {skipped} {split} record(s) longer than --block-size {max_tokens} tokens once formatted "
                  "(records are never cut).")
    tokens = sum(len(e["input_ids"]) for e in examples["train"])
    print(f"records: {len(examples['train'])} training ({tokens:,} tokens), {len(examples['validation'])} validation; "
          f"the loss covers {'prompts and responses' if args.train_on_prompts else 'the responses only'}.")
    if args.max_eval_samples:
        examples["validation"] = examples["validation"][:args.max_eval_samples]
    return examples


def collate_blocks(examples: list[Any], pad_id: int):
    """Right-pad blocks (token lists) or examples ({"input_ids", "labels"}); padding is masked out of
    attention and labels (real EOS tokens keep theirs)."""
    import torch

    examples = [e if isinstance(e, dict) else {"input_ids": e} for e in examples]
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.tensor(example["input_ids"])
        attention[row, :length] = 1
        labels[row, :length] = torch.tensor(example.get("labels", example["input_ids"]))
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
    prompts = common.read_texts(args.prompt or [], "--prompt", TEXT_EXTENSIONS)
    if not prompts and default:
        prompts = [line.strip() for line in DEFAULT_PROMPTS.read_text().splitlines() if line.strip()][:3]
    return prompts


def generate(model, tokenizer, prompts: list[str], args: argparse.Namespace, greedy: bool = False,
             templated: bool = False, max_new_tokens: int | None = None, batch_size: int = 16) -> list[str]:
    """A continuation of each prompt (greedy with `greedy` or --temperature 0, else sampled), in
    batches with left padding. `templated`: the prompts are formatted already (format_prompt), and
    the tokenizer adds no special tokens of its own."""
    import torch
    from transformers import set_seed

    limit, max_new_tokens = context_length(model, tokenizer), max_new_tokens or args.max_new_tokens
    for prompt in prompts:
        length = len(tokenizer(prompt, add_special_tokens=not templated)["input_ids"])
        if length + max_new_tokens > limit:
            raise UserError(f"the prompt '{prompt[:40]}...' is {length} tokens; with --max-new-tokens "
                            f"{max_new_tokens} that exceeds the model's context of {limit} tokens.")
    set_seed(args.seed)
    sample = args.temperature > 0 and not greedy
    options = dict(max_new_tokens=max_new_tokens, do_sample=sample, repetition_penalty=args.repetition_penalty,
                   pad_token_id=tokenizer.pad_token_id)
    if sample:
        options.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    texts = []
    for start in range(0, len(prompts), batch_size):
        inputs = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                           add_special_tokens=not templated).to(device)
        with torch.inference_mode():
            output = model.generate(**inputs, **options)
        texts += tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    model.train(was_training)
    return texts


def score_answers(answers: list[str], references: list[str]) -> dict[str, float]:
    """Exact match (after lower-casing and joining whitespace) and ROUGE-L F1 (rouge-score's, with its
    own tokenizer: lower-cased words), averaged over the prompts."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    same = [" ".join(a.lower().split()) == " ".join(r.lower().split()) for a, r in zip(answers, references)]
    rouge = [scorer.score(r, a)["rougeL"].fmeasure for a, r in zip(answers, references)]
    return {"exact_match": round(sum(same) / len(same), 4), "rougeL": round(sum(rouge) / len(rouge), 4)}


def generate_from_saved(args: argparse.Namespace) -> None:
    """--prompt without training data: load the model or adapter in --output-dir and generate; a
    model trained on instruction data answers each prompt formatted as in training."""
    model_dir = Path(args.output_dir)
    prompts = read_prompts(args, default=False)
    if not prompts:
        raise UserError("no prompt given: pass --prompt TEXT or --prompt @FILE with one prompt per line.")
    model, tokenizer = load_saved(model_dir, gguf_cache=not args.no_speedups)
    model.to(common.inference_device())
    instructed = (common.read_json(model_dir / common.RUN_CONFIG_FILE) or {}).get("data_kind") == "instruction"
    inputs = [format_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts] if instructed else prompts
    for prompt, text in zip(prompts, generate(model, tokenizer, inputs, args, templated=instructed)):
        print(f"{prompt}\n{text}" if instructed else f"{prompt}{text}", f"\n{'-' * 60}", sep="")


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


def write_samples(path: Path, samples: list[dict[str, Any]], method: str) -> None:
    """samples.md: each prompt with the base and the fine-tuned model's text (and the reference
    answer of an instruction record)."""
    lines = ["# Samples: base model vs fine-tuned", ""]
    for sample in samples:
        answers = "reference" in sample  # an instruction record: answers, not continuations of the prompt
        lead = "" if answers else sample["prompt"]
        lines += [f"## Prompt: `{' '.join(sample['prompt'].split())}`", ""]
        if answers:
            lines += ["### Reference", "", f"```text\n{sample['reference']}\n```", ""]
        lines += ["### Base model", "", f"```text\n{lead}{sample['before']}\n```", "",
                  f"### Fine-tuned ({method})", "", f"```text\n{lead}{sample['after']}\n```", ""]
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
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        activation_checkpointing=args.gradient_checkpointing,  # transformers' name for gradient checkpointing
        logging_steps=max(1, min(25, len(blocks["train"]) // (args.batch_size * args.gradient_accumulation_steps) // 5)),
        report_to="none",  # --report-to tensorboard: the callback of make_callbacks()
        seed=args.seed,
        **common.precision_training_kwargs(precision),
    )
    callbacks, interrupt_callback = common.make_callbacks(output_dir, args.report_to)
    trainer = trainer_base(model=model, args=training_args,
                           train_dataset=[e if isinstance(e, dict) else {"input_ids": e} for e in blocks["train"]],
                           data_collator=lambda batch: collate_blocks(batch, tokenizer.pad_token_id), callbacks=callbacks)
    print(common.describe_batch(args))
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
    validation = metrics["validation"]
    if "rougeL" in validation:
        print(f"answers     {validation['answered']} validation prompts: exact match {validation['exact_match_before']:.3f} "
              f"-> {validation['exact_match']:.3f}, ROUGE-L {validation['rougeL_before']:.3f} -> {validation['rougeL']:.3f}")
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

    # 1. Read the data: plain text, or instruction records.
    train_docs, validation_docs, source = load_documents(args)
    instruction = is_instruction_data(train_docs)
    unrelated_docs = read_documents([args.unrelated_file], "--unrelated-file", None) if args.unrelated_file else None
    kind = "instruction record" if instruction else "document"
    print(f"data: {source}: {len(train_docs)} training {kind}(s)"
          + (f", {len(validation_docs)} validation {kind}(s)" if validation_docs else ""))

    # 2. Model and tokenizer; blocks of text, or one example per record.
    resolved = common.resolve_model(args.model_name, allow_fallback=not args.no_fallback, kind="causal-lm")
    model, tokenizer = load_model_and_tokenizer(args, resolved, seed=args.seed)
    block_size = choose_block_size(args, model, tokenizer)
    print(f"model: {resolved.name}  method: {method}  precision: {precision}")
    if instruction:
        prompt_format = "the model's chat template" if tokenizer.chat_template else "the plain template (### Instruction / ### Response)"
        tokenizer.chat_template = tokenizer.chat_template or PLAIN_CHAT_TEMPLATE  # saved with the tokenizer
        print(f"prompt format: {prompt_format}")
        blocks = build_examples(args, tokenizer, train_docs, validation_docs, block_size)
    else:
        blocks = build_blocks(args, tokenizer, train_docs, validation_docs, block_size)
    if unrelated_docs:
        blocks["unrelated"] = cut_blocks(token_stream(tokenizer, unrelated_docs), block_size, keep_partial=True)
        blocks["unrelated"] = blocks["unrelated"][:args.max_eval_samples or len(blocks["validation"])]
        if not blocks["unrelated"]:
            raise UserError(f"--unrelated-file {args.unrelated_file}: too short to score (fewer than 2 tokens).")
    common.check_one_batch(len(blocks["train"]), args.batch_size, "records" if instruction else f"blocks of {block_size} tokens",
                           "add records" if instruction else "add text, lower --block-size")

    # 3. LoRA adapters (or full fine-tuning), and the speed tricks for this model, each checked on
    # two training examples against the stock computation.
    model, targets = add_adapters(args, model)
    params = common.count_parameters(model)
    print(common.describe_parameters(params))
    if args.gradient_checkpointing:  # before the tricks check themselves, so that the check covers it
        model.activation_checkpointing_enable()
    probe = collate_blocks([e if instruction else e[:64] for e in blocks["train"][:2]], tokenizer.pad_token_id)
    applied += speedups.for_model(model, probe, precision, "causal-lm", not args.no_speedups)
    chunked = "chunked_loss" in applied

    # 4. Perplexity and samples before training. LoRA leaves the base weights as they are, so it
    # measures them after training with the adapters switched off, once the adapter is saved; full
    # fine-tuning changes them and measures now. Instruction data: greedy answers to the validation
    # prompts, scored against the references.
    if instruction:
        scored = blocks["validation"][:args.max_eval_samples or SCORED_PROMPTS]
        prompts, shown = [e["prompt"] for e in scored], [e["question"] for e in scored]
        answer_tokens = max(args.max_new_tokens, max(e["reference_tokens"] for e in scored) + 8)
    else:
        shown = prompts = read_prompts(args, default=not (args.train_file or args.dataset)) or sample_prompts(tokenizer, validation_docs or train_docs)
        answer_tokens = args.max_new_tokens

    def measure(when: str) -> tuple[dict[str, Any], list[str]]:
        result = perplexity(model, blocks["validation"], args.eval_batch_size, tokenizer.pad_token_id, precision, chunked)
        line = f"{when} training: perplexity {result['perplexity']:.2f}" + (" on the responses" if instruction else "")
        if "unrelated" in blocks:
            result["unrelated"] = perplexity(model, blocks["unrelated"], args.eval_batch_size, tokenizer.pad_token_id,
                                             precision, chunked)
            line += f" (unrelated text: {result['unrelated']['perplexity']:.2f})"
        texts = generate(model, tokenizer, prompts, args, greedy=instruction, templated=instruction,
                         max_new_tokens=answer_tokens)
        if instruction:
            result.update(score_answers(texts, [e["reference"] for e in scored]))
            line += f"; {len(texts)} validation prompts answered: exact match {result['exact_match']:.3f}, ROUGE-L {result['rougeL']:.3f}"
        print(line)
        return result, texts

    if args.full:
        before, samples_before = measure("before")

    # 5. Train; save the adapter (or model) as soon as it is trained, before anything else can fail.
    common.save_run_config(output_dir, args, {"model": resolved.name, "model_path": resolved.path,
                                              "gguf_file": resolved.gguf_file, "precision": precision,
                                              "method": method, "block_size": block_size, "data": source,
                                              "data_kind": "instruction" if instruction else "text",
                                              "prompt_format": prompt_format if instruction else None,
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
    scores = ("loss", "perplexity", "exact_match", "rougeL") if instruction else ("loss", "perplexity")
    trainer.log({f"eval_{key}": after[key] for key in scores})  # the training log and TensorBoard get them too
    samples = [{"prompt": prompt, **({"reference": e["reference"]} if instruction else {}), "before": base, "after": tuned}
               for prompt, e, base, tuned in zip(shown, scored if instruction else shown, samples_before, samples_after)]
    common.save_atomically(output_dir, lambda staging: write_samples(staging / SAMPLES_FILE, samples, method))
    if args.merge_adapter and not args.full:
        save_merged(model, tokenizer, output_dir)
    if not common.keeps_checkpoints(args) and common.is_main_process():
        import shutil

        shutil.rmtree(output_dir / common.CHECKPOINT_SUBDIR, ignore_errors=True)
    scaling = common.batch_scaling(args)
    examples_trained = result.global_step * scaling["effective_batch_size"]  # every process trains a batch per step
    mean_tokens = sum(len(e["input_ids"] if instruction else e) for e in blocks["train"]) / len(blocks["train"])
    train_stats = {"runtime_s": round(runtime, 2), "steps": result.global_step,
                   "samples_per_s": round(examples_trained / runtime, 2),
                   "tokens_per_s": round(examples_trained * mean_tokens / runtime, 1),
                   ("records" if instruction else "blocks"): len(blocks["train"]),
                   "block_size": block_size, "final_loss": round(result.training_loss, 4), **scaling,
                   "chunked_loss": chunked, "fast_attention": "cpu_attention" in applied, "speedups": applied,
                   "peak_rss_mb": common.peak_rss_mb(), "wall_time_s": round(time.perf_counter() - started, 2)}
    validation = {key: after[key] for key in ("loss", "perplexity", "tokens")}
    if instruction:
        validation.update({"exact_match_before": before["exact_match"], "exact_match": after["exact_match"],
                           "rougeL_before": before["rougeL"], "rougeL": after["rougeL"], "answered": len(scored)})
    saved_size_mb = common.directory_size_mb(output_dir)
    metrics = reports.build_metrics(
        "text-generation", method, resolved.name, precision, params, train_stats, validation, None,
        {"perplexity_before": before["perplexity"], "perplexity": after["perplexity"],
         "eval_loss_before": before["loss"], "eval_loss": after["loss"],
         "adapter_size_mb": saved_size_mb if not args.full else None, "saved_size_mb": saved_size_mb,
         "data_kind": "instruction" if instruction else "text", "samples": samples})
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
    if args.prompt and not (args.train_file or args.dataset):
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
