"""Hardware: which device and dtype a model runs in, where its inputs go, and whether a pass fits in memory.

Owns the defaults of `load_model(device=, dtype=)` / `scan(device=, dtype=)` ("cuda" when available, else "cpu";
float32 on CPU, bfloat16 on CUDA), the parsing of device / dtype arguments, the input device of a model (where its
embedding runs: accelerate's execution device for dispatched models), the placement record a scan keeps as
provenance (devices, dtypes, accelerate device map), and the memory estimate made before every pass (weights plus
the largest per-layer working set of the statistics path at that length and batch), which raises
`MemoryBudgetError` naming the knob to turn instead of letting the pass die out of memory, and the prompt chunks
of KV-cached greedy decoding's prefill (`prefill_chunk_size`: one pass unless its attention scores would not fit).

Nothing here moves a model: models the user passes stay where they are (ARCHITECTURE.md, "Devices and dtypes belong
to the user's model").
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from posprobe.errors import InputError, MemoryBudgetError

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "fp64": torch.float64,
}
DTYPE_CHOICES = ("float32", "bfloat16", "float16")  # what the CLI offers (float64 works through the API)


def default_device() -> torch.device:
    """"cuda" when a CUDA device is visible, else "cpu"."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """float32 on CPU (and anything that is not CUDA), bfloat16 on CUDA."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A device argument (None = the default) as a `torch.device`; an unavailable CUDA device is refused here."""
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"device={device!r} is not a torch device ({exc}). Use 'cpu', 'cuda', 'cuda:1' or 'mps'.") \
            from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device={device!r} was asked for, but torch sees no CUDA device (torch {torch.__version__}, "
                         f"built {'with' if torch.version.cuda else 'without'} CUDA). Use device='cpu', or install a "
                         f"CUDA build of torch on a machine with a GPU.")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise InputError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                         f"(cuda:0..cuda:{torch.cuda.device_count() - 1}).")
    if resolved.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise InputError(f"device={device!r} was asked for, but MPS is not available here. Use device='cpu'.")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """A dtype argument (None = the default for `device`; names like "bf16" / "bfloat16") as a `torch.dtype`."""
    if dtype is None:
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise InputError(f"dtype={dtype} is not a floating-point dtype; use one of {', '.join(DTYPE_CHOICES)}.")
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name not in _DTYPES:
        raise InputError(f"dtype={dtype!r} is not a dtype posprobe knows; use one of {', '.join(DTYPE_CHOICES)} "
                         f"(or float64).")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------------------------
# Where a model lives


def _execution_device(module: Any) -> torch.device | None:
    """accelerate's execution device of a dispatched module (its AlignDevicesHook), if any."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is None:
        return None
    return torch.device(f"cuda:{device}" if isinstance(device, int) else device)


def input_device(model: Any) -> torch.device:
    """The device a model's input ids must be on: that of its input embedding (accelerate's execution device when
    the embedding is dispatched or offloaded), else its first non-meta parameter, else the CPU."""
    if model is None:
        return torch.device("cpu")
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if embedding is not None:
        hooked = _execution_device(embedding)
        if hooked is not None:
            return hooked
        weight = getattr(embedding, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
            return weight.device
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.device.type != "meta":
                return p.device
    return torch.device("cpu")


def placement(model: Any) -> dict[str, Any]:
    """Where a model's weights are, for a scan's provenance: input device, devices and dtypes of the parameters
    (offloaded parameters show as "meta"), and accelerate's `hf_device_map` when the model was dispatched."""
    out: dict[str, Any] = {"input_device": str(input_device(model))}
    if isinstance(model, torch.nn.Module):
        devices: dict[str, int] = {}
        dtypes: dict[str, int] = {}
        for p in model.parameters():
            devices[str(p.device)] = devices.get(str(p.device), 0) + p.numel()
            dtypes[dtype_name(p.dtype)] = dtypes.get(dtype_name(p.dtype), 0) + p.numel()
        out["devices"] = sorted(devices)
        out["dtype"] = max(dtypes, key=dtypes.__getitem__) if dtypes else None
        out["dtypes"] = sorted(dtypes)
    device_map = getattr(model, "hf_device_map", None)
    out["device_map"] = {str(k): str(v) for k, v in device_map.items()} if device_map else None
    return out


def model_dtype(model: Any) -> torch.dtype:
    """The dtype of most of a model's floating-point parameters (float32 when it has none)."""
    counts: dict[torch.dtype, int] = {}
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.dtype.is_floating_point:
                counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


# ---------------------------------------------------------------------------------------------------------------
# Memory


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one pass needs on its device beyond what is already allocated there (weights are resident)."""

    weights: int  # resident weights on the device (already allocated: reported, not added to `needed`)
    activations: int  # hidden states, q/k/v, MLP intermediates of one layer at this batch and length
    statistics: int  # the largest per-layer working set of the streaming statistics (one query chunk of patterns)
    logits: int  # the LM head's output at the kept positions
    n_tokens: int
    batch: int

    @property
    def needed(self) -> int:
        return self.activations + self.statistics + self.logits


def _gib(n: int | float) -> str:
    return f"{n / 2**30:.2f} GiB"


# The streaming statistics' per-layer working set (one query chunk) is kept under this many bytes, and under a
# quarter of the device's free memory: 256-query chunks fit it up to ~40k tokens x 4 heads (Gemma 3 270M at its full
# 32k context keeps 256), while a 128k-context model with 32 heads reads ~10 queries at a time instead of failing.
STATISTICS_BYTES = 2**30
STATISTICS_FACTOR = 6  # float32 [b, H, chunk, n] tensors of one chunk alive at once (scores, probs, entropy terms,
# a float64 prefix sum = 2); the factor `estimate_pass_memory` charges


def statistics_bytes_per_query(info: Any, n_tokens: int, batch: int) -> int:
    """Bytes of the statistics working set per query of a chunk: STATISTICS_FACTOR float32 rows [b, H, n]."""
    return STATISTICS_FACTOR * batch * info.n_heads * n_tokens * 4


def query_chunk_size(info: Any, n_tokens: int, batch: int = 1, *, device: torch.device | str | None = None,
                     limit: int = 256, budget_bytes: int | None = None) -> int:
    """Queries per pattern chunk: the largest chunk <= `limit` whose statistics working set
    (`statistics_bytes_per_query` x chunk) fits `budget_bytes` (default: min(STATISTICS_BYTES, a quarter of the free
    memory of `device`; `POSPROBE_MEMORY_LIMIT` caps that). At least 1: a pass that cannot fit one query is refused by
    `check_memory`. The global (full-attention) layers' [chunk x n] rows are what this bounds at long context."""
    budget = _working_set_budget(STATISTICS_BYTES, device, budget_bytes)
    per_query = statistics_bytes_per_query(info, max(1, n_tokens), max(1, batch))
    return int(max(1, min(limit, budget // per_query)))


def _working_set_budget(cap: int, device: torch.device | str | None, budget_bytes: int | None) -> int:
    """`budget_bytes` when given, else min(cap, a quarter of the free memory of `device`)."""
    if budget_bytes is not None:
        return budget_bytes
    free = available_memory(torch.device(device)) if device is not None else None
    return cap if free is None else min(cap, free // 4)


# One prefill pass of KV-cached greedy decoding keeps one layer's float32 attention scores under this many bytes (and
# under a quarter of the device's free memory). The [b, H, queries, keys] scores bound what the model's own kernel
# holds; measured on the CPU, Gemma 3 270M's one-pass 16k prefill peaked 2.2 GB over the model (scores: 4.3 GB), its
# 4 chunks of 4096 at 0.8 GB. It prefills one row of up to 8192 tokens in one pass, 32k in 16 chunks of 2047.
PREFILL_BYTES = 2**30


def prefill_scores_bytes(info: Any, n_tokens: int, batch: int = 1, queries: int | None = None) -> int:
    """Bytes of one layer's float32 attention scores in a prefill pass: `queries` (default: all `n_tokens`) queries
    of `batch` rows over `n_tokens` keys, b x n_heads x queries x n x 4."""
    return batch * info.n_heads * (n_tokens if queries is None else queries) * n_tokens * 4


def prefill_chunk_size(info: Any, n_tokens: int, batch: int = 1, *, device: torch.device | str | None = None,
                       budget_bytes: int | None = None) -> int | None:
    """Prompt tokens per prefill pass of KV-cached greedy decoding, or None for the whole prompt in one pass.

    None while one layer's scores over the whole prompt (`prefill_scores_bytes`) fit `budget_bytes` (default:
    min(PREFILL_BYTES, a quarter of the free memory of `device`; `POSPROBE_MEMORY_LIMIT` caps that), so short
    prompts run as one pass. Otherwise the chunk whose [b, H, chunk, n] scores fit the budget, evened out over the
    chunks the prompt then needs (16384 tokens, 4096 fit: 4 x 4096; 32748 tokens, 2049 fit: 16 x 2047); at least 1.
    """
    n = max(1, int(n_tokens))
    budget = _working_set_budget(PREFILL_BYTES, device, budget_bytes)
    if prefill_scores_bytes(info, n, max(1, batch)) <= budget:
        return None
    fits = max(1, budget // prefill_scores_bytes(info, n, max(1, batch), queries=1))
    n_chunks = -(-n // fits)
    return -(-n // n_chunks)


def check_prefill_chunk(value: Any) -> int | str | None:
    """`prefill_chunk` of greedy decoding ("auto", None or a positive int) as given, or the InputError saying so."""
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"prefill_chunk must be 'auto' (chunks only when one prefill pass would not fit the memory "
                         f"budget, devices.prefill_chunk_size), None (the whole prompt in one pass) or a positive "
                         f"number of prompt tokens per pass; got {value!r}.")
    return int(value)


def estimate_pass_memory(
    info: Any, n_tokens: int, batch: int, dtype: torch.dtype, *, reads_attention: bool, n_logits: int,
    query_chunk: int | None = None, weights: int = 0, pattern_memo_bytes: int = 256 * 2**20,
) -> MemoryEstimate:
    """Estimate of one pass's working set. info: `ModelInfo`; n_logits: positions whose logits are computed.

    Activations: ~6 residual-sized and 3 MLP-sized ([b, n, 4 D] assumed) tensors per layer in the model dtype, plus
    q/k/v. Statistics (only when attention is read): one query chunk of float32 scores / probabilities / entropy
    terms [b, H, chunk, n] (x4), a float64 prefix sum of it (x2), and the pattern memo (bounded, see
    `LayerCapture.PATTERN_MEMO_BYTES`). Logits are float32 [b, n_logits, vocab]. query_chunk: queries per chunk
    (None: `query_chunk_size` with the default budget, as the probes choose it).
    """
    itemsize = torch.empty(0, dtype=dtype).element_size()
    d, d_model = info.head_dim, info.d_model
    activations = batch * n_tokens * itemsize * (6 * d_model + 3 * 4 * d_model
                                                 + (info.n_heads + 2 * info.n_kv_heads) * d)
    statistics = 0
    if reads_attention:
        chunk = min(query_chunk or query_chunk_size(info, n_tokens, batch), n_tokens)
        pattern = batch * info.n_heads * chunk * n_tokens * 4
        statistics = STATISTICS_FACTOR * pattern + min(pattern_memo_bytes, pattern * max(1, -(-n_tokens // chunk)))
    logits = batch * n_logits * info.vocab_size * 4
    return MemoryEstimate(weights=weights, activations=activations, statistics=statistics, logits=logits,
                          n_tokens=n_tokens, batch=batch)


def available_memory(device: torch.device) -> int | None:
    """Free bytes on `device` now (CUDA: the driver's free memory; CPU: the OS's available memory), None if
    unknown. `POSPROBE_MEMORY_LIMIT` (bytes) caps it, for shared machines and for tests."""
    free: int | None = None
    if device.type == "cuda" and torch.cuda.is_available():
        free = int(torch.cuda.mem_get_info(device)[0])
    elif device.type == "cpu":
        try:
            import psutil

            free = int(psutil.virtual_memory().available)
        except ImportError:  # pragma: no cover - psutil ships with the dependencies
            free = None
    limit = os.environ.get("POSPROBE_MEMORY_LIMIT")
    if limit:
        free = int(float(limit)) if free is None else min(free, int(float(limit)))
    return free


def check_memory(estimate: MemoryEstimate, devices: Iterable[torch.device], *, dtype: torch.dtype,
                 model_name: str = "the model", headroom: float = 0.9) -> None:
    """Raise `MemoryBudgetError` when the estimated working set exceeds `headroom` x the free memory of a device
    the pass runs on (the smallest such device decides: a dispatched model's layers each need their working set)."""
    for device in devices:
        if device.type == "meta":
            continue
        free = available_memory(device)
        if free is None or estimate.needed <= headroom * free:
            continue
        parts = (f"activations {_gib(estimate.activations)}, attention statistics {_gib(estimate.statistics)}, "
                 f"logits {_gib(estimate.logits)}; weights already resident {_gib(estimate.weights)}")
        raise MemoryBudgetError(
            f"A pass over {estimate.batch} x {estimate.n_tokens} tokens of {model_name} in {dtype_name(dtype)} needs "
            f"about {_gib(estimate.needed)} on {device} ({parts}), but only {_gib(free)} is free there. Nothing was "
            f"run. Turn one of these knobs: a smaller batch (batch_size= / --batch-size), fewer sampled queries or a "
            f"shorter context (Budget.max_queries / context_lengths, --budget quick), a smaller dtype "
            f"(dtype='bfloat16' / --dtype bfloat16), or a device with more memory (device= / --device).")


def accumulator_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype statistics are summed in on `device`: float64, except on MPS (no float64 there: float32)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def hashable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with real values: a model dispatched by accelerate with offloaded layers holds `meta`
    placeholders that accelerate's hooks fill during forward ("Cannot copy out of meta tensor" otherwise); those
    weights are onloaded module by module to the CPU (`accelerate.utils.modeling.get_state_dict_offloaded_model`),
    so the digest equals that of the same weights undispatched. Memory: the offloaded weights, once, on the CPU."""
    state = model.state_dict()
    if not any(t.device.type == "meta" for t in state.values()):
        return state
    from accelerate.utils.modeling import get_state_dict_offloaded_model

    loaded = get_state_dict_offloaded_model(model)
    return {name: loaded.get(name, tensor) for name, tensor in state.items()}
