#!/usr/bin/env python
"""The CPU attention of speedups.py against PyTorch's fused SDPA kernel, one attention call at a time.

    python benchmarks/cpu_attention.py              # fp32, and bf16 autocast where the CPU has bf16
    python benchmarks/cpu_attention.py --bf16       # bf16 autocast on any CPU (emulated: slow)

For each shape, a forward and backward pass of one attention call (random inputs, the model's
attention dropout) alternates between the two paths for --rounds rounds; it prints the median time
of each and the median of the rounds' CPU / SDPA ratios. Shapes:

  smollm2-causal  SmolLM2-135M: 8 x 256 tokens, 9 query heads sharing 3 key/value heads, causal,
                  no dropout
  minilm-ner      MiniLM on WNUT-17: 32 sentences of 31 tokens, 12 heads of 32, dropout 0.1
  minilm-sst2     MiniLM on SST-2 phrases: 32 x 14 tokens, 12 heads of 32, dropout 0.1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import speedups  # noqa: E402

# name: (batch, query heads, key/value heads, tokens, head size, causal, dropout)
SHAPES = {"smollm2-causal": (8, 9, 3, 256, 64, True, 0.0), "minilm-ner": (32, 12, 12, 31, 32, False, 0.1),
          "minilm-sst2": (32, 12, 12, 14, 32, False, 0.1)}


class AttentionModule:  # what the attention functions read from the calling layer
    training = True

    def __init__(self, causal: bool, groups: int):
        self.is_causal, self.num_key_value_groups = causal, groups


def one_pass(function, shape: tuple, dtype) -> float:
    import torch

    batch, heads, kv_heads, tokens, head_size, causal, dropout = shape
    query = torch.randn(batch, heads, tokens, head_size, requires_grad=True)
    key, value = (torch.randn(batch, kv_heads, tokens, head_size, requires_grad=True) for _ in range(2))
    started = time.perf_counter()
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        output, _ = function(AttentionModule(causal, heads // kv_heads), query.to(dtype or query.dtype),
                             key.to(dtype or key.dtype), value.to(dtype or value.dtype), None, dropout=dropout,
                             scaling=head_size ** -0.5, is_causal=causal)
    output.float().sum().backward()
    return time.perf_counter() - started


def main() -> int:
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    parser = common.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=common.positive_int, default=30)
    parser.add_argument("--bf16", action="store_true", help="Measure bf16 autocast even without native bf16.")
    args = parser.parse_args()
    precisions = {"fp32": None} | ({"bf16": torch.bfloat16} if args.bf16 or common.cpu_supports_bf16() else {})
    paths = {"sdpa": sdpa_attention_forward, "cpu": speedups._cpu_training_attention}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    for precision, dtype in precisions.items():
        for name, shape in SHAPES.items():
            times = {path: [] for path in paths}
            for round_ in range(args.rounds + 1):  # the first round warms up
                for path in (paths if round_ % 2 == 0 else reversed(paths)):
                    elapsed = one_pass(paths[path], shape, dtype)
                    if round_:
                        times[path].append(elapsed)
            ratio = statistics.median(c / s for c, s in zip(times["cpu"], times["sdpa"]))
            print(f"{precision:5} {name:15} SDPA {1000 * statistics.median(times['sdpa']):7.2f} ms  "
                  f"CPU attention {1000 * statistics.median(times['cpu']):7.2f} ms  CPU / SDPA {ratio:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
