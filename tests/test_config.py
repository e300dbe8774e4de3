import dataclasses

import pytest

from ringd.config import Settings, describe_settings
from ringd.units import format_size, parse_size
from ringd.errors import ConfigError


def test_file_then_environment_then_flags(tmp_path):
    cfg = tmp_path / "ringd.toml"
    cfg.write_text('[ringd]\nport = 9000\nmemory-budget = "2GiB"\n'
                   'peers = ["10.0.0.2:7411"]\nmdns = false\n')
    s = Settings.load(cfg, env={})
    assert ((s.port, s.memory_budget, s.peers, s.mdns)
            == (9000, 2 * 2**30, ("10.0.0.2:7411",), False))
    s = Settings.load(cfg, env={"RINGD_PORT": "9100", "RINGD_MDNS": "yes"})
    assert (s.port, s.mdns) == (9100, True)
    s = Settings.load(cfg, env={"RINGD_PORT": "9100"}, port=9200, memory_budget="512MiB")
    assert (s.port, s.memory_budget) == (9200, 512 * 2**20)


def test_config_named_by_environment(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("http_port = 8000\n")
    assert Settings.load(env={"RINGD_CONFIG": str(cfg)}).http_port == 8000


@pytest.mark.parametrize("content, needle", [
    ("port = \n", "not valid TOML"),
    ("prot = 1\n", "unknown setting 'prot'"),
    ('port = "many"\n', "bad value 'many' for port"),
    ("port = 70000\n", "port must be 0..65535"),
    ('memory_budget = "lots"\n', "cannot read 'lots' as a size"),
    ("mdns = 3\n", "expected true or false"),
    ("peers = [1, 2]\n", "expected a list of strings"),
])
def test_bad_config_files_say_what_and_where(tmp_path, content, needle):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(content)
    with pytest.raises(ConfigError) as e:
        Settings.load(cfg, env={})
    assert needle in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Settings.load(tmp_path / "nope.toml", env={})


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError, match="RINGD_PROBE_INTERVAL"):
        Settings.load(env={"RINGD_PROBE_INTERVAL": "soon"})


@pytest.mark.parametrize("text, value", [("6GiB", 6 * 2**30), ("512 MB", 512 * 10**6),
                                         ("1.5g", 1_500_000_000), ("1073741824", 2**30),
                                         (4096, 4096)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_format_size():
    assert format_size(3 * 2**30) == "3.0 GiB" and format_size(10) == "10 B"


def test_settings_are_frozen_and_documented():
    s = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.port = 1  # type: ignore[misc]
    assert all(help_ for _, _, help_ in describe_settings())
    assert "api_key" not in s.as_dict()
