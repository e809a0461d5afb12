#!/usr/bin/env python
"""What a new sequence length costs a training step, per attention and precision setting.

    python benchmarks/attention_shapes.py                 # every setting, each in its own process
    python benchmarks/attention_shapes.py --settings default no-cudnn

Dynamic padding gives the batches of a run many different lengths. A kernel library that prepares
a plan per input shape (cuDNN's attention, which PyTorch prefers on recent NVIDIA GPUs) pays for
each new length once; this measures that cost. A MiniLM-shaped BERT classifier (6 layers, hidden
384; random weights: only the time matters) trains one step at each of 24 lengths from 9 to 124
tokens (batch 32; half the rows end in a quarter of padding), then once more at each; then
evaluation batches of 64 at 8 of those lengths, twice. Each setting runs in a fresh process, so
that no plan or kernel carries over. It runs on a CPU too (no cuDNN there: a GPU diagnosis).

Settings:

  default       SDPA with PyTorch's backend choice, bf16 autocast (on a GPU: cuDNN first)
  no-cudnn      SDPA with cuDNN's backend switched off (what the scripts do on a GPU by default)
  eager         the library's eager attention, bf16 autocast
  first-token   default, plus the scripts' first-token shortcut of the classifier's last layer
  pad16         default, lengths padded to a multiple of 16 (8 distinct shapes instead of 24)
  fp32          SDPA, no autocast

Measured on an NVIDIA H200 (torch 2.11, cuDNN 9.19), 2026-11-27: README, "Expected results", and
BENCHMARKS.md's GPU notes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import speedups  # noqa: E402  (light: it imports torch and transformers only where used)

SETTINGS = ("default", "no-cudnn", "eager", "first-token", "pad16", "fp32")
LENGTHS = list(range(9, 129, 5))
MINILM = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
              max_position_embeddings=512, num_labels=2)


def measure(setting: str) -> dict[str, float]:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if setting == "no-cudnn":
        torch.backends.cuda.enable_cudnn_sdp(False)  # what speedups.for_process() does on a GPU
    config = BertConfig(**MINILM)
    config._attn_implementation = "eager" if setting == "eager" else "sdpa"
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).to(device).train()
    if setting == "first-token":
        speedups._use_first_token_last_layer(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    autocast = dict(device_type=device, dtype=torch.bfloat16, enabled=setting != "fp32")
    multiple = 16 if setting == "pad16" else 1

    def batch(length: int, size: int):
        length = -(-length // multiple) * multiple
        ids = torch.randint(1000, 20000, (size, length), device=device)
        mask = torch.ones_like(ids)
        mask[: size // 2, length * 3 // 4:] = 0
        return ids, mask

    def train_step(length: int) -> None:
        ids, mask = batch(length, 32)
        with torch.autocast(**autocast):
            loss = model(input_ids=ids, attention_mask=mask, labels=torch.randint(0, 2, (32,), device=device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def eval_step(length: int) -> None:
        ids, _ = batch(length, 64)
        with torch.no_grad(), torch.autocast(**autocast):
            model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().sum().item()

    def ms_per_call(function, lengths: list[int]) -> float:
        sync()
        started = time.perf_counter()
        for length in lengths:
            function(length)
        sync()
        return round(1000 * (time.perf_counter() - started) / len(lengths), 1)

    train_step(64)  # the process's first step: context, library loading
    return {"setting": setting, "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
            "step_new_ms": ms_per_call(train_step, LENGTHS), "step_seen_ms": ms_per_call(train_step, LENGTHS),
            "eval_new_ms": ms_per_call(eval_step, LENGTHS[::3]), "eval_seen_ms": ms_per_call(eval_step, LENGTHS[::3])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--one", choices=SETTINGS, help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return 0
    print("| setting | training step, new length | seen length | evaluation batch, new length | seen length |")
    print("|---|---|---|---|---|")
    for setting in args.settings:
        child = subprocess.run([sys.executable, __file__, "--one", setting], capture_output=True, text=True)
        if child.returncode != 0:
            print(f"| {setting} | failed: {(child.stderr.strip().splitlines() or ['?'])[-1]} | | | |")
            continue
        row = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"| {setting} ({row['device']}) | {row['step_new_ms']} ms | {row['step_seen_ms']} ms | "
              f"{row['eval_new_ms']} ms | {row['eval_seen_ms']} ms |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
