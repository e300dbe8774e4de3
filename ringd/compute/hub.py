"""Models from the Hugging Face hub: which files a layer range needs, and downloading them.

Selection (:func:`select_files`, pure): from a repository's ``config.json`` and
``model.safetensors.index.json``, the files a node holding layers ``[start, end)`` needs —
the config and tokenizer files, and only the safetensors files that hold those layers'
tensors (plus the embedding on the first shard, the final norm and head on the last; the
embedding on the last too when the head is tied to it). Without a range: every weight file.

Download (:func:`download`): a thin wrapper over ``huggingface_hub.hf_hub_download``, which
keeps its own resume state (``.incomplete`` files, ranged requests) under
``LOCAL_DIR/.cache/huggingface``: a download that was cut resumes where it stopped. The
revision is resolved to a commit first and every file is taken from that commit, so a branch
that moves during a pull cannot mix two versions. The endpoint is configurable (``endpoint=``
or ``HF_ENDPOINT``), which is how the tests use a local stand-in server.

A model pulled whole becomes a full model directory (its manifest is built from the files).
A model pulled for some layers holds whole safetensors files that may also hold tensors of
other layers, and lacks the others: its manifest (hence its model id) cannot be computed on
this node alone. See the module's callers for how a ring names such a model.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ringd.core.model_manifest import SMALL_FILES, group_of
from ringd.errors import ModelError, UsageError

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
REQUIRED = ("config.json",)
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_WEIGHT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}\.safetensors")
_LAYERS = re.compile(r"(\d{1,6})-(\d{1,6})")


@dataclass(frozen=True)
class HubSelection:
    """The files to download for a layer range (``None``: the whole model)."""

    layers: tuple[int, int] | None
    weight_files: tuple[str, ...]
    small_files: tuple[str, ...]
    tensors: tuple[str, ...]  # the range's tensors named in the index (() without one)

    @property
    def files(self) -> tuple[str, ...]:
        return self.small_files + self.weight_files


def parse_layers(text: str) -> tuple[int, int]:
    """``"A-B"`` (inclusive, as the CLI takes it) -> the range ``[A, B + 1)``."""
    m = _LAYERS.fullmatch(text.strip())
    if not m or int(m.group(1)) > int(m.group(2)):
        raise UsageError(f"--layers {text!r} is not a layer range",
                         hint="write FIRST-LAST, both included, e.g. --layers 0-15")
    return int(m.group(1)), int(m.group(2)) + 1


def check_repo_id(repo_id: str) -> str:
    if not isinstance(repo_id, str) or not _REPO.fullmatch(repo_id) or ".." in repo_id:
        raise UsageError(f"{repo_id!r} is not a hub model id",
                         hint="write it as ORG/NAME, e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
    return repo_id


def select_files(config: Mapping[str, Any], index: Mapping[str, Any] | None,
                 layers: tuple[int, int] | None = None, *,
                 available: Collection[str] | None = None) -> HubSelection:
    """The files holding layers ``layers`` (``[start, end)``; None: all) of a hub model.

    ``index``: the repository's ``model.safetensors.index.json`` (None when it has a single
    ``model.safetensors``). ``available``: the repository's file names, when known (small
    files not in it are not asked for); otherwise every known small file name is tried.
    """
    where = f"{INDEX_FILE} of the hub model"
    try:
        n = int(config["num_hidden_layers"])
    except (KeyError, TypeError, ValueError):
        raise ModelError("config.json of the hub model has no num_hidden_layers",
                         hint="ringd runs Llama-layout models (llama, mistral, qwen2, qwen3)"
                         ) from None
    tied = bool(config.get("tie_word_embeddings", True))
    if layers is not None:
        start, end = layers
        if not 0 <= start < end <= n:
            raise UsageError(f"layers {start}-{end - 1} are outside the model (0-{n - 1})")
    small = tuple(f for f in SMALL_FILES
                  if f in REQUIRED or available is None or f in available)
    if index is None:
        return HubSelection(layers, (SINGLE_FILE,), small, ())
    weight_map = index.get("weight_map") if isinstance(index, Mapping) else None
    if not isinstance(weight_map, Mapping) or not weight_map:
        raise ModelError(f"{where} has no weight_map", hint="the repository is incomplete")
    for name, f in weight_map.items():
        if not isinstance(name, str) or not isinstance(f, str) or not _WEIGHT.fullmatch(f):
            raise ModelError(f"{where} maps {str(name)[:80]!r} to {str(f)[:80]!r}, "
                             "not a plain safetensors file name",
                             hint="ringd reads weights from the repository's top folder only")
    if layers is None:
        return HubSelection(None, tuple(sorted(set(weight_map.values()))), small,
                            tuple(sorted(weight_map)))
    start, end = layers
    groups: set[object] = set(range(start, end))
    if start == 0 or (end == n and tied):
        groups.add("embed")
    if end == n:
        groups.add("norm")
        if not tied:
            groups.add("head")
    names = sorted(k for k in weight_map if group_of(k, n) in groups)
    found = {group_of(k, n) for k in names}
    if found != groups:
        lacking = sorted(str(g) for g in groups - found)
        raise ModelError(f"{where} lists no tensors for {', '.join(lacking[:5])}",
                         hint="the repository is incomplete or not in the Llama layout")
    files = tuple(sorted({weight_map[k] for k in names}))
    return HubSelection(layers, files, small, tuple(names))


# ----------------------------------------------------------------------------- download
def _hub() -> Any:
    try:
        import huggingface_hub
        import huggingface_hub.errors  # noqa: F401  (hub.errors below)
    except ImportError:
        raise ModelError("the huggingface_hub package is not installed",
                         hint="pip install huggingface_hub (ringd's own install brings it)"
                         ) from None
    return huggingface_hub


def _error(e: Exception, repo_id: str, what: str) -> ModelError:
    hub = _hub()
    errors = hub.errors
    if isinstance(e, errors.RevisionNotFoundError):
        return ModelError(f"{repo_id}: revision not found ({what})",
                          hint="check --revision (a branch, tag or commit of the repository)")
    if isinstance(e, errors.RepositoryNotFoundError):
        return ModelError(f"hub model {repo_id} not found (or it needs a token)",
                          hint="check the id on the hub; for gated or private models log in "
                               "with `hf auth login` or set HF_TOKEN")
    if isinstance(e, errors.EntryNotFoundError):
        return ModelError(f"{repo_id} has no {what}", hint="the repository is incomplete")
    if isinstance(e, OSError) and not isinstance(e, errors.HfHubHTTPError):
        return ModelError(f"cannot download {what} of {repo_id}: {e}",
                          hint="check the network (or HF_ENDPOINT), and the space on the disk")
    return ModelError(f"cannot download {what} of {repo_id}: {e}",
                      hint="check the network, HF_ENDPOINT, and that the hub is reachable")


@dataclass(frozen=True)
class HubDownload:
    """What :func:`download` fetched."""

    repo_id: str
    commit: str
    path: Path
    selection: HubSelection


def download(repo_id: str, local_dir: Path, *, layers: tuple[int, int] | None = None,
             revision: str | None = None, endpoint: str | None = None,
             token: str | bool | None = None,
             progress: Callable[[str], None] | None = None) -> HubDownload:
    """Download the files of ``repo_id`` that layers ``layers`` need into ``local_dir``.

    Resumes a cut download (huggingface_hub's own state under ``local_dir/.cache``). Every
    file is taken from the commit ``revision`` (default: the main branch) resolves to now.
    """
    hub = _hub()
    check_repo_id(repo_id)
    local_dir = Path(local_dir)
    try:
        meta = hub.get_hf_file_metadata(
            hub.hf_hub_url(repo_id, "config.json", revision=revision, endpoint=endpoint),
            token=token, endpoint=endpoint)
    except Exception as e:  # huggingface_hub raises many kinds; all become one clear error
        raise _error(e, repo_id, "config.json") from None
    commit = meta.commit_hash or revision or "main"

    def get(name: str, required: bool = True) -> Path | None:
        if progress is not None:
            progress(f"downloading {name}")
        try:
            return Path(hub.hf_hub_download(repo_id, name, revision=commit, endpoint=endpoint,
                                            local_dir=local_dir, token=token))
        except hub.errors.EntryNotFoundError:
            if required:
                raise ModelError(f"{repo_id}@{commit[:12]} has no {name}",
                                 hint="the repository is incomplete") from None
            return None
        except Exception as e:
            raise _error(e, repo_id, name) from None

    config = _load_json(get("config.json"), "config.json")
    index_path = get(INDEX_FILE, required=False)
    index = _load_json(index_path, INDEX_FILE) if index_path is not None else None
    selection = select_files(config, index, layers)
    for name in selection.small_files:
        if name not in ("config.json",):
            get(name, required=name in REQUIRED)
    for name in selection.weight_files:
        get(name)
    log.info("downloaded %s@%s (%d weight files%s) into %s", repo_id, commit[:12],
             len(selection.weight_files),
             f", layers {layers[0]}-{layers[1] - 1}" if layers else "", local_dir)
    return HubDownload(repo_id, commit, local_dir, selection)


def _load_json(path: Path | None, what: str) -> Any:
    try:
        return json.loads(Path(str(path)).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ModelError(f"the hub's {what} is unreadable: {e}",
                         hint="the repository is damaged; try another revision") from None
