"""Instruction data for text_generation_lora.py: the record shapes, the prompt template, the loss
on response tokens only, records skipped rather than cut, and answers scored before and after."""

from __future__ import annotations

import json

import pytest

from conftest import run_main, run_script, write_rows

SCRIPT = "text_generation_lora.py"
SHAPES = {
    "prompt/response": {"prompt": "How long do I boil an egg?", "response": "Short answer: 9 minutes."},
    "instruction/output": {"instruction": "How long do I boil an egg?", "input": "", "output": "Short answer: 9 minutes."},
    "messages": {"messages": [{"role": "user", "content": "How long do I boil an egg?"},
                              {"role": "assistant", "content": "Short answer: 9 minutes."}]},
}


def plain_tokenizer(model_dir):
    """The tiny GPT-2's tokenizer (no chat template of its own) with the script's plain template."""
    from transformers import AutoTokenizer

    import text_generation_lora as script

    tokenizer = script.prepare_tokenizer(AutoTokenizer.from_pretrained(model_dir))
    tokenizer.chat_template = script.PLAIN_CHAT_TEMPLATE
    return tokenizer


@pytest.mark.parametrize("train_on_prompts", [False, True], ids=["responses", "prompts-too"])
def test_every_record_shape_gives_the_same_example_with_the_loss_on_the_response(tiny_gpt2, train_on_prompts):
    import text_generation_lora as script

    tokenizer = plain_tokenizer(tiny_gpt2)
    examples = []
    for name, row in SHAPES.items():
        records = script.read_records([row], name)
        encoded, skipped = script.encode_records(tokenizer, records, 128, train_on_prompts)
        assert skipped == 0
        examples.append(encoded[0])
    assert all(e["input_ids"] == examples[0]["input_ids"] and e["labels"] == examples[0]["labels"] for e in examples)
    example = examples[0]
    prompt = "### Instruction:\nHow long do I boil an egg?\n\n### Response:\n"
    assert example["prompt"] == prompt
    prompt_length = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    answer = example["input_ids"][prompt_length:]
    assert tokenizer.decode(answer) == "Short answer: 9 minutes.<|endoftext|>\n\n"
    if train_on_prompts:
        assert example["labels"] == example["input_ids"]
    else:
        assert example["labels"] == [-100] * prompt_length + answer


def test_a_chat_template_formats_the_records_and_the_input_joins_the_instruction(tiny_gpt2):
    import text_generation_lora as script

    tokenizer = plain_tokenizer(tiny_gpt2)
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</turn>{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    records = script.read_records([{"instruction": "Convert", "input": "1 cup to ml", "output": "240 ml."}], "test")
    assert records == [([{"role": "user", "content": "Convert\n\n1 cup to ml"}], "240 ml.")]
    example = script.encode_records(tokenizer, records, 128, False)[0][0]
    assert example["prompt"] == "<user>Convert\n\n1 cup to ml</turn><assistant>"
    answer = [token for token, label in zip(example["input_ids"], example["labels"]) if label != -100]
    assert tokenizer.decode(answer) == "240 ml.</turn>"


def test_long_records_are_skipped_never_cut(tiny_gpt2):
    import text_generation_lora as script

    tokenizer = plain_tokenizer(tiny_gpt2)
    records = script.read_records([{"prompt": "Soup?", "response": "Salt."},
                                   {"prompt": "Soup " * 200, "response": "Salt."}], "test")
    examples, skipped = script.encode_records(tokenizer, records, 64, False)
    assert skipped == 1 and len(examples) == 1 and examples[0]["reference"] == "Salt."


def test_exact_match_and_rouge_l():
    import text_generation_lora as script

    scores = script.score_answers(["Short answer:  9 minutes.", "Boil it."], ["short answer: 9 minutes.", "Boil it for 9 minutes."])
    assert scores["exact_match"] == 0.5
    # ROUGE-L F1 of "boil it" against "boil it for 9 minutes": precision 1, recall 2/5 -> 4/7; mean with 1.
    assert scores["rougeL"] == pytest.approx((1 + 4 / 7) / 2, abs=1e-4)


def test_instruction_run_scores_answers_before_and_after_and_prompts_use_the_template(tiny_gpt2, tmp_path):
    """A run on instruction records: validation perplexity on the response tokens, exact match and
    ROUGE-L of greedy answers before and after, samples.md with the references; --prompt on the
    saved model answers through the same template."""
    import torch
    from transformers import AutoModelForCausalLM

    import text_generation_lora as script

    rows = [{"prompt": f"Which spice goes with dish {i}?", "response": f"Short answer: spice {i % 3}."} for i in range(30)]
    train = write_rows(tmp_path / "train.jsonl", rows[:24])
    validation = write_rows(tmp_path / "validation.jsonl", rows[24:])
    output_dir = tmp_path / "out"
    result = run_script(SCRIPT, "--model-name", tiny_gpt2, "--train-file", train, "--validation-file", validation,
                        "--epochs", "2", "--batch-size", "4", "--max-new-tokens", "6", "--output-dir", output_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "prompt format: the plain template" in result.stdout
    metrics = json.loads((output_dir / "metrics.json").read_text())
    validation_metrics = metrics["validation"]
    for key in ("exact_match_before", "exact_match", "rougeL_before", "rougeL"):
        assert 0 <= validation_metrics[key] <= 1
    assert validation_metrics["answered"] == 6 and metrics["train"]["records"] == 24
    assert json.loads((output_dir / "run_config.json").read_text())["data_kind"] == "instruction"

    tokenizer = plain_tokenizer(tiny_gpt2)
    examples, _ = script.encode_records(tokenizer, script.read_records(rows[24:], "v"), 128, False)
    response_tokens = sum(sum(label != -100 for label in e["labels"][1:]) for e in examples)
    assert validation_metrics["tokens"] == response_tokens, "perplexity counts the response tokens only"
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    expected = script.perplexity(base, examples, 8, tokenizer.pad_token_id, metrics["precision"])
    assert metrics["perplexity_before"] == pytest.approx(expected["perplexity"], rel=1e-4)

    samples = (output_dir / "samples.md").read_text()
    assert samples.count("### Reference") == 6 and "Short answer: spice 0." in samples
    assert "Which spice goes with dish 24?" in samples

    answered = run_main(SCRIPT, "--output-dir", output_dir, "--prompt", "Which spice goes with dish 3?",
                          "--temperature", "0", "--max-new-tokens", "6")
    assert answered.returncode == 0, answered.stderr
    model, saved_tokenizer = script.load_saved(output_dir)
    prompt = script.format_prompt(saved_tokenizer, [{"role": "user", "content": "Which spice goes with dish 3?"}])
    assert prompt.startswith("### Instruction:\n")
    inputs = saved_tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=6, do_sample=False, repetition_penalty=1.1,
                                pad_token_id=saved_tokenizer.pad_token_id)
    expected_answer = saved_tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answered.stdout.startswith(f"Which spice goes with dish 3?\n{expected_answer}")
