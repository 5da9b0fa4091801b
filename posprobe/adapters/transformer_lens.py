"""The TransformerLens adapter: posprobe's access interface over a TL 4.x `TransformerBridge`, through its hook points.

Owns the translation of `Tap`s and edit specs into TransformerBridge hook names (posprobe's conventions: explicit
position_ids, post-rotary q/k as the model computed them, the model's own attention pattern) and the safe way to
boot a bridge from a user's HF model. Positional facts (`ModelInfo`) always come from the HF config of the model the
bridge wraps, via `posprobe.adapters.architectures.model_info`, never from `bridge.cfg` (BACKENDS.md: its rotary
base and window fields are wrong for Gemma 3 / SmolLM2).

Tap -> hook point (per block `blocks.{l}`):
    RESID_PRE  hook_resid_pre            ATTN_IN   attn.hook_in (the post-norm input of attention)
    Q_PRE/K_PRE  attn.hook_q_normed / hook_k_normed where the model normalises q/k before rotating (Gemma 3),
                 else attn.hook_q / hook_k (projection output); layers without RoPE report the post-rotary q/k
    Q/K        attn.hook_rot_q / hook_rot_k (post-rotary; KV heads not expanded)
    PATTERN    attn.hook_pattern (the bridge's eager softmax; handed to probes as `pattern_source`)
    SCORES     computed by `LayerCapture.scores` from Q/K (the bridge's own scores carry finfo.min at masked entries)
    ATTN_OUT   attn.hook_out             RESID_POST  hook_resid_post (where `on_layer` is called)

Edits: AttentionEdit at "scores" through attn.hook_attn_scores (masked entries handed to the edit as -inf), at
"probs" through attn.hook_pattern; ProjectionInputEdit through attn.q.hook_in / attn.k.hook_in; RotaryEdit by
replacing the layer's cos/sin with the identity rotation at attn.hook_cos / hook_sin. When PATTERN is tapped on a
layer with an attention edit, probes see the edited pattern (the one the model used).

Streaming: each layer's capture is handed to `on_layer` at its hook_resid_post and dropped; nothing is kept. The
bridge runs eager attention (TL forces it), so a pass costs the eager column of BACKENDS.md's table, not SDPA's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from posprobe.access import (
    AttentionEdit,
    Edit,
    EditContext,
    LayerCallback,
    LayerCapture,
    ModelAccess,
    ProjectionInputEdit,
    RotaryEdit,
    Tap,
    causal_key_mask,
)
from posprobe.adapters._wrapping import private_copy, state_dict_hash
from posprobe.adapters.architectures import model_info, module_paths
from posprobe.errors import InterventionError, MissingDependencyError, ModelLoadError, UnsupportedModelError

_INSTALL = 'pip install "transformer-lens>=4.0"  (or: pip install "posprobe[lens]")'
_QK_TAPS = frozenset({Tap.Q, Tap.K, Tap.SCORES})
_PRE_TAPS = frozenset({Tap.Q_PRE, Tap.K_PRE})

Hook = tuple[str, Callable[..., Any]]


def _bridge_class() -> Any:
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        raise MissingDependencyError("The transformer_lens backend", _INSTALL) from None
    return TransformerBridge


def _to_heads_first(x: Tensor, n_heads: int, head_dim: int, *, heads_first: bool) -> Tensor:
    """Bring a q/k hook value to [b, heads, n, d] (TL hands most of them as [b, n, heads, d])."""
    if x.dim() == 3:  # flat [b, n, heads * d] (pre-reshape norms)
        return x.view(*x.shape[:2], n_heads, head_dim).transpose(1, 2)
    return x if heads_first else x.transpose(1, 2)


class TransformerLensAccess(ModelAccess):
    """ModelAccess over a TransformerLens 4.x `TransformerBridge` (hook points; eager attention)."""

    backend = "transformer_lens"

    def __init__(self, bridge: Any, tokenizer: Any = None, name: str | None = None) -> None:
        super().__init__()
        bridge_cls = _bridge_class()
        if not isinstance(bridge, bridge_cls):
            raise UnsupportedModelError(
                f"TransformerLensAccess expects a transformer_lens TransformerBridge, got "
                f"{type(bridge).__module__}.{type(bridge).__name__}. Boot one with "
                f"TransformerBridge.boot_transformers(...), or wrap an HF model with "
                f"TransformerLensAccess.from_hf(hf_model, tokenizer)."
            )
        self.bridge: Any = bridge
        hf_model = bridge.original_model
        if not hasattr(hf_model, "config"):
            raise UnsupportedModelError(
                f"The bridge wraps a {type(hf_model).__name__} without an HF config; posprobe reads positional facts "
                f"from the HF config. Boot the bridge from a transformers causal LM."
            )
        self.tokenizer = tokenizer if tokenizer is not None else bridge.tokenizer
        if self.tokenizer is None:
            raise ModelLoadError(
                "The bridge has no tokenizer and none was given; posprobe needs it to build prompts. "
                "Pass TransformerLensAccess(bridge, tokenizer=AutoTokenizer.from_pretrained(path))."
            )
        self.paths = module_paths(hf_model.config)
        label = name or getattr(hf_model, "name_or_path", "") or type(hf_model).__name__
        self.info = model_info(hf_model, label, self.tokenizer)
        self._hf_source: nn.Module | None = None  # the user's untouched HF model when built by from_hf (hashing)
        self._hash: str | None = None
        self._has_hook = set(bridge.hook_dict)

    @classmethod
    def from_hf(cls, hf_model: nn.Module, tokenizer: Any, name: str | None = None) -> TransformerLensAccess:
        """Boot a bridge over a private copy of `hf_model` (shared weights), leaving the user's model untouched.

        `TransformerBridge.boot_transformers(hf_model=...)` rewires the model it is given in place (eager
        attention, bridge submodules) and adjusts the tokenizer it is given; both get copies here.
        """
        bridge_cls = _bridge_class()
        from transformers import PreTrainedModel

        if not isinstance(hf_model, PreTrainedModel) or hf_model.get_output_embeddings() is None:
            raise UnsupportedModelError(
                f"TransformerLensAccess.from_hf needs a transformers causal LM (AutoModelForCausalLM), got "
                f"{type(hf_model).__module__}.{type(hf_model).__name__}."
            )
        if tokenizer is None:
            raise ModelLoadError(
                "TransformerLensAccess.from_hf needs the model's tokenizer (TL would otherwise try to download "
                "one). Pass tokenizer=AutoTokenizer.from_pretrained(path)."
            )
        module_paths(hf_model.config)  # unsupported architectures fail here, before the copy
        label = name or getattr(hf_model, "name_or_path", "") or type(hf_model).__name__
        model_copy = private_copy(hf_model).eval()
        if not getattr(model_copy.config, "architectures", None):  # configs built in code have none; TL needs it
            model_copy.config.architectures = [type(hf_model).__name__]
        tok_copy = copy.deepcopy(tokenizer)
        # TL re-loads a tokenizer by name unless it believes BOS is already handled; posprobe passes ids, never
        # text, to the bridge, so the copy only needs to satisfy that check (no download, no behaviour change).
        tok_copy.init_kwargs.setdefault("name_or_path", label)
        tok_copy.init_kwargs["add_bos_token"] = True
        try:
            bridge = bridge_cls.boot_transformers(label, hf_model=model_copy, tokenizer=tok_copy, device="cpu")
        except ValueError as exc:
            raise UnsupportedModelError(
                f"TransformerLens cannot wrap {type(hf_model).__name__}: {str(exc).splitlines()[0][:300]}. "
                f"Use backend='hf' for this model."
            ) from None
        access = cls(bridge, tokenizer=tokenizer, name=label)
        access._hf_source = hf_model
        return access

    # --- provenance ---------------------------------------------------------------------------------------------
    def weights_hash(self) -> str:
        """Same hash as the HF adapter when built by `from_hf`; else a hash of the bridge's HF state dict."""
        if self._hash is None:
            if self._hf_source is not None:
                state = self._hf_source.state_dict()
            else:
                state = {k.replace("_original_component.", ""): v
                         for k, v in self.bridge.original_model.state_dict().items()}
            self._hash = state_dict_hash(state)
        return self._hash

    # --- hooks ---------------------------------------------------------------------------------------------------
    def _hook(self, layer: int, name: str) -> str | None:
        full = f"blocks.{layer}.{name}"
        return full if full in self._has_hook else None

    def _tap_hooks(
        self, taps: frozenset[Tap], on_layer: LayerCallback | None, position_ids: Tensor
    ) -> list[Hook]:
        if not taps and on_layer is None:
            return []
        info = self.info
        captures: dict[int, LayerCapture] = {}
        hooks: list[Hook] = []

        def capture(layer: int) -> LayerCapture:
            if layer not in captures:
                captures[layer] = LayerCapture(layer=layer, info=info.layers[layer], model=info,
                                               position_ids=position_ids)
                captures[layer].extras["attn_scale"] = info.attn_scale
            return captures[layer]

        def setter(layer: int, field: str, transform: Callable[[Tensor], Tensor] | None = None) -> Callable:
            def hook(x: Tensor, hook: Any) -> None:
                setattr(capture(layer), field, transform(x) if transform else x)
            return hook

        for layer, layer_info in enumerate(info.layers):
            if Tap.RESID_PRE in taps:
                hooks.append((f"blocks.{layer}.hook_resid_pre", setter(layer, "resid_pre")))
            if Tap.ATTN_IN in taps:
                hooks.append((f"blocks.{layer}.attn.hook_in", setter(layer, "attn_in")))
            q_name = self._hook(layer, "attn.hook_rot_q") or self._hook(layer, "attn.hook_q")
            k_name = self._hook(layer, "attn.hook_rot_k") or self._hook(layer, "attn.hook_k")
            need_post = bool(taps & _QK_TAPS) or (bool(taps & _PRE_TAPS) and not layer_info.has_rope)
            if need_post:
                for which, hook_name, n in (("q", q_name, info.n_heads), ("k", k_name, info.n_kv_heads)):
                    if hook_name is None:
                        raise UnsupportedModelError(
                            f"This TransformerLens bridge exposes no blocks.{layer}.attn.hook_rot_{which} or "
                            f"hook_{which}, so posprobe cannot read the layer's {which}. Use backend='hf'.")
                    fields = [which] if layer_info.has_rope else [which, f"{which}_pre"]

                    def post(x: Tensor, hook: Any, layer: int = layer, fields: list[str] = fields, n: int = n) -> None:
                        value = _to_heads_first(x, n, info.head_dim, heads_first=False)
                        for field in fields:
                            setattr(capture(layer), field, value)

                    hooks.append((hook_name, post))
            if taps & _PRE_TAPS and layer_info.has_rope:
                for which, n in (("q", info.n_heads), ("k", info.n_kv_heads)):
                    normed = self._hook(layer, f"attn.hook_{which}_normed")
                    hook_name = normed or f"blocks.{layer}.attn.hook_{which}"
                    heads_first = normed is not None and self._pos_dim(hook_name) == 2

                    def to_heads(x: Tensor, n: int = n, hf: bool = heads_first) -> Tensor:
                        return _to_heads_first(x, n, info.head_dim, heads_first=hf)

                    hooks.append((hook_name, setter(layer, f"{which}_pre", to_heads)))
            if Tap.PATTERN in taps:

                def pattern(x: Tensor, hook: Any, layer: int = layer) -> None:
                    capture(layer).pattern_source = lambda query_index, x=x: x[:, :, query_index]

                hooks.append((f"blocks.{layer}.attn.hook_pattern", pattern))
            if Tap.ATTN_OUT in taps:
                hooks.append((f"blocks.{layer}.attn.hook_out", setter(layer, "attn_out")))

            def resid_post(x: Tensor, hook: Any, layer: int = layer) -> None:
                cap = capture(layer)
                del captures[layer]
                if Tap.RESID_POST in taps:
                    cap.resid_post = x
                if on_layer is not None:
                    on_layer(cap)

            hooks.append((f"blocks.{layer}.hook_resid_post", resid_post))
        return hooks

    def _pos_dim(self, hook_name: str) -> int | None:
        return getattr(self.bridge.hook_dict[hook_name], "pos_dim", None)

    def _edit_hooks(self, edits: Sequence[Edit], position_ids: Tensor) -> list[Hook]:
        hooks: list[Hook] = []
        for edit in edits:
            if isinstance(edit, AttentionEdit):
                hooks.append(self._attention_edit(edit, position_ids))
            elif isinstance(edit, ProjectionInputEdit):
                hooks += self._projection_edit(edit)
            elif isinstance(edit, RotaryEdit):
                hooks += self._rotary_edit(edit)
            else:  # pragma: no cover - the Edit union is closed
                raise InterventionError(f"The transformer_lens adapter cannot apply a {type(edit).__name__}.")
        return hooks

    def _attention_edit(self, edit: AttentionEdit, position_ids: Tensor) -> Hook:
        window = self.info.layers[edit.layer].sliding_window
        layer = edit.layer

        def context(x: Tensor) -> EditContext:
            n_keys = x.shape[-1]
            query_index = torch.arange(n_keys - x.shape[-2], n_keys, device=x.device)
            return EditContext(layer=layer, query_index=query_index, n_keys=n_keys, position_ids=position_ids)

        if edit.stage == "scores":

            def scores(x: Tensor, hook: Any) -> Tensor:
                ctx = context(x)
                allowed = causal_key_mask(ctx.query_index, ctx.n_keys, window)
                return edit.fn(x.masked_fill(~allowed, float("-inf")), ctx)

            return f"blocks.{layer}.attn.hook_attn_scores", scores

        def probs(x: Tensor, hook: Any) -> Tensor:
            return edit.fn(x, context(x))

        return f"blocks.{layer}.attn.hook_pattern", probs

    def _projection_edit(self, edit: ProjectionInputEdit) -> list[Hook]:
        if self.paths.q_proj is None or self._hook(edit.layer, "attn.q.hook_in") is None:
            raise InterventionError(
                f"{self.info.architecture} has a fused QKV projection; ProjectionInputEdit needs separate "
                f"q/k projections (Llama, Gemma, Qwen, Mistral families)."
            )
        dims = torch.tensor(edit.dims, dtype=torch.long)

        def scaler(last_only: bool) -> Callable[[Tensor, Any], Tensor]:
            def hook(x: Tensor, hook: Any) -> Tensor:
                x = x.clone()
                if last_only:
                    x[:, -1:, dims] *= edit.factor
                else:
                    x[..., dims] *= edit.factor
                return x
            return hook

        hooks: list[Hook] = []
        if edit.keys:
            hooks.append((f"blocks.{edit.layer}.attn.k.hook_in", scaler(False)))
        if edit.queries != "none":
            hooks.append((f"blocks.{edit.layer}.attn.q.hook_in", scaler(edit.queries == "last")))
        return hooks

    def _rotary_edit(self, edit: RotaryEdit) -> list[Hook]:
        if not self.info.layers[edit.layer].has_rope:
            raise InterventionError(f"Layer {edit.layer} of {self.info.name} has no RoPE to disable.")
        if self._hook(edit.layer, "attn.hook_cos") is None:
            raise InterventionError(
                f"The TransformerLens bridge of {self.info.architecture} exposes no per-layer cos/sin hook "
                f"(attn.hook_cos), so posprobe cannot replace layer {edit.layer}'s rotation through TL. "
                f"Use backend='hf' for RotaryEdit on this model."
            )
        return [
            (f"blocks.{edit.layer}.attn.hook_cos", lambda x, hook: torch.ones_like(x)),
            (f"blocks.{edit.layer}.attn.hook_sin", lambda x, hook: torch.zeros_like(x)),
        ]

    # --- one pass ----------------------------------------------------------------------------------------------
    def _forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        taps: frozenset[Tap],
        on_layer: LayerCallback | None,
        logit_positions: Tensor | None,
        edits: Sequence[Edit],
    ) -> Tensor | None:
        # edits first: taps on the same hook point then see what the model used
        hooks = self._edit_hooks(edits, position_ids) + self._tap_hooks(taps, on_layer, position_ids)
        # logits_to_keep=1 when none are wanted: one row of the LM head instead of n (the bridge always runs it)
        keep: int | Tensor = 1 if logit_positions is None else logit_positions
        with self.bridge.hooks(fwd_hooks=hooks):
            logits = self.bridge(input_ids, return_type="logits", position_ids=position_ids, use_cache=False,
                                 logits_to_keep=keep)
        return None if logit_positions is None else logits

    def close(self) -> None:
        """Hooks live only inside each pass (`bridge.hooks` removes them); the user's HF model was never touched."""
