"""ringctl's own commands (model, keygen, demo wiring): messages, never tracebacks."""

import os
import stat

from click.testing import CliRunner

from ringd.cli import main


def test_keygen_writes_a_private_key_once(tmp_path):
    key = tmp_path / "k" / "cluster.key"
    r = CliRunner().invoke(main, ["keygen", "--key-file", str(key)])
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert "cluster id" in r.output and key.read_text().strip() not in r.output
    r = CliRunner().invoke(main, ["keygen", "--key-file", str(key)])
    assert r.exit_code == 2 and "already exists" in r.output and "Traceback" not in r.output
    old = key.read_text()
    assert CliRunner().invoke(main, ["keygen", "--key-file", str(key), "--force"]).exit_code == 0
    assert key.read_text() != old


def test_model_list_on_an_empty_store_says_what_to_do(tmp_path):
    r = CliRunner().invoke(main, ["model", "list", "--store", str(tmp_path)])
    assert r.exit_code == 0 and "ringctl model pull" in r.output


def test_model_import_of_a_missing_file_is_a_message(tmp_path):
    r = CliRunner().invoke(main, ["model", "import", str(tmp_path / "nope.gguf"),
                                  "--store", str(tmp_path)])
    assert r.exit_code != 0 and "nope.gguf" in r.output and "Traceback" not in r.output


def test_bad_config_file_is_a_message(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("port = 'x'\n")
    r = CliRunner().invoke(main, ["--config", str(cfg), "model", "list"])
    assert r.exit_code == 2 and "bad value 'x' for port" in r.output and "Traceback" not in r.output
