"""Shard engine: a contiguous block of a model's layers, its KV caches, and sampling.

A shard ``[start, end)`` is built from mlx-lm's own architecture classes. The whole
model is constructed lazily (nothing is allocated), only the owned blocks are kept —
plus the embedding on the first shard and the final norm and head on the last — and only
the tensors those modules need are read from the safetensors files. Parameter names stay
the checkpoint's names (``model.layers.17...``), so the per-module quantization in
``config.json`` applies unchanged.

Call an engine from one thread at a time (the daemon runs compute on one dedicated
thread); it may be loaded on another thread than the one that runs it.

Speed on the CPU device: MLX's CPU matmul kernels use one core each, so the large
projections (and the output head) are split by rows over one MLX stream per core
(``cpu_split``); every output element is the same dot product, so results are identical
to the unsplit model. On Metal (Apple silicon) nothing is split.

Activations: a non-first shard takes hidden states ``[1, T, hidden]`` in
``info.activation_dtype`` (the promotion of the model's floating dtypes: float32 for the
imported SmolLM2, whose norms are float32; float16 or bfloat16 for models stored that
way); other float dtypes are cast.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import secrets
from pathlib import Path
from typing import Any, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache

from ringd.compute.model_info import ModelInfo, inspect_model
from ringd.core.requests import SamplingParams
from ringd.errors import LocalProtocolError, ModelError

log = logging.getLogger(__name__)

_ARCH_MODULES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


_MIN_SPLIT_ROWS = 256
_cpu_streams: list[Any] = []


def _streams(n: int) -> list[Any]:
    """``n`` CPU streams, usable from any thread (MLX streams are per thread; these
    thread-local ones resolve to the calling thread's own). Created once per process."""
    while len(_cpu_streams) < n:
        _cpu_streams.append(mx.new_thread_local_stream(mx.cpu))
    return _cpu_streams[:n]


def _auto_split() -> int:
    if mx.default_device() != mx.cpu:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


class _RowSplit(nn.Module):
    """A projection whose output rows are computed in parts on parallel CPU streams.

    MLX's CPU matmul kernels use one core each; splitting the rows of a weight matrix
    across streams uses several, and gives exactly the same numbers (every output element
    is the same dot product).
    """

    def __init__(self, module: nn.Module, parts: int) -> None:
        super().__init__()
        rows = module["weight"].shape[0]
        cuts = [rows * k // parts for k in range(parts + 1)]
        self.quant = ({"group_size": module.group_size, "bits": module.bits, "mode": module.mode}
                      if "scales" in module else None)
        names = [k for k in ("weight", "scales", "biases", "bias")
                 if k in module and module[k] is not None]
        if isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)):
            names = [k for k in names if k != "bias"]
        self.parts = [{k: module[k][a:b] for k in names} for a, b in zip(cuts, cuts[1:])]
        self._streams = _streams(parts)

    def __call__(self, x: mx.array) -> mx.array:
        outs = []
        for stream, p in zip(self._streams, self.parts):
            with mx.stream(stream):
                if self.quant is not None:
                    y = mx.quantized_matmul(x, p["weight"], scales=p["scales"],
                                            biases=p.get("biases"), transpose=True, **self.quant)
                else:
                    y = x @ p["weight"].T
                if "bias" in p:
                    y = y + p["bias"]
                outs.append(y)
        return mx.concatenate(outs, axis=-1)


def _split_projections(shard: "_Shard", parts: int) -> None:
    """Replace the large projections of every owned block with row-split ones."""
    for layer in shard.model.layers.values():
        for parent in layer.children().values():
            if not isinstance(parent, nn.Module):
                continue
            for name, child in list(parent.children().items()):
                if (isinstance(child, (nn.Linear, nn.QuantizedLinear))
                        and child.weight.shape[0] >= _MIN_SPLIT_ROWS):
                    n = min(parts, child.weight.shape[0] // 128)
                    setattr(parent, name, _RowSplit(child, n))


class _Shard(nn.Module):
    """Holds the owned modules under their checkpoint names."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()


def _quant_params(path: str, module: nn.Module, info: ModelInfo) -> dict[str, Any] | bool:
    """Same choice as mlx-lm's loader: the config's entry, else inferred from the shapes."""
    qcfg = info.config.get("quantization") or {}
    if path in qcfg:
        return qcfg[path]
    scales = info.tensor_index.get(f"{path}.scales")
    if scales is None or not hasattr(module, "to_quantized"):
        return False
    in_dims = module.weight.shape[-1]
    group = in_dims // scales.shape[-1]
    bits = info.tensor_index[f"{path}.weight"].shape[-1] * 32 // in_dims
    if scales.dtype != "U8":
        return {"group_size": group, "bits": bits, "mode": "affine"}
    modes = {(4, 16): "nvfp4", (4, 32): "mxfp4", (8, 32): "mxfp8"}
    if (bits, group) not in modes:
        raise ModelError(f"{info.path}: cannot tell how {path} is quantized "
                         f"({bits} bits, group size {group})")
    return {"group_size": group, "bits": bits, "mode": modes[(bits, group)]}


class ShardEngine:
    """Layers ``[start, end)`` of one model, with one KV cache per request."""

    def __init__(self, info: ModelInfo, start: int, end: int, shard: _Shard,
                 layers: list[tuple[int, nn.Module]], cache_specs: list[tuple[type, dict]],
                 tensor_names: tuple[str, ...], sliding_window: int | None,
                 cpu_split: int) -> None:
        self.info = info
        self.start = start
        self.end = end
        self.is_first = start == 0
        self.is_last = end == info.num_layers
        self.tensor_names = tensor_names  # every tensor this shard read from disk
        self.activation_dtype = _DTYPES[info.activation_dtype]
        self._shard = shard
        self._layers = [m for _, m in layers]
        self._cache_specs = cache_specs
        self._sliding_window = sliding_window
        self._requests: dict[str, list[Any]] = {}
        self.loaded_bytes = sum(v.nbytes for _, v in tree_flatten(shard.parameters()))
        self.cpu_split = cpu_split
        self._head: Any = None
        if self.is_last:
            base = shard["lm_head"] if "lm_head" in shard else shard.model.embed_tokens
            if cpu_split > 1:
                shard.head_split = self._head = _RowSplit(base, cpu_split)
            else:
                self._head = base if "lm_head" in shard else base.as_linear
        if cpu_split > 1:
            _split_projections(shard, cpu_split)
        # Evaluate every array now, private ones (rope tables) and split views included:
        # a lazy array is bound to the stream of the thread that made it, and the
        # engine may be loaded on one thread and run on another.
        mx.eval(shard)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, model_dir: Path, start: int, end: int, *,
             cpu_split: int | None = None) -> "ShardEngine":
        """Load layers ``[start, end)``; reads only the tensors this shard needs.

        ``cpu_split``: on the CPU device, compute large projections in this many row
        parts on parallel streams (default: one per core, at most 8; 1 turns it off).
        Results are identical either way.
        """
        info = inspect_model(Path(model_dir))
        n = info.num_layers
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= n):
            raise ModelError(
                f"layer range [{start}, {end}) is out of bounds for {info.path}, "
                f"which has {n} layers (0..{n - 1})",
                hint=f"use 0 <= start < end <= {n}")
        config = info.config
        if "quantization" not in config and any(k.endswith(".scales") for k in info.tensor_index):
            raise ModelError(f"{info.path / 'config.json'}: quantized weights but no "
                             "'quantization' entry", hint="convert the model with `mlx_lm.convert`")
        arch = importlib.import_module(f"mlx_lm.models.{_ARCH_MODULES[info.model_type]}")
        try:
            full = arch.Model(arch.ModelArgs.from_dict(config))  # lazy: nothing allocated yet
        except (TypeError, ValueError, KeyError, AssertionError) as e:
            raise ModelError(f"{info.path / 'config.json'}: cannot build the model ({e})",
                             hint="re-import or re-copy the model directory") from None
        inner = full.model
        protos = full.make_cache() if hasattr(full, "make_cache") else None

        shard = _Shard()
        layers = [(i, inner.layers[i]) for i in range(start, end)]
        shard.model.layers = {str(i): m for i, m in layers}
        first, last = start == 0, end == n
        if first or (last and info.tie_word_embeddings):
            shard.model.embed_tokens = inner.embed_tokens
        if last:
            shard.model.norm = inner.norm
            if not info.tie_word_embeddings:
                shard.lm_head = full.lm_head
        cache_specs: list[tuple[type, dict]] = []
        for i in range(start, end):
            proto = protos[i] if protos is not None else KVCache()
            if type(proto) is KVCache:
                cache_specs.append((KVCache, {}))
            elif type(proto) is RotatingKVCache:
                cache_specs.append((RotatingKVCache,
                                    {"max_size": proto.max_size, "keep": proto.keep}))
            else:
                raise ModelError(f"{info.path}: layer {i} needs a {type(proto).__name__}, "
                                 "which ringd does not run")
        sliding = getattr(inner, "sliding_window", None)
        del full, inner, protos

        if "quantization" in config:
            q = config["quantization"]
            nn.quantize(shard, group_size=q["group_size"], bits=q["bits"],
                        mode=q.get("mode", "affine"),
                        class_predicate=lambda p, m: _quant_params(p, m, info))

        # Modules by checkpoint prefix (after quantization replaced some of them).
        owned: dict[str, nn.Module] = {f"model.layers.{i}.": m for i, m in layers}
        for name in ("embed_tokens", "norm"):
            if name in shard.model:
                owned[f"model.{name}."] = shard.model[name]
        if "lm_head" in shard:
            owned["lm_head."] = shard.lm_head
        needed = sorted(k for k in info.tensor_index if k.startswith(tuple(owned)))
        missing = info.missing(needed)
        if missing:  # a shard directory that does not hold this range (yet)
            held = ", ".join(f"{a}-{b - 1}" for a, b in info.complete_ranges()) or "none"
            raise ModelError(
                f"{info.path} does not hold layers {start}-{end - 1}: {len(missing)} of their "
                f"{len(needed)} tensors are missing (e.g. {missing[0]}); it holds layers: {held}",
                hint="fetch them from a node that holds them (the daemon does this after a plan "
                     "commits), or use a directory that holds the whole model")
        by_file: dict[str, list[str]] = {}
        for k in needed:
            by_file.setdefault(str(info.tensor_index[k].file), []).append(k)
        weights = {}
        for fname, names in by_file.items():
            try:
                loaded = mx.load(str(info.path / fname))  # lazy: reads the header only
            except (RuntimeError, ValueError, OSError) as e:
                raise ModelError(f"cannot read {info.path / fname}: {e}",
                                 hint="re-import or re-copy the model directory") from None
            weights.update((k, loaded[k]) for k in names)
        try:
            for prefix, module in owned.items():
                module.load_weights([(k[len(prefix):], v) for k, v in weights.items()
                                     if k.startswith(prefix)], strict=True)
        except ValueError as e:
            raise ModelError(f"{info.path}: the weights do not match the model ({e})",
                             hint="the directory must be in the mlx-lm layout; "
                                  "convert it with `mlx_lm.convert`") from None
        shard.eval()
        try:
            mx.eval(shard.parameters())
        except (RuntimeError, ValueError) as e:
            raise ModelError(f"cannot read the weights of {info.path}: {e}",
                             hint="re-import or re-copy the model directory") from None
        split = _auto_split() if cpu_split is None else max(1, int(cpu_split))
        eng = cls(info, start, end, shard, layers, cache_specs, tuple(needed), sliding, split)
        log.info("loaded %s layers [%d, %d): %.1f MiB", info.name, start, end,
                 eng.loaded_bytes / 2**20)
        return eng

    # ------------------------------------------------------------------ requests
    def new_request(self, rid: str) -> None:
        if rid in self._requests:
            raise LocalProtocolError(f"request {rid!r} already has a KV cache on this shard")
        self._requests[rid] = [cls(**kw) for cls, kw in self._cache_specs]

    def free_request(self, rid: str) -> None:
        """Drop the request's KV cache (no error if it is already gone)."""
        self._requests.pop(rid, None)

    def active_requests(self) -> list[str]:
        return list(self._requests)

    def cache_len(self, rid: str) -> int:
        return self._caches(rid)[0].offset

    def cache_bytes(self) -> int:
        return sum(c.nbytes for caches in self._requests.values() for c in caches)

    def _caches(self, rid: str) -> list[Any]:
        try:
            return self._requests[rid]
        except KeyError:
            raise LocalProtocolError(f"request {rid!r} has no KV cache on this shard") from None

    # ------------------------------------------------------------------ compute
    def forward(self, rid: str, x: mx.array, *, lazy: bool = False,
                need_logits: bool = True) -> mx.array | None:
        """Run the owned layers on ``x`` and append to the request's KV cache.

        First shard: ``x`` is int32 token ids ``[T]``; others: hidden states ``[1, T, H]``.
        Returns hidden states ``[1, T, H]`` (``activation_dtype``), or on the last shard
        float32 logits ``[vocab]`` of the last position only. Call it repeatedly with
        chunks for chunked prefill; ``need_logits=False`` (a prefill chunk before the
        prompt's last) skips the head on the last shard, which then returns None. With
        ``lazy`` nothing is evaluated yet (to overlap building the next step's graph with
        this step's compute); otherwise the result and the cache are evaluated.
        """
        caches = self._caches(rid)
        m = self._shard.model
        if self.is_first:
            if x.ndim != 1 or x.size == 0 or not mx.issubdtype(x.dtype, mx.integer):
                raise LocalProtocolError(
                    f"first shard needs token ids [T], got {x.shape} {x.dtype}")
            h = m.embed_tokens(x[None])
        else:
            hidden = self.info.hidden_size
            if x.ndim != 3 or x.shape[0] != 1 or x.shape[1] == 0 or x.shape[2] != hidden:
                raise LocalProtocolError(
                    f"shard [{self.start}, {self.end}) needs hidden states [1, T, "
                    f"{self.info.hidden_size}], got {x.shape}")
            h = x if x.dtype == self.activation_dtype else x.astype(self.activation_dtype)
        h = self._run_layers(h, caches)
        out: mx.array | None = h
        if self.is_last:
            out = self._head(m.norm(h[:, -1:, :]))[0, 0].astype(mx.float32) if need_logits else None
        if not lazy:
            mx.eval(out, [(c.keys, c.values) for c in caches])
        return out

    def _run_layers(self, h: mx.array, caches: list[Any]) -> mx.array:
        masks: dict[bool, Any] = {}
        for layer, cache in zip(self._layers, caches):
            sliding = bool(getattr(layer, "use_sliding", False))
            if sliding not in masks:
                masks[sliding] = create_attention_mask(
                    h, cache, window_size=self._sliding_window if sliding else None)
            h = layer(h, masks[sliding], cache=cache)
        return h

    # ------------------------------------------------------------------ whole model
    def generate(self, token_ids: list[int], params: SamplingParams, *,
                 prefill_chunk: int = 512, rid: str = "local",
                 ignore_eos: bool = False) -> Iterator[int]:
        """Generate on a shard holding every layer.

        Stops at EOS (not yielded) unless ``ignore_eos``, or after ``params.max_tokens``.
        The next step is queued (``mx.async_eval``) before the current token is read, so
        building one step's graph overlaps the previous step's compute.
        """
        if not (self.is_first and self.is_last):
            raise LocalProtocolError("generate needs an engine holding the whole model")
        if not token_ids:
            raise LocalProtocolError("generate needs at least one prompt token")
        eos = set() if ignore_eos else set(self.info.eos_token_ids)
        sampler = Sampler(params)
        self.new_request(rid)
        try:
            # Like mlx-lm: the prompt but its last token in chunks, then the last token
            # as the first step.
            ids = mx.array(token_ids, dtype=mx.int32)
            for s in range(0, len(token_ids) - 1, prefill_chunk):
                self.forward(rid, ids[s:min(s + prefill_chunk, len(token_ids) - 1)],
                             need_logits=False)
            y = sampler.sample_lazy(self.forward(rid, ids[-1:], lazy=True))
            mx.async_eval(y)
            produced = 0
            while True:
                nxt = None
                if produced + 1 < params.max_tokens:
                    nxt = sampler.sample_lazy(self.forward(rid, y.reshape(1), lazy=True))
                    mx.async_eval(nxt)
                tok = y.item()
                if tok in eos:
                    return
                yield tok
                produced += 1
                if nxt is None:
                    return
                y = nxt
        finally:
            self.free_request(rid)


class Sampler:
    """Picks the next token from float32 logits ``[vocab]``.

    Greedy when ``temperature == 0``; otherwise temperature, then top-k, then top-p
    (nucleus), drawn with a key derived from this request's seed (or a random one) and the
    token's step: the same seed, step and logits give the same token, independent of other
    requests -- so a request replayed on another ring (:mod:`ringd.core.pipeline`) draws its
    next tokens exactly as an undisturbed run would.
    """

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self._next = 0  # the step of the next draw when none is given

    def key(self, step: int) -> mx.array:
        """The random key of the draw at ``step``."""
        digest = hashlib.blake2b(f"{self.seed}:{step}".encode(), digest_size=8).digest()
        return mx.random.key(int.from_bytes(digest, "little") >> 1)

    def sample_lazy(self, logits: mx.array, step: int | None = None) -> mx.array:
        """The token as an unevaluated int32 scalar array (no host synchronisation);
        ``step``: which token of the request it is (default: the one after the last)."""
        p = self.params
        if step is None:
            step = self._next
        self._next = step + 1
        if p.greedy:
            return mx.argmax(logits, axis=-1).astype(mx.int32)
        sub = self.key(step)
        logits = logits.astype(mx.float32) / p.temperature
        vocab = logits.shape[-1]
        if 0 < p.top_k < vocab:
            kth = mx.min(mx.topk(logits, p.top_k))
            logits = mx.where(logits >= kth, logits, -mx.inf)
        if p.top_p < 1.0:
            order = mx.argsort(-logits)
            ordered = logits[order]
            probs = mx.softmax(ordered)
            before = mx.cumsum(probs) - probs  # mass of the tokens ranked above each one
            ordered = mx.where(before < p.top_p, ordered, -mx.inf)
            return order[mx.random.categorical(ordered, key=sub)].astype(mx.int32)
        return mx.random.categorical(logits, key=sub).astype(mx.int32)

    def sample(self, logits: mx.array, step: int | None = None) -> int:
        return int(self.sample_lazy(logits, step).item())


def generate_local(model_dir: Path, token_ids: list[int], params: SamplingParams, *,
                   prefill_chunk: int = 512) -> Iterator[int]:
    """Load the whole model as one shard and generate (stops at EOS, not yielded)."""
    info = inspect_model(Path(model_dir))
    engine = ShardEngine.load(Path(model_dir), 0, info.num_layers)
    yield from engine.generate(token_ids, params, prefill_chunk=prefill_chunk)
