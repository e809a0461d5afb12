"""The speed settings that are on by default: FastDropout, length-grouped batches, the tuned allocator.
(Their timings are benchmark figures, in BENCHMARKS.md; these tests check that they compute what
they claim to.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, run_script


def test_fast_dropout_keeps_the_distribution_and_masks_its_gradient():
    import torch

    import common

    dropout = common._fast_dropout_class()(0.1).train()
    x = torch.ones(2_000_003, requires_grad=True)  # not a multiple of 4: the draw is cut to size
    y = dropout(x)
    kept = (y != 0).float().mean().item()
    assert kept == pytest.approx(0.9, abs=0.002)  # 6 standard deviations: sqrt(0.09 / 2e6) = 0.0002
    assert y.mean().item() == pytest.approx(1.0, abs=0.003)  # kept values are scaled by 1 / (1 - p)
    zero, scaled = y.detach().unique().tolist()
    assert zero == 0.0 and scaled == pytest.approx(1 / (1 - dropout.threshold / 32768))
    y.sum().backward()
    assert torch.equal(x.grad != 0, y != 0)  # the gradient flows through exactly the kept elements
    # Element i comes from cut i % 4 of a 64-bit draw (the top cut has one random bit fewer): each
    # cut must drop at the same rate. 50 x 4096 / 4 draws per cut: one standard deviation is 0.0013.
    dropped = torch.stack([dropout(torch.ones(4096)) == 0 for _ in range(50)]).float()
    for cut in range(4):
        assert dropped[:, cut::4].mean().item() == pytest.approx(0.1, abs=0.008), cut
    dropout.eval()
    assert dropout(x) is x


def test_fast_dropout_is_reproducible_from_the_seed():
    import torch

    import common

    dropout = common._fast_dropout_class()(0.3).train()
    x = torch.randn(32, 16, 8, dtype=torch.bfloat16)
    torch.manual_seed(5)
    first = dropout(x)
    torch.manual_seed(5)
    assert first.dtype == torch.bfloat16 and torch.equal(first, dropout(x))


def test_fast_dropout_replaces_the_models_dropout_modules(tiny_encoder):
    import torch
    from transformers import AutoModelForSequenceClassification

    import common

    model = AutoModelForSequenceClassification.from_pretrained(tiny_encoder, num_labels=2)
    plain = [m for m in model.modules() if type(m) is torch.nn.Dropout and m.p > 0]
    assert common.use_fast_dropout(model) == len(plain) > 0
    fast = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert all(type(m) is common._fast_dropout_class() for m in fast)
    assert [m.p for m in fast] == [m.p for m in plain]


def test_training_with_and_without_fast_dropout(tiny_encoder, tmp_path):
    """Both train; the default records nothing different except the speed."""
    runs = {}
    for flag in ("", "--no-fast-dropout"):
        output_dir = tmp_path / (flag or "fast")
        result = run_script("sentiment_finetuning.py", "--model-name", tiny_encoder, "--output-dir", output_dir,
                            "--epochs", "2", "--batch-size", "8", "--learning-rate", "1e-3",
                            *([flag] if flag else []))
        assert result.returncode == 0, result.stderr
        runs[flag] = json.loads((output_dir / "metrics.json").read_text())
    for metrics in runs.values():
        assert metrics["train"]["final_loss"] < 0.75  # two classes: 0.69 is chance


def test_length_grouped_batches_cut_padding_and_cover_every_example():
    import random

    from common import length_grouped_order

    lengths = [random.Random(i).randint(3, 60) for i in range(3200)]
    order = length_grouped_order(lengths, batch_size=32, seed=0)
    assert sorted(order) == list(range(len(lengths)))

    def padded(indices):
        return sum(max(lengths[i] for i in indices[s:s + 32]) * len(indices[s:s + 32])
                   for s in range(0, len(indices), 32))

    shuffled = list(range(len(lengths)))
    random.Random(0).shuffle(shuffled)
    assert padded(order) < 1.1 * sum(lengths) < padded(shuffled)
    assert order != length_grouped_order(lengths, batch_size=32, seed=1)


ALLOCATION_CHECK = '''
import resource, sys
sys.path.insert(0, sys.argv[1])
import torch
import common
if sys.argv[2] == "tuned":
    assert common.tune_allocator()


def step(mib):  # one activation-sized block, written and freed
    block = torch.ones(int(mib * (1 << 18)))  # float32: `mib` MiB
    del block


sizes = [8 + k / 4 for k in range(24)]  # a little larger each step, as activations grow with length
for mib in sizes[:4]:
    step(mib)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for mib in sizes[4:]:
    step(mib)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_tuned_allocator_reuses_memory_instead_of_faulting_it_back(tmp_path):
    """A block 1/4 MiB larger than the last, every step: by default glibc maps each one afresh (a
    block above its threshold goes to mmap) and faults in all ~2,900 pages; tuned, each step reuses
    the freed memory and faults in only the quarter MiB (64 pages) by which it grew."""
    script = tmp_path / "allocation_check.py"
    script.write_text(ALLOCATION_CHECK)
    faults = {}
    for mode in ("default", "tuned"):
        result = subprocess.run([sys.executable, script, ROOT, mode], capture_output=True, text=True, check=True)
        faults[mode] = float(result.stdout.split()[-1])
    assert faults["default"] > 2000
    assert faults["tuned"] < 300
