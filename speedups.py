"""The engine room: every speed trick of the scripts, kept out of their teaching path.

Each script calls these entry points from its run(), one per stage, and records what they applied
in metrics.json (train.speedups):

    for_process(enabled)                        the memory allocator; the GPU attention backend
    for_model(model, probe, precision, kind)    CPU attention, first-token last layer, embedding
                                                gradient, chunked language-model loss, LoRA's
                                                fused products, frozen weights and inputs in bf16
    trainer_class(base, applied)                the Trainer's side of the tricks above
    for_training(model, applied)                the context the training runs in
    cached_checkpoint(resolved, convert, ...)   a GGUF model converted once, then loaded fast

--no-speedups turns every one of them off, and the run is the libraries' own computation.

A trick that replaces library code checks itself once per run against the stock computation:
for_model() runs a forward and backward pass on a few training examples (dropout off) before and
after applying each trick, and a trick whose loss, logits or gradients differ beyond the
precision's tolerance, or that raises, is switched off with one line naming it and the reason;
the run goes on without it. A library upgrade can cost speed, never results. The gradient
clipping of trainer_class() checks itself the same way on its first step. What each trick gains is
in BENCHMARKS.md ("Levers"), measured by benchmarks/levers.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import platform
import sys
from pathlib import Path
from typing import Any, Callable

import common

# Relative tolerance of the self-checks: how far a trick's loss, logits and each gradient may be
# from the stock computation's (as a share of the latter's norm). Under bf16 or fp16 autocast,
# other kernels round differently; 5% stays far from any real disagreement (a wrong mask, a
# missing term), which moves results by tens of percent.
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 5e-2}


def note_switched_off(name: str, reason: str) -> None:
    print(f"note: speedup {name} switched off ({reason}); this run takes the library's own path there.")


# --------------------------------------------------------------------------------------------
# The process: allocator and GPU attention backend
# --------------------------------------------------------------------------------------------

# glibc's mallopt parameters, and the largest mmap threshold it accepts on 64-bit systems.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
LARGEST_MMAP_THRESHOLD = 32 << 20


def for_process(enabled: bool = True) -> list[str]:
    """Process-wide settings; returns the names of those applied.

    allocator: glibc hands blocks above a threshold to mmap and returns freed heap memory to the
    kernel, so a training step that frees and reallocates its activations faults every page back
    in, zeroed (60,000-160,000 page faults per SmolLM2 LoRA step). Raising both thresholds lets
    the steps reuse their memory; the peak stays that of one step.
    gpu_attention_without_cudnn: PyTorch prefers cuDNN's attention on recent GPUs, which builds a
    plan for every new input shape; with dynamic padding nearly every batch has a new length
    (measured on an H200: 110-460 ms for a MiniLM step at an unseen length instead of ~20 ms)."""
    if not enabled:
        return []
    import torch

    applied = []
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        import ctypes

        with contextlib.suppress(OSError):
            libc = ctypes.CDLL("libc.so.6")
            if libc.mallopt(_M_MMAP_THRESHOLD, LARGEST_MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30):
                applied.append("allocator")
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)
        applied.append("gpu_attention_without_cudnn")
    return applied


# --------------------------------------------------------------------------------------------
# The model: each trick, its check, and how it steps aside
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Trick:
    name: str
    kinds: tuple[str, ...]  # "sequence-classification", "token-classification", "causal-lm"
    applies: Callable[[Any], bool]  # whether the trick can be used on this model (nothing changed)
    apply: Callable[[Any], None]
    remove: Callable[[Any], None]
    chunked_loss: bool = False  # checked through the chunked loss rather than the model's own
    confirm: Callable[[Any], None] = lambda model: None  # after its check passed: drop what remove() needed
    autocast_only: bool = False  # only under bf16 / fp16 autocast


def for_model(model, probe: dict, precision: str, kind: str, enabled: bool = True) -> list[str]:
    """Apply the model tricks that fit `model` (of `kind`, trained in `precision`), each checked on
    the `probe` batch (a few collated training examples with labels) against the stock
    computation; returns the names of those applied."""
    if not enabled:
        return []
    candidates = [trick for trick in TRICKS if kind in trick.kinds and trick.applies(model)
                  and not (trick.autocast_only and precision not in AUTOCAST_DTYPES)]
    if not candidates:
        return []
    reference = _probe(model, probe, precision)
    applied = []
    for trick in candidates:
        try:
            trick.apply(model)
            with for_training(model, [*applied, trick.name]):
                problem = _probe(model, probe, precision, trick.chunked_loss, reference)
        except Exception as error:  # a library change the trick did not foresee
            problem = f"it raised {type(error).__name__}: {common.first_line(error)}"
        if problem:
            with contextlib.suppress(Exception):
                trick.remove(model)
            note_switched_off(trick.name, problem)
        else:
            trick.confirm(model)
            applied.append(trick.name)
    return applied


AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def _probe(model, batch: dict, precision: str, chunked_loss: bool = False, reference: dict | None = None):
    """The loss, logits and every gradient of one training step on `batch`, with dropout off,
    leaving the model, its gradients and the random state as they were. With `reference` (such a
    result of the stock computation), the step's figures are compared with it in place instead
    (no copy of the gradients): returns why they disagree, or None."""
    import torch

    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}
    dtype = getattr(torch, AUTOCAST_DTYPES[precision]) if precision in AUTOCAST_DTYPES else None
    dropouts = {module: module.p for module in model.modules() if isinstance(module, torch.nn.Dropout)}
    rng, was_training = torch.get_rng_state(), model.training
    try:
        for module in dropouts:
            module.p = 0.0
        model.train()
        model.zero_grad(set_to_none=True)
        result = {}
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            if chunked_loss:
                loss = chunked_model_loss(model, batch, dtype or torch.float32)
            else:
                output = model(**batch)
                loss = output.loss
                result["logits"] = output.logits.detach().float()
        loss.backward()
        result["loss"] = loss.detach().float().reshape(1)
        for name, parameter in model.named_parameters():
            if parameter.grad is not None:
                gradient = parameter.grad.to_dense() if parameter.grad.is_sparse else parameter.grad
                result[name] = gradient.detach().float()
                if reference is None:
                    result[name] = result[name].clone()
        return result if reference is None else _difference(reference, result, precision)
    finally:
        model.zero_grad(set_to_none=True)
        for module, p in dropouts.items():
            module.p = p
        model.train(was_training)
        torch.set_rng_state(rng)


def _difference(reference: dict, result: dict, precision: str) -> str | None:
    """Why `result` disagrees with the stock `reference`, or None when it agrees. Each tensor's
    error may be `tolerance` of its own norm plus `tolerance` of what a tensor of its size holds at
    the model's average gradient magnitude: gradients that are zero in exact arithmetic (a key
    bias's, under softmax) keep only rounding noise, which is large relative to themselves."""
    tolerance = TOLERANCE[precision]
    expected_names = set(reference) - ({"logits"} if "logits" not in result else set())
    if set(result) != expected_names:
        return f"other gradients than the stock computation: {sorted(set(result) ^ expected_names)[:3]}"
    gradients = [value for name, value in reference.items() if name not in ("loss", "logits")]
    squares = sum(float(value.square().sum()) for value in gradients)
    mean_square = squares / max(1, sum(value.numel() for value in gradients))
    for name, value in result.items():
        expected = reference[name]
        if value.shape != expected.shape:
            return f"{name} has shape {tuple(value.shape)}, the stock one {tuple(expected.shape)}"
        error, scale = float((value - expected).norm()), float(expected.norm())
        typical = (mean_square * value.numel()) ** 0.5 if name not in ("loss", "logits") else 0.0
        if not error <= tolerance * (scale + typical) + 1e-7:  # also catches NaN
            return f"{name} differs from the stock computation by {error / max(scale, 1e-12):.1%}"
    return None


# ---- dropout ----------------------------------------------------------------------------------


@functools.cache
def fast_dropout_class():
    """torch.nn.Dropout that draws its mask three times faster on a CPU, where torch's Bernoulli
    sampler spends about 12 ns on each value: the model's dropout modules (the `fast_dropout`
    trick) and the attention probabilities of the CPU attention.

    FastDropout cuts four 15-bit random numbers out of every 64-bit draw of the same seeded
    generator: the same distribution (the drop probability is rounded to a multiple of 1/32768),
    reproducible and resumable, another random stream."""
    import torch

    class FastDropout(torch.nn.Dropout):
        def forward(self, x):
            if not self.training or x.device.type != "cpu" or self.p == 0:
                return super().forward(x)
            threshold = round(self.p * 32768)  # drop where the 15-bit draw falls below it
            words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_()  # 63 random bits each
            draws = words.view(torch.int16)[:x.numel()].view(x.shape).bitwise_and_(0x7FFF)
            return x.masked_fill(draws < threshold, 0).mul_(32768 / (32768 - threshold))

    return FastDropout


def check_fast_dropout() -> None:
    """FastDropout's own check (with dropout off, the model probe cannot see it): on 2^16 values,
    the share dropped is p within five standard deviations, and every kept value is x / (1 - p)
    (p rounded to a multiple of 1/32768)."""
    import torch

    p = round(0.1 * 32768) / 32768
    x = torch.rand(1 << 16) + 1
    with torch.random.fork_rng():
        y = fast_dropout_class()(p).train()(x)
    dropped = float((y == 0).float().mean())
    kept = y != 0
    if abs(dropped - p) > 5 * (p * (1 - p) / x.numel()) ** 0.5:
        raise RuntimeError(f"dropped {dropped:.3f} of the values instead of {p}")
    if not torch.allclose(y[kept], x[kept] / (1 - p), rtol=1e-6):
        raise RuntimeError("kept values are not scaled by 1 / (1 - p)")


def _dropout_modules(model) -> list:
    import torch

    return [module for module in model.modules() if type(module) is torch.nn.Dropout and module.p > 0]


def _can_use_fast_dropout(model) -> bool:
    return not _on_gpu(model) and bool(_dropout_modules(model))


def _use_fast_dropout(model) -> None:
    check_fast_dropout()  # the model probe runs with dropout off, so FastDropout checks its own draws
    for module in _dropout_modules(model):
        module.__class__ = fast_dropout_class()


def _remove_fast_dropout(model) -> None:
    import torch

    for module in model.modules():
        if type(module) is fast_dropout_class():
            module.__class__ = torch.nn.Dropout


def _on_gpu(model) -> bool:
    return next(model.parameters()).device.type != "cpu"


# ---- attention -------------------------------------------------------------------------------

# Attention scores of at most this many elements (batch x heads x queries x keys) take the plain
# matmul path; longer inputs keep SDPA, whose memory does not grow with the scores.
CPU_ATTENTION_MAX_SCORES = 2 ** 23
CPU_ATTENTION = "cpu_matmul_sdpa"


def _can_use_cpu_attention(model) -> bool:
    return (not _on_gpu(model) and getattr(model.config, "_attn_implementation", None) == "sdpa"
            and hasattr(model, "set_attn_implementation"))


def _use_cpu_attention(model) -> None:
    """Train on a CPU with two plain bf16 matrix products around the softmax where the scores are
    small. PyTorch's fused CPU kernels are slower for training (29.7 vs 46.6 ms forward and
    backward for one SmolLM2 layer at 8 x 256 tokens), and with dropout they draw their mask with
    the slow Bernoulli sampler. The same attention; only the kernels and the rounding differ.
    GPU tensors, evaluation and long inputs keep SDPA."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    check_fast_dropout()  # its attention dropout; the model probe runs with dropout off
    AttentionInterface.register(CPU_ATTENTION, _cpu_training_attention)
    AttentionMaskInterface.register(CPU_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    model.set_attn_implementation(CPU_ATTENTION)


def restore_attention(model) -> None:
    """Undo the CPU attention before a model is saved or handed on (its config names SDPA again)."""
    if getattr(model.config, "_attn_implementation", None) == CPU_ATTENTION:
        model.set_attn_implementation("sdpa")


def _cpu_training_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    batch, heads, queries, head_dim = query.shape
    keys = key.shape[2]
    plain = (module.training and query.device.type == "cpu" and kwargs.get("position_bias") is None
             and kwargs.get("softcap") is None and batch * heads * queries * keys <= CPU_ATTENTION_MAX_SCORES)
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
    # without materialising (and keeping for backward) an fp32 copy of every score.
    probabilities = torch.softmax(scores, dim=-1).to(value.dtype)
    if dropout > 0:
        probabilities = fast_dropout_class()(dropout)(probabilities)
    output = torch.matmul(probabilities, value)
    return output.transpose(1, 2).contiguous(), None


# ---- the first-token last layer ----------------------------------------------------------------

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


def _last_layer(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the model
    layers_path = FIRST_TOKEN_CLASSIFIERS.get(type(base).__name__)
    return base.base_model.get_submodule(layers_path)[-1] if layers_path else None


def _first_token_forward(layer):
    """The first-token forward for `layer`'s structure, or None where it does not fit."""
    attention = getattr(layer, "attention", None)
    if hasattr(layer, "feed_forward_chunk") and hasattr(getattr(attention, "self", None), "query"):
        if getattr(layer, "add_cross_attention", False) or layer.chunk_size_feed_forward:
            return None
        return functools.partial(_first_token_bert_layer, layer)
    if hasattr(layer, "sa_layer_norm") and hasattr(attention, "q_lin"):
        return functools.partial(_first_token_distilbert_block, layer)
    return None


def _can_use_first_token_last_layer(model) -> bool:
    layer = _last_layer(model)
    return layer is not None and _first_token_forward(layer) is not None


def _use_first_token_last_layer(model) -> None:
    """Let the last encoder layer compute the [CLS] position only: the head of these classifiers
    reads nothing else. The other positions' keys and values are still needed (the first position
    attends to every token), but not their queries, attention outputs and feed-forward blocks:
    about a seventh of a 6-layer encoder's matrix products, in training and evaluation alike. The
    model's last_hidden_state then has one position."""
    layer = _last_layer(model)
    layer.forward = _first_token_forward(layer)


def _remove_first_token_last_layer(model) -> None:
    layer = _last_layer(model)
    if "forward" in vars(layer):
        del layer.forward


def _first_token_bert_layer(layer, hidden_states, attention_mask=None, *args, cache=None,
                            encoder_attention_mask=None, **kwargs):
    # The cross-attention and cache arguments are accepted and unused: _first_token_forward()
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


# ---- the word-embedding gradient ---------------------------------------------------------------


def _can_keep_embedding_gradient(model) -> bool:
    import torch

    embedding = model.get_input_embeddings()
    return (type(embedding) is torch.nn.Embedding and embedding.weight.requires_grad and embedding.max_norm is None
            and not _on_gpu(model) and common.world_size() == 1)


def _keep_embedding_gradient(model) -> None:
    """Accumulate the word-embedding gradient into one buffer kept from step to step.

    The library builds the gradient of an embedding matrix as a fresh dense tensor every step
    (zeroed in full, then a few hundred rows written): 47 MB for MiniLM's 30,522 x 384 matrix,
    which glibc maps and the kernel faults in afresh each time. Here the embedding emits its
    sparse row gradient, which autograd adds into the kept dense buffer; before the next step
    only the rows written are zeroed again. The optimizer sees the same dense gradient. Off on
    GPUs (whose caching allocator has no such cost) and in multi-process runs (DDP would
    all-reduce sparse gradients)."""
    import torch

    embedding = model.get_input_embeddings()
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

    embedding.sparse = True
    embedding.kept_gradient_hook = embedding.register_forward_pre_hook(install_buffer)
    embedding.written_rows = written_rows  # for the Trainer's gradient clipping


def _drop_embedding_gradient(model) -> None:
    embedding = model.get_input_embeddings()
    embedding.sparse = False
    if hasattr(embedding, "kept_gradient_hook"):
        embedding.kept_gradient_hook.remove()
        del embedding.kept_gradient_hook, embedding.written_rows
    embedding.weight.grad = None


def written_embedding_rows(model):
    """The written rows of a kept word-embedding gradient, else None."""
    input_embeddings = getattr(model, "get_input_embeddings", None)  # not on a DDP wrapper
    written_rows = getattr(input_embeddings(), "written_rows", None) if input_embeddings else None
    return written_rows() if written_rows is not None else None


def clip_gradients_by_rows(model, rows, max_norm: float, total=None):
    """torch.nn.utils.clip_grad_norm_ for a model whose word-embedding gradient is zero outside
    `rows`: the norm and the scaling read only those rows of it (not all 47 MB of MiniLM's), for
    the same total norm and the same clipped gradients. Returns the total norm before clipping
    (`total`, when the caller has it already)."""
    import torch

    weight = model.get_input_embeddings().weight
    parameters = [p for p in model.parameters() if p.grad is not None and p is not weight]
    row_gradients = weight.grad.index_select(0, rows)
    if total is None:
        total = gradient_norm_by_rows(model, rows)
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # clip_grads_with_norm_'s own formula
    weight.grad.index_copy_(0, rows, row_gradients.mul_(coefficient))
    return total


def gradient_norm_by_rows(model, rows):
    """The total gradient norm of `model`, reading only `rows` of its kept embedding gradient."""
    import torch

    weight = model.get_input_embeddings().weight
    gradients = [p.grad for p in model.parameters() if p.grad is not None and p is not weight]
    return torch.nn.utils.get_total_norm(gradients + [weight.grad.index_select(0, rows)])


# ---- the chunked language-model loss -----------------------------------------------------------

# Architectures whose logits are exactly lm_head(last hidden state): no soft-capping, logit scale
# or bias, so the loss can be computed from the hidden states chunk by chunk.
CHUNKED_LOSS_MODEL_TYPES = {"gpt2", "llama", "mistral", "qwen2", "qwen3", "gpt_neox", "smollm3", "olmo", "olmo2"}

# On a GPU a chunk's fp32 logits may take this much memory: few, large chunks keep the GPU busy
# (each chunk is a handful of kernel launches) while a small card still never holds all the logits.
GPU_LOSS_CHUNK_BYTES = 512 * 2**20


def chunked_loss_parts(model):
    """(decoder, lm_head) when the chunked loss computes exactly the model's own loss, else None."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wrapper
    if not hasattr(inner, "get_output_embeddings"):
        return None
    head = inner.get_output_embeddings()
    decoder = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    if (inner.config.model_type not in CHUNKED_LOSS_MODEL_TYPES or decoder is None or head is None
            or getattr(head, "bias", None) is not None or getattr(inner.config, "final_logit_softcapping", None)):
        return None
    return decoder, head


def loss_chunk_rows(vocabulary: int, on_gpu: bool = False) -> int:
    """Positions per loss chunk. On a CPU: the most (a power of two, 16 to 512) whose fp32 logits
    stay under the allocator's largest mmap threshold, so that every chunk reuses the memory of the
    one before instead of mapping fresh pages: 128 for GPT-2's and SmolLM2's ~50k tokens. On a
    GPU: up to 8192 within GPU_LOSS_CHUNK_BYTES (2048 for a ~50k vocabulary)."""
    limit, most = (GPU_LOSS_CHUNK_BYTES, 8192) if on_gpu else (LARGEST_MMAP_THRESHOLD, 512)
    rows = 16
    while rows < most and 2 * rows * vocabulary * 4 <= limit:
        rows *= 2
    return rows


@functools.cache
def chunked_cross_entropy():
    """An autograd function: the summed next-token cross-entropy of lm_head(hidden) and its gradients,
    computed a few hundred positions at a time. The full (tokens x vocabulary) fp32 logits of the
    usual path (400 MB for 8 x 256 tokens and a 49k vocabulary) are never built; softmax and its
    gradient are formed in one pass while a chunk is hot in cache. Under torch.inference_mode() (the
    perplexity evaluation) only the loss is computed."""
    import torch

    class ChunkedLinearCrossEntropy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, labels, compute_dtype):
            gradients = not torch.is_inference_mode_enabled()
            with torch.autocast(hidden.device.type, enabled=False):
                w = weight.to(compute_dtype)
                grad_hidden = torch.empty_like(hidden) if gradients else None
                grad_weight = torch.zeros_like(weight, dtype=torch.float32) if gradients and weight.requires_grad else None
                total = torch.zeros((), dtype=torch.float32, device=hidden.device)
                rows = loss_chunk_rows(weight.shape[0], on_gpu=hidden.is_cuda)
                for start in range(0, hidden.shape[0], rows):
                    h = hidden[start:start + rows].to(compute_dtype)
                    targets = labels[start:start + rows]
                    valid = targets != -100
                    safe_targets = targets.clamp(min=0)
                    log_probabilities = torch.log_softmax((h @ w.T).float(), dim=-1)
                    total -= (log_probabilities.gather(1, safe_targets[:, None]).squeeze(1) * valid).sum()
                    if not gradients:
                        continue
                    probabilities = log_probabilities.exp_()  # d(loss)/d(logits) = softmax - one-hot
                    probabilities[torch.arange(len(targets), device=h.device), safe_targets] -= 1
                    # On a GPU, bool(valid.all()) would stall the queue once per chunk: mask always.
                    if hidden.is_cuda or not bool(valid.all()):
                        probabilities.mul_(valid[:, None])
                    grad_logits = probabilities.to(compute_dtype)
                    grad_hidden[start:start + rows] = grad_logits @ w
                    if grad_weight is not None:
                        grad_weight += (grad_logits.T @ h).float()
            if gradients:
                ctx.save_for_backward(grad_hidden, grad_weight if grad_weight is not None else torch.empty(0))
                ctx.has_weight_grad = grad_weight is not None
            return total

        @staticmethod
        def backward(ctx, grad_total):
            grad_hidden, grad_weight = ctx.saved_tensors
            return (grad_hidden * grad_total.to(grad_hidden.dtype),
                    (grad_weight * grad_total).to(grad_weight.dtype) if ctx.has_weight_grad else None, None, None)

    return ChunkedLinearCrossEntropy


def chunked_next_token_nll(model, batch: dict, compute_dtype):
    """The summed next-token cross-entropy of `model` on `batch` (labels -100 ignored), from the
    hidden states chunk by chunk (chunked_cross_entropy()); call it under autocast as the model's
    own forward would run."""
    import torch

    decoder, head = chunked_loss_parts(model)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    shifted = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)  # the last position predicts nothing
    return chunked_cross_entropy().apply(hidden.flatten(0, 1), head.weight, shifted.flatten(), compute_dtype)


def chunked_model_loss(model, batch: dict, compute_dtype):
    """The mean next-token loss, as the model's own forward computes it."""
    return chunked_next_token_nll(model, batch, compute_dtype) / (batch["labels"][:, 1:] != -100).sum()


# ---- LoRA inputs ---------------------------------------------------------------------------


def _lora_casts_inputs(model) -> bool:
    config = getattr(model, "peft_config", {}).get("default")
    return config is not None and not config.use_dora and not config.lora_dropout


def for_training(model, applied: list[str]):
    """The context the training runs in. With "lora_input_casting_off": PEFT's casting of each
    adapter's input to the adapter's dtype is off (peft.helpers.disable_input_dtype_casting). PEFT
    casts a bf16 input up to the adapter's fp32 weights, and autocast casts it straight back to
    bf16 for the product: an exact round trip that copies every such activation twice (with all
    seven SmolLM2 projections adapted, ~10% of a training step)."""
    if "lora_input_casting_off" not in applied:
        return contextlib.nullcontext()
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model)


# ---- LoRA's frozen weights -----------------------------------------------------------------------


def _has_frozen_fp32_linears(model) -> bool:
    import torch

    return hasattr(model, "peft_config") and not _on_gpu(model) and any(
        type(m) is torch.nn.Linear and not m.weight.requires_grad and m.weight.dtype == torch.float32
        for m in model.modules())


def _store_frozen_weights_in_bf16(model) -> None:
    """Store the frozen weights and biases of LoRA's base linear layers in bf16. Autocast casts every
    fp32 weight to bf16 again at each forward, trained or frozen (MiniLM: 38 casts, 11M parameters
    per step); a frozen weight never changes, so casting it once gives the same bf16 values at every
    step: the same forward and gradients. The trained parameters stay fp32, and the base model on
    disk is untouched (merging and predicting reload it). Until the check passes the fp32 tensors
    are kept, so that stepping aside restores them exactly."""
    import torch

    originals = {}
    for module in model.modules():
        if type(module) is torch.nn.Linear and not module.weight.requires_grad and module.weight.dtype == torch.float32:
            for parameter in (module.weight, module.bias):
                if parameter is not None and not parameter.requires_grad:
                    originals[parameter] = parameter.data
                    parameter.data = parameter.data.to(torch.bfloat16)
    model.fp32_frozen_weights = originals


def _restore_frozen_weights(model) -> None:
    for parameter, data in getattr(model, "fp32_frozen_weights", {}).items():
        parameter.data = data
    model.fp32_frozen_weights = {}


# ---- LoRA's adapted layers ---------------------------------------------------------------------


def _fusable_lora_layers(model) -> list:
    """PEFT's LoRA linear layers that the fused product can run: one plain adapter ("default", no
    dropout, no DoRA) on a frozen torch Linear (not GPT-2's transposed Conv1D)."""
    import torch

    config = getattr(model, "peft_config", {}).get("default")
    if config is None or config.use_dora or config.lora_dropout or _on_gpu(model):
        return []
    from peft.tuners.lora.layer import Linear

    return [module for module in model.modules()
            if type(module) is Linear and type(module.base_layer) is torch.nn.Linear and not module.fan_in_fan_out
            and not module.base_layer.weight.requires_grad and list(module.lora_A) == ["default"]]


@functools.cache
def _lora_product():
    """y = x W^T + b + s (x A^T) B^T as one autograd function. PEFT computes the adapter's output,
    scales it and adds it to the frozen layer's as three more full-size tensors each way (forward
    and backward); here the scaled update is accumulated into the frozen product's output, and the
    adapter's input gradient into the frozen layer's, by the matrix products themselves. Under
    autocast it computes in the autocast dtype, as the library's layers do."""
    import torch

    class LoraProduct(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, lora_a, lora_b, scaling):
            device = x.device.type
            dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
            ctx.scaling, ctx.x_shape, ctx.x_dtype, ctx.adapter_dtype = scaling, x.shape, x.dtype, lora_a.dtype
            with torch.autocast(device, enabled=False):
                rows = x.reshape(-1, x.shape[-1]).to(dtype)
                weight, lora_a, lora_b = weight.to(dtype), lora_a.to(dtype), (lora_b * scaling).to(dtype)
                out = rows @ weight.t() if bias is None else torch.addmm(bias.to(dtype), rows, weight.t())
                hidden = rows @ lora_a.t()
                out.addmm_(hidden, lora_b.t())
            ctx.save_for_backward(rows, weight, lora_a, lora_b, hidden)
            return out.view(*x.shape[:-1], out.shape[-1])

        @staticmethod
        def backward(ctx, grad):
            rows, weight, lora_a, scaled_b, hidden = ctx.saved_tensors
            grad = grad.reshape(-1, grad.shape[-1]).to(rows.dtype)
            grad_hidden = grad @ scaled_b
            grad_b = (grad.t() @ hidden).mul_(ctx.scaling).to(ctx.adapter_dtype)
            grad_a = (grad_hidden.t() @ rows).to(ctx.adapter_dtype)
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = (grad @ weight).addmm_(grad_hidden, lora_a).view(ctx.x_shape).to(ctx.x_dtype)
            return grad_x, None, None, grad_a, grad_b, None

    return LoraProduct


def _fused_lora_forward(layer, x, *args, **kwargs):
    if args or kwargs or layer.merged or layer.disable_adapters or layer.active_adapters != ["default"]:
        return type(layer).forward(layer, x, *args, **kwargs)
    base = layer.base_layer
    return _lora_product().apply(x, base.weight, base.bias, layer.lora_A["default"].weight,
                                 layer.lora_B["default"].weight, layer.scaling["default"])


def _fuse_lora_products(model) -> None:
    import types

    for layer in _fusable_lora_layers(model):
        layer.forward = types.MethodType(_fused_lora_forward, layer)


def _unfuse_lora_products(model) -> None:
    for module in model.modules():
        if getattr(module.__dict__.get("forward"), "__func__", None) is _fused_lora_forward:
            del module.forward


TRICKS = [
    # Encoders only: text generation merges its adapters into the model in memory, which must stay fp32.
    Trick("frozen_weights_in_bf16", ("sequence-classification", "token-classification"),
          _has_frozen_fp32_linears, _store_frozen_weights_in_bf16, _restore_frozen_weights, autocast_only=True,
          confirm=lambda model: setattr(model, "fp32_frozen_weights", {})),
    Trick("first_token_last_layer", ("sequence-classification",), _can_use_first_token_last_layer,
          _use_first_token_last_layer, _remove_first_token_last_layer),
    # Token classification only: on SST-2 it saved 2.9-4.5% of a step (BENCHMARKS.md, "Levers").
    Trick("fast_dropout", ("token-classification",), _can_use_fast_dropout, _use_fast_dropout, _remove_fast_dropout),
    Trick("cpu_attention", ("sequence-classification", "token-classification"), _can_use_cpu_attention,
          _use_cpu_attention, restore_attention),
    # Causal LMs under autocast only: in fp32 the fused SDPA kernel, which skips the masked half of
    # the causal scores, is faster (benchmarks/cpu_attention.py: 25.1 against 38.1 ms for SmolLM2's).
    Trick("cpu_attention", ("causal-lm",), _can_use_cpu_attention, _use_cpu_attention, restore_attention,
          autocast_only=True),
    # Sequence classification only: on NER's longer inputs it saved under 4% of a step.
    Trick("embedding_gradient_buffer", ("sequence-classification",),
          _can_keep_embedding_gradient, _keep_embedding_gradient, _drop_embedding_gradient),
    Trick("chunked_loss", ("causal-lm",), lambda model: chunked_loss_parts(model) is not None,
          lambda model: None, lambda model: None, chunked_loss=True),
    Trick("fused_lora_products", ("sequence-classification", "token-classification", "causal-lm"),
          lambda model: bool(_fusable_lora_layers(model)), _fuse_lora_products, _unfuse_lora_products),
    Trick("lora_input_casting_off", ("sequence-classification", "token-classification", "causal-lm"),
          _lora_casts_inputs, lambda model: None, lambda model: None, autocast_only=True),
]


# --------------------------------------------------------------------------------------------
# The Trainer
# --------------------------------------------------------------------------------------------


def trainer_class(base, applied: list[str], precision: str = "fp32"):
    """`base` (a Trainer class) with the training-step side of the model tricks in `applied`:
    gradient clipping that reads only the written rows of a kept embedding gradient (checked
    against the library's clipping on the first step), and the chunked language-model loss."""
    import torch

    if "embedding_gradient_buffer" not in applied and "chunked_loss" not in applied:
        return base
    compute_dtype = getattr(torch, AUTOCAST_DTYPES.get(precision, "float32"))

    class FasterTrainer(base):
        clipping_by_rows = "embedding_gradient_buffer" in applied
        clipping_checked = False

        def _clip_grad_norm(self, model):
            rows = written_embedding_rows(model) if self.clipping_by_rows else None
            if rows is None:
                return super()._clip_grad_norm(model)
            total = None
            if not self.clipping_checked:  # once: against the library's norm of every gradient
                self.clipping_checked = True
                try:
                    stock = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
                    total = gradient_norm_by_rows(model, rows)
                    problem = None if torch.allclose(total, stock, rtol=1e-4) else \
                        f"gradient norm {float(total):.6g} against the library's {float(stock):.6g}"
                except Exception as error:
                    problem = f"it raised {type(error).__name__}: {common.first_line(error)}"
                if problem:
                    self.clipping_by_rows = False
                    note_switched_off("clipping_by_rows", problem)
                    return super()._clip_grad_norm(model)
            return clip_gradients_by_rows(model, rows, self.args.max_grad_norm, total)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # A model wrapped for distributed training (model is not self.model) must run its own
            # forward, which synchronises the gradients.
            if "chunked_loss" not in applied or return_outputs or model is not self.model:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            with self.accelerator.autocast():
                total = chunked_next_token_nll(model, inputs, compute_dtype)
            count = num_items_in_batch if num_items_in_batch is not None else (inputs["labels"][:, 1:] != -100).sum()
            return total / count

    return FasterTrainer


# --------------------------------------------------------------------------------------------
# Loading: a GGUF model converted once
# --------------------------------------------------------------------------------------------

CACHE_DIR_ENV = "FINETUNE_TOOLKIT_CACHE"


def model_cache_dir() -> Path:
    """Where converted GGUF models are kept: $FINETUNE_TOOLKIT_CACHE, else ~/.cache/finetuning-toolkit."""
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finetuning-toolkit"


def cached_checkpoint(resolved: common.ResolvedModel, convert: Callable[[common.ResolvedModel, Path], None],
                      enabled: bool = True) -> common.ResolvedModel:
    """The GGUF model `resolved` as an ordinary checkpoint directory, converted by `convert(resolved,
    directory)` on first use and kept in model_cache_dir(); other models are returned as they are.

    transformers reads a GGUF file by parsing its metadata three times (tokenizer, config, weights)
    and de-quantizing every tensor: ~18 s per run for the bundled SmolLM2-135M on a 2-core
    machine, against ~1 s for the converted copy. The de-quantized float32 weights are stored as
    they are, so the model is the same. The key covers the file's path, size and modification time
    and the transformers version (which does the conversion)."""
    import hashlib
    import shutil
    import tempfile

    import transformers

    if not enabled or not resolved.gguf_file:
        return resolved
    gguf = Path(resolved.path) / resolved.gguf_file
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}".encode())
    target = model_cache_dir() / f"{gguf.stem}-{key.hexdigest()[:16]}"
    if target.is_dir():
        if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file() \
                and any(target.glob("*.safetensors")):
            return dataclasses.replace(resolved, path=str(target), gguf_file=None)
        print(f"note: the converted copy in {target} is incomplete (files removed?); converting it again.")
        shutil.rmtree(target, ignore_errors=True)
    print(f"note: converting {gguf.name} once to an ordinary checkpoint in {target}; later runs load it "
          "in about a second.")
    staging = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        convert(resolved, staging)
        os.replace(staging, target)  # the directory appears complete or not at all
    except OSError as error:
        if not target.is_dir():  # another run may have finished the same conversion first
            print(f"note: cannot write the model cache ({common.first_line(error)}); reading the GGUF file directly.")
            return resolved
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return dataclasses.replace(resolved, path=str(target), gguf_file=None)
