"""FLOP accounting for the benchmarks: what a training run computes, and the machine's peak.

MFU (model FLOPs utilisation) = training_flops() / training time / matmul_peak_gflops(). The
benchmarks compute it (benchmarks/run_all.py); user runs do not time a matrix product.
"""

from __future__ import annotations

import time
from typing import Sequence


def matmul_shape(model, sequence_head: bool = False) -> dict[str, int]:
    """What a training-FLOP estimate needs: layers, hidden size, and the weights of the matrix
    products every token goes through, split into trainable and frozen (LoRA's base weights).

    Counted: every nn.Linear and GPT-2 Conv1D weight (attention, MLP, a token-level head, a causal
    LM's output projection, a full product even when tied to the input embeddings). Not counted:
    embedding look-ups, norms and biases (no matrix product), and with `sequence_head` a sequence
    classifier's pooler and classifier, which run once per sequence rather than per token.
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    trainable = frozen = 0
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, Conv1D)) or "original_module" in name:  # PEFT's unused head copy
            continue
        if sequence_head and any(part in ("pooler", "classifier", "score", "pre_classifier") for part in name.split(".")):
            continue
        if module.weight.requires_grad:
            trainable += module.weight.numel()
        else:
            frozen += module.weight.numel()
    config = model.config
    return {"layers": int(config.num_hidden_layers), "hidden": int(config.hidden_size),
            "matmul_params_trainable": trainable, "matmul_params_frozen": frozen}


def token_totals(lengths: Sequence[int], epochs: float) -> tuple[float, float]:
    """training_flops()'s token figures for `epochs` passes over sequences of `lengths` real tokens:
    the tokens, and the sum of the squared lengths (attention)."""
    return sum(lengths) * epochs, sum(n * n for n in lengths) * epochs


def training_flops(shape: dict[str, int], tokens: float, tokens_squared: float) -> float:
    """Model FLOPs of training on `tokens` real tokens whose sequences' squared lengths sum to
    `tokens_squared`: (6 x trainable + 4 x frozen matmul weights) x tokens (forward 2, input
    gradients 2, weight gradients 2 per weight; frozen weights need no weight gradients) plus
    attention, 12 x layers x hidden x sum(length^2) (QK^T and AV, forward and twice backward)."""
    per_token = 6 * shape["matmul_params_trainable"] + 4 * shape["matmul_params_frozen"]
    return per_token * tokens + 12 * shape["layers"] * shape["hidden"] * tokens_squared


def matmul_peak_gflops(precision: str, repeats: int = 3, size: int = 2048) -> float:
    """The machine's practical peak in `precision` (fp32, bf16, fp16), on the GPU where there is
    one: GFLOP/s of the best of `repeats` timings of a size x size matrix product."""
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    inner = 20 if cuda else 2  # products per timing: enough to dwarf the timer's resolution
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    out = torch.empty_like(a)
    best = float("inf")
    for _ in range(repeats + 1):  # the first round warms up (thread pool, kernel choice)
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b, out=out)
        if cuda:
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - started) / inner)
    return round(2 * size ** 3 / best / 1e9, 1)
