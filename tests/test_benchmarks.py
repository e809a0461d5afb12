"""The benchmark harness (benchmarks/): the same SST-2 split in every process; the FLOP accounting behind MFU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

SPLIT = '''
import json, sys
sys.path.insert(0, sys.argv[1])
import sentiment_sst2
words = ["good", "bad", "film", "plot", "cast", "score", "scene", "story"]
rows = [(" ".join(words[(i + k) % 8] for k in range(6 + i % 3)) + f" {i}", i % 2) for i in range(400)]
rows += [(sentence.rsplit(" ", 2)[0], label) for sentence, label in rows[:50]]  # sub-phrases
train, test = sentiment_sst2.sentence_level_split(rows, held_out=20, seed=3)
print(json.dumps([train, test]))
'''


def test_sst2_sentence_split_is_the_same_in_every_process():
    """Many held-out candidates share a length; their order must not come from string hashing,
    which Python salts per process (PYTHONHASHSEED)."""
    splits = []
    for hash_seed in ("1", "2", "3"):
        result = subprocess.run([sys.executable, "-c", SPLIT, str(ROOT / "benchmarks")], capture_output=True,
                                text=True, check=True, env={**os.environ, "PYTHONHASHSEED": hash_seed})
        splits.append(json.loads(result.stdout))
    assert splits[0] == splits[1] == splits[2]
    train, test = splits[0]
    assert len(test) == 20 and not {sentence for sentence, _ in test} & {sentence for sentence, _ in train}


# ---- FLOP accounting (benchmarks/flops.py, for MFU) ------------------------------------------------


@pytest.mark.parametrize("lora", [False, True])
def test_matmul_shape_counts_the_per_token_matrix_products(tiny_encoder, lora):
    from argparse import Namespace

    from transformers import AutoModelForSequenceClassification

    import common
    import encoders
    import flops

    model, fresh = encoders.load_with_fresh_head(AutoModelForSequenceClassification, common.ResolvedModel(str(tiny_encoder), "tiny"),
                                               ["neg", "pos"], "classification")
    hidden, inner, layers = 32, 64, 2  # conftest's tiny BERT
    per_layer = 4 * hidden * hidden + 2 * hidden * inner  # query, key, value, output; the two feed-forward matrices
    if lora:
        args = Namespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=None, lora_variant="lora")
        model, _ = common.apply_lora(model, args, "SEQ_CLS", encoders.lora_head_modules(model, fresh))
        adapters = layers * 2 * (4 * hidden + 4 * hidden)  # query and value: A (r x hidden) and B (hidden x r)
        expected = {"matmul_params_trainable": adapters, "matmul_params_frozen": layers * per_layer}
    else:
        expected = {"matmul_params_trainable": layers * per_layer, "matmul_params_frozen": 0}
    # the pooler and the classifier run once per sequence: not per-token work
    assert flops.matmul_shape(model, sequence_head=True) == {"layers": layers, "hidden": hidden, **expected}
    with_head = flops.matmul_shape(model)
    head = hidden * hidden + 2 * hidden
    assert with_head["matmul_params_trainable"] == expected["matmul_params_trainable"] + head


def test_training_flops_follow_the_formula():
    import flops

    shape = {"layers": 2, "hidden": 8, "matmul_params_trainable": 100, "matmul_params_frozen": 50}
    # (6 x 100 + 4 x 50) x 10 tokens + 12 x 2 x 8 x 40 (two sequences of lengths 2 and 6: 4 + 36)
    assert flops.training_flops(shape, 10, 40) == 800 * 10 + 12 * 2 * 8 * 40
    assert flops.token_totals([2, 6], epochs=2) == (16, 80)


def test_matmul_shape_counts_gpt2s_conv1d_projections_and_the_output_layer(tiny_gpt2):
    from transformers import AutoModelForCausalLM

    import flops

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    hidden, layers, vocab = 32, 2, model.config.vocab_size  # conftest's tiny GPT-2 (inner size 4 x hidden)
    per_layer = hidden * 3 * hidden + hidden * hidden + 2 * hidden * 4 * hidden  # c_attn, attn c_proj, c_fc, mlp c_proj
    assert flops.matmul_shape(model) == {"layers": layers, "hidden": hidden, "matmul_params_frozen": 0,
                                          "matmul_params_trainable": layers * per_layer + vocab * hidden}
