"""Loading Hugging Face models and tokenizers: the zoo's only contact with transformers and tokenizers.

Owns the one-time GGUF -> safetensors conversion of the embedded models (`convert_gguf`, de-quantised to fp32 and
written atomically with a manifest the zoo verifies), `from_pretrained` (a local directory, a `.gguf` file or a hub
id, placed on the requested device in the requested dtype), the seeded tiny random models used by tests and as
random-init baselines (`tiny_model`, `byte_tokenizer`: RoPE, NoPE and absolute-position variants of one shape, see
docs/probes/implicit_position.md) and `is_hf_model`. `posprobe.models` keeps the public names and the cache; this
module does no work at import beyond importing transformers.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

from posprobe._io import replace_dir
from posprobe.errors import ModelLoadError, UnknownNameError


def is_hf_model(model: Any) -> bool:
    """Whether `model` is a transformers `PreTrainedModel`."""
    return isinstance(model, PreTrainedModel)


def convert_gguf(gguf_path: Path, target: Path, source_sha: str, label: str, cache_format: int) -> None:
    """De-quantise a GGUF file once into an fp32 safetensors + tokenizer folder, written atomically."""
    print(f"posprobe: converting {label} from GGUF to a local safetensors cache (once, about a minute) -> {target}",
          file=sys.stderr, flush=True)
    start = time.time()
    with replace_dir(target) as tmp:  # the shared atomic swap: a failed or killed conversion leaves no half cache
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
        model.hf_quantizer = None  # save_pretrained refuses GGUF-loaded models otherwise
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        (tmp / "posprobe-cache.json").write_text(json.dumps(
            {"format": cache_format, "source": str(gguf_path), "source_sha256": source_sha, "files": files},
            indent=1))
    print(f"posprobe: cache ready in {time.time() - start:.0f} s", file=sys.stderr, flush=True)


def from_pretrained(path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, *,
                    known_names: Iterable[str] = ()) -> tuple[torch.nn.Module, Any]:
    """Load weights straight onto `device` in `dtype` (device "auto": accelerate's device_map="auto")."""
    p = Path(path).expanduser()
    placement = {"device_map": "auto"} if str(device) == "auto" else \
        ({"device_map": str(device)} if torch.device(device).type != "cpu" else {})
    try:
        if p.is_file() and p.suffix == ".gguf":
            tokenizer = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
            model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dtype, **placement)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(p) if p.exists() else path)
            model = AutoModelForCausalLM.from_pretrained(str(p) if p.exists() else path, dtype=dtype, **placement)
    except (OSError, ValueError) as exc:
        where = "local directory" if p.exists() else "hub id (needs network access)"
        raise ModelLoadError(
            f"Could not load {path!r} as a {where}: {str(exc).splitlines()[0]}. Pass a directory holding "
            f"config.json + weights + tokenizer, a .gguf file, or one of the known names: {', '.join(known_names)}."
        ) from None
    return model, tokenizer


def byte_tokenizer() -> Any:
    """A byte-level tokenizer (256 byte tokens + <pad>, <bos>, <eos>, <unk>) that covers any text, no download."""
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_model(
    kind: str = "rope",
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    head_dim: int | None = None,
    max_positions: int = 4096,
    rope_theta: float = 10000.0,
    vocab_size: int | None = None,
    seed: int = 0,
) -> tuple[torch.nn.Module, Any]:
    """A seeded random-init HF causal LM and its byte tokenizer. kind: "rope", "nope" or "absolute"."""
    tokenizer = byte_tokenizer()
    vocab = vocab_size or len(tokenizer)
    head_dim = head_dim or d_model // n_heads
    common = dict(vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                  num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, head_dim=head_dim,
                  max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  tie_word_embeddings=False)
    torch.manual_seed(seed)
    if kind == "rope":
        config = LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
        model = LlamaForCausalLM(config)
    elif kind == "nope":
        config = SmolLM3Config(**common, no_rope_layers=[0] * n_layers,
                               rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
        model = SmolLM3ForCausalLM(config)
    elif kind == "absolute":
        config = GPT2Config(vocab_size=vocab, n_embd=d_model, n_layer=n_layers, n_head=n_heads,
                            n_positions=max_positions, bos_token_id=1, eos_token_id=2)
        model = GPT2LMHeadModel(config)
    else:
        raise UnknownNameError("tiny model kind", kind, ["rope", "nope", "absolute"])
    model.config._attn_implementation = "sdpa"
    return model.eval(), tokenizer
