"""The speed settings that are on by default: FastDropout, length-grouped batches, the tuned allocator,
the padded attention softmax, attention kept off cuDNN on a GPU, the first-token last layer of
classifiers and the kept embedding-gradient buffer; and the FLOP accounting behind metrics.json's
model FLOPs utilisation.
(Their timings are benchmark figures, in BENCHMARKS.md; these tests check that they compute what
they claim to.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, build_tiny_encoder, logged_losses_and_grad_norms, run_script


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


def test_fast_dropout_rounds_each_kept_value_once_both_ways():
    import torch

    import common

    dropout = common._fast_dropout_class()(0.1).train()
    x = (torch.rand(64, 384) + 0.5).to(torch.bfloat16).requires_grad_()  # no zeros: y != 0 is the mask
    gradient = torch.randn(64, 384, dtype=torch.bfloat16)
    y = dropout(x)
    y.backward(gradient)
    keep = y != 0
    scale = 1 / (1 - dropout.threshold / 32768)
    # x / (1 - p) computed in float and rounded to bf16 once, forward and backward (not times a rounded scale).
    assert torch.equal(y, torch.where(keep, (x.detach().float() * scale).to(torch.bfloat16), 0))
    assert torch.equal(x.grad, torch.where(keep, (gradient.float() * scale).to(torch.bfloat16), 0))


def test_fast_dropout_is_reproducible_from_the_seed():
    import torch

    import common

    dropout = common._fast_dropout_class()(0.3).train()
    x = torch.randn(32, 16, 8, dtype=torch.bfloat16)
    torch.manual_seed(5)
    first = dropout(x)
    torch.manual_seed(5)
    assert first.dtype == torch.bfloat16 and torch.equal(first, dropout(x))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_fast_dropout_masks_with_its_seeded_draws_in_the_inputs_dtype(dtype):
    """The mask is the comparison of the generator's 15-bit cuts with the threshold, the same
    stream for every input dtype and layout (the attention's probabilities arrive as a strided
    view); kept values are x / (1 - p) rounded once, dropped ones exactly 0, as is their gradient."""
    import torch

    import common

    dropout = common._fast_dropout_class()(0.1).train()
    x = (torch.randn(6, 5, 40) * 3).to(getattr(torch, dtype))[..., :37].requires_grad_()  # strided, odd size
    gradient = torch.randn(6, 5, 37).to(x.dtype)
    torch.manual_seed(11)
    y = dropout(x)
    y.backward(gradient)
    torch.manual_seed(11)
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_()
    keep = words.view(torch.int16)[:x.numel()].view(x.shape).bitwise_and(0x7FFF) >= dropout.threshold
    scale = 1 / (1 - dropout.threshold / 32768)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert 0.8 < keep.float().mean().item() < 0.97
    assert torch.equal(y, torch.where(keep, (x.detach().float() * scale).to(x.dtype), 0))
    assert torch.equal(x.grad, torch.where(keep, (gradient.float() * scale).to(x.dtype), 0))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("columns, padded_to", [(5, 32), (14, 32), (30, 32), (32, None), (36, None), (46, 64)])
def test_softmax_last_dim_pads_short_and_ragged_rows_to_the_same_values(dtype, columns, padded_to):
    """Rows shorter than 32 columns, or with more than 8 past a multiple of 32, go through a softmax
    padded to the next multiple of 32 (the CPU kernel's slow path is its tail); the probabilities and
    the gradient are torch.softmax's to the last bit of rounding (the padded rows run the kernel's
    vectorised path, whose sums may round differently)."""
    import torch

    import common

    torch.manual_seed(columns)
    scores = (torch.randn(4, 3, 7, columns) * 4).to(getattr(torch, dtype))
    scores[0, 0, 0] = torch.finfo(scores.dtype).min  # a fully masked row: uniform over its own columns
    scores.requires_grad_()
    reference = scores.detach().clone().requires_grad_()
    gradient = torch.randn(4, 3, 7, columns).to(scores.dtype)
    probabilities = common.softmax_last_dim(scores)
    expected = torch.softmax(reference, dim=-1)
    probabilities.backward(gradient)
    expected.backward(gradient)
    assert probabilities.shape == expected.shape
    assert probabilities.stride(-2) == (padded_to or columns)  # a view of the padded rows, or torch.softmax's own
    unit = torch.finfo(scores.dtype).eps  # one unit in the last place at 1
    torch.testing.assert_close(probabilities, expected, atol=2 * unit, rtol=0)
    torch.testing.assert_close(scores.grad, reference.grad, atol=2 * unit * gradient.abs().max().item(), rtol=0)


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


def test_training_with_and_without_the_speed_settings(tiny_encoder, tmp_path):
    """Both train; the default records nothing different except the speed."""
    runs = {}
    for flags in ((), ("--no-fast-dropout", "--no-first-token-shortcut", "--no-embedding-grad-buffer",
                       "--no-fast-attention")):
        output_dir = tmp_path / ("plain" if flags else "fast")
        result = run_script("sentiment_finetuning.py", "--model-name", tiny_encoder, "--output-dir", output_dir,
                            "--epochs", "2", "--batch-size", "8", "--learning-rate", "1e-3", *flags)
        assert result.returncode == 0, result.stderr
        runs[flags] = json.loads((output_dir / "metrics.json").read_text())
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


@pytest.mark.parametrize("gpu", [True, False])
@pytest.mark.parametrize("requested", [False, True], ids=["default", "--cudnn-attention"])
def test_attention_stays_off_cudnn_on_a_gpu_unless_asked(gpu, requested, monkeypatch):
    import argparse

    import torch

    import common

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    monkeypatch.setattr(common, "choose_precision", lambda *flags: "bf16")
    args = argparse.Namespace(fp16=False, bf16=False, fp32=False, no_allocator_tuning=True,
                                     cudnn_attention=requested)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        assert common.set_up_hardware(args) == "bf16"
        assert torch.backends.cuda.cudnn_sdp_enabled() is (requested or not gpu)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


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


def _without_dropout(model):
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def _tiny_classifier(directory, num_labels: int = 3):
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(1)  # the same fresh head for every copy
    return _without_dropout(AutoModelForSequenceClassification.from_pretrained(directory, num_labels=num_labels))


@pytest.mark.parametrize("kind", ["bert", "distilbert", "roberta"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_first_token_last_layer_gives_the_full_models_logits_and_gradients(kind, lora, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model

    import common

    directory = build_tiny_encoder(tmp_path / kind, kind)
    full, shortcut = _tiny_classifier(directory), _tiny_classifier(directory)
    if lora:
        targets = ["q_lin", "v_lin"] if kind == "distilbert" else ["query", "value"]
        adapted = []
        for model in (full, shortcut):
            torch.manual_seed(2)  # the same random (not zero) adapters in both
            adapted.append(get_peft_model(model, LoraConfig(r=4, target_modules=targets, task_type="SEQ_CLS",
                                                            init_lora_weights=False)))
        full, shortcut = adapted
    assert common.use_first_token_last_layer(shortcut)
    base = shortcut.get_base_model() if lora else shortcut
    layers = base.base_model.get_submodule(common.FIRST_TOKEN_CLASSIFIERS[type(base).__name__])
    positions = []
    layers[-1].register_forward_hook(lambda module, args, output: positions.append(output.shape[1]))

    input_ids = torch.randint(5, 100, (4, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0  # padded inputs: the first query must ignore the padding keys
    attention_mask[3, 2:] = 0
    labels = torch.tensor([0, 2, 1, 2])
    for mode in ("eval", "train"):
        outputs = []
        for model in (full, shortcut):
            getattr(model, mode)()
            model.zero_grad()
            output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            output.loss.backward()
            outputs.append(output)
        torch.testing.assert_close(outputs[1].logits, outputs[0].logits, atol=1e-5, rtol=1e-5)
        for (name, expected), actual in zip(full.named_parameters(), shortcut.parameters()):
            if expected.requires_grad:
                torch.testing.assert_close(actual.grad, expected.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert positions == [1, 1]  # the last layer computed the first position only


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["bert", "distilbert", "roberta"])
@pytest.mark.parametrize("task", ["classification", "tokens"])
def test_fast_attention_gives_sdpas_logits_and_gradients_for_encoders(kind, task, precision, tmp_path, monkeypatch):
    """The plain-matmul training attention on padded encoder batches, with the first-token last
    layer (classification) and without (token classification): SDPA's logits and gradients to fp32
    rounding in fp32, to bf16 rounding under bf16 autocast. Evaluation is handed to SDPA."""
    import torch
    import transformers.integrations.sdpa_attention as sdpa_module
    from transformers import AutoModelForTokenClassification

    import common

    directory = build_tiny_encoder(tmp_path / kind, kind)
    models = []
    for _ in range(2):
        if task == "classification":
            model = _tiny_classifier(directory)
            common.use_first_token_last_layer(model)
        else:
            torch.manual_seed(1)
            model = _without_dropout(AutoModelForTokenClassification.from_pretrained(directory, num_labels=3))
        models.append(model.train())
    sdpa, fast = models
    assert common.use_fast_attention(fast)
    handed_to_sdpa = []
    original = sdpa_module.sdpa_attention_forward
    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward",
                        lambda *args, **kwargs: handed_to_sdpa.append(1) or original(*args, **kwargs))
    torch.manual_seed(3)
    input_ids = torch.randint(5, 100, (4, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    attention_mask[3, 2:] = 0
    labels = torch.tensor([0, 2, 1, 2]) if task == "classification" else torch.randint(0, 3, (4, 9))

    def forward_backward(model):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            output = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        output.loss.backward()
        return output.logits.float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected_logits, expected = forward_backward(sdpa)
    logits, gradients = forward_backward(fast)
    assert not handed_to_sdpa, "training ran the plain-matmul attention"
    assert expected.keys() == gradients.keys()
    if precision == "fp32":
        torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
        for name in expected:
            torch.testing.assert_close(gradients[name], expected[name], atol=1e-6, rtol=1e-4, msg=name)
    else:
        assert (logits - expected_logits).norm() <= 0.02 * expected_logits.norm()
        for name in expected:  # bf16 keeps 8 bits: compare each gradient as a whole
            assert (gradients[name] - expected[name]).norm() <= 0.03 * expected[name].norm() + 1e-6, name
    with torch.no_grad():
        fast.eval()(input_ids=input_ids, attention_mask=attention_mask)
    assert handed_to_sdpa, "evaluation keeps SDPA"


def test_first_token_last_layer_is_left_alone_where_the_head_reads_more(tiny_encoder):
    import torch
    from transformers import AlbertConfig, AlbertForSequenceClassification, AutoModelForTokenClassification

    import common

    tagger = AutoModelForTokenClassification.from_pretrained(tiny_encoder, num_labels=3)  # every position
    shared = AlbertForSequenceClassification(AlbertConfig(  # one layer's weights serve every layer
        vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64))
    for model in (tagger, shared):
        forwards = [module.forward for module in model.modules()]
        assert not common.use_first_token_last_layer(model)
        assert [module.forward for module in model.modules()] == forwards
    model = tagger.eval()
    assert model(input_ids=torch.randint(5, 100, (2, 7))).logits.shape == (2, 7, 3)


def test_embedding_gradient_buffer_trains_like_fresh_gradients(tiny_encoder):
    """Four optimizer steps (one of two accumulated micro-batches) with gradient clipping:
    the kept buffer gives the weights of the library's fresh dense gradients."""
    import torch

    import common

    models = [_tiny_classifier(tiny_encoder), _tiny_classifier(tiny_encoder)]
    assert common.keep_embedding_gradient(models[1])
    # SGD: AdamW would magnify rounding noise in gradients that are zero in theory (attention key biases).
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9) for model in models]
    generator = torch.Generator().manual_seed(0)
    batches = [[torch.randint(5, 100, (4, 6), generator=generator)] for _ in range(4)]
    batches[2].append(torch.randint(5, 100, (3, 8), generator=generator))
    kept = []
    for model, optimizer in zip(models, optimizers):
        model.train()
        for micro_batches in batches:
            for input_ids in micro_batches:
                model(input_ids=input_ids, labels=input_ids[:, 0] % 3).loss.backward()
            kept.append(model.get_input_embeddings().weight.grad)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for (name, expected), actual in zip(models[0].named_parameters(), models[1].parameters()):
        # Repeated tokens' rows may be summed in another order: equal to float32 rounding.
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5, msg=name)
    assert not kept[0].is_sparse and all(grad is kept[4] for grad in kept[4:])  # one dense buffer, reused
    assert models[1].get_input_embeddings().weight.grad is None  # handed back to the optimizer's contract


def test_embedding_gradient_buffer_is_skipped_for_frozen_embeddings_and_under_ddp(tiny_encoder, monkeypatch):
    import common

    frozen = _tiny_classifier(tiny_encoder)
    frozen.get_input_embeddings().weight.requires_grad_(False)
    assert not common.keep_embedding_gradient(frozen)
    monkeypatch.setenv("WORLD_SIZE", "2")  # DDP would see sparse gradients
    distributed = _tiny_classifier(tiny_encoder)
    assert not common.keep_embedding_gradient(distributed)
    assert not frozen.get_input_embeddings().sparse and not distributed.get_input_embeddings().sparse


@pytest.mark.parametrize("case", ["clipped", "not-clipped", "nan"])
def test_clipping_by_written_rows_equals_clip_grad_norm(tiny_encoder, case):
    """The Trainer's clipping reads only the written rows of the kept embedding gradient: the
    same total norm and the same clipped gradients as torch's clip_grad_norm_ over everything.
    A norm within the limit leaves the gradients unwritten (the library multiplies them by 1); a
    NaN norm makes every gradient NaN, as the library's does (the embedding's unwritten rows, zero
    and never read by this clipping, excepted)."""
    import torch

    import common

    max_norm = 1e-3 if case == "clipped" else 1e3
    models = [_tiny_classifier(tiny_encoder), _tiny_classifier(tiny_encoder)]
    input_ids = torch.randint(5, 100, (4, 6), generator=torch.Generator().manual_seed(0))
    for model in models:
        assert common.keep_embedding_gradient(model)
        model(input_ids=input_ids, labels=input_ids[:, 0] % 3).loss.backward()
        if case == "nan":
            model.classifier.bias.grad[0] = float("nan")
    rows = common.written_embedding_rows(models[1])
    assert torch.equal(rows, input_ids.unique())
    versions = [p.grad._version for p in models[1].parameters()]
    expected = torch.nn.utils.clip_grad_norm_(models[0].parameters(), max_norm)
    total = common.clip_gradients_by_rows(models[1], rows, max_norm)
    torch.testing.assert_close(total, expected, equal_nan=True)
    embedding = models[1].get_input_embeddings().weight
    for (name, reference), actual in zip(models[0].named_parameters(), models[1].parameters()):
        if actual is embedding and case == "nan":
            reference, actual = reference.grad[rows], actual.grad[rows]
        else:
            reference, actual = reference.grad, actual.grad
        torch.testing.assert_close(actual, reference, equal_nan=True, msg=name)
    written = [p.grad._version != version for p, version in zip(models[1].parameters(), versions)]
    if case == "not-clipped":
        assert expected < max_norm and not any(written)
    else:
        assert all(written) and (case == "nan") is bool(expected.isnan())
    if case == "nan":
        assert embedding.grad[rows].isnan().all() and models[1].classifier.weight.grad.isnan().all()


def test_trainer_with_the_embedding_gradient_buffer_logs_the_same_training(tiny_encoder, tmp_path):
    """Through the Trainer (its clipping then reads only the written rows): the same losses and
    gradient norms, step by step, as with the library's fresh dense gradients."""
    logs = {}
    for flags in ((), ("--no-embedding-grad-buffer",)):
        output_dir = tmp_path / ("fresh" if flags else "kept")
        result = run_script("sentiment_finetuning.py", "--model-name", tiny_encoder, "--output-dir", output_dir,
                            "--epochs", "1", "--batch-size", "8", "--learning-rate", "1e-3", "--fp32", *flags)
        assert result.returncode == 0, result.stderr
        logs[flags] = logged_losses_and_grad_norms(output_dir)
    kept, fresh = logs.values()
    assert len(kept) == len(fresh) >= 6
    assert kept == pytest.approx(fresh, rel=1e-4)


# ---- FLOP accounting (metrics.json's training_flops and mfu) ------------------------------------


@pytest.mark.parametrize("lora", [False, True])
def test_matmul_shape_counts_the_per_token_matrix_products(tiny_encoder, lora):
    from argparse import Namespace

    import common
    import sentiment_finetuning

    model, fresh = sentiment_finetuning.build_model(common.ResolvedModel(str(tiny_encoder), "tiny"), ["neg", "pos"])
    hidden, inner, layers = 32, 64, 2  # conftest's tiny BERT
    per_layer = 4 * hidden * hidden + 2 * hidden * inner  # query, key, value, output; the two feed-forward matrices
    if lora:
        args = Namespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=None, use_rslora=False,
                         use_dora=False)
        model, _ = common.apply_lora(model, args, "SEQ_CLS", common.lora_head_modules(model, fresh))
        adapters = layers * 2 * (4 * hidden + 4 * hidden)  # query and value: A (r x hidden) and B (hidden x r)
        expected = {"matmul_params_trainable": adapters, "matmul_params_frozen": layers * per_layer}
    else:
        expected = {"matmul_params_trainable": layers * per_layer, "matmul_params_frozen": 0}
    # the pooler and the classifier run once per sequence: not per-token work
    assert common.matmul_shape(model, sequence_head=True) == {"layers": layers, "hidden": hidden, **expected}
    with_head = common.matmul_shape(model)
    head = hidden * hidden + 2 * hidden
    assert with_head["matmul_params_trainable"] == expected["matmul_params_trainable"] + head


def test_training_flops_and_mfu_follow_the_formula(monkeypatch):
    import common

    shape = {"layers": 2, "hidden": 8, "matmul_params_trainable": 100, "matmul_params_frozen": 50}
    # (6 x 100 + 4 x 50) x 10 tokens + 12 x 2 x 8 x 40 (two sequences of lengths 2 and 6: 4 + 36)
    assert common.training_flops(shape, 10, 40) == 800 * 10 + 12 * 2 * 8 * 40
    monkeypatch.setattr(common, "matmul_peak_gflops", lambda precision: {"bf16": 4e-6}[precision])  # 4,000 FLOP/s
    figures = common.throughput_figures(shape, "bf16", 4.0, 10, 40)
    assert figures["training_flops"] == 15680
    assert figures["model_tflops_per_s"] == 3.92e-09 and figures["peak_tflops_per_s"] == 4e-09
    assert figures["mfu"] == 0.98  # 15,680 FLOPs in 4 s against 4,000 FLOP/s
    monkeypatch.setenv("WORLD_SIZE", "2")  # one process of several cannot measure the machine's peak
    assert common.throughput_figures(shape, "bf16", 4.0, 10, 40)["mfu"] is None


def test_matmul_shape_counts_gpt2s_conv1d_projections_and_the_output_layer(tiny_gpt2):
    from transformers import AutoModelForCausalLM

    import common

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    hidden, layers, vocab = 32, 2, model.config.vocab_size  # conftest's tiny GPT-2 (inner size 4 x hidden)
    per_layer = hidden * 3 * hidden + hidden * hidden + 2 * hidden * 4 * hidden  # c_attn, attn c_proj, c_fc, mlp c_proj
    assert common.matmul_shape(model) == {"layers": layers, "hidden": hidden, "matmul_params_frozen": 0,
                                          "matmul_params_trainable": layers * per_layer + vocab * hidden}
