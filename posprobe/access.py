"""The access interface: the only thing probes, interventions and tasks know about a model.

Owns `ModelInfo` / `LayerInfo` (per-layer positional facts, "RoPE layout" in docs/probes/index.md), the `Tap` vocabulary
of activations a probe may ask for, `LayerCapture` (what one layer hands a probe during a streaming forward pass), the
edit specs interventions use, and the backend-free attention math (`attention_probs`, `causal_key_mask`) that adapters
share when they compute attention patterns chunk-wise from the rotated q/k the model already produced.

A forward pass goes: `access.run(input_ids, taps=..., on_layer=fn)`; `fn(LayerCapture)` is called once per layer as
the pass runs, and nothing is retained after it returns unless the probe keeps it (streaming, no activation cache).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import enum
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from posprobe.errors import ContextLengthError, InputError, InterventionError, UnsupportedModelError
from posprobe.types import KeyMask, Pattern, QueryIndex, Scores

# ---------------------------------------------------------------------------------------------------------------
# Model facts


class Positional(str, enum.Enum):
    """How a layer encodes position."""

    ROPE = "rope"
    NONE = "none"  # NoPE: no explicit positional signal in this layer
    ABSOLUTE = "absolute"  # learned / sinusoidal embeddings added once at the input
    ALIBI = "alibi"  # a per-head linear distance bias on the logits (BLOOM, Falcon with alibi); slopes in LayerInfo


class ChunkLayout(str, enum.Enum):
    """Which coordinates of a RoPE head form the 2-d chunk k (METRICS.md "RoPE layout")."""

    HALF_SPLIT = "half_split"  # (k, k + r/2): HF rotate_half (Llama, Gemma, Qwen, Mistral, GPT-NeoX)
    INTERLEAVED = "interleaved"  # (2k, 2k + 1): GPT-J, RoFormer


@dataclass(frozen=True)
class LayerInfo:
    """Positional facts of one layer, read from the model's own config."""

    index: int
    layer_type: str  # "full_attention", "sliding_attention", ...
    positional: Positional
    rope_theta: float | None = None
    rotary_dim: int | None = None
    chunk_layout: ChunkLayout | None = None
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = None
    # Added in round 2 (defaults keep scans saved before them loadable):
    rotary_offset: int = 0  # first rotated dim of a q/k head (MLA heads are cat(nope, rope): offset = nope dims)
    rotary_cos_scale: float = 1.0  # multiplier the model folds into cos/sin (YaRN / LongRoPE attention factor)
    attention_chunk: int | None = None  # chunked attention (Llama 4): a query sees keys of its own chunk only
    attn_scale: float | None = None  # multiplier of q.k in this layer's logit (Granite, Gemma's query_pre_attn_scalar)
    attn_softcap: float | None = None  # tanh logit softcap (Gemma 2)
    learned_sinks: bool = False  # a learned per-head sink logit joins the softmax (gpt-oss): rows sum to < 1
    alibi_slopes: tuple[float, ...] | None = None  # per-head ALiBi slopes (positional "alibi")

    @property
    def has_rope(self) -> bool:
        return self.positional is Positional.ROPE

    @property
    def n_chunks(self) -> int:
        """Number of 2-d rotary chunks (r / 2); 0 for layers without RoPE."""
        return (self.rotary_dim or 0) // 2 if self.has_rope else 0

    def chunk_frequencies(self) -> np.ndarray:
        """w_k = theta ** (-2k / r), k = 0 fastest. Unscaled base frequencies (rope_scaling is reported separately)."""
        if not self.has_rope:
            return np.zeros(0)
        if self.rotary_dim is None or self.rope_theta is None:
            raise UnsupportedModelError(
                f"Layer {self.index} is a RoPE layer without rotary_dim / rope_theta (got {self.rotary_dim!r} / "
                f"{self.rope_theta!r}), so its chunk frequencies are undefined. The adapter that read the model's "
                f"config must set both (or mark the layer Positional.NONE).")
        r = float(self.rotary_dim)
        return self.rope_theta ** (-2.0 * np.arange(self.n_chunks) / r)

    def chunk_coordinates(self) -> tuple[np.ndarray, np.ndarray]:
        """Indices (a_k, b_k) of the two coordinates of every chunk k in a head vector."""
        k = np.arange(self.n_chunks)
        if self.chunk_layout is ChunkLayout.INTERLEAVED:
            return self.rotary_offset + 2 * k, self.rotary_offset + 2 * k + 1
        return self.rotary_offset + k, self.rotary_offset + k + self.n_chunks

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["positional"] = self.positional.value
        d["chunk_layout"] = self.chunk_layout.value if self.chunk_layout else None
        d["alibi_slopes"] = list(self.alibi_slopes) if self.alibi_slopes is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerInfo:
        d = {k: v for k, v in d.items() if k in _LAYER_FIELDS}  # fields of newer versions are dropped
        d["positional"] = Positional(d["positional"])
        d["chunk_layout"] = ChunkLayout(d["chunk_layout"]) if d.get("chunk_layout") else None
        if d.get("alibi_slopes") is not None:
            d["alibi_slopes"] = tuple(float(x) for x in d["alibi_slopes"])
        return cls(**d)


@dataclass(frozen=True)
class ModelInfo:
    """Shape and positional facts of a model, per layer. Adapters build it from the HF config."""

    name: str
    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    vocab_size: int
    max_positions: int | None
    attn_scale: float  # multiplier of q.k in the pre-softmax logit
    attn_softcap: float | None
    adds_bos: bool  # the tokenizer prepends BOS itself
    layers: tuple[LayerInfo, ...]
    family: str | None = None  # HF model_type ("llama", "gemma3_text", ...); None in scans saved before round 2
    moe: bool = False  # the MLP is a mixture of experts (routing is not probed; attention is what posprobe reads)

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    def kv_head(self, head: int) -> int:
        """The KV head that query head `head` reads (grouped-query attention)."""
        return head // self.group_size

    @property
    def kv_head_map(self) -> tuple[int, ...]:
        return tuple(self.kv_head(h) for h in range(self.n_heads))

    @property
    def has_rope(self) -> bool:
        return any(layer.has_rope for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "layers"}
        d["layers"] = [layer.to_dict() for layer in self.layers]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        d = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}}
        d["layers"] = tuple(LayerInfo.from_dict(x) for x in d["layers"])
        return cls(**d)


_LAYER_FIELDS = frozenset(f.name for f in dataclasses.fields(LayerInfo))


# ---------------------------------------------------------------------------------------------------------------
# Taps: what a probe can ask to see


class Tap(str, enum.Enum):
    """Activations a probe can request for every layer of a streaming pass.

    Shapes (batch b, query heads H, KV heads G, sequence n, head dim d, model dim D):
    RESID_PRE / RESID_POST / ATTN_OUT: [b, n, D]; ATTN_IN (post-norm input of attention): [b, n, D];
    Q_PRE / Q: [b, H, n, d] (pre-/post-rotary); K_PRE / K: [b, G, n, d];
    PATTERN / SCORES: not tensors but chunked accessors on `LayerCapture` (`pattern_chunks`, `scores`).
    """

    RESID_PRE = "resid_pre"
    ATTN_IN = "attn_in"
    Q_PRE = "q_pre"
    K_PRE = "k_pre"
    Q = "q"
    K = "k"
    PATTERN = "pattern"
    SCORES = "scores"
    ATTN_OUT = "attn_out"
    RESID_POST = "resid_post"


# ---------------------------------------------------------------------------------------------------------------
# Backend-free attention math (shared by adapters and checked against the model's own eager attention in tests)


def causal_key_mask(
    query_index: QueryIndex, n_keys: int, sliding_window: int | None, key_start: int = 0
) -> KeyMask:
    """Boolean [q, k] mask of keys each query may attend to: j <= i and, with a window w, i - j < w."""
    keys = torch.arange(key_start, n_keys, device=query_index.device)
    allowed = keys[None, :] <= query_index[:, None]
    if sliding_window is not None:
        allowed &= (query_index[:, None] - keys[None, :]) < sliding_window
    return allowed


def expand_kv(k: Tensor, n_heads: int) -> Tensor:
    """[b, G, n, d] -> [b, H, n, d] by repeating each KV head for its query-head group."""
    groups = n_heads // k.shape[1]
    return k if groups == 1 else k.repeat_interleave(groups, dim=1)


def grouped_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a [bt, H, m, x] @ b [bt, G, x, n] -> [bt, H, m, n], query head h reading KV head h // (H / G).

    Grouped-query attention without `expand_kv`: the group's query rows are stacked into one matmul against their
    KV head (no repeated copy of b). G == H is a plain matmul."""
    heads, groups = a.shape[1], b.shape[1]
    if groups == heads:
        return torch.matmul(a, b)
    if heads % groups:
        raise ValueError(f"grouped_matmul: {heads} query heads cannot share {groups} KV heads evenly; the model's "
                         f"n_heads must be a multiple of n_kv_heads (check ModelInfo).")
    bt, _, m, x = a.shape
    out = torch.matmul(a.reshape(bt, groups, (heads // groups) * m, x), b)
    return out.view(bt, heads, m, out.shape[-1])


def attention_scores(q: Tensor, k: Tensor, scale: float, softcap: float | None = None) -> Scores:
    """Pre-softmax logits s = scale * q.k (then softcapped as the model does), unmasked. q: [b,H,q,d], k: [b,H,k,d]
    or [b,G,k,d] (grouped-query KV heads, read through `grouped_matmul` without expanding them).

    Computed in float32 or wider whatever the model's dtype (bf16 / fp16 models give float32 statistics)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    s = grouped_matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    return s


def attention_probs(
    q: Tensor,
    k: Tensor,
    query_index: QueryIndex,
    *,
    scale: float,
    softcap: float | None,
    sliding_window: int | None,
    key_start: int = 0,
) -> Pattern:
    """Attention probabilities for queries `query_index` over keys [key_start, key_start + k.shape[2]).

    q: [b, H, cq, d] (rows of `query_index`), k: [b, H or G, nk, d]. Masked entries are exactly 0.
    """
    n_keys = key_start + k.shape[2]
    s = attention_scores(q, k, scale, softcap)
    allowed = causal_key_mask(query_index, n_keys, sliding_window, key_start=key_start)
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1)


def query_key_range(query_index: Tensor, sliding_window: int | None) -> tuple[int, int]:
    """The smallest key range [start, stop) that holds every key these queries can see."""
    stop = int(query_index.max()) + 1
    start = 0 if sliding_window is None else max(0, int(query_index.min()) - sliding_window + 1)
    return start, stop


def widen_band(probs: Tensor, start: int, n_keys: int) -> Tensor:
    """Band probs [..., width] over keys [start, start + width) -> full rows [..., n_keys], zeros elsewhere (the
    band itself when it already spans every key)."""
    if start == 0 and probs.shape[-1] == n_keys:
        return probs
    full = probs.new_zeros(*probs.shape[:-1], n_keys)
    full[..., start : start + probs.shape[-1]] = probs
    return full


# ---------------------------------------------------------------------------------------------------------------
# What one layer hands a probe


@dataclass
class LayerCapture:
    """Everything a probe asked for about one layer during one forward pass. Valid only inside `on_layer`.

    Tensors that were not requested are None. `position_ids` is the [b, n] tensor the model was run with.
    """

    layer: int
    info: LayerInfo
    model: ModelInfo
    position_ids: Tensor
    resid_pre: Tensor | None = None
    attn_in: Tensor | None = None
    q_pre: Tensor | None = None
    k_pre: Tensor | None = None
    q: Tensor | None = None
    k: Tensor | None = None
    attn_out: Tensor | None = None
    resid_post: Tensor | None = None
    pattern_source: Callable[[Tensor], Tensor] | None = None  # query index [cq] -> probs [b, H, cq, n]
    # (the pattern_source it belongs to, query index [cq] -> (probs [b, H, cq, stop - start], start)): the same
    # probabilities over only the key range [start, stop) the queries can see. Used while pattern_source is still
    # the one it was paired with (an edit that replaces pattern_source turns it off).
    band_source: tuple[Callable[[Tensor], Tensor], Callable[[Tensor], tuple[Tensor, int]]] | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return int(self.position_ids.shape[-1])

    @property
    def device(self) -> torch.device:
        """The device this layer ran on (with accelerate dispatch, layers of one model live on different devices):
        that of its q (or k, or any captured tensor), else that of position_ids."""
        for t in (self.q, self.k, self.q_pre, self.k_pre, self.attn_in, self.resid_pre, self.attn_out,
                  self.resid_post):
            if t is not None:
                return t.device
        call = self.extras.get("attention_call")
        if call is not None:
            return call.q.device
        return self.position_ids.device

    def _source(self) -> Callable[[Tensor], tuple[Tensor, int]]:
        """query index -> (probs [b, H, cq, width], first key): a band over the visible key range where the source
        can compute one, else the full [b, H, cq, n] rows with first key 0."""
        if self.pattern_source is not None:
            source = self.pattern_source
            if self.band_source is not None and self.band_source[0] == source:
                return self.band_source[1]
            return lambda query_index: (source(query_index), 0)
        q, k = self.q, self.k
        if q is None or k is None:
            raise RuntimeError("LayerCapture has no pattern: request Tap.PATTERN (or Tap.Q and Tap.K).")
        return lambda query_index: self._band_from_qk(q, k, query_index)

    def _band_from_qk(self, q: Tensor, k: Tensor, query_index: Tensor) -> tuple[Tensor, int]:
        start, stop = query_key_range(query_index, self.info.sliding_window)
        probs = attention_probs(
            q[:, :, query_index],
            k[:, :, start:stop],
            query_index,
            scale=self.info.attn_scale if self.info.attn_scale is not None else self.model.attn_scale,
            # each layer field overrides its model-level value on its own (a layer may set a softcap, not a scale)
            softcap=self.info.attn_softcap if self.info.attn_softcap is not None else self.model.attn_softcap,
            sliding_window=self.info.sliding_window,
            key_start=start,
        )
        return probs, start

    def _pattern_from_qk(self, q: Tensor, k: Tensor, query_index: Tensor) -> Tensor:
        return widen_band(*self._band_from_qk(q, k, query_index), self.n_tokens)

    # Bytes of patterns one capture may memoise (see `pattern`): 16 chunks of 256 queries x 4096 keys x 4 heads fp32.
    PATTERN_MEMO_BYTES = 256 * 2**20

    def pattern(self, query_index: QueryIndex | None = None) -> Pattern:
        """Attention probabilities [b, H, cq, n] for the given queries (all queries if None).

        Results are memoised for the life of this capture (freed when the layer's callback returns), so several
        probes reading the same queries of the same layer share one computation. Memory: the memo keeps results
        while they fit in `PATTERN_MEMO_BYTES` and never evicts (the first result is always kept). A probe sweeping
        all queries in chunks therefore leaves at most that many bytes behind and the next probe's sweep reuses
        the first chunks and recomputes the rest (a first-in-first-out memo missed on every chunk once a sweep
        had more chunks than it held). Sampled queries (one chunk per layer) always hit. Do not modify the
        returned tensor: other probes may receive the same one.
        """
        if query_index is None:
            query_index = torch.arange(self.n_tokens)
        probs, start = self._entry(query_index)
        return widen_band(probs, start, self.n_tokens)

    def pattern_band(self, query_index: QueryIndex) -> tuple[Pattern, int]:
        """(probs [b, H, cq, stop - start], start): the attention probabilities of these queries over the key range
        [start, stop) they can see (`query_key_range`: causal, sliding window); every key outside it is exactly 0
        in `pattern`. Shares `pattern`'s memo; cheaper than it where a window hides most keys. Read-only, as
        `pattern`."""
        probs, start = self._entry(query_index)
        lo, hi = query_key_range(query_index, self.info.sliding_window)
        if lo > start or hi < start + probs.shape[-1]:  # a wider result (full rows, a larger chunk): a view of it
            lo, hi = max(lo, start), min(hi, start + probs.shape[-1])
            probs, start = probs[..., lo - start : hi - start], lo
        return probs, start

    def _entry(self, query_index: QueryIndex) -> tuple[Tensor, int]:
        """The memoised (probs, first key) of these queries, computed on a miss (see `pattern`)."""
        query_index = query_index.to(self.device)  # indices live with the layer's tensors (masks, gathers)
        memo = self.extras.setdefault("pattern_memo", {})
        wanted = query_index.detach().to("cpu", torch.int64).numpy()
        key = wanted.tobytes()  # the exact index list, as bytes
        hit = memo.get(key)
        if hit is not None:
            return hit
        rows = self._memo_rows(wanted)
        if rows is not None:  # every query is a row of a memoised sorted chunk: a gather instead of a recomputation
            held_key, positions = rows
            held, start = memo[held_key]
            return held[:, :, torch.as_tensor(positions, device=held.device)], start
        entry = self._source()(query_index)
        probs = entry[0]
        held_bytes = self.extras.get("pattern_memo_bytes", 0)
        size = probs.numel() * probs.element_size()
        if not memo or held_bytes + size <= self.PATTERN_MEMO_BYTES:
            memo[key] = entry
            self.extras["pattern_memo_bytes"] = held_bytes + size
            if len(wanted) and bool(np.all(wanted[1:] > wanted[:-1])):
                self.extras.setdefault("pattern_memo_sorted", []).append((key, wanted))
        return entry

    def _memo_rows(self, wanted: np.ndarray) -> tuple[bytes, np.ndarray] | None:
        """(key of a memoised chunk with strictly increasing queries that holds every wanted query, their row
        positions in it), or None. A pattern row depends only on its query (the key range of a chunk only adds
        exact zeros), so the rows equal a fresh computation for these queries up to float rounding."""
        for key, held in self.extras.get("pattern_memo_sorted", ()):
            if not len(wanted) or wanted[0] < held[0] or wanted[-1] > held[-1]:
                continue
            positions = np.asarray(np.searchsorted(held, wanted))
            if np.array_equal(held[np.minimum(positions, len(held) - 1)], wanted):
                return key, positions
        return None

    def query_chunk(self, limit: int = 256) -> int:
        """Queries per pattern chunk on this layer: at most `limit`, fewer where the [b, H, chunk, n] working set of
        a long context would not fit (`posprobe.devices.query_chunk_size`, the memory estimate `run` checks).
        Memoised, so every probe reading this capture gets the same chunks and shares the pattern memo."""
        key = f"query_chunk:{limit}"
        if key not in self.extras:
            from posprobe.devices import query_chunk_size

            self.extras[key] = query_chunk_size(self.model, self.n_tokens, int(self.position_ids.shape[0]),
                                                device=self.device, limit=limit)
        return int(self.extras[key])

    def query_chunks(self, chunk_size: int | None = None, queries: Tensor | None = None) -> list[Tensor]:
        """`queries` (default all) split into the chunks `pattern_chunks` reads: at most `chunk_size` queries
        (None: `query_chunk()`), and on a sliding-window layer a new chunk wherever the next query lies a window
        or more past the chunk's first, so a chunk's visible key range spans under two windows (not the whole
        context). Memoised per capture: every probe gets the same chunks and shares the pattern memo."""
        chunk_size = chunk_size or self.query_chunk()
        queries = torch.arange(self.n_tokens) if queries is None else queries
        window = self.info.sliding_window
        key = f"query_chunks:{chunk_size}:" + queries.detach().to("cpu", torch.int64).numpy().tobytes().hex()
        held = self.extras.get(key)
        if held is not None:
            return held
        queries = queries.to(self.device)
        host = queries.detach().to("cpu", torch.int64).numpy()
        bounds: list[int] = []
        first = lo = hi = 0
        for at, pos in enumerate(host.tolist()):
            if at == first:
                lo = hi = pos
                continue
            lo, hi = min(lo, pos), max(hi, pos)
            if at - first >= chunk_size or (window is not None and hi - lo >= window):
                bounds.append(at)
                first, lo, hi = at, pos, pos
        edges = [0, *bounds, len(host)]
        chunks = [queries[a:b] for a, b in zip(edges[:-1], edges[1:]) if b > a]
        self.extras[key] = chunks
        return chunks

    def pattern_chunks(self, chunk_size: int | None = None,
                       queries: Tensor | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield (query_index [cq], probs [b, H, cq, n]) over `queries` (default all), in `query_chunks`.

        Both are on the layer's device (`device`): reduce them there and move per-layer results to the CPU once."""
        for idx in self.query_chunks(chunk_size, queries):
            yield idx, self.pattern(idx)

    def pattern_band_chunks(self, chunk_size: int | None = None,
                            queries: Tensor | None = None) -> Iterator[tuple[Tensor, Tensor, int]]:
        """As `pattern_chunks`, as bands: (query_index [cq], probs [b, H, cq, stop - start], start) over the keys
        [start, stop) each chunk can see (`pattern_band`). A reduction that skips the exact zeros outside the band
        does a window's work per query on a sliding-window layer instead of the whole context's."""
        for idx in self.query_chunks(chunk_size, queries):
            probs, start = self.pattern_band(idx)
            yield idx, probs, start

    def scores(self, query_index: Tensor) -> Tensor:
        """Pre-softmax logits [b, H, cq, n] (scaled, softcapped, NOT masked) for the given queries."""
        call = self.extras.get("attention_call")  # the adapter's record of the model's own call (scale, softcap)
        if call is not None:
            return call.scores(query_index)
        if self.q is None or self.k is None:
            raise RuntimeError("LayerCapture has no q/k: request Tap.SCORES (or Tap.Q and Tap.K).")
        query_index = query_index.to(self.q.device)
        return attention_scores(self.q[:, :, query_index], self.k, self.model.attn_scale, self.model.attn_softcap)


# ---------------------------------------------------------------------------------------------------------------
# Edits (interventions are built from these; adapters apply them and restore the model exactly)


@dataclass(frozen=True)
class EditContext:
    """What an attention edit function sees besides the tensor it edits."""

    layer: int
    query_index: Tensor  # [cq] absolute sequence indices of the queries in this call
    n_keys: int
    position_ids: Tensor | None
    # q [b, H, cq, d] and k [b, G, nk, d] as the attention function received them (rotated), where the adapter
    # provides them (HF); score edits that recompute scores at other relative positions (posprobe.what_if) need them.
    query: Tensor | None = None
    key: Tensor | None = None
    scale: float | None = None  # the layer's multiplier of q.k and its logit softcap, as the model applied them
    softcap: float | None = None


@dataclass(frozen=True)
class AttentionEdit:
    """Replace the attention of layer `layer` by `fn(tensor, ctx)`.

    stage "scores": fn edits the masked pre-softmax logits [b, H, cq, nk] (masked = -inf) before softmax;
    stage "probs": fn edits the probabilities [b, H, cq, nk] after softmax (it should keep rows summing to 1).
    The layer is then computed in eager form from the edited probabilities.
    stage "qk": fn((q, k), ctx) -> (q, k) edits the layer's post-rotary queries [b, H, nq, d] and keys
    [b, G, nk, d] before the attention kernel (it may return keys with one head per query head, G = H); the layer
    then runs through its own kernel (SDPA where the model uses it), so it costs what a plain pass does, and probes
    read the pattern of the edited q/k. Only adapters listing "qk" in `attention_edit_stages` (HF) accept it.
    """

    layer: int
    fn: Callable[..., Any]
    stage: Literal["scores", "probs", "qk"] = "probs"


@dataclass(frozen=True)
class ProjectionInputEdit:
    """Scale dimensions of the (post-norm) attention input when computing keys and/or queries of layer `layer`.

    keys: scale for the key projection at every position; queries: "all", "last" (only the final position of the
    sequence, as Yu et al. 2024) or "none". Values are computed from the unscaled input.
    """

    layer: int
    dims: tuple[int, ...]
    factor: float
    keys: bool = True
    queries: Literal["all", "last", "none"] = "last"


@dataclass(frozen=True)
class RotaryEdit:
    """Replace the rotary embedding of layer `layer` by the identity rotation (a NoPE ablation of that layer)."""

    layer: int


Edit = AttentionEdit | ProjectionInputEdit | RotaryEdit

# The attribute a what-if sets on an access while it swaps a layer's rotary embedding for its own (RoPE rescaling:
# posprobe.what_if.rope_scaling): {layer: (rotary module, layer_type)}. The what-ifs write it; an adapter that needs
# to know which rotaries a pass will use (chunked prefill refuses length-dependent ones) reads it. One name, here.
ROTARY_OVERRIDES = "_posprobe_what_if_rotary"


def validate_edits(info: ModelInfo, edits: Sequence[Edit],
                   stages: Sequence[str] = ("scores", "probs")) -> None:
    """Raise `InterventionError` for an edit `info`'s model cannot honour exactly (nothing is applied half-way).

    Checked: the edit type; the layer; AttentionEdit's stage, a callable fn and, when the fn declares `heads`
    (query-head indices it edits, as `mask_heads` does), those heads; ProjectionInputEdit's dims (of the d_model
    residual stream), a finite factor and its `queries` mode; RotaryEdit's layer has a rotary embedding.
    """
    if isinstance(edits, (AttentionEdit, ProjectionInputEdit, RotaryEdit)):
        raise InterventionError(f"edits must be a list of edits; got a single {type(edits).__name__}. "
                                f"Write edits=[edit].")
    for edit in edits:
        if not isinstance(edit, (AttentionEdit, ProjectionInputEdit, RotaryEdit)):
            raise InterventionError(f"{edit!r} is not an edit: use AttentionEdit, ProjectionInputEdit or RotaryEdit "
                                    f"from posprobe.access (interventions build them for you).")
        layer, kind = edit.layer, type(edit).__name__
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < info.n_layers:
            raise InterventionError(f"Edit {kind} targets layer {layer!r}, but {info.name} has layers "
                                    f"0..{info.n_layers - 1}. Choose a layer in that range.")
        if isinstance(edit, AttentionEdit):
            if edit.stage not in stages:
                known = edit.stage in ("scores", "probs", "qk")
                raise InterventionError(
                    f"AttentionEdit stage must be one of {', '.join(map(repr, stages))}"
                    + (" on this backend ('qk' edits q/k inside the HF attention interface; use backend='hf')"
                       if known else "") + f"; got {edit.stage!r}.")
            if not callable(edit.fn):
                raise InterventionError(f"AttentionEdit fn must be a callable (tensor, EditContext) -> tensor; got "
                                        f"{type(edit.fn).__name__}.")
            bad = [h for h in getattr(edit.fn, "heads", None) or () if not 0 <= int(h) < info.n_heads]
            if bad:
                raise InterventionError(f"AttentionEdit on layer {layer} edits query heads {bad}, but {info.name} "
                                        f"has heads 0..{info.n_heads - 1} per layer; the edit would change nothing.")
        elif isinstance(edit, ProjectionInputEdit):
            bad = [d for d in edit.dims if not 0 <= int(d) < info.d_model]
            if not edit.dims or bad:
                raise InterventionError(f"ProjectionInputEdit on layer {layer} scales dimensions {list(edit.dims)}, "
                                        f"but {info.name}'s residual stream has dimensions 0..{info.d_model - 1}; "
                                        f"give at least one in that range.")
            if not math.isfinite(float(edit.factor)):
                raise InterventionError(f"ProjectionInputEdit factor must be finite; got {edit.factor!r}.")
            if edit.queries not in ("all", "last", "none"):
                raise InterventionError(f"ProjectionInputEdit queries must be 'all', 'last' or 'none'; got "
                                        f"{edit.queries!r}.")
        elif not info.layers[layer].has_rope:
            raise InterventionError(f"RotaryEdit on layer {layer}: that layer of {info.name} has no rotary embedding "
                                    f"(no RoPE: {info.layers[layer].positional.value}), so there is nothing to "
                                    f"replace.")


# ---------------------------------------------------------------------------------------------------------------
# The interface


@dataclass
class RunResult:
    """What a forward pass returns: logits only for the requested positions (None when none were requested)."""

    logits: Tensor | None  # [b, n_kept, vocab]
    logit_positions: Tensor | None  # [n_kept] sequence indices the logits belong to

    def requested_logits(self) -> Tensor:
        """`logits`, for a run that asked for some (`run(logits=...)` other than "none")."""
        if self.logits is None:
            raise RuntimeError("The model access returned no logits for a run that asked for them: a run with "
                               "logits='none' (the default) computes none; pass logits='last', 'all' or positions. "
                               "An adapter whose _forward drops them is broken.")
        return self.logits


LayerCallback = Callable[[LayerCapture], None]


class ModelAccess(abc.ABC):
    """A model seen through posprobe: facts, tokenizer, streaming forward passes, and edits.

    Implementations live in `posprobe/adapters/`. All of them keep the user's model as they found it once
    `close()` is called (or the access is used as a context manager).
    """

    info: ModelInfo
    tokenizer: Any
    backend: str = "abstract"
    # Adapters whose `_forward` accepts `attention_mask=` ([b, n], 1 = token, 0 = padding) set this.
    supports_attention_mask: bool = False
    # The AttentionEdit stages the adapter applies ("qk" needs the rotated q/k before the kernel: HF).
    attention_edit_stages: tuple[str, ...] = ("scores", "probs")

    def __init__(self) -> None:
        self._edits: list[Edit] = []

    # --- hardware ------------------------------------------------------------------------------------------------
    def torch_model(self) -> Any:
        """The torch module whose parameters hold the weights (for devices, dtypes and memory); adapters keep it
        as `hf_model` (nnsight), `model` (HF) or `bridge` (TransformerLens)."""
        for name in ("hf_model", "model", "bridge"):
            module = getattr(self, name, None)
            if module is not None:
                return module
        return None

    @property
    def input_device(self) -> torch.device:
        """Where input ids, positions and masks are built: the device of the model's input embedding (accelerate's
        execution device for dispatched models). Layers may live elsewhere; taps are read where they live."""
        from posprobe.devices import input_device

        return input_device(self.torch_model())

    def placement(self) -> dict[str, Any]:
        """Devices, dtype and accelerate device map of the model, as recorded in a scan's provenance."""
        from posprobe.devices import placement

        return placement(self.torch_model())

    def check_memory(self, n_tokens: int, batch: int = 1, *, taps: Iterable[Tap] = (), n_logits: int = 0) -> None:
        """Raise `MemoryBudgetError` when one pass of this shape would not fit in its device's free memory
        (`posprobe.devices.estimate_pass_memory`); called by `run` before every pass."""
        from posprobe.devices import check_memory, estimate_pass_memory, model_dtype, query_chunk_size

        facts = self.__dict__.get("_memory_facts")
        if facts is None:  # parameters are walked once per access
            model = self.torch_model()
            found: set[torch.device] = set()
            weights = 0
            if isinstance(model, torch.nn.Module):
                for p in model.parameters():
                    found.add(p.device)
                    weights += p.numel() * p.element_size() if p.device.type != "meta" else 0
            facts = self.__dict__["_memory_facts"] = (sorted(found or {torch.device("cpu")}, key=str),
                                                       model_dtype(model), weights)
        devices, dtype, weights = facts
        reads = bool({Tap(t) for t in taps} & {Tap.PATTERN, Tap.SCORES})
        device = next((d for d in devices if d.type != "meta"), None)
        chunk = query_chunk_size(self.info, n_tokens, batch, device=device) if reads else None  # as the probes do
        estimate = estimate_pass_memory(self.info, n_tokens, batch, dtype, reads_attention=reads, n_logits=n_logits,
                                        query_chunk=chunk, weights=weights,
                                        pattern_memo_bytes=LayerCapture.PATTERN_MEMO_BYTES)
        check_memory(estimate, devices, dtype=dtype, model_name=self.info.name)

    # --- forward passes -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        taps: frozenset[Tap],
        on_layer: LayerCallback | None,
        logit_positions: Tensor | None,
        edits: Sequence[Edit],
    ) -> Tensor | None:
        """Run one pass; return logits [b, len(logit_positions), V] or None when logit_positions is None."""

    def run(
        self,
        input_ids: Tensor | Sequence[int] | Sequence[Sequence[int]],
        *,
        taps: Iterable[Tap] = (),
        on_layer: LayerCallback | None = None,
        position_ids: Tensor | None = None,
        logits: Literal["none", "last", "all"] | Sequence[int] | Tensor = "none",
        edits: Sequence[Edit] = (),
        attention_mask: Tensor | None = None,
    ) -> RunResult:
        """One streaming forward pass. `on_layer` is called once per layer with the requested taps.

        `logits` chooses where logits are computed: "none" (default; the LM head is never run), "last", "all",
        or explicit sequence indices. Edits given here apply on top of those active through `editing()`.
        `attention_mask` [b, n] (1 = token, 0 = padding) runs a padded batch (`posprobe.tasks.base.pad_left` builds
        ids, mask and position_ids); probes must not read queries on padding. Inputs are moved to `input_device`
        and the pass's memory is estimated first (`check_memory`).
        """
        ids = self._check_ids(input_ids)
        pos = self._check_positions(ids, position_ids)
        keep = self._logit_positions(logits, ids.shape[1])
        extra: dict[str, Any] = {}
        if attention_mask is not None:
            extra["attention_mask"] = self._check_attention_mask(ids, attention_mask)
        if edits:
            self._validate_edits(edits)
        self.check_memory(ids.shape[1], ids.shape[0], taps=taps, n_logits=0 if keep is None else len(keep))
        with torch.inference_mode():
            out = self._forward(ids, pos, frozenset(Tap(t) for t in taps), on_layer, keep, [*self._edits, *edits],
                                **extra)
        return RunResult(logits=out, logit_positions=keep)

    def _check_attention_mask(self, ids: Tensor, attention_mask: Any) -> Tensor:
        if not self.supports_attention_mask:
            raise InputError(f"The {self.backend} adapter runs unpadded batches only; got an attention_mask. Run "
                             f"prompts of different lengths one at a time (batch_size=1) or use backend='hf'.")
        mask = torch.as_tensor(attention_mask).to(ids.device, torch.long)
        if mask.shape != ids.shape or not bool(((mask == 0) | (mask == 1)).all()):
            raise InputError(f"attention_mask must be 0/1 with the shape of input_ids {tuple(ids.shape)}; got "
                             f"shape {tuple(mask.shape)}. Build padded batches with posprobe.tasks.base.pad_left.")
        if not bool(mask[:, -1].all()):
            raise InputError("attention_mask marks the last token of a row as padding: posprobe pads on the left "
                             "(pad_left), so the last position of every row is a real token.")
        return mask

    def greedy(
        self, input_ids: Tensor | Sequence[int], max_new_tokens: int, *, stop_ids: Sequence[int] = (),
        edits: Sequence[Edit] = ()
    ) -> Tensor:
        """Greedy decoding (no sampling). Returns the new token ids [b, <= max_new_tokens].

        The default recomputes the full prefix each step, so every edit sees the whole sequence (correct for any
        backend); adapters may override with a KV-cached version.
        """
        ids = self._check_ids(input_ids)
        self._validate_edits(edits)
        new: list[Tensor] = []
        for _ in range(max_new_tokens):
            logits = self.run(ids, logits="last", edits=edits).requested_logits()[:, -1]
            nxt = logits.argmax(-1, keepdim=True).to(ids.device)
            new.append(nxt)
            ids = torch.cat([ids, nxt], dim=1)
            if stop_ids and bool(torch.isin(nxt, torch.tensor(list(stop_ids), device=nxt.device)).all()):
                break
        return torch.cat(new, dim=1) if new else ids.new_zeros(ids.shape[0], 0)

    # --- edits ------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def editing(self, edits: Sequence[Edit]) -> Iterator[None]:
        """Apply `edits` to every pass (and generation) inside the block; removed on exit, model untouched."""
        self._validate_edits(edits)
        n_before = len(self._edits)
        self._edits.extend(edits)
        try:
            yield
        finally:
            del self._edits[n_before:]

    def _validate_edits(self, edits: Sequence[Edit]) -> None:
        """Refuse edits that would match nothing or fail mid-pass: every adapter calls this where edits enter
        (`run`, `greedy`, `editing`), so an out-of-range layer, head or dimension raises before any work."""
        validate_edits(self.info, edits, self.attention_edit_stages)

    # --- tokenizer helpers --------------------------------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of `text`; BOS is prepended (once) when the model has one and add_bos is True."""
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if add_bos and bos is not None and self.info.adds_bos:
            ids = [bos, *ids]
        return ids

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # --- lifecycle ----------------------------------------------------------------------------------------------
    def close(self) -> None:  # noqa: B027 (optional: adapters that changed the model override it)
        """Give the user's model back exactly as it was (attention implementation, hooks)."""

    def __enter__(self) -> ModelAccess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def weights_hash(self) -> str:
        """A short content hash of the weights (provenance of scans)."""
        raise NotImplementedError

    # --- input checking -------------------------------------------------------------------------------------
    def _check_ids(self, input_ids: Any) -> Tensor:
        try:
            ids = torch.as_tensor(input_ids, dtype=torch.long)
        except (TypeError, ValueError) as exc:
            raise InputError(
                f"input_ids must be token ids (a list of ints, a list of equal-length lists, or a LongTensor); "
                f"got {type(input_ids).__name__}: {exc}. Tokenize text with access.encode(text)."
            ) from None
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise InputError(
                f"input_ids must have shape [batch, tokens] with at least one token; got shape {tuple(ids.shape)}."
            )
        if int(ids.min()) < 0 or int(ids.max()) >= self.info.vocab_size:
            raise InputError(
                f"input_ids contain ids outside the vocabulary [0, {self.info.vocab_size}): min {int(ids.min())}, "
                f"max {int(ids.max())}. Were they made with another model's tokenizer? Use access.encode(text)."
            )
        limit = self.info.max_positions
        if limit is not None and ids.shape[1] > limit:
            raise ContextLengthError(
                f"The sequence has {ids.shape[1]} tokens but {self.info.name} supports at most {limit} positions "
                f"(max_position_embeddings). Use a shorter context (e.g. a smaller budget or context length)."
            )
        return ids.to(self.input_device)  # checked on the CPU above; built where the model's embedding runs

    def _check_positions(self, ids: Tensor, position_ids: Tensor | None) -> Tensor:
        if position_ids is None:
            return torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
        pos = torch.as_tensor(position_ids, dtype=torch.long).to(ids.device)
        if pos.dim() == 1:
            pos = pos[None].expand(ids.shape[0], -1)
        if pos.shape != ids.shape:
            raise InputError(
                f"position_ids has shape {tuple(pos.shape)} but input_ids has shape {tuple(ids.shape)}; "
                f"give one position per token."
            )
        limit = self.info.max_positions
        if limit is not None and int(pos.max()) >= limit:
            raise ContextLengthError(
                f"position_ids go up to {int(pos.max())} but {self.info.name} supports positions < {limit}."
            )
        return pos

    @staticmethod
    def _logit_positions(logits: Any, n: int) -> Tensor | None:
        if isinstance(logits, str):
            if logits == "none":
                return None
            if logits == "last":
                return torch.tensor([n - 1])
            if logits == "all":
                return torch.arange(n)
            raise InputError(f"logits must be 'none', 'last', 'all' or a list of positions; got {logits!r}.")
        keep = torch.as_tensor(logits, dtype=torch.long).flatten()
        keep = torch.where(keep < 0, keep + n, keep)
        if len(keep) and (int(keep.min()) < 0 or int(keep.max()) >= n):
            raise InputError(f"logit positions must lie in [0, {n}); got {keep.tolist()}.")
        return keep

