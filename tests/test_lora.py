"""lora_finetuning.py: target defaults, heads saved with the adapter, switching, merging, the report."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
from conftest import assert_clean_error, build_tiny_encoder, run_script

SCRIPT = "lora_finetuning.py"
FAST = ("--epochs", "1", "--batch-size", "16", "--learning-rate", "5e-3", "--max-train-samples", "96",
        "--max-eval-samples", "40")
LABELS = ["negative", "positive"]


@pytest.fixture(scope="module")
def tiny_encoders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encoders")
    return {kind: build_tiny_encoder(root / kind, kind=kind) for kind in ("bert", "distilbert", "roberta")}


def lora_args(**overrides) -> argparse.Namespace:
    values = dict(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=None, lora_variant="lora",
                  lora_layers=None)
    values.update(overrides)
    return argparse.Namespace(**values)


def make_adapter(model_dir: Path, output_dir: Path, seed: int):
    """A LoRA classifier with random (non-zero) adapter and head weights, saved like the script saves it."""
    import torch
    from transformers import AutoTokenizer

    from transformers import AutoModelForSequenceClassification

    import common
    import encoders

    torch.manual_seed(seed)
    resolved = common.ResolvedModel(path=str(model_dir), name=str(model_dir))
    model, fresh = encoders.load_with_fresh_head(AutoModelForSequenceClassification, resolved, LABELS, "classification")
    head = encoders.lora_head_modules(model, fresh)
    model, _ = common.apply_lora(model, lora_args(), "SEQ_CLS", head)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:  # adapters and the head: as if trained
                parameter.add_(torch.randn_like(parameter) * 0.5)
    model.save_pretrained(output_dir)
    (output_dir / "run_config.json").write_text(json.dumps({"model_path": str(model_dir), "labels": LABELS}))
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(output_dir)
    return model.eval(), head


def logits(model, model_dir: Path, texts=("great phone", "the soup was cold and bland", "never again")):
    import torch
    from transformers import AutoTokenizer

    inputs = AutoTokenizer.from_pretrained(model_dir)(list(texts), padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits


# ---- target modules ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, expected", [("distilbert", ["q_lin", "v_lin"]), ("bert", ["query", "value"]),
                                            ("roberta", ["query", "value"])])
def test_default_target_modules_per_architecture(tiny_encoders, kind, expected):
    from transformers import AutoModelForSequenceClassification

    import common

    model = AutoModelForSequenceClassification.from_pretrained(tiny_encoders[kind], num_labels=2)
    assert common.lora_target_modules(model, None) == expected
    assert common.lora_target_modules(model, ["all-linear"]) == "all-linear"


@pytest.mark.parametrize("kind", ["distilbert", "bert", "roberta"])
def test_lora_finetuning_adapts_every_block_linear_and_leaves_the_head_to_full_training(tiny_encoders, kind):
    """lora_finetuning.py's classification default: an adapter on each linear layer of the top two
    thirds of the transformer blocks, none on the pooler or the classification head (those are
    trained in full), and the base model's dropout off unless --keep-base-dropout."""
    import torch
    from transformers import AutoModelForSequenceClassification

    import encoders
    import lora_finetuning

    model = AutoModelForSequenceClassification.from_pretrained(tiny_encoders[kind], num_labels=2, num_hidden_layers=3)
    top_two_layers = {name for name, module in model.named_modules()
                      if isinstance(module, torch.nn.Linear) and (".layer.1." in name or ".layer.2." in name)}
    args = lora_finetuning.parse_args(["--model-name", str(tiny_encoders[kind])])
    assert args.lora_r == 16 and args.lora_target_modules is None and args.lora_layers is None
    fresh = [name for name, _ in model.named_parameters() if "classifier" in name]
    model, record = encoders.prepare_for_method(model, fresh, args, "lora", "SEQ_CLS")
    adapted = {name.removeprefix("base_model.model.") for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == top_two_layers and len(adapted) == 6 * 2 and record["layers"] == 2  # the top two thirds of 3
    assert record["base_dropout"] == "off" and not any(m.p for m in model.modules() if isinstance(m, torch.nn.Dropout))

    kept = AutoModelForSequenceClassification.from_pretrained(tiny_encoders[kind], num_labels=2)
    probabilities = [m.p for m in kept.modules() if isinstance(m, torch.nn.Dropout)]
    args = lora_finetuning.parse_args(["--model-name", str(tiny_encoders[kind]), "--keep-base-dropout"])
    kept, record = encoders.prepare_for_method(kept, fresh, args, "lora", "SEQ_CLS")
    assert record["base_dropout"] == "kept" and any(probabilities)
    assert {m.p for m in kept.modules() if isinstance(m, torch.nn.Dropout)} == set(probabilities)  # PEFT copies head modules


def test_gpt2_default_target_is_c_attn(tiny_gpt2):
    from transformers import AutoModelForCausalLM

    import common

    assert common.lora_target_modules(AutoModelForCausalLM.from_pretrained(tiny_gpt2), None) == ["c_attn"]


# ---- the head is trained and saved with the adapter ---------------------------------------------


# BERT's pooler is pretrained, not fresh, but the classifier reads it: it is trained with the head.
@pytest.mark.parametrize("kind, head", [("distilbert", {"pre_classifier", "classifier"}),
                                        ("bert", {"classifier", "pooler"}), ("roberta", {"classifier"})])
def test_fresh_head_modules_are_saved_and_reload_gives_the_same_predictions(tiny_encoders, kind, head, tmp_path):
    import lora_finetuning

    model, saved_head = make_adapter(tiny_encoders[kind], tmp_path, seed=1)
    assert set(saved_head) == head
    before = logits(model, tiny_encoders[kind])
    reloaded, _, record = lora_finetuning.load_adapters([tmp_path])
    assert record["labels"] == LABELS
    assert (before - logits(reloaded, tiny_encoders[kind])).abs().max() < 1e-5


# ---- switching and merging -------------------------------------------------------------------------


def test_switching_adapters_gives_each_adapters_own_predictions(tiny_encoders, tmp_path):
    import lora_finetuning

    model_dir = tiny_encoders["bert"]
    first, _ = make_adapter(model_dir, tmp_path / "a", seed=1)
    second, _ = make_adapter(model_dir, tmp_path / "b", seed=2)
    expected = [logits(first, model_dir), logits(second, model_dir)]
    assert (expected[0] - expected[1]).abs().max() > 1e-3
    model, names, _ = lora_finetuning.load_adapters([tmp_path / "a", tmp_path / "b"])
    for name, want in zip(names * 2, expected * 2):  # back and forth, without reloading the base
        model.set_adapter(name)
        assert (logits(model, model_dir) - want).abs().max() < 1e-5


def test_merged_model_equals_adapter_on_base_and_needs_no_peft(tiny_encoders, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model_dir = tiny_encoders["distilbert"]
    adapted, _ = make_adapter(model_dir, tmp_path, seed=3)
    result = run_script(SCRIPT, "--output-dir", tmp_path, "--merge-adapter")
    assert result.returncode == 0, result.stderr
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    assert merged.config.id2label == {0: "negative", 1: "positive"}
    assert (logits(adapted, model_dir) - logits(merged, model_dir)).abs().max() < 1e-4


def test_predict_with_several_adapters_prints_each_adapters_own_predictions(tiny_encoders, tmp_path):
    """Through the CLI, switching adapters on one base: under each adapter's heading, every printed
    label and score is that adapter's own prediction, computed here from the adapter alone."""
    model_dir = tiny_encoders["bert"]
    texts = ["lovely", "awful", "the soup was cold and bland"]
    expected = {}
    for name, seed in (("a", 1), ("b", 4)):
        model, _ = make_adapter(model_dir, tmp_path / name, seed=seed)
        probabilities = logits(model, model_dir, texts).softmax(-1)
        expected[name] = [(LABELS[int(row.argmax())], f"{float(row.max()):.3f}") for row in probabilities]
    assert expected["a"] != expected["b"], "the two adapters must disagree somewhere for the test to mean anything"
    result = run_script(SCRIPT, "--adapter", tmp_path / "a", "--adapter", tmp_path / "b",
                        *[arg for text in texts for arg in ("--predict", text)])
    assert result.returncode == 0, result.stderr
    printed, current = {}, None
    for line in result.stdout.splitlines():
        if line.startswith("adapter "):
            current = Path(line.split()[1]).name
            assert "base not reloaded" in line
            printed[current] = []
        elif current and line.split()[:1] in (["negative"], ["positive"]):
            label, score, text = line.split(maxsplit=2)
            printed[current].append((label, score))
            assert text == texts[len(printed[current]) - 1]
    assert printed == expected


# ---- the CLI end to end and the comparison report ------------------------------------------------------


def test_lora_run_trains_only_adapters_and_head(tiny_encoders, tmp_path):
    result = run_script(SCRIPT, "--model-name", tiny_encoders["distilbert"], "--output-dir", tmp_path, *FAST)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["method"] == "lora"
    assert metrics["lora"]["target_modules"] == ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"]
    assert metrics["lora"]["modules_to_save"] == ["classifier", "pre_classifier"]
    assert metrics["lora"]["base_dropout"] == "off" and "the base model's dropout off" in (tmp_path / "README.md").read_text()
    import torch
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_encoders["distilbert"], num_labels=2)
    adapters = sum(16 * (m.in_features + m.out_features) for name, m in base.named_modules()
                   if isinstance(m, torch.nn.Linear) and ".layer." in name)
    head = sum(p.numel() for name, p in base.named_parameters() if "classifier" in name)
    assert metrics["params"]["trainable"] == adapters + head
    assert (tmp_path / "adapter_model.safetensors").is_file() and not (tmp_path / "model.safetensors").exists()
    assert "reduction" in result.stdout


# ---- token classification (--task ner) -------------------------------------------------------------

NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
NER_FAST = ("--epochs", "1", "--batch-size", "16", "--learning-rate", "5e-3", "--max-train-samples", "64",
            "--max-eval-samples", "20")


@pytest.mark.parametrize("kind", ["distilbert", "bert", "roberta"])
def test_token_classification_adapter_reloads_with_its_head(tiny_encoders, kind, tmp_path):
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    import common
    import encoders
    import lora_finetuning

    torch.manual_seed(4)
    model, fresh = encoders.load_with_fresh_head(AutoModelForTokenClassification,
                                               common.ResolvedModel(path=str(tiny_encoders[kind]), name=kind), NER_LABELS, "ner")
    head = encoders.lora_head_modules(model, fresh)
    assert head == ["classifier"]  # token classification has no pooler
    model, _ = common.apply_lora(model, lora_args(), "TOKEN_CLS", head)
    with torch.no_grad():
        for parameter in (p for p in model.parameters() if p.requires_grad):
            parameter.add_(torch.randn_like(parameter) * 0.5)
    model.save_pretrained(tmp_path)
    (tmp_path / "run_config.json").write_text(json.dumps({"model_path": str(tiny_encoders[kind]), "labels": NER_LABELS,
                                                          "task": "ner"}))
    inputs = AutoTokenizer.from_pretrained(tiny_encoders[kind])(["Ada Lovelace lived in London"], return_tensors="pt")
    with torch.no_grad():
        before = model.eval()(**inputs).logits
        reloaded, _, record = lora_finetuning.load_adapters([tmp_path])
        after = reloaded(**inputs).logits
    assert record["task"] == "ner" and after.shape[-1] == len(NER_LABELS)
    assert (before - after).abs().max() < 1e-5


def test_ner_lora_run_predict_and_merge(tiny_encoders, tmp_path):
    from transformers import AutoModelForTokenClassification

    result = run_script(SCRIPT, "--task", "ner", "--model-name", tiny_encoders["bert"], "--output-dir", tmp_path, *NER_FAST,
                        "--merge-adapter")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["task"] == "token-classification" and metrics["method"] == "lora"
    assert metrics["lora"]["target_modules"] == ["query", "key", "value", "intermediate.dense", "output.dense"]
    assert metrics["lora"]["layers"] is None  # NER adapts every layer
    assert metrics["lora"]["modules_to_save"] == ["classifier"]
    assert 0 <= metrics["test"]["f1"] <= 1 and "per_type" in metrics["test"]
    assert (tmp_path / "adapter_model.safetensors").is_file() and not (tmp_path / "model.safetensors").exists()
    assert metrics["saved_size_mb"] < 0.5 * sum(f.stat().st_size for f in (tmp_path / "merged").glob("*.safetensors")) / 2**20

    merged = AutoModelForTokenClassification.from_pretrained(tmp_path / "merged")
    assert set(merged.config.id2label.values()) == set(metrics["labels"])
    # The adapter knows its task: no --task needed to predict with it.
    adapter_run = run_script(SCRIPT, "--output-dir", tmp_path, "--predict", "Maria Costa flew to Lisbon.")
    merged_run = run_script("ner_finetuning.py", "--output-dir", tmp_path / "merged", "--predict",
                            "Maria Costa flew to Lisbon.")
    assert adapter_run.returncode == 0 and merged_run.returncode == 0, adapter_run.stderr + merged_run.stderr
    entity_lines = lambda out: [line for line in out.splitlines() if line.startswith("  ")]  # noqa: E731
    assert entity_lines(adapter_run.stdout) == entity_lines(merged_run.stdout)
    assert "Maria Costa flew to Lisbon." in adapter_run.stdout


def test_compare_runs_of_different_tasks(tiny_encoders, tmp_path):
    for directory, task in (("a", "text-classification"), ("b", "token-classification")):
        (tmp_path / directory).mkdir()
        method = "full" if directory == "a" else "lora"
        (tmp_path / directory / "metrics.json").write_text(json.dumps({"task": task, "method": method}))
    result = run_script(SCRIPT, "--compare-runs", tmp_path / "a", tmp_path / "b", "--output-dir", tmp_path / "out")
    assert_clean_error(result, "cannot compare a 'text-classification' run with a 'token-classification' run")


# ---- bad input -------------------------------------------------------------------------------------------


def test_merge_adapter_on_a_full_model(tiny_encoders, tmp_path):
    shutil.copytree(tiny_encoders["bert"], tmp_path / "full")
    result = run_script(SCRIPT, "--output-dir", tmp_path / "full", "--merge-adapter")
    assert_clean_error(result, "holds a full model, not a LoRA adapter")


def test_adapter_whose_base_model_is_missing(tiny_encoders, tmp_path):
    moved = tmp_path / "base"
    shutil.copytree(tiny_encoders["bert"], moved)
    make_adapter(moved, tmp_path / "adapter", seed=1)
    shutil.rmtree(moved)
    result = run_script(SCRIPT, "--output-dir", tmp_path / "adapter", "--predict", "hi")
    assert_clean_error(result, "base model", "is missing")


def test_adapters_of_different_base_models(tiny_encoders, tmp_path):
    make_adapter(tiny_encoders["bert"], tmp_path / "a", seed=1)
    make_adapter(tiny_encoders["roberta"], tmp_path / "b", seed=1)
    result = run_script(SCRIPT, "--adapter", tmp_path / "a", "--adapter", tmp_path / "b", "--predict", "hi")
    assert_clean_error(result, "different base models")


def test_target_modules_that_match_nothing_list_the_modules(tiny_encoders, tmp_path):
    result = run_script(SCRIPT, "--model-name", tiny_encoders["bert"], "--output-dir", tmp_path, *FAST,
                        "--lora-target-modules", "q_proj")
    assert_clean_error(result, "no such linear module", "query", "value")


# ---- LoRA's speed trick: frozen weights in bf16 ----------------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_frozen_weights_in_bf16_train_exactly_like_autocasts_casts(tiny_encoders, kind, tmp_path):
    """Autocast would cast the frozen fp32 weights to the same bf16 values at every step: storing
    them in bf16 once gives the same logits and the same gradients of everything trained, which
    stays fp32; stepping aside puts the fp32 weights back exactly."""
    import torch

    import speedups

    models = [make_adapter(tiny_encoders[kind], tmp_path / str(copy), seed=0)[0].train() for copy in range(2)]
    originals = {name: p.detach().clone() for name, p in models[1].named_parameters()}
    assert speedups._has_frozen_fp32_linears(models[1])
    speedups._store_frozen_weights_in_bf16(models[1])
    assert len(models[1].fp32_frozen_weights) >= 4 * 2  # at least every layer's four attention projections
    assert all(p.dtype == torch.float32 for p in models[1].parameters() if p.requires_grad)
    assert {p.dtype for p in models[1].parameters() if not p.requires_grad} == {torch.float32, torch.bfloat16}
    input_ids = torch.randint(5, 100, (4, 9), generator=torch.Generator().manual_seed(0))
    outputs = []
    for model in models:
        torch.manual_seed(1)  # the same dropout masks
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids[:, 0] % 2)
        output.loss.backward()
        outputs.append(output.logits)
    assert torch.equal(outputs[0], outputs[1])
    for (name, reference), actual in zip(models[0].named_parameters(), models[1].parameters()):
        if reference.requires_grad:
            assert torch.equal(actual.grad, reference.grad), name
    speedups._restore_frozen_weights(models[1])
    for name, parameter in models[1].named_parameters():
        assert parameter.dtype == torch.float32 and torch.equal(parameter, originals[name]), name


def test_lora_run_with_its_tricks_logs_the_training_of_one_without(tiny_encoders, tmp_path):
    """Through the script, in bf16 with dropout off (nothing random differs): LoRA's frozen weights
    in bf16 and its other tricks give the losses and gradient norms of --no-speedups to bf16
    rounding, and an fp32 adapter on disk."""
    import shutil

    from safetensors import safe_open
    from transformers import AutoConfig

    from conftest import EXPECTED_PRECISION, logged_losses_and_grad_norms

    if EXPECTED_PRECISION != "bf16":
        pytest.skip("the CPU has no native bf16 (AVX-512 BF16 or AMX)")
    model_dir = tmp_path / "no-dropout"
    shutil.copytree(tiny_encoders["bert"], model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    config.save_pretrained(model_dir)
    logs = {}
    for flags in ((), ("--no-speedups",)):
        output_dir = tmp_path / ("plain" if flags else "fast")
        result = run_script(SCRIPT, "--model-name", model_dir, "--output-dir", output_dir, *FAST, "--bf16", *flags)
        assert result.returncode == 0, result.stderr
        metrics = json.loads((output_dir / "metrics.json").read_text())
        assert ("frozen_weights_in_bf16" in metrics["train"]["speedups"]) is not bool(flags)
        logs[flags] = logged_losses_and_grad_norms(output_dir)
        with safe_open(output_dir / "adapter_model.safetensors", "pt") as saved:
            assert {str(saved.get_slice(key).get_dtype()) for key in saved.keys()} == {"F32"}
    fast, plain = logs.values()
    assert len(fast) == len(plain) >= 4
    assert fast == pytest.approx(plain, rel=0.03)


def test_lora_layers_adapts_the_top_layers_only_and_skips_the_backward_below(tiny_encoders):
    import torch
    from transformers import AutoModelForSequenceClassification

    import common
    import encoders

    resolved = common.ResolvedModel(path=str(tiny_encoders["bert"]), name="bert")
    model, fresh = encoders.load_with_fresh_head(AutoModelForSequenceClassification, resolved, LABELS, "classification")
    model, _ = common.apply_lora(model, lora_args(lora_layers=1, lora_target_modules=["query", "value", "output.dense"]),
                                 "SEQ_CLS", encoders.lora_head_modules(model, fresh))
    adapted = sorted({name.split(".lora_A")[0] for name, _ in model.named_parameters() if ".lora_A" in name})
    assert adapted and all(".layer.1." in name for name in adapted), adapted  # the top one of two layers
    assert any(name.endswith("attention.output.dense") for name in adapted)  # a dotted target, as PEFT matches it
    # The lower layer gets no backward pass: its output needs no gradient.
    seen = {}
    model.base_model.model.bert.encoder.layer[0].register_forward_hook(lambda m, i, o: seen.update(low=o[0].requires_grad))
    model.base_model.model.bert.encoder.layer[1].register_forward_hook(lambda m, i, o: seen.update(high=o[0].requires_grad))
    model(input_ids=torch.tensor([[2, 10, 11, 3]]), labels=torch.tensor([1])).loss.backward()
    assert seen == {"low": False, "high": True}
    fresh_model, fresh = encoders.load_with_fresh_head(AutoModelForSequenceClassification, resolved, LABELS, "classification")
    with pytest.raises(common.UserError, match="--lora-layers 3: the model has 2 layers"):
        common.apply_lora(fresh_model, lora_args(lora_layers=3), "SEQ_CLS", [])



def test_all_linear_on_the_top_layers_adapts_the_linear_layers_of_those_layers(tiny_encoders):
    """PEFT picks layers only for named modules: `all-linear` with the default top layers (or
    --lora-layers) becomes the names of the linear layers inside the numbered layers."""
    import torch
    from transformers import AutoModelForSequenceClassification

    import encoders
    import lora_finetuning

    model = AutoModelForSequenceClassification.from_pretrained(tiny_encoders["bert"], num_labels=2, num_hidden_layers=3)
    expected = {name for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear) and (".layer.1." in name or ".layer.2." in name)}
    args = lora_finetuning.parse_args(["--model-name", str(tiny_encoders["bert"]), "--lora-target-modules", "all-linear"])
    model, record = encoders.prepare_for_method(model, ["classifier.weight", "classifier.bias"], args, "lora", "SEQ_CLS")
    adapted = {name.removeprefix("base_model.model.") for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == expected and record["layers"] == 2
    assert record["target_modules"] == ["dense", "key", "query", "value"]
