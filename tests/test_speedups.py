"""The speed tricks of speedups.py: each computes what the library computes (their timings are
benchmark figures, in BENCHMARKS.md), each steps aside when a library change breaks its assumption,
and a run with them gives the losses of a run without them (--no-speedups)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (ROOT, build_tiny_encoder, logged_losses_and_grad_norms, requires_cpu_bf16, run_main,
                      run_script, training_log)


def test_fast_dropout_keeps_the_distribution_and_masks_its_gradient():
    import torch

    import speedups

    dropout = speedups.fast_dropout_class()(0.1).train()
    x = torch.ones(2_000_003, requires_grad=True)  # not a multiple of 4: the draw is cut to size
    y = dropout(x)
    kept = (y != 0).float().mean().item()
    assert kept == pytest.approx(0.9, abs=0.002)  # 6 standard deviations: sqrt(0.09 / 2e6) = 0.0002
    assert y.mean().item() == pytest.approx(1.0, abs=0.003)  # kept values are scaled by 1 / (1 - p)
    zero, scaled = y.detach().unique().tolist()
    assert zero == 0.0 and scaled == pytest.approx(32768 / (32768 - round(dropout.p * 32768)))
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

    import speedups

    dropout = speedups.fast_dropout_class()(0.3).train()
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

    import speedups

    dropout = speedups.fast_dropout_class()(0.1).train()
    x = (torch.randn(6, 5, 40) * 3).to(getattr(torch, dtype))[..., :37].requires_grad_()  # strided, odd size
    gradient = torch.randn(6, 5, 37).to(x.dtype)
    torch.manual_seed(11)
    y = dropout(x)
    y.backward(gradient)
    torch.manual_seed(11)
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_()
    keep = words.view(torch.int16)[:x.numel()].view(x.shape).bitwise_and(0x7FFF) >= round(dropout.p * 32768)
    scale = 32768 / (32768 - round(dropout.p * 32768))
    assert y.dtype == x.dtype and y.shape == x.shape
    assert 0.8 < keep.float().mean().item() < 0.97
    assert torch.equal(y, torch.where(keep, (x.detach().float() * scale).to(x.dtype), 0))
    assert torch.equal(x.grad, torch.where(keep, (gradient.float() * scale).to(x.dtype), 0))


def test_length_grouped_batches_cut_padding_and_cover_every_example():
    import random

    from encoders import length_grouped_order

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
import speedups
if sys.argv[2] == "tuned":
    assert "allocator" in speedups.for_process()


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

    import speedups

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
    assert speedups._can_use_first_token_last_layer(shortcut)
    speedups._use_first_token_last_layer(shortcut)
    base = shortcut.get_base_model() if lora else shortcut
    layers = base.base_model.get_submodule(speedups.FIRST_TOKEN_CLASSIFIERS[type(base).__name__])
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

    import speedups

    directory = build_tiny_encoder(tmp_path / kind, kind)
    models = []
    for _ in range(2):
        if task == "classification":
            model = _tiny_classifier(directory)
            speedups._use_first_token_last_layer(model)
        else:
            torch.manual_seed(1)
            model = _without_dropout(AutoModelForTokenClassification.from_pretrained(directory, num_labels=3))
        models.append(model.train())
    sdpa, fast = models
    assert speedups._can_use_cpu_attention(fast)
    speedups._use_cpu_attention(fast)
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

    import speedups

    tagger = AutoModelForTokenClassification.from_pretrained(tiny_encoder, num_labels=3)  # every position
    shared = AlbertForSequenceClassification(AlbertConfig(  # one layer's weights serve every layer
        vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64))
    for model in (tagger, shared):
        forwards = [module.forward for module in model.modules()]
        assert not speedups._can_use_first_token_last_layer(model)
        assert [module.forward for module in model.modules()] == forwards
    model = tagger.eval()
    assert model(input_ids=torch.randint(5, 100, (2, 7))).logits.shape == (2, 7, 3)


def test_embedding_gradient_buffer_trains_like_fresh_gradients(tiny_encoder):
    """Four optimizer steps (one of two accumulated micro-batches) with gradient clipping:
    the kept buffer gives the weights of the library's fresh dense gradients."""
    import torch

    import speedups

    models = [_tiny_classifier(tiny_encoder), _tiny_classifier(tiny_encoder)]
    assert speedups._can_keep_embedding_gradient(models[1])
    speedups._keep_embedding_gradient(models[1])
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
    import speedups

    frozen = _tiny_classifier(tiny_encoder)
    frozen.get_input_embeddings().weight.requires_grad_(False)
    assert not speedups._can_keep_embedding_gradient(frozen)
    monkeypatch.setenv("WORLD_SIZE", "2")  # DDP would see sparse gradients
    distributed = _tiny_classifier(tiny_encoder)
    assert not speedups._can_keep_embedding_gradient(distributed)
    assert not frozen.get_input_embeddings().sparse and not distributed.get_input_embeddings().sparse


@pytest.mark.parametrize("case", ["clipped", "not-clipped", "nan"])
def test_clipping_by_written_rows_equals_clip_grad_norm(tiny_encoder, case):
    """The Trainer's clipping reads only the written rows of the kept embedding gradient: the
    same total norm and the same clipped gradients as torch's clip_grad_norm_ over everything.
    A NaN norm makes every gradient NaN, as the library's does (the embedding's unwritten rows, zero
    and never read by this clipping, excepted)."""
    import torch

    import speedups

    max_norm = 1e-3 if case == "clipped" else 1e3
    models = [_tiny_classifier(tiny_encoder), _tiny_classifier(tiny_encoder)]
    input_ids = torch.randint(5, 100, (4, 6), generator=torch.Generator().manual_seed(0))
    for model in models:
        assert speedups._can_keep_embedding_gradient(model)
        speedups._keep_embedding_gradient(model)
        model(input_ids=input_ids, labels=input_ids[:, 0] % 3).loss.backward()
        if case == "nan":
            model.classifier.bias.grad[0] = float("nan")
    rows = speedups.written_embedding_rows(models[1])
    assert torch.equal(rows, input_ids.unique())
    expected = torch.nn.utils.clip_grad_norm_(models[0].parameters(), max_norm)
    total = speedups.clip_gradients_by_rows(models[1], rows, max_norm)
    torch.testing.assert_close(total, expected, equal_nan=True)
    embedding = models[1].get_input_embeddings().weight
    for (name, reference), actual in zip(models[0].named_parameters(), models[1].parameters()):
        if actual is embedding and case == "nan":
            reference, actual = reference.grad[rows], actual.grad[rows]
        else:
            reference, actual = reference.grad, actual.grad
        torch.testing.assert_close(actual, reference, equal_nan=True, msg=name)
    assert (case == "nan") is bool(expected.isnan()) and (case == "not-clipped") is bool(expected < max_norm)
    if case == "nan":
        assert embedding.grad[rows].isnan().all() and models[1].classifier.weight.grad.isnan().all()


def tiny_llama(vocab_size: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        tie_word_embeddings=True))


def test_loss_chunks_fit_their_memory_budget():
    import speedups

    for vocabulary in (400, 49152, 50257):
        cpu, gpu = speedups.loss_chunk_rows(vocabulary), speedups.loss_chunk_rows(vocabulary, on_gpu=True)
        assert 16 <= cpu <= 512 and (cpu == 16 or cpu * vocabulary * 4 <= speedups.LARGEST_MMAP_THRESHOLD)
        assert cpu <= gpu <= 8192 and gpu * vocabulary * 4 <= speedups.GPU_LOSS_CHUNK_BYTES
        assert gpu == 8192 or 2 * gpu * vocabulary * 4 > speedups.GPU_LOSS_CHUNK_BYTES  # the most that fits
    assert speedups.loss_chunk_rows(49152) == 128 and speedups.loss_chunk_rows(49152, on_gpu=True) == 2048


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_chunked_loss_equals_the_models_loss_and_gradients(tiny_gpt2, architecture, method, monkeypatch):
    import argparse

    import torch
    from transformers import AutoModelForCausalLM

    import common
    import speedups
    import text_generation_lora as script

    # Several chunks, the last one partial.
    monkeypatch.setattr(speedups, "loss_chunk_rows", lambda vocabulary, on_gpu=False: 7)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2) if architecture == "gpt2" else tiny_llama(400)
    if method == "lora":
        lora = argparse.Namespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=None,
                                  lora_variant="lora")
        model, _ = common.apply_lora(model, lora, "CAUSAL_LM")
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.1)
    torch.manual_seed(1)
    batch = script.collate_blocks([torch.randint(0, 400, (n,)).tolist() for n in (20, 13, 17)], pad_id=0)

    def loss_and_gradients(chunked: bool):
        model.zero_grad(set_to_none=True)
        if chunked:
            decoder, head = speedups.chunked_loss_parts(model)
            hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            shifted = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
            total = speedups.chunked_cross_entropy().apply(hidden.flatten(0, 1), head.weight, shifted.flatten(),
                                                         torch.float32)
            loss = total / (shifted != -100).sum()
        else:
            loss = model(**batch).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected_loss, expected = loss_and_gradients(chunked=False)
    loss, gradients = loss_and_gradients(chunked=True)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert gradients.keys() == expected.keys() and len(gradients) > 0
    if method == "full":
        assert any("wte" in name or "embed_tokens" in name for name in gradients)  # the tied output layer learns
    for name in expected:
        assert torch.allclose(gradients[name], expected[name], rtol=1e-4, atol=1e-6), name


def test_chunked_loss_is_not_used_where_it_would_change_the_loss(tiny_gpt2):
    from transformers import AutoModelForCausalLM

    import speedups

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    assert speedups.chunked_loss_parts(model) is not None
    model.config.model_type = "gemma2"  # soft-capped logits: not in the list
    assert speedups.chunked_loss_parts(model) is None


def test_lora_without_input_casting_is_exact_under_autocast():
    """speedups.for_training() turns off PEFT's cast of bf16 adapter inputs to fp32 (PEFT's own
    disable_input_dtype_casting): under bf16 autocast the logits and gradients are bit for bit
    those with the cast."""
    import argparse

    import torch

    import common
    import speedups

    lora = argparse.Namespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=["all-linear"],
                              lora_variant="lora")
    model, _ = common.apply_lora(tiny_llama(400), lora, "CAUSAL_LM")
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    torch.manual_seed(1)
    input_ids = torch.randint(0, 400, (2, 24))

    def logits_and_gradients(cast: bool):
        model.zero_grad(set_to_none=True)
        with speedups.for_training(model, [] if cast else ["lora_input_casting_off"]), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            assert all(m.cast_input_dtype_enabled is cast for m in model.modules() if hasattr(m, "cast_input_dtype_enabled"))
            output = model(input_ids=input_ids, labels=input_ids)
        output.loss.backward()
        return output.logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    cast_logits, cast_gradients = logits_and_gradients(cast=True)
    logits, gradients = logits_and_gradients(cast=False)
    assert torch.equal(logits, cast_logits)
    assert len(gradients) == len(cast_gradients) > 0
    assert all(torch.equal(a, b) for a, b in zip(gradients, cast_gradients))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_fast_attention_equals_sdpa_in_training(tiny_gpt2, architecture, precision):
    """The CPU training attention gives SDPA's loss and gradients, with padding, for GPT-2 and for
    grouped-query Llama attention: exactly in fp32, to bf16 rounding under bf16 autocast (where its
    softmax runs on the bf16 scores); evaluation and saving go back to SDPA."""
    import torch
    from transformers import AutoModelForCausalLM

    import speedups
    import text_generation_lora as script

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2) if architecture == "gpt2" else tiny_llama(400)
    model.config.attn_pdrop = model.config.resid_pdrop = model.config.embd_pdrop = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()
    torch.manual_seed(1)
    batch = script.collate_blocks([torch.randint(0, 400, (n,)).tolist() for n in (20, 13, 17)], pad_id=0)

    def loss_and_gradients():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(**batch).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected_loss, expected = loss_and_gradients()
    assert speedups._can_use_cpu_attention(model)
    speedups._use_cpu_attention(model)
    assert model.config._attn_implementation == speedups.CPU_ATTENTION
    loss, gradients = loss_and_gradients()
    if precision == "fp32":
        assert loss == pytest.approx(expected_loss, rel=1e-5)
        for name in expected:
            assert torch.allclose(gradients[name], expected[name], rtol=1e-4, atol=1e-6), name
    else:
        assert loss == pytest.approx(expected_loss, rel=1e-3)
        for name in expected:  # bf16 keeps 8 bits: compare each gradient as a whole
            assert (gradients[name] - expected[name]).norm() <= 0.03 * expected[name].norm() + 1e-6, name
    speedups.restore_attention(model)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("gpu", [True, False])
def test_attention_stays_off_cudnn_on_a_gpu(gpu, monkeypatch):
    import torch

    import speedups

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        applied = speedups.for_process()
        assert ("gpu_attention_without_cudnn" in applied) is gpu
        assert torch.backends.cuda.cudnn_sdp_enabled() is not gpu
        torch.backends.cuda.enable_cudnn_sdp(True)
        assert speedups.for_process(enabled=False) == [] and torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


# ---- the self-checks: a library change switches a trick off, never changes results ------------------


@pytest.fixture(scope="module")
def dropout_free_encoder(tiny_encoder, tmp_path_factory):
    """conftest's tiny BERT without dropout: a run's losses then depend on no random draw, so the
    runs with and without the speed tricks can be compared step by step."""
    import shutil

    from transformers import AutoConfig

    directory = tmp_path_factory.mktemp("dropout-free")
    shutil.copytree(tiny_encoder, directory, dirs_exist_ok=True)
    config = AutoConfig.from_pretrained(directory)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    config.save_pretrained(directory)
    return directory


def run_sentiment(model_dir, output_dir, *flags, precision="fp32"):
    """sentiment_finetuning.py in this process (a simulated library change is a monkeypatch)."""
    import common
    import sentiment_finetuning

    argv = ["--model-name", str(model_dir), "--output-dir", str(output_dir), "--epochs", "1", "--batch-size", "8",
            "--learning-rate", "1e-3", "--max-train-samples", "96", "--max-eval-samples", "48",
            "--precision", precision, *map(str, flags)]
    args = sentiment_finetuning.parse_args(argv)
    common.set_trust_remote_code(False)
    return sentiment_finetuning.run(args)


def _scale_bert_layer_output(monkeypatch):
    """A library release whose BERT layer computes something else (here: scales its output)."""
    from transformers.models.bert import modeling_bert

    forward = modeling_bert.BertLayer.forward
    monkeypatch.setattr(modeling_bert.BertLayer, "forward", lambda self, *a, **k: forward(self, *a, **k) * 1.5)


def _scale_sdpa(monkeypatch):
    """A library release whose SDPA attention computes something else."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def changed(*args, **kwargs):
        output, weights = sdpa(*args, **kwargs)
        return output * 1.5, weights

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", changed)


def _hooks_raise(monkeypatch):
    """A PyTorch release without forward pre-hooks as the embedding-gradient buffer uses them."""
    import torch

    def gone(*args, **kwargs):
        raise TypeError("register_forward_pre_hook() got an unexpected keyword argument")

    monkeypatch.setattr(torch.nn.Embedding, "register_forward_pre_hook", gone)


def _norm_by_rows_wrong(monkeypatch):
    """Clipping by rows whose norm no longer matches the library's (its first step shows it)."""
    import speedups

    by_rows = speedups.gradient_norm_by_rows
    monkeypatch.setattr(speedups, "gradient_norm_by_rows", lambda model, rows: by_rows(model, rows) * 2)


@pytest.mark.parametrize("trick, breaks, reason", [
    ("first_token_last_layer", _scale_bert_layer_output, "differs from the stock computation"),
    ("cpu_attention", _scale_sdpa, "differs from the stock computation"),
    ("embedding_gradient_buffer", _hooks_raise, "it raised TypeError"),
    ("clipping_by_rows", _norm_by_rows_wrong, "gradient norm"),
])
def test_a_library_change_switches_the_trick_off_with_one_line_and_the_run_keeps_the_stock_results(
        trick, breaks, reason, dropout_free_encoder, tmp_path, monkeypatch, capsys):
    """Each trick is checked against the stock computation on the run's own data: broken by a
    simulated library change, it says so in one line and the run trains exactly as a run without
    it would (here: as --no-speedups, the only trick on trial being this one)."""
    import speedups

    kept = "embedding_gradient_buffer" if trick == "clipping_by_rows" else trick
    monkeypatch.setattr(speedups, "TRICKS", [t for t in speedups.TRICKS if t.name == kept])
    stock = run_sentiment(dropout_free_encoder, tmp_path / "stock", "--no-speedups")
    capsys.readouterr()
    breaks(monkeypatch)
    broken = run_sentiment(dropout_free_encoder, tmp_path / "broken")
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"note: speedup {trick} ")]
    assert len(notes) == 1 and "switched off" in notes[0] and reason in notes[0], notes
    if trick != "clipping_by_rows":
        assert trick not in broken["train"]["speedups"]
    if trick in ("first_token_last_layer", "cpu_attention"):
        return  # the simulated change alters the library's own result too: compare with it below
    assert logged_losses_and_grad_norms(tmp_path / "broken") == pytest.approx(
        logged_losses_and_grad_norms(tmp_path / "stock"), rel=1e-5)
    assert broken["validation"]["loss"] == pytest.approx(stock["validation"]["loss"], rel=1e-5)


@pytest.mark.parametrize("trick, breaks", [("first_token_last_layer", _scale_bert_layer_output),
                                           ("cpu_attention", _scale_sdpa)])
def test_a_trick_switched_off_by_a_library_change_trains_like_the_changed_library(
        trick, breaks, dropout_free_encoder, tmp_path, monkeypatch):
    """The same simulated changes: the run follows the changed library, step by step, exactly as a
    --no-speedups run under that library does."""
    import speedups

    monkeypatch.setattr(speedups, "TRICKS", [t for t in speedups.TRICKS if t.name == trick])
    breaks(monkeypatch)
    stock = run_sentiment(dropout_free_encoder, tmp_path / "stock", "--no-speedups")
    broken = run_sentiment(dropout_free_encoder, tmp_path / "broken")
    assert broken["train"]["speedups"] == ["allocator"] or trick not in broken["train"]["speedups"]
    assert logged_losses_and_grad_norms(tmp_path / "broken") == pytest.approx(
        logged_losses_and_grad_norms(tmp_path / "stock"), rel=1e-5)
    assert broken["validation"]["loss"] == pytest.approx(stock["validation"]["loss"], rel=1e-5)


def test_fast_dropout_checks_its_own_draws(monkeypatch):
    """FastDropout's own check (dropout is off in the model probe) fails on a kernel that stops
    dropping, and for_model() then keeps torch's dropout."""
    import torch

    import speedups

    speedups.check_fast_dropout()
    monkeypatch.setattr(torch.Tensor, "masked_fill", lambda self, mask, value: self.clone())  # a broken kernel
    with pytest.raises(RuntimeError, match="dropped 0.000 of the values"):
        speedups.check_fast_dropout()


def test_fast_dropout_replaces_the_models_dropout_and_steps_aside_when_its_draws_fail(tiny_encoder, monkeypatch,
                                                                                     capsys):
    """The fast_dropout trick puts FastDropout in place of every active torch.nn.Dropout of a
    token classifier (and --no-speedups leaves them all); a kernel change that breaks its draws
    switches it off with one line and leaves torch's dropout in place."""
    import torch
    from transformers import AutoModelForTokenClassification

    import speedups

    monkeypatch.setattr(speedups, "TRICKS", [t for t in speedups.TRICKS if t.name == "fast_dropout"])
    probe = {"input_ids": torch.randint(5, 100, (4, 6)), "labels": torch.randint(0, 3, (4, 6))}

    def dropout_types(model):
        return {type(module) for module in model.modules() if isinstance(module, torch.nn.Dropout) and module.p > 0}

    def fresh_model():
        return AutoModelForTokenClassification.from_pretrained(tiny_encoder, num_labels=3)

    model = fresh_model()
    assert speedups.for_model(model, probe, "fp32", "token-classification") == ["fast_dropout"]
    assert dropout_types(model) == {speedups.fast_dropout_class()}
    model.train()
    outputs = [model(input_ids=probe["input_ids"]).logits for _ in range(2)]
    assert not torch.equal(*outputs)  # masks are drawn
    assert speedups.for_model(plain := fresh_model(), probe, "fp32", "token-classification", enabled=False) == []
    assert dropout_types(plain) == {torch.nn.Dropout}
    capsys.readouterr()

    monkeypatch.setattr(torch.Tensor, "masked_fill", lambda self, mask, value: self.clone())  # drops nothing
    broken = fresh_model()
    assert speedups.for_model(broken, probe, "fp32", "token-classification") == []
    notes = capsys.readouterr().out.splitlines()
    assert len(notes) == 1 and notes[0].startswith("note: speedup fast_dropout switched off (it raised RuntimeError: "
                                                   "dropped 0.000 of the values"), notes
    assert dropout_types(broken) == {torch.nn.Dropout}


# ---- with and without: the same training -------------------------------------------------------------


def test_the_speed_tricks_train_like_the_libraries_own_computation(dropout_free_encoder, tmp_path):
    """Every encoder trick on (fp32, no dropout: nothing random differs): the logged losses and
    gradient norms of every step, and the validation figures, are those of --no-speedups to 1e-4."""
    fast = run_sentiment(dropout_free_encoder, tmp_path / "fast")
    plain = run_sentiment(dropout_free_encoder, tmp_path / "plain", "--no-speedups")
    assert set(fast["train"]["speedups"]) >= {"first_token_last_layer", "cpu_attention", "embedding_gradient_buffer"}
    assert plain["train"]["speedups"] == []
    fast_log, plain_log = logged_losses_and_grad_norms(tmp_path / "fast"), logged_losses_and_grad_norms(tmp_path / "plain")
    assert len(fast_log) == len(plain_log) >= 6
    assert fast_log == pytest.approx(plain_log, rel=1e-4)
    assert fast["validation"]["loss"] == pytest.approx(plain["validation"]["loss"], rel=1e-4)


def test_the_ner_speed_tricks_train_like_the_libraries_own_computation(dropout_free_encoder, tmp_path):
    """The same for token classification through ner_finetuning.py: every step's loss and gradient
    norm, the validation loss and the test entity F1, as --no-speedups."""
    import common
    import ner_finetuning

    metrics = {}
    for name, flags in (("fast", ()), ("plain", ("--no-speedups",))):
        args = ner_finetuning.parse_args(["--model-name", str(dropout_free_encoder), "--output-dir", str(tmp_path / name),
                                          "--epochs", "1", "--batch-size", "16", "--learning-rate", "1e-3",
                                          "--fp32", *flags])
        common.set_trust_remote_code(False)
        metrics[name] = ner_finetuning.run(args)
    assert "cpu_attention" in metrics["fast"]["train"]["speedups"]
    assert metrics["plain"]["train"]["speedups"] == []
    fast_log, plain_log = logged_losses_and_grad_norms(tmp_path / "fast"), logged_losses_and_grad_norms(tmp_path / "plain")
    assert len(fast_log) == len(plain_log) >= 6
    assert fast_log == pytest.approx(plain_log, rel=1e-4)
    assert metrics["fast"]["test"]["f1"] == pytest.approx(metrics["plain"]["test"]["f1"], abs=1e-6)
    assert metrics["fast"]["validation"]["loss"] == pytest.approx(metrics["plain"]["validation"]["loss"], rel=1e-4)


@requires_cpu_bf16
def test_the_speed_tricks_under_bf16_stay_within_bf16_rounding(dropout_free_encoder, tmp_path):
    """The same under bf16 autocast, where the tricks' kernels round differently: every logged loss
    within 2% of --no-speedups'."""
    fast = run_sentiment(dropout_free_encoder, tmp_path / "fast", precision="bf16")
    plain = run_sentiment(dropout_free_encoder, tmp_path / "plain", "--no-speedups", precision="bf16")
    assert fast["precision"] == plain["precision"] == "bf16"
    losses = [[r["loss"] for r in training_log(tmp_path / name) if "grad_norm" in r] for name in ("fast", "plain")]
    assert len(losses[0]) == len(losses[1]) >= 6
    assert losses[0] == pytest.approx(losses[1], rel=0.02)


def test_text_generation_with_and_without_the_speed_tricks(tiny_gpt2, tmp_path):
    """GPT-2 with its dropout in fp32: the causal LM keeps SDPA (the CPU attention is for autocast),
    so both runs draw the same masks and train alike, the chunked loss and the fused adapter products
    rounding differently from the library's."""
    runs = {}
    for name, flags in (("fast", ()), ("plain", ("--no-speedups",))):
        result = run_script("text_generation_lora.py", "--model-name", tiny_gpt2, "--output-dir", tmp_path / name,
                            "--block-size", "64", "--max-steps", "4", "--batch-size", "4", "--max-new-tokens", "4",
                            "--fp32", "--merge-adapter", *flags)
        assert result.returncode == 0, result.stderr
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    fast, plain = runs["fast"], runs["plain"]
    assert "chunked_loss" in fast["train"]["speedups"] and "cpu_attention" not in fast["train"]["speedups"]
    assert plain["train"]["speedups"] == [] and plain["train"]["chunked_loss"] is False
    assert fast["perplexity_before"] == pytest.approx(plain["perplexity_before"], rel=1e-4)
    assert logged_losses_and_grad_norms(tmp_path / "fast") == pytest.approx(
        logged_losses_and_grad_norms(tmp_path / "plain"), rel=1e-3)
    assert fast["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-3)


def test_text_generation_trains_with_the_cpu_attention_under_autocast(tiny_gpt2, tmp_path, monkeypatch):
    """Under bf16 autocast (faked here on a CPU without native bf16: only slower) the causal LM
    trains with the CPU attention, checked against SDPA without a note."""
    import common
    import text_generation_lora as script

    monkeypatch.setattr(common, "cpu_supports_bf16", lambda: True)
    args = script.parse_args(["--model-name", str(tiny_gpt2), "--output-dir", str(tmp_path), "--block-size", "64",
                              "--max-steps", "2", "--batch-size", "4", "--max-new-tokens", "4", "--bf16"])
    assert script.main(args) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["precision"] == "bf16" and {"cpu_attention", "chunked_loss"} <= set(metrics["train"]["speedups"])
    assert metrics["perplexity_before"] > metrics["perplexity"] > 1


# ---- LoRA's fused products ------------------------------------------------------------------------


def lora_model(architecture: str, tiny_encoder):
    """A tiny BERT classifier (biased linears) or Llama (unbiased) with LoRA on every linear layer
    and non-zero adapters, so that the update reaches the outputs."""
    import argparse

    import torch
    from transformers import AutoModelForSequenceClassification

    import common

    lora = argparse.Namespace(lora_r=4, lora_alpha=12, lora_dropout=0.0, lora_target_modules=["all-linear"],
                              lora_variant="lora")
    if architecture == "llama":
        model, _ = common.apply_lora(tiny_llama(400), lora, "CAUSAL_LM")
    else:
        base = AutoModelForSequenceClassification.from_pretrained(tiny_encoder, num_labels=2,
                                                                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        model, _ = common.apply_lora(base, lora, "SEQ_CLS")
    torch.manual_seed(3)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.2)
    return model.train()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("architecture", ["bert", "llama"])
def test_fused_lora_products_give_peft_outputs_and_gradients(architecture, precision, tiny_encoder):
    """The fused adapter product against PEFT's layers on the same model: the loss, logits and every
    trained gradient (fp32, as PEFT's) to fp32 rounding, and under bf16 autocast (where both compute
    in bf16) within the self-check's tolerance; the adapter-free paths (disabled, merged) stay
    PEFT's, and removing the trick leaves no trace."""
    import torch

    import speedups

    model = lora_model(architecture, tiny_encoder)
    torch.manual_seed(0)
    input_ids = torch.randint(5, 100, (3, 11))
    labels = input_ids if architecture == "llama" else input_ids[:, 0] % 2

    def step() -> dict:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            output = model(input_ids=input_ids, labels=labels)
        output.loss.backward()
        result = {name: p.grad.float().clone() for name, p in model.named_parameters() if p.grad is not None}
        assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
        return {**result, "loss": output.loss.detach().float().reshape(1), "logits": output.logits.detach().float()}

    stock = step()
    fusable = speedups._fusable_lora_layers(model)
    assert len(fusable) == len([m for m in model.modules() if hasattr(m, "lora_A")]) >= 8
    speedups._fuse_lora_products(model)
    fused = step()
    assert fused.keys() == stock.keys() and any("lora_A" in name for name in fused)
    if precision == "fp32":  # the same products, summed in another order
        for name, value in fused.items():
            assert float((value - stock[name]).norm()) <= 1e-5 * float(stock[name].norm()), name
    # bf16: the self-check's own rule (5% of each tensor's norm plus an allowance for gradients
    # that are near zero in exact arithmetic, such as the keys')
    assert speedups._difference(stock, fused, precision) is None
    stock_logits = stock["logits"]
    with torch.no_grad():
        with model.disable_adapter():
            base_logits = model(input_ids=input_ids).logits
        model.merge_adapter()
        merged_logits = model(input_ids=input_ids).logits
        model.unmerge_adapter()
    assert not torch.allclose(base_logits, stock_logits, atol=1e-3)
    if precision == "fp32":
        assert torch.allclose(merged_logits, stock_logits, atol=1e-5)
    speedups._unfuse_lora_products(model)
    assert not any("forward" in vars(module) for module in model.modules())


def test_fused_lora_products_leave_other_adapters_to_peft(tiny_gpt2, tiny_encoder):
    """GPT-2's transposed Conv1D layers, DoRA and adapter dropout keep PEFT's layers."""
    import argparse

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    import common
    import speedups

    def adapted(model, task_type, **flags):
        lora = argparse.Namespace(**{"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lora_variant": "lora",
                                     "lora_target_modules": None, **flags})
        return common.apply_lora(model, lora, task_type)[0]

    assert speedups._fusable_lora_layers(adapted(AutoModelForCausalLM.from_pretrained(tiny_gpt2), "CAUSAL_LM")) == []
    for flags in ({"lora_variant": "dora"}, {"lora_dropout": 0.1}):
        model = adapted(AutoModelForSequenceClassification.from_pretrained(tiny_encoder, num_labels=2), "SEQ_CLS", **flags)
        assert speedups._fusable_lora_layers(model) == []
    assert speedups._fusable_lora_layers(AutoModelForSequenceClassification.from_pretrained(tiny_encoder)) == []


def run_lora(model_dir, output_dir, *flags):
    """lora_finetuning.py in this process, fp32 (a simulated library change is a monkeypatch)."""
    argv = ["--model-name", str(model_dir), "--output-dir", str(output_dir), "--epochs", "1", "--batch-size", "8",
            "--learning-rate", "5e-3", "--max-train-samples", "96", "--max-eval-samples", "48", "--precision", "fp32",
            *flags]
    result = run_main("lora_finetuning.py", *argv)
    assert result.returncode == 0, result.stderr
    return json.loads((Path(output_dir) / "metrics.json").read_text()), result.stdout


def test_lora_with_fused_products_trains_like_peft(dropout_free_encoder, tmp_path):
    """Through the script (fp32, no dropout): the logged losses and gradient norms of every step and
    the validation loss are those of --no-speedups to 1e-4."""
    fast, _ = run_lora(dropout_free_encoder, tmp_path / "fast")
    plain, _ = run_lora(dropout_free_encoder, tmp_path / "plain", "--no-speedups")
    assert "fused_lora_products" in fast["train"]["speedups"] and plain["train"]["speedups"] == []
    fast_log, plain_log = logged_losses_and_grad_norms(tmp_path / "fast"), logged_losses_and_grad_norms(tmp_path / "plain")
    assert len(fast_log) == len(plain_log) >= 6
    assert fast_log == pytest.approx(plain_log, rel=1e-4)
    assert fast["validation"]["loss"] == pytest.approx(plain["validation"]["loss"], rel=1e-4)


def test_a_peft_change_switches_the_fused_products_off_and_the_run_follows_peft(
        dropout_free_encoder, tmp_path, monkeypatch):
    """A PEFT release whose LoRA layers compute something else (here: scale their output): the
    fused products disagree on the probe, say so in one line, and the run trains exactly as a
    --no-speedups run under that release."""
    from peft.tuners.lora import layer

    import speedups

    monkeypatch.setattr(speedups, "TRICKS", [t for t in speedups.TRICKS if t.name == "fused_lora_products"])
    forward = layer.Linear.forward
    monkeypatch.setattr(layer.Linear, "forward", lambda self, x, *a, **k: forward(self, x, *a, **k) * 1.5)
    stock, _ = run_lora(dropout_free_encoder, tmp_path / "stock", "--no-speedups")
    broken, output = run_lora(dropout_free_encoder, tmp_path / "broken")
    notes = [line for line in output.splitlines() if line.startswith("note: speedup fused_lora_products ")]
    assert len(notes) == 1 and "differs from the stock computation" in notes[0], notes
    assert "fused_lora_products" not in broken["train"]["speedups"]
    assert logged_losses_and_grad_norms(tmp_path / "broken") == pytest.approx(
        logged_losses_and_grad_norms(tmp_path / "stock"), rel=1e-5)
    assert broken["validation"]["loss"] == pytest.approx(stock["validation"]["loss"], rel=1e-5)
