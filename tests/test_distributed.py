"""The scripts under torchrun with 2 CPU processes (gloo): every process trains and evaluates, the
main one alone writes, evaluation covers the validation set exactly once, the length-grouped
sampler is sharded consistently, and an interrupt stops every process at the same step."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DATA, OFFLINE_ENV, ROOT, assert_saved_then_evaluated_once, run_command, write_rows

TORCHRUN = Path(sys.executable).parent / "torchrun"


def distributed_available() -> bool:
    import torch.distributed

    return torch.distributed.is_available() and torch.distributed.is_gloo_available() and TORCHRUN.is_file()


pytestmark = pytest.mark.skipif(not distributed_available(), reason="torch.distributed (gloo) or torchrun is unavailable")

# --standalone: a free port of its own, so parallel runs on one machine do not collide.
LAUNCH = (TORCHRUN, "--standalone", "--nproc_per_node", "2")
SIZES = {"train": 40, "validation": 23, "test": 17}  # odd sizes: the last evaluation batch is uneven across processes
FAST = ("--epochs", "2", "--batch-size", "4", "--fp32")


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("distributed-data")
    files = {}
    for split, size in SIZES.items():
        with (DATA / "sentiment" / f"{split}.csv").open(encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))[:size]
        files[split] = write_rows(directory / f"{split}.csv", rows)
    return files


def data_flags(files: dict[str, Path]) -> tuple:
    return ("--train-file", files["train"], "--validation-file", files["validation"], "--test-file", files["test"])


def check_saved_once(output_dir: Path, stdout: str, model_files: tuple[str, ...], epochs: int = 2) -> dict:
    """One report, every output exactly once and complete, no leftovers of the save machinery."""
    assert stdout.count("model card (README.md), metrics.json") == 1, stdout
    checkpoints = "checkpoints: every epoch" if epochs > 1 else "checkpoints: none in a run of one epoch"
    assert stdout.count(checkpoints) == 1, stdout
    for name in (*model_files, "tokenizer.json", "metrics.json", "run_config.json", "training_log.jsonl",
                 "training_curves.png"):
        assert (output_dir / name).is_file(), name
    leftovers = [p.name for p in output_dir.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
    assert not leftovers, leftovers
    assert not (output_dir / "checkpoints").exists()
    lines = (output_dir / "training_log.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    keys = [(r["step"], tuple(sorted(r))) for r in records]
    assert len(keys) == len(set(keys)), "a log line was written by more than one process"
    assert [round(r["epoch"]) for r in records if "eval_accuracy" in r] == list(range(1, epochs + 1))
    assert json.loads((output_dir / "run_config.json").read_text())["args"]["epochs"] == epochs
    return json.loads((output_dir / "metrics.json").read_text())


def check_evaluated_once(metrics: dict, epochs: int = 2) -> None:
    """Each split scored on all of its examples, none twice (the processes' shards are gathered
    and the padding that evens them out is dropped)."""
    for split in ("validation", "test"):
        block = metrics[split]
        assert block["examples"] == SIZES[split]
        assert sum(v["support"] for v in block["per_class"].values()) == SIZES[split]
        assert sum(map(sum, block["confusion_matrix"])) == SIZES[split]
    # Each process trained on its half of every batch round: 40 examples / (4 x 2) = 5 steps per epoch.
    assert metrics["train"]["steps"] == epochs * 5


def direct_validation_loss(model_dir: Path, validation_file: Path) -> float:
    """The mean cross-entropy of the saved model over the validation file, computed here in one process."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with validation_file.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    labels = torch.tensor([model.config.label2id[row["label"]] for row in rows])
    inputs = tokenizer([row["text"] for row in rows], truncation=True, max_length=128, padding=True, return_tensors="pt")
    with torch.inference_mode():
        return float(torch.nn.functional.cross_entropy(model(**inputs).logits, labels))


@pytest.mark.parametrize("epochs", [2, 1])  # one epoch: saved first, evaluated after, by every process
def test_sentiment_under_torchrun_saves_once_and_evaluates_everything(epochs, tiny_encoder, data_files, tmp_path):
    output_dir = tmp_path / "nested" / "out"  # created by whichever process gets there first
    result = run_command([*LAUNCH, ROOT / "sentiment_finetuning.py", "--model-name", tiny_encoder,
                          "--output-dir", output_dir, *data_flags(data_files), *FAST, "--learning-rate", "1e-3",
                          "--epochs", str(epochs)])
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = check_saved_once(output_dir, result.stdout, ("config.json", "model.safetensors"), epochs)
    check_evaluated_once(metrics, epochs)
    if epochs == 1:
        assert_saved_then_evaluated_once(output_dir, "accuracy", metrics["validation"]["accuracy"])
    # The validation loss is that of the saved model on the whole file: not scaled by the number of
    # processes, no example missing or counted twice.
    assert metrics["validation"]["loss"] == pytest.approx(
        direct_validation_loss(output_dir, data_files["validation"]), abs=1e-4)


def test_lora_under_torchrun_saves_the_adapter_once(tiny_encoder, data_files, tmp_path):
    output_dir = tmp_path / "lora"
    result = run_command([*LAUNCH, ROOT / "lora_finetuning.py", "--model-name", tiny_encoder,
                          "--output-dir", output_dir, *data_flags(data_files), *FAST])
    assert result.returncode == 0, result.stdout + result.stderr
    metrics = check_saved_once(output_dir, result.stdout, ("adapter_config.json", "adapter_model.safetensors"))
    assert metrics["method"] == "lora"
    check_evaluated_once(metrics)


SAMPLER_CHECK = '''
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
import torch.distributed as dist
from transformers import Trainer, TrainingArguments
import common
import encoders


class Recorder(torch.nn.Module):
    """Records the example indices of every training batch it sees."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.seen = []

    def forward(self, index, input_ids):
        self.seen.append(index.tolist())
        return {"loss": (self.weight * input_ids.float().mean()).sum()}


def collate(rows):
    width = max(len(r["input_ids"]) for r in rows)
    return {"index": torch.tensor([r["index"] for r in rows]),
            "input_ids": torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows])}


lengths = [int(n) for n in sys.argv[3].split(",")]
dataset = [{"index": i, "input_ids": [1] * n} for i, n in enumerate(lengths)]
args = TrainingArguments(output_dir=sys.argv[2], per_device_train_batch_size=4, num_train_epochs=2, seed=11,
                         save_strategy="no", report_to="none", use_cpu=True, remove_unused_columns=False,
                         disable_tqdm=True)


def train():
    # Inside a function, as in the scripts' main(): the Trainer and its DDP wrapper are gone before
    # the process group is torn down. Kept alive as globals until interpreter shutdown, they
    # outlived it and aborted about one run in three ("terminate called without an active exception").
    model = Recorder()
    trainer = encoders.make_trainer_class(Trainer)(model=model, args=args, train_dataset=dataset, data_collator=collate)
    trainer.train()
    return model.seen


gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, train())
if dist.get_rank() == 0:
    with open(sys.argv[2] + "/seen.json", "w") as handle:
        json.dump(gathered, handle)
common.leave_process_group()
'''


def test_length_grouped_sampler_is_sharded_consistently(tmp_path):
    """Every process computes the same seeded order; accelerate deals its batches out in turn, so
    together the processes see every example once per epoch, with a new order each epoch."""
    from encoders import length_grouped_order

    script = tmp_path / "sampler_check.py"
    script.write_text(SAMPLER_CHECK)
    lengths = [(i * 37) % 50 + 1 for i in range(37)]  # 37 examples: 9 batches of 4 and one of 1
    result = run_command([*LAUNCH, script, ROOT, tmp_path, ",".join(map(str, lengths))])
    assert result.returncode == 0, result.stdout + result.stderr
    seen = json.loads((tmp_path / "seen.json").read_text())
    steps_per_epoch = 5  # 10 batches dealt to 2 processes
    assert [len(batches) for batches in seen] == [2 * steps_per_epoch] * 2
    orders = []
    for epoch in range(2):
        order = length_grouped_order(lengths, batch_size=4, seed=11 + epoch)
        batches = [order[i:i + 4] for i in range(0, len(order), 4)]
        # Batch k of the common order goes to process k % 2; the short last batch (process 1's) is
        # topped up with the first examples of the order, so that both processes get full batches.
        batches[-1] = batches[-1] + order[:4 - len(batches[-1])]
        for rank in range(2):
            assert seen[rank][epoch * steps_per_epoch:(epoch + 1) * steps_per_epoch] == batches[rank::2]
        covered = {i for rank in range(2) for batch in seen[rank][epoch * steps_per_epoch:(epoch + 1) * steps_per_epoch]
                   for i in batch}
        assert covered == set(range(len(lengths)))
        orders.append(order)
    assert orders[0] != orders[1]


def worker_pid(launcher: int, rank: int) -> int | None:
    """The process id of the torchrun worker of this rank (Linux /proc)."""
    for proc in Path("/proc").iterdir():
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == launcher and f"RANK={rank}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


@pytest.mark.parametrize("target", ["torchrun", "rank 1 alone"])
def test_interrupt_stops_every_process_at_the_same_step(target, tiny_encoder, data_files, tmp_path):
    """SIGTERM to torchrun reaches both processes, possibly in different steps; SIGTERM to one
    worker (as some schedulers send it) reaches that one only. Either way the processes agree on
    one step, save one complete checkpoint together (each its own RNG state) and stop, instead of
    one waiting forever for the other."""
    if target != "torchrun" and not Path("/proc/self/environ").exists():
        pytest.skip("finding a worker's rank needs /proc")
    output_dir = tmp_path / "out"
    command = [*LAUNCH, ROOT / "sentiment_finetuning.py", "--model-name", tiny_encoder, "--output-dir", output_dir,
               *data_flags(data_files), "--epochs", "500", "--batch-size", "4", "--fp32"]
    # torchrun gives the workers 30 s after forwarding a signal, then kills them: enough for this
    # checkpoint on an idle machine, not always on a busy one.
    env = {**OFFLINE_ENV, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "240"}
    process = subprocess.Popen(list(map(str, command)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, cwd=ROOT)
    log = output_dir / "training_log.jsonl"
    deadline = time.time() + 240  # seconds on a busy machine; about 10 on an idle one
    while time.time() < deadline and process.poll() is None and not (log.exists() and log.read_text().strip()):
        time.sleep(0.2)
    if target == "torchrun":
        process.send_signal(signal.SIGTERM)
    else:
        pid = worker_pid(process.pid, rank=1)
        assert pid is not None, "no worker of rank 1 found"
        os.kill(pid, signal.SIGTERM)
    try:
        stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        # A process left training waits for its peer forever: stop the workers (they run in
        # sessions of their own), then the launcher, and fail.
        for rank in range(2):
            pid = worker_pid(process.pid, rank)
            if pid:
                os.kill(pid, signal.SIGKILL)
        process.kill()
        process.communicate()
        pytest.fail("the processes did not stop together after the signal")
    assert process.returncode != 0
    assert "training interrupted; checkpoint saved" in stderr, stderr
    assert "torchrun --nproc_per_node=2 " in stderr and "--resume-from-checkpoint" in stderr, stderr  # as many processes
    # The interrupt's checkpoint, and the previous epoch's when the signal came after the first epoch.
    checkpoints = sorted((output_dir / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert 1 <= len(checkpoints) <= 2, stderr
    checkpoint = checkpoints[-1]
    for name in ("model.safetensors", "trainer_state.json", "optimizer.pt", "rng_state_0.pth", "rng_state_1.pth"):
        assert (checkpoint / name).is_file(), name
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == int(checkpoint.name.split("-")[1])
    assert state["epoch"] < 500
    assert not (output_dir / "metrics.json").exists(), "an interrupted run saves no final model"
