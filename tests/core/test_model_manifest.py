"""The canonical model manifest: grouping, model id, peer copies checked, plans from it alone."""

from __future__ import annotations

import json

import pytest

from ringd.core.model_manifest import (ModelManifest, blake2b_hex, file_key, group_of,
                                       model_id_of)
from ringd.core.plan import make_plan
from ringd.core.proof import shard_fingerprint
from ringd.errors import ModelError

N = 4


def _tensors(tied: bool, layers: int = N) -> list[tuple[str, str, list[int], int, str]]:
    out = [("model.embed_tokens.weight", "F16", [100, 8], 1600, blake2b_hex(b"e")),
           ("model.norm.weight", "F32", [8], 32, blake2b_hex(b"n"))]
    for i in range(layers):
        out += [(f"model.layers.{i}.mlp.up_proj.weight", "F16", [16, 8], 256,
                 blake2b_hex(f"u{i}".encode())),
                (f"model.layers.{i}.input_layernorm.weight", "F32", [8], 32,
                 blake2b_hex(f"l{i}".encode()))]
    if not tied:
        out.append(("lm_head.weight", "F16", [100, 8], 1600, blake2b_hex(b"h")))
    return out


FILES = [("config.json", 10, blake2b_hex(b"c")), ("tokenizer.json", 20, blake2b_hex(b"t"))]


def _manifest(tied: bool = False) -> ModelManifest:
    return ModelManifest.build(N, _tensors(tied), FILES)


def test_groups_sizes_and_the_shape_a_plan_needs() -> None:
    m = _manifest()
    assert [group_of(n, N) for n in ("model.layers.3.x", "model.layers.4.x", "lm_head.weight",
                                     "model.rotary_emb.inv_freq")] == [3, None, "head", None]
    assert m.layer_bytes == (288,) * N and (m.embed_bytes, m.norm_bytes, m.head_bytes) == (
        1600, 32, 1600)
    assert m.total_bytes == 288 * N + 1600 + 32 + 1600 and not m.tied
    assert m.shard_bytes(0, 2) + m.shard_bytes(2, 4) == m.total_bytes
    shape = m.shape("x", kv_bytes_per_layer=7)
    assert shape.weight_bytes == m.total_bytes and shape.kv_bytes_per_layer == 7
    # a node that only has the manifest can plan
    plan = make_plan([("a", 10_000), ("b", 10_000)], shape)
    assert [(s.start, s.end) for s in plan.order] == [(0, 2), (2, 4)]


def test_tied_model_last_shard_holds_the_embedding() -> None:
    m = _manifest(tied=True)
    assert m.tied and m.head_bytes == m.embed_bytes
    assert "model.embed_tokens.weight" in m.tensors_for(3, 4)
    untied = _manifest()
    assert "model.embed_tokens.weight" not in untied.tensors_for(3, 4)
    assert "lm_head.weight" in untied.tensors_for(3, 4)
    assert untied.tensors_for(1, 2) == sorted(untied.group_tensors(1))
    with pytest.raises(ModelError, match="outside"):
        untied.tensors_for(2, 5)


def test_fingerprint_is_the_proof_digest_over_the_shards_tensors() -> None:
    m = _manifest()
    names = m.tensors_for(1, 3)
    pairs = [(n, m.tensors[n].hash) for n in names]
    assert m.fingerprint(1, 3) == shard_fingerprint(1, 3, pairs) == m.fingerprint(1, 3, names)
    assert m.fingerprint(1, 3) != m.fingerprint(1, 2)


def test_model_id_is_the_hash_of_the_canonical_form_and_ignores_input_order() -> None:
    m = _manifest()
    again = ModelManifest.build(N, list(reversed(_tensors(False))), list(reversed(FILES)))
    assert again.model_id == m.model_id == model_id_of(m.canonical_bytes())
    obj = json.loads(m.canonical_bytes())
    assert [sorted(g) for g in obj["layers"]][0] == sorted(m.group_tensors(0))  # by layer
    back = ModelManifest.from_bytes(m.canonical_bytes(), expect_id=m.model_id)
    assert back == m and back.model_id == m.model_id
    other = [t if t[0] != "model.layers.2.mlp.up_proj.weight" else (*t[:4], blake2b_hex(b"x"))
             for t in _tensors(False)]
    assert ModelManifest.build(N, other, FILES).model_id != m.model_id
    files = [FILES[0], ("tokenizer.json", 20, blake2b_hex(b"other"))]
    assert ModelManifest.build(N, _tensors(False), files).model_id != m.model_id


def test_a_copy_that_is_not_the_claimed_model_is_refused() -> None:
    m = _manifest()
    with pytest.raises(ModelError, match="not the model id"):
        ModelManifest.from_bytes(m.canonical_bytes(), expect_id="0" * 32)
    pretty = json.dumps(json.loads(m.canonical_bytes()), indent=2).encode()
    with pytest.raises(ModelError):  # same content, other bytes: not what the id names
        ModelManifest.from_bytes(pretty, expect_id=m.model_id)
    assert ModelManifest.from_bytes(pretty).model_id == m.model_id  # a local file may be pretty


@pytest.mark.parametrize("edit, match", [
    (lambda o: o["layers"][1].update({"model.layers.2.x.weight": o["layers"][1].popitem()[1]}),
     "filed under group"),
    (lambda o: o["files"].update({"../../etc/passwd": {"size": 1, "hash": "0" * 32}}),
     "not an allowed model file name"),
    (lambda o: o["files"].update({"model-1.safetensors": {"size": 1, "hash": "0" * 32}}),
     "not an allowed model file name"),
    (lambda o: o["files"].pop("config.json"), "no config.json"),
    (lambda o: o["embed"]["model.embed_tokens.weight"].update(size=3), "size 3"),
    (lambda o: o["embed"]["model.embed_tokens.weight"].update(dtype="F99"), "unknown dtype"),
    (lambda o: o["embed"]["model.embed_tokens.weight"].update(hash="XYZ"), "bad hash"),
    (lambda o: o["embed"]["model.embed_tokens.weight"].update(shape=[-1, 8]), "bad shape"),
    (lambda o: o["norm"].update({"model.norm/../x": {}}), "not allowed"),
    (lambda o: o["layers"].pop(), "list of 4"),
    (lambda o: o.update(num_layers=True), "num_layers"),
    (lambda o: o.update(extra=1), "unknown fields"),
    (lambda o: o["layers"][0].clear(), "has no tensors"),
    (lambda o: o.update(format="ringd-model/9"), "format"),
])
def test_a_bad_peer_copy_is_a_model_error_naming_its_source(edit, match):  # type: ignore
    obj = json.loads(_manifest().canonical_bytes())
    edit(obj)
    with pytest.raises(ModelError, match=match) as err:
        ModelManifest.from_bytes(json.dumps(obj).encode(), where="peer n2")
    assert "peer n2" in err.value.message and err.value.hint


def test_complete_ranges_are_what_a_node_can_serve() -> None:
    for tied in (False, True):
        m = ModelManifest.build(N, _tensors(tied), FILES)
        everything = set(m.tensors)
        assert m.complete_ranges(everything) == [(0, N)]
        assert m.complete_ranges(set()) == []
        assert m.complete_ranges(set(m.tensors_for(1, 3))) == [(1, 3)]
        assert m.complete_ranges(set(m.tensors_for(0, 2)) | set(m.tensors_for(3, 4))) == [
            (0, 2), (3, 4)]
        # layer 0 without the embedding is not a shard that starts the ring
        assert m.complete_ranges(everything - set(m.group_tensors("embed"))) == (
            [(1, N - 1)] if tied else [(1, N)])
        # the last layer without the final norm cannot end the ring
        assert m.complete_ranges(everything - {"model.norm.weight"}) == [(0, N - 1)]
        one_missing = everything - {"model.layers.2.mlp.up_proj.weight"}
        assert m.complete_ranges(one_missing) == [(0, 2), (3, N)]
        held = m.holdings([(1, 3)])
        assert held == set(m.tensors_for(1, 3)) | {file_key("config.json"),
                                                   file_key("tokenizer.json")}
        sizes = m.item_sizes(held)
        assert sizes[file_key("tokenizer.json")] == 20
        assert sum(v for k, v in sizes.items() if ":" not in k) == m.shard_bytes(1, 3)
