"""Bad input, for all four scripts: one clear `error:` line on stderr, exit code 2, no traceback,
and nothing saved before is changed. docs/errors.md lists these cases.

The scripts run inside this process, through the same `common.run_cli(main)` that `python script.py`
runs: a fresh interpreter per case would spend most of this file importing torch and transformers
(an exception that escapes main() is printed as a traceback, so the checks see what a user would).
`test_real_process_*` run a few cases as separate processes to show that both ways agree.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import assert_clean_error, run_main, run_script, snapshot, write_rows

import common

SENTIMENT, NER, LORA, GENERATION = ("sentiment_finetuning.py", "ner_finetuning.py", "lora_finetuning.py",
                                    "text_generation_lora.py")
LORA_NER = "lora_finetuning.py --task ner"  # LoRA on NER data: lora_finetuning.py with ner_finetuning.py's data flags
SCRIPTS = (SENTIMENT, NER, LORA, LORA_NER, GENERATION)
ENCODER_SCRIPTS = (SENTIMENT, NER, LORA, LORA_NER)
NER_DATA = (NER, LORA_NER)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """The hub is never contacted; every run is a plain (not distributed) one."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def guard(tmp_path) -> tuple[str, str]:
    """A model that cannot load: a run whose data check wrongly passes fails fast, with another message."""
    return ("--model-name", str(tmp_path / "model-that-does-not-exist"))


def out(tmp_path) -> tuple[str, str]:
    return ("--output-dir", str(tmp_path / "out"))


def review_rows(n: int, labels=("bad", "good")) -> list[dict]:
    return [{"text": f"review number {i} was {labels[i % len(labels)]}", "label": labels[i % len(labels)]}
            for i in range(n)]


def conll(path: Path, sentences: int) -> Path:
    path.write_text("\n\n".join(f"Anna{i} B-PER\nvisited O\nRome B-LOC\n. O" for i in range(sentences)) + "\n")
    return path


def train_file_for(script: str, tmp_path: Path, n: int = 40) -> Path:
    """A small valid training file for the script."""
    if script in NER_DATA:
        return conll(tmp_path / "train.conll", n)
    if script == GENERATION:
        path = tmp_path / "train.txt"
        path.write_text("\n\n".join(f"Recipe {i}: stir the soup, add salt and serve it warm." for i in range(n)))
        return path
    return write_rows(tmp_path / "train.csv", review_rows(n))


# ============================================================================================
# Files
# ============================================================================================


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_file(script, guard, tmp_path):
    result = run_main(script, *guard, *out(tmp_path), "--train-file", tmp_path / "nope.csv")
    assert_clean_error(result, "--train-file", "nope.csv", "no such file")


@pytest.mark.parametrize("script, name, message", [
    (SENTIMENT, "empty.csv", "the file is empty"),
    (LORA, "empty.jsonl", "holds no examples"),
    (NER, "empty.conll", "no sentences found"),
    (GENERATION, "empty.txt", "the corpus is empty"),
])
def test_empty_file(script, name, message, guard, tmp_path):
    (tmp_path / name).write_bytes(b"")
    assert_clean_error(run_main(script, *guard, *out(tmp_path), "--train-file", tmp_path / name), message)


@pytest.mark.parametrize("script, message", [
    (SENTIMENT, "is a directory, expected a file"), (LORA, "is a directory, expected a file"),
    (NER, "is a directory, expected a file"),
    (GENERATION, "the folder holds no .txt/.text/.md files"),  # a folder of documents is valid input there
])
def test_directory_as_data_file(script, message, guard, tmp_path):
    (tmp_path / "data").mkdir()
    assert_clean_error(run_main(script, *guard, *out(tmp_path), "--train-file", tmp_path / "data"), message)


@pytest.mark.parametrize("script, name", [(SENTIMENT, "train.xlsx"), (LORA, "train.parquet"), (NER, "train.csv"),
                                          (GENERATION, "train.pdf")])
def test_unknown_extension(script, name, guard, tmp_path):
    (tmp_path / name).write_text("text,label\nfine,good\n")
    result = run_main(script, *guard, *out(tmp_path), "--train-file", tmp_path / name)
    assert_clean_error(result, "unsupported file type", Path(name).suffix)


@pytest.mark.parametrize("script, name", [(SENTIMENT, "train.csv"), (LORA, "train.tsv"), (NER, "train.conll"),
                                          (GENERATION, "train.txt")])
def test_undecodable_bytes(script, name, guard, tmp_path):
    content = "Café B-LOC\n" if script in NER_DATA else "text\tlabel\ncafé au lait\tgood\n" if name.endswith("tsv") \
        else "text,label\ncafé au lait,good\n"
    (tmp_path / name).write_bytes(content.encode("latin-1"))
    result = run_main(script, *guard, *out(tmp_path), "--train-file", tmp_path / name)
    assert_clean_error(result, "not valid UTF-8", "re-save the file as UTF-8")


@pytest.mark.parametrize("script", [SENTIMENT, LORA, GENERATION])
def test_ragged_csv(script, guard, tmp_path):
    (tmp_path / "ragged.csv").write_text("text,label\ngood film,pos\nbad, slow film,neg\n")
    result = run_main(script, *guard, *out(tmp_path), "--train-file", tmp_path / "ragged.csv")
    assert_clean_error(result, "row 3 has 3 fields but the header has 2", "quote fields")


@pytest.mark.parametrize("script, name, content, message", [
    (SENTIMENT, "train.json", '[{"text": "fine", "label": "good"},', "invalid JSON at file"),
    (LORA, "train.jsonl", '{"text": "fine", "label": "good"}\n{"text": "bad"\n', "invalid JSON at line 2"),
    (NER, "train.jsonl", '{"tokens": ["Rome"], "tags": ["B-LOC"]}\nnot json\n', "invalid JSON at line 2"),
    (SENTIMENT, "train.json", '{"text": "fine", "label": "good"}', "expected a list of objects"),
])
def test_invalid_json(script, name, content, message, guard, tmp_path):
    (tmp_path / name).write_text(content)
    assert_clean_error(run_main(script, *guard, *out(tmp_path), "--train-file", tmp_path / name), message)


# ============================================================================================
# Columns, labels and tags
# ============================================================================================


@pytest.mark.parametrize("script", [SENTIMENT, LORA])
def test_label_column_that_does_not_exist(script, guard, tmp_path):
    train = write_rows(tmp_path / "train.csv", review_rows(20))
    result = run_main(script, *guard, *out(tmp_path), "--train-file", train, "--label-column", "grade")
    assert_clean_error(result, "no column 'grade'", "available: text, label", "--label-column")


def test_text_column_that_does_not_exist(guard, tmp_path):
    corpus = write_rows(tmp_path / "corpus.jsonl", [{"body": "Stir the soup."}])
    result = run_main(GENERATION, *guard, *out(tmp_path), "--train-file", corpus, "--text-column", "story")
    assert_clean_error(result, "no column 'story'", "available: body", "--text-column")


@pytest.mark.parametrize("script, message", [(SENTIMENT, "the text column 'text' is empty in every row"),
                                             (LORA, "the text column 'text' is empty in every row"),
                                             (GENERATION, "the corpus is empty")])
def test_text_column_of_empty_strings(script, message, guard, tmp_path):
    train = write_rows(tmp_path / "train.csv", [{"text": " " * (i % 2), "label": "good" if i % 2 else "bad"}
                                                for i in range(20)])
    assert_clean_error(run_main(script, *guard, *out(tmp_path), "--train-file", train), message)


def test_same_column_for_text_and_label(guard, tmp_path):
    train = write_rows(tmp_path / "train.csv", review_rows(20))
    result = run_main(SENTIMENT, *guard, *out(tmp_path), "--train-file", train, "--text-column", "text",
                      "--label-column", "text")
    assert_clean_error(result, "the text and label columns are both 'text'")


@pytest.mark.parametrize("rows, message", [
    ([{"text": "fine", "label": 1}, {"text": "bad", "label": "neg"}] * 10, "labels mix numbers and text"),
    ([{"text": "fine", "label": "good"}, {"text": "bad", "label": ""}] * 10, "row 2 has an empty label"),
])
def test_bad_labels(rows, message, guard, tmp_path):
    train = write_rows(tmp_path / "train.jsonl", rows)
    assert_clean_error(run_main(SENTIMENT, *guard, *out(tmp_path), "--train-file", train), message)


@pytest.mark.parametrize("args, message", [
    (("--label-list", "O,PERSON,LOCATION"), "'PERSON' is not a tag"),
    (("--label-list", "O,,B-PER"), "expected comma-separated tag names"),
])
def test_ner_label_list_that_is_not_tags(args, message, guard, tmp_path):
    train = write_rows(tmp_path / "train.jsonl", [{"tokens": ["Anna", "runs"], "tags": [1, 0]}] * 20)
    assert_clean_error(run_main(NER, *guard, *out(tmp_path), "--train-file", train, *args), message)


def test_ner_tags_that_are_not_lists(guard, tmp_path):
    train = write_rows(tmp_path / "train.jsonl", [{"tokens": "Anna runs", "tags": "B-PER O"}] * 20)
    result = run_main(NER, *guard, *out(tmp_path), "--train-file", train)
    assert_clean_error(result, "row 1", "'tokens' must be a list")


# ============================================================================================
# Tiny data
# ============================================================================================


@pytest.mark.parametrize("script", [SENTIMENT, LORA])
def test_fewer_examples_than_classes(script, guard, tmp_path):
    train = write_rows(tmp_path / "train.csv", review_rows(3, labels=("bad", "good", "okay")))
    result = run_main(script, *guard, *out(tmp_path), "--train-file", train, "--batch-size", "1")
    assert_clean_error(result, "only 2 training examples for 3 classes")


@pytest.mark.parametrize("script, what", [(SENTIMENT, "examples"), (LORA, "examples"), (NER, "sentences")])
def test_fewer_examples_than_one_batch(script, what, guard, tmp_path):
    train = train_file_for(script, tmp_path, n=10)
    result = run_main(script, *guard, *out(tmp_path), "--train-file", train, "--batch-size", "32")
    assert_clean_error(result, f"only 9 training {what}, fewer than one batch (--batch-size 32)", "lower --batch-size")


def test_fewer_blocks_than_one_batch(tiny_gpt2, tmp_path):
    train = train_file_for(GENERATION, tmp_path, n=10)
    result = run_main(GENERATION, "--model-name", tiny_gpt2, *out(tmp_path), "--train-file", train,
                      "--block-size", "64", "--batch-size", "64")
    assert_clean_error(result, "blocks of 64 tokens, fewer than one batch (--batch-size 64)", "lower --block-size")


@pytest.mark.parametrize("script, message", [(SENTIMENT, "only 10 training examples: too few to hold out"),
                                             (LORA, "only 10 training examples: too few to hold out"),
                                             (NER, "only 10 training sentences: too few to hold out")])
def test_validation_split_that_leaves_no_training_data(script, message, guard, tmp_path):
    train = train_file_for(script, tmp_path, n=10)
    result = run_main(script, *guard, *out(tmp_path), "--train-file", train, "--validation-split", "0.95")
    assert_clean_error(result, message, "--validation-file")


def test_validation_split_that_leaves_no_training_text(tiny_gpt2, tmp_path):
    train = train_file_for(GENERATION, tmp_path, n=10)
    result = run_main(GENERATION, "--model-name", tiny_gpt2, *out(tmp_path), "--train-file", train,
                      "--block-size", "64", "--validation-split", "0.99")
    assert_clean_error(result, "after holding out --validation-split 0.99", "fewer than one block of 64")


def test_too_few_examples_after_subsampling(guard, tmp_path):
    train = write_rows(tmp_path / "train.csv", review_rows(40))
    result = run_main(SENTIMENT, *guard, *out(tmp_path), "--train-file", train, "--max-train-samples", "4")
    assert_clean_error(result, "only 4 training examples, fewer than one batch (--batch-size 8)")


# ============================================================================================
# Flags: impossible values and conflicts
# ============================================================================================


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("args, fragments", [
    (("--epochs", "0"), ("argument --epochs", "must be a positive number, got 0")),
    (("--batch-size", "-1"), ("argument --batch-size", "must be a positive integer, got -1")),
    (("--fp16", "--bf16"), ("argument --bf16: not allowed with argument --fp16",)),
    (("--validation-split", "1.5"), ("argument --validation-split", "between 0 and 1", "got 1.5")),
    (("--gradient-accumulation-steps", "0"), ("argument --gradient-accumulation-steps", "must be a positive integer, got 0")),
    (("--report-to", "wandb"), ("argument --report-to: invalid choice: 'wandb'",)),
], ids=["epochs-0", "batch-size--1", "fp16-bf16", "validation-split-1.5", "accumulation-0", "report-to-wandb"])
def test_impossible_flags(script, args, fragments, tmp_path):
    line = assert_clean_error(run_main(script, *out(tmp_path), *args), *fragments)
    assert line.endswith(f"see {script.split()[0]} --help."), line
    assert not (tmp_path / "out").exists(), "flags are checked before anything is written"


@pytest.mark.parametrize("script, args, message", [
    (SENTIMENT, ("--max-length", "4"), "--max-length must be at least 8"),
    (NER, ("--warmup-ratio", "1.5"), "--warmup-ratio must be in [0, 1)"),
    (LORA, ("--lora-dropout", "1"), "--lora-dropout must be in [0, 1)"),
    (LORA, ("--lora-r", "0"), "argument --lora-r: must be a positive integer"),
    (LORA, ("--task", "summarise"), "argument --task: invalid choice: 'summarise'"),
    (LORA, ("--adapter", "some-dir"), "--adapter needs --predict"),
    (LORA_NER, ("--class-weights", "balanced"), "--class-weights applies to --task classification only"),
    ("lora_finetuning.py --task generation", ("--class-weights", "balanced"), "--class-weights applies to --task classification"),
    (NER, ("--class-weights", "balanced"), "unrecognized arguments: --class-weights"),
    (SENTIMENT, ("--class-weights", "auto"), "argument --class-weights: invalid choice: 'auto'"),
    (LORA, ("--seeds", "1", "2"), "--seeds needs --compare"),
    (LORA_NER, ("--compare", "--seeds", "1", "1"), "--seeds: each seed once"),
    ("lora_finetuning.py --task generation", ("--compare", "--full"), "--full and --compare"),
    (GENERATION, ("--unrelated-file", "missing.txt"), "--unrelated-file"),
    (GENERATION, ("--top-p", "1.5"), "--top-p must be at most 1"),
    (GENERATION, ("--learning-rate", "fast"), "argument --learning-rate: invalid positive_float value: 'fast'"),
    (SENTIMENT, ("--dataset", "imdb", "--train-file", "t.csv"), "--dataset and --train-file are mutually exclusive"),
    (SENTIMENT, ("--no-such-flag",), "unrecognized arguments: --no-such-flag"),
])
def test_other_bad_flags(script, args, message, tmp_path):
    assert_clean_error(run_main(script, *out(tmp_path), *args), message)


@pytest.mark.parametrize("script", [SENTIMENT, NER, GENERATION])
def test_validation_file_without_train_file(script, guard, tmp_path):
    validation = train_file_for(script, tmp_path)
    result = run_main(script, *guard, *out(tmp_path), "--validation-file", validation)
    assert_clean_error(result, "--validation-file", "--train-file as well")


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_without_a_checkpoint(script, guard, tmp_path):
    result = run_main(script, *guard, *out(tmp_path), "--resume-from-checkpoint", "auto")
    assert_clean_error(result, "--resume-from-checkpoint auto: no checkpoint under")
    result = run_main(script, *guard, *out(tmp_path), "--resume-from-checkpoint", tmp_path / "checkpoint-9")
    assert_clean_error(result, "not a checkpoint directory")


# ============================================================================================
# Prompts (text generation)
# ============================================================================================


@pytest.fixture
def saved_gpt2(tiny_gpt2, tmp_path) -> Path:
    """A full causal LM saved in an output directory, as a finished --full run leaves it."""
    directory = tmp_path / "saved-gpt2"
    shutil.copytree(tiny_gpt2, directory)
    return directory


def test_prompt_longer_than_the_context(saved_gpt2):
    result = run_main(GENERATION, "--output-dir", saved_gpt2, "--prompt", "salt and pepper " * 60,
                      "--max-new-tokens", "20")
    assert_clean_error(result, "with --max-new-tokens 20 that exceeds the model's context of 128 tokens")


@pytest.mark.parametrize("name, content, message", [
    ("prompts.txt", None, "no such file"),
    ("prompts.txt", "\n  \n", "no prompt given"),
    ("prompts.json", '["Recipe:"]', "unsupported file type '.json'"),
])
def test_bad_prompt_file(name, content, message, saved_gpt2, tmp_path):
    if content is not None:
        (tmp_path / name).write_text(content)
    result = run_main(GENERATION, "--output-dir", saved_gpt2, "--prompt", f"@{tmp_path / name}")
    assert_clean_error(result, message)


# ============================================================================================
# Models
# ============================================================================================


@pytest.mark.parametrize("script", SCRIPTS)
def test_model_path_that_does_not_exist(script, tmp_path):
    result = run_main(script, *out(tmp_path), "--model-name", "./models/not-here")
    assert_clean_error(result, "--model-name ./models/not-here: no such directory")


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("name", ["bad model name!", "org/model?v=2"])
def test_model_name_with_invalid_characters(script, name, tmp_path):
    result = run_main(script, *out(tmp_path), "--model-name", name)
    assert_clean_error(result, f"--model-name '{name}'", "not a valid Hugging Face hub name")


@pytest.mark.parametrize("script", SCRIPTS)
def test_model_directory_without_config(script, tmp_path):
    (tmp_path / "empty-model").mkdir()
    result = run_main(script, *out(tmp_path), "--model-name", tmp_path / "empty-model")
    assert_clean_error(result, "the directory has no config.json")


@pytest.fixture
def hub(monkeypatch) -> dict:
    """The Hugging Face hub client as the test sets it: nothing cached, and model_info() answering
    with hub["answer"] (an exception is raised, as the client raises it)."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)
    state: dict = {}

    def model_info(name, **kwargs):
        state.setdefault("asked", []).append(name)
        raise state["answer"]

    monkeypatch.setattr(huggingface_hub, "model_info", model_info)
    return state


def repository_not_found(name: str):
    import httpx2
    from huggingface_hub.errors import RepositoryNotFoundError

    request = httpx2.Request("GET", f"https://huggingface.co/api/models/{name}")
    return RepositoryNotFoundError(f"404 Client Error: Repository Not Found for url: {request.url}",
                                   response=httpx2.Response(404, request=request))


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_model_the_hub_does_not_have(script, hub, tmp_path):
    hub["answer"] = repository_not_found("no-such-org/no-such-model")
    result = run_main(script, *out(tmp_path), "--model-name", "no-such-org/no-such-model")
    assert_clean_error(result, "'no-such-org/no-such-model' was not found on the Hugging Face hub", "check the spelling")
    assert hub["asked"] == ["no-such-org/no-such-model"]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("failure", [ConnectionError("[Errno -3] Temporary failure in name resolution"),
                                     TimeoutError("The read operation timed out"), OSError("Network is unreachable")],
                         ids=["dns", "timeout", "network"])
def test_an_unreachable_hub_without_fallback(script, failure, hub, tmp_path):
    hub["answer"] = failure
    result = run_main(script, *out(tmp_path), "--model-name", "some-org/some-model", "--no-fallback")
    assert_clean_error(result, "'some-org/some-model' is not cached and the Hugging Face hub cannot be reached",
                       "--no-fallback")


@pytest.mark.skipif(common.bundled_encoder_dir() is None or common.bundled_causal_lm_dir() is None,
                    reason="the bundled models (requirements-offline.txt) are not installed")
def test_an_unreachable_hub_falls_back_to_the_bundled_models(hub, capsys):
    hub["answer"] = ConnectionError("[Errno -3] Temporary failure in name resolution")
    encoder = common.resolve_model("distilbert-base-uncased")
    assert encoder.fallback and encoder.path == str(common.bundled_encoder_dir())
    causal_lm = common.resolve_model("gpt2", kind="causal-lm")
    assert causal_lm.fallback and causal_lm.gguf_file == common.BUNDLED_CAUSAL_LM_FILE
    notes = capsys.readouterr().out.splitlines()
    assert len(notes) == 2 and all("the Hugging Face hub is unreachable" in note for note in notes)
    hub["answer"] = repository_not_found("distilbert-base-uncasd")
    with pytest.raises(common.UserError, match="was not found on the Hugging Face hub"):
        common.resolve_model("distilbert-base-uncasd")  # a misspelt name is an error, never a silent switch


@pytest.mark.parametrize("script", SCRIPTS)
def test_unreachable_model_without_fallback(script, tmp_path):
    result = run_main(script, *out(tmp_path), "--model-name", "no-such-org/no-such-model", "--no-fallback")
    assert_clean_error(result, "'no-such-org/no-such-model' is not cached", "cannot be reached", "--no-fallback")


@pytest.mark.parametrize("script", SCRIPTS)
def test_model_directory_with_a_broken_config(script, tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    result = run_main(script, *out(tmp_path), "--model-name", tmp_path / "broken")
    assert_clean_error(result, "could not load the tokenizer", "config.json' is not a valid JSON file")


@pytest.mark.parametrize("script", SCRIPTS)
def test_model_directory_without_weights(script, tiny_encoder, tiny_gpt2, tmp_path):
    model = tmp_path / "no-weights"
    shutil.copytree(tiny_gpt2 if script == GENERATION else tiny_encoder, model,
                    ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    result = run_main(script, *out(tmp_path), "--model-name", model)
    assert_clean_error(result, "could not load", "no-weights", "no file named")


CUSTOM_CODE = """
from pathlib import Path

from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification, BertModel

Path({marker!r}).write_text("the model's own code ran")


class CustomConfig(BertConfig):
    model_type = "custom-bert"


class CustomModel(BertModel):
    config_class = CustomConfig


class CustomForSequenceClassification(BertForSequenceClassification):
    config_class = CustomConfig


class CustomForTokenClassification(BertForTokenClassification):
    config_class = CustomConfig
"""


def model_with_custom_code(tiny_encoder: Path, directory: Path) -> tuple[Path, Path]:
    """A copy of the tiny encoder whose config points at Python code shipped beside it (auto_map),
    code that leaves a marker file when it runs."""
    model, marker = directory / "custom-model", directory / "code-ran.marker"
    shutil.copytree(tiny_encoder, model)
    (model / "custom_bert.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="custom-bert", architectures=["CustomModel"], auto_map={
        "AutoConfig": "custom_bert.CustomConfig", "AutoModel": "custom_bert.CustomModel",
        "AutoModelForSequenceClassification": "custom_bert.CustomForSequenceClassification",
        "AutoModelForTokenClassification": "custom_bert.CustomForTokenClassification"})
    (model / "config.json").write_text(json.dumps(config))
    return model, marker


@pytest.mark.parametrize("script", ENCODER_SCRIPTS)
def test_model_with_its_own_code_needs_trust_remote_code(script, tiny_encoder, tmp_path):
    """Code shipped with a model never runs without --trust-remote-code (and the library's
    interactive prompt, which would hang a script, never appears); with the flag it loads."""
    model, marker = model_with_custom_code(tiny_encoder, tmp_path)
    result = run_main(script, *out(tmp_path), "--model-name", model, "--max-train-samples", "16")
    assert_clean_error(result, "ships its own Python code", "--trust-remote-code")
    assert not marker.exists()
    result = run_main(script, "--output-dir", tmp_path / "trusted", "--model-name", model, "--trust-remote-code",
                      "--max-train-samples", "16", "--epochs", "1", "--batch-size", "8")
    assert result.returncode == 0, result.stderr
    assert marker.exists()


# ============================================================================================
# Output directory, and what was saved before
# ============================================================================================


@pytest.mark.parametrize("script", SCRIPTS)
def test_output_dir_is_a_file(script, guard, tmp_path):
    (tmp_path / "results").write_text("notes")
    result = run_main(script, *guard, "--output-dir", tmp_path / "results")
    assert_clean_error(result, "exists and is a file")
    assert (tmp_path / "results").read_text() == "notes"


def unwritable_dirs(tmp_path: Path) -> dict[str, Path]:
    """Output directories that cannot be created or written. The tests run as root, which chmod
    does not stop, so they use paths no user can create: under a file, and under /proc."""
    (tmp_path / "file").write_text("x")
    dirs = {"under a file": tmp_path / "file" / "out", "under /proc": Path("/proc/no-such-dir/out")}
    if os.geteuid() != 0:
        (tmp_path / "read-only").mkdir(mode=0o500)
        dirs["read-only"] = tmp_path / "read-only" / "out"
    return dirs


@pytest.mark.parametrize("script", SCRIPTS)
def test_output_dir_that_cannot_be_written(script, guard, tmp_path):
    for where, directory in unwritable_dirs(tmp_path).items():
        result = run_main(script, *guard, "--output-dir", directory)
        assert "Traceback" not in result.stderr, where
        assert_clean_error(result, f"--output-dir {directory}: cannot be written")


def write_saved_model(directory: Path, script: str) -> Path:
    """What a finished run leaves in --output-dir (the weights' bytes do not matter here)."""
    directory.mkdir(parents=True)
    files = {"config.json": json.dumps({"model_type": "bert"}), "tokenizer.json": "{}",
             "metrics.json": json.dumps({"task": script, "validation": {"accuracy": 0.9}}),
             "run_config.json": json.dumps({"argv": [script]}), "training_log.jsonl": '{"step": 1}\n'}
    if script in (LORA, LORA_NER, GENERATION):
        files["adapter_config.json"] = json.dumps({"base_model_name_or_path": "base"})
    for name, text in files.items():
        (directory / name).write_text(text)
    weights = "adapter_model.safetensors" if "adapter_config.json" in files else "model.safetensors"
    (directory / weights).write_bytes(os.urandom(2048))
    return directory


@pytest.mark.parametrize("script", SCRIPTS)
def test_existing_model_is_not_replaced_without_overwrite(script, tmp_path):
    saved = write_saved_model(tmp_path / "saved", script)
    before = snapshot(saved)
    result = run_main(script, "--output-dir", saved, "--model-name", tmp_path / "no-model")
    assert_clean_error(result, "already holds a trained model", "--overwrite-output-dir")
    assert snapshot(saved) == before


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("failure", ["bad data", "bad model", "tiny data"])
def test_failed_run_into_a_saved_model_leaves_it_intact(script, failure, tmp_path):
    """--overwrite-output-dir, then a run that fails: the model saved before is byte for byte the same
    (a run replaces it only once its new model is complete)."""
    saved = write_saved_model(tmp_path / "saved", script)
    before = snapshot(saved)
    if failure == "bad data":
        (tmp_path / "train.csv").write_text("text,label\ngood film,pos\nbad, slow film,neg\n")
        args, message = ("--train-file", tmp_path / "train.csv", "--model-name", tmp_path / "no-model"), \
            "unsupported file type" if script in NER_DATA else "row 3 has 3 fields"
    elif failure == "bad model":
        args, message = ("--model-name", tmp_path / "no-model"), "no such directory"
    else:
        args, message = ("--train-file", train_file_for(script, tmp_path, n=4), "--batch-size", "64",
                         "--model-name", tmp_path / "no-model"), \
            "no such directory" if script == GENERATION else "fewer than one batch"
    result = run_main(script, "--output-dir", saved, "--overwrite-output-dir", *args)
    assert_clean_error(result, message)
    assert snapshot(saved) == before


# ============================================================================================
# The same as real processes
# ============================================================================================


@pytest.mark.parametrize("script", SCRIPTS)
def test_real_process_impossible_flag(script, tmp_path):
    file, *first = script.split()
    result = run_script(file, *first, "--output-dir", tmp_path / "out", "--batch-size", "-1")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: argument --batch-size: must be a positive integer, got -1; "
                                     f"see {file} --help."), result.stderr


def test_real_process_bad_data(tmp_path):
    (tmp_path / "t.conll").write_bytes("Café B-LOC\n".encode("latin-1"))
    result = run_script(NER, "--model-name", tmp_path / "no-model", "--output-dir", tmp_path / "out",
                        "--train-file", tmp_path / "t.conll")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [assert_clean_error(result, "not valid UTF-8")]


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "Soup?"}, {"prompt": "Salt?", "response": "Yes."}], "record 1 has no 'response' field"),
    ([{"instruction": "Soup?", "output": "Salt."}, {"instruction": "Stew?", "output": " "}], "record 2: the response is empty"),
    ([{"question": "Soup?", "answer": "Salt."}], "unknown record shape (fields: question, answer)"),
    ([{"messages": [{"role": "user", "content": "Soup?"}]}], "'messages' must be a list"),
    ([{"messages": [{"role": "user", "content": "Soup?"}, "Salt."]}], "'messages' must be a list"),
], ids=["missing-response", "empty-response", "unknown-shape", "messages-without-answer", "message-not-an-object"])
def test_bad_instruction_records(rows, message, guard, tmp_path):
    records = write_rows(tmp_path / "records.jsonl", rows)
    assert_clean_error(run_main(GENERATION, *guard, *out(tmp_path), "--train-file", records), message)


def test_text_and_instruction_records_do_not_mix(guard, tmp_path):
    records = write_rows(tmp_path / "records.jsonl", [{"prompt": "Soup?", "response": "Salt."}])
    result = run_main(GENERATION, *guard, *out(tmp_path), "--train-file", train_file_for(GENERATION, tmp_path),
                      "--validation-file", records)
    assert_clean_error(result, "different kinds of data")


def test_every_instruction_record_too_long(tiny_gpt2, tmp_path):
    records = write_rows(tmp_path / "records.jsonl", [{"prompt": "Soup " * 100, "response": "Salt."}] * 4)
    result = run_main(GENERATION, "--model-name", tiny_gpt2, *out(tmp_path), "--train-file", records,
                      "--validation-file", records, "--block-size", "64")
    assert_clean_error(result, "every train record is longer than --block-size 64")
