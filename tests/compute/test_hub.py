"""Hub models: the files a layer range needs, and the real huggingface_hub client against a
local stand-in of the hub (its endpoint is configurable), including resuming a cut download."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ringd.compute.hub import download, parse_layers, select_files
from ringd.compute.manifest import load_manifest
from ringd.compute.model_info import inspect_model
from ringd.core.model_manifest import group_of
from ringd.errors import ModelError, UsageError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _repo(model_dir: Path) -> tuple[dict, dict]:
    return (json.loads((model_dir / "config.json").read_text()),
            json.loads((model_dir / "model.safetensors.index.json").read_text()))


@pytest.mark.parametrize("which", ["float", "quantized"])
def test_a_range_needs_exactly_the_files_holding_its_tensors(
        which: str, tiny_model_dir: Path, tiny_quantized_model_dir: Path) -> None:
    model_dir = tiny_model_dir if which == "float" else tiny_quantized_model_dir
    config, index = _repo(model_dir)
    wm = index["weight_map"]
    info = inspect_model(model_dir)
    n = info.num_layers
    for start, end in [(0, 2), (2, 4), (4, 6), (0, 6), (3, 4)]:
        sel = select_files(config, index, (start, end))
        need = set(info.shard_tensors(start, end))
        assert set(sel.tensors) == need
        assert set(sel.weight_files) == {wm[t] for t in need}  # every file needed, no other
        others = {f for f in wm.values()} - set(sel.weight_files)
        assert all(group_of(t, n) not in {group_of(x, n) for x in need}
                   for t, f in wm.items() if f in others)
        assert sel.files[0] == "config.json" and "tokenizer.json" in sel.small_files
    whole = select_files(config, index)
    assert set(whole.weight_files) == set(wm.values()) and whole.layers is None
    single = select_files(config, None, (1, 2))
    assert single.weight_files == ("model.safetensors",)
    avail = select_files(config, index, (1, 2), available={"config.json", "tokenizer.json"})
    assert avail.small_files == ("config.json", "tokenizer.json")


def test_bad_indexes_and_ranges_are_clear_errors(tiny_model_dir: Path) -> None:
    config, index = _repo(tiny_model_dir)
    for bad in ("../x.safetensors", "sub/x.safetensors", "/etc/passwd", "x.bin"):
        wm = dict(index["weight_map"], **{"model.norm.weight": bad})
        with pytest.raises(ModelError, match="not a plain safetensors file name"):
            select_files(config, {"weight_map": wm}, (5, 6))
    wm = {k: v for k, v in index["weight_map"].items() if not k.startswith("model.layers.3.")}
    with pytest.raises(ModelError, match="no tensors for 3"):
        select_files(config, {"weight_map": wm}, (2, 5))
    with pytest.raises(UsageError, match="outside"):
        select_files(config, index, (4, 9))
    assert parse_layers("0-15") == (0, 16) and parse_layers(" 3-3 ") == (3, 4)
    for text in ("5-2", "a-b", "3", "-1-2"):
        with pytest.raises(UsageError):
            parse_layers(text)


# ----------------------------------------------------------------------------- stand-in hub
class StandIn:
    """Serves a directory as hub repo ``org/tiny`` at COMMIT (``main`` resolves to it), the way
    the hub's resolve endpoint does: HEAD with X-Repo-Commit and ETag, GET with Range."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.log: list[tuple[str, str, str | None]] = []  # method, path, Range
        self.cut: dict[str, int] = {}  # file -> bytes to send before dropping the first GET
        self.fail: set[str] = set()  # files whose next GET is answered 500
        stand = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: object) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _fail(self, code: str) -> None:
                self.send_response(404)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _serve(self, body: bool) -> None:
                stand.log.append((self.command, self.path, self.headers.get("Range")))
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path)
                if m is None or m.group(1) != "org/tiny":
                    return self._fail("RepoNotFound")
                if m.group(2) not in ("main", COMMIT):
                    return self._fail("RevisionNotFound")
                f = stand.root / m.group(3)
                if "/" in m.group(3) or not f.is_file():
                    return self._fail("EntryNotFound")
                if body and f.name in stand.fail:
                    stand.fail.discard(f.name)
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = f.read_bytes()
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))  # type: ignore
                self.send_response(206 if rng else 200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", '"%s"' % hashlib.sha256(data).hexdigest())
                self.send_header("Content-Length", str(len(data) - start))
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if not body:
                    return
                cut = stand.cut.pop(f.name, None)
                if cut is not None:  # send part of it, then drop the connection
                    self.wfile.write(data[start:start + cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(data[start:])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def gets(self) -> list[str]:
        return [p.rsplit("/", 1)[-1] for m, p, _ in self.log if m == "GET"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> Iterator[StandIn]:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    s = StandIn(tiny_model_dir)
    yield s
    s.close()


def test_download_of_a_range_fetches_only_its_files_from_one_commit(
        hub: StandIn, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pulled"
    got = download("org/tiny", out, layers=(2, 4), endpoint=hub.url)
    assert got.commit == COMMIT
    sel = got.selection
    weights = {p.name for p in out.glob("*.safetensors")}
    assert weights == set(sel.weight_files)
    assert weights < {p.name for p in tiny_model_dir.glob("*.safetensors")}
    for name in [*weights, "config.json", "tokenizer.json", "tokenizer_config.json"]:
        assert (out / name).read_bytes() == (tiny_model_dir / name).read_bytes()
    downloaded = {g for g in hub.gets() if g.endswith(".safetensors")}
    assert downloaded == weights  # no other weight file was asked for
    # everything after the first look-up is taken from the resolved commit, not "main"
    paths = [p for m, p, _ in hub.log]
    assert all(f"/resolve/{COMMIT}/" in p for p in paths[1:]), paths


def test_a_whole_pull_is_a_full_model_with_the_same_model_id(
        hub: StandIn, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "whole"
    download("org/tiny", out, endpoint=hub.url)
    info = inspect_model(out)
    assert not info.partial and info.total_bytes == inspect_model(tiny_model_dir).total_bytes
    assert load_manifest(out).model_id == load_manifest(tiny_model_dir).model_id


def test_a_failed_pull_resumes_with_the_files_it_has(hub: StandIn, tmp_path: Path) -> None:
    out = tmp_path / "pulled"
    weights = sorted(p.name for p in hub.root.glob("*.safetensors"))
    hub.fail.add(weights[3])
    with pytest.raises(ModelError, match=weights[3]) as err:
        download("org/tiny", out, endpoint=hub.url)
    assert err.value.hint
    first = [g for g in hub.gets() if g.endswith(".safetensors")]
    assert first == weights[:4]  # stopped at the failing file
    hub.log.clear()
    download("org/tiny", out, endpoint=hub.url)
    again = [g for g in hub.gets() if g.endswith(".safetensors")]
    assert again == weights[3:]  # the files it had were not downloaded again
    assert load_manifest(out).model_id == load_manifest(hub.root).model_id


def test_a_dropped_connection_is_retried_within_the_call(hub: StandIn, tiny_model_dir: Path,
                                                         tmp_path: Path) -> None:
    """huggingface_hub retries a cut body at once. (It resumes with a Range request only past
    its 10 MiB read chunk, so this small file is fetched again from its start.)"""
    config, index = _repo(tiny_model_dir)
    target = select_files(config, index, (0, 1)).weight_files[0]
    size = (tiny_model_dir / target).stat().st_size
    hub.cut[target] = size // 2
    out = tmp_path / "pulled"
    download("org/tiny", out, layers=(0, 1), endpoint=hub.url)
    assert (out / target).read_bytes() == (tiny_model_dir / target).read_bytes()
    asks = [m for m, p, _ in hub.log if m == "GET" and p.endswith("/" + target)]
    assert len(asks) == 2


def test_hub_errors_are_clear(hub: StandIn, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found") as err:
        download("org/nothing", tmp_path / "x", endpoint=hub.url)
    assert err.value.hint
    with pytest.raises(ModelError, match="revision"):
        download("org/tiny", tmp_path / "x", revision="v9", endpoint=hub.url)
    with pytest.raises(UsageError):
        download("../etc", tmp_path / "x", endpoint=hub.url)


def test_ringctl_model_pull_from_the_hub(hub: StandIn, tiny_model_dir: Path,
                                         tmp_path: Path) -> None:
    from click.testing import CliRunner

    from ringd.cli import main as ringctl

    store = tmp_path / "store"
    r = CliRunner().invoke(ringctl, ["model", "pull", "org/tiny", "--endpoint", hub.url,
                                     "--store", str(store)])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(store / "tiny")
    assert load_manifest(store / "tiny").model_id == load_manifest(tiny_model_dir).model_id
    r = CliRunner().invoke(ringctl, ["model", "list", "--store", str(store)])
    assert r.output.splitlines()[1].split()[:3] == ["tiny", "all", "6"], r.output
    # only the files of some layers, under another name
    r = CliRunner().invoke(ringctl, ["model", "pull", "org/tiny", "--endpoint", hub.url,
                                     "--layers", "2-3", "--name", "tiny-part",
                                     "--store", str(store)])
    assert r.exit_code == 0, r.output
    config, index = _repo(tiny_model_dir)
    want = set(select_files(config, index, (2, 4)).weight_files)
    assert {p.name for p in (store / "tiny-part").glob("*.safetensors")} == want
    # a name that holds another model is refused, with what to do
    r = CliRunner().invoke(ringctl, ["model", "pull", "org/other", "--endpoint", hub.url,
                                     "--name", "tiny", "--store", str(store)])
    assert r.exit_code == 1 and "already holds another model" in r.output
    assert "Traceback" not in r.output
