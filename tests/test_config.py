"""Tests for dcbnode.config: defaults, the example file, validation, overrides, reload."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dcbnode.config import (
    DUPLICATE_STATUS,
    AccessConfig,
    Config,
    ConfigError,
    NodeConfig,
    PeerConfig,
    RetrieveConfig,
    StorageConfig,
    load_config,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "dcbnode.toml"
DOCS = REPO / "docs" / "configuration.md"

MINIMAL = '[node]\ndata_dir = "/var/lib/dcbnode"\n'


def write(tmp_path: Path, text: str, name: str = "dcbnode.toml") -> Path:
    """Write a config file into tmp_path and return its path."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_for(tmp_path: Path, text: str) -> ConfigError:
    """Load ``text`` as a file and return the ConfigError it must raise."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return info.value


def assert_one_line(error: ConfigError, key: str, *fragments: str) -> None:
    """The message is one line, starts with the key and contains the fragments."""
    message = str(error)
    assert "\n" not in message and "\r" not in message
    assert message.startswith(f"{key}: "), message
    assert error.key == key
    for fragment in fragments:
        assert fragment in message, message


# ---------------------------------------------------------------- defaults


def test_defaults_without_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None)
    node = config.node
    assert (node.ae_title, node.bind, node.port) == ("DCBNODE", "0.0.0.0", 11112)
    assert node.data_dir == tmp_path / "dcbnode-data"
    assert node.database_url == ""
    assert node.resolved_database_url == f"sqlite:///{tmp_path}/dcbnode-data/index.sqlite"
    assert node.resolved_database_url.startswith("sqlite:////")
    assert (node.max_associations, node.max_pdu_size) == (10, 1048576)
    assert (node.acse_timeout, node.dimse_timeout, node.network_timeout) == (30.0, 60.0, 60.0)
    assert (node.duplicate_policy, node.log_level) == ("keep_first", "INFO")
    assert config.access == AccessConfig(allowed_calling_aets=(), require_called_aet=True)
    assert config.peers == {}
    assert config.query.case_insensitive_names is True
    assert config.query.max_responses == 0
    assert config.source is None


def test_minimal_file_uses_defaults_for_everything_else(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, MINIMAL))
    assert config.node.data_dir == Path("/var/lib/dcbnode")
    assert config.node.port == 11112
    assert config.source == tmp_path / "dcbnode.toml"


def test_duplicate_status_codes() -> None:
    assert dict(DUPLICATE_STATUS) == {"keep_first": 0x0000, "replace": 0x0000, "reject": 0xCD01}
    assert NodeConfig(duplicate_policy="reject").duplicate_status == 0xCD01
    # Cxxx is the implementation-defined "Error: Cannot understand" failure class.
    assert DUPLICATE_STATUS["reject"] & 0xF000 == 0xC000


def test_config_is_frozen() -> None:
    config = load_config(None)
    with pytest.raises(AttributeError):
        config.node.port = 1  # type: ignore[misc]


def test_database_url_not_in_repr_and_redacted(tmp_path: Path) -> None:
    url = "postgresql+psycopg://dcb:s3cret@db.example.org/dcbnode"
    config = load_config(write(tmp_path, MINIMAL + f'database_url = "{url}"\n'))
    assert config.node.resolved_database_url == url
    assert "s3cret" not in repr(config)
    assert "s3cret" not in config.node.redacted_database_url
    assert "db.example.org" in config.node.redacted_database_url


# ---------------------------------------------------------------- example file and docs


def test_example_file_loads() -> None:
    config = load_config(EXAMPLE)
    assert config.node.data_dir == Path("/var/lib/dcbnode")
    assert config.node.ae_title == "DCBNODE"
    assert config.node.resolved_database_url == "sqlite:////var/lib/dcbnode/index.sqlite"
    assert config.peers == {"STORESCP": PeerConfig(ae_title="STORESCP", host="127.0.0.1", port=11113)}
    assert config.access.allowed_calling_aets == ()


def test_example_file_sets_every_key_to_its_default() -> None:
    """The example documents every key, so its values must equal the defaults."""
    example = load_config(EXAMPLE)
    defaults = load_config(None, {"node.data_dir": "/var/lib/dcbnode"})
    assert example.node == defaults.node
    assert example.access == defaults.access
    assert example.query == defaults.query
    assert example.storage == defaults.storage
    assert example.retrieve == defaults.retrieve


@pytest.mark.parametrize(
    "key",
    [
        *(f"node.{name}" for name in NodeConfig.__dataclass_fields__),
        *(f"access.{name}" for name in AccessConfig.__dataclass_fields__),
        "query.case_insensitive_names",
        "query.max_responses",
        *(f"storage.{name}" for name in StorageConfig.__dataclass_fields__),
        *(f"retrieve.{name}" for name in RetrieveConfig.__dataclass_fields__),
    ],
)
def test_every_key_is_in_example_and_docs(key: str) -> None:
    name = key.split(".", 1)[1]
    assert f"\n{name} = " in EXAMPLE.read_text(encoding="utf-8")
    assert f"`{name}`" in DOCS.read_text(encoding="utf-8")


# ---------------------------------------------------------------- file-level errors


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert_one_line(info.value, str(path), "not found", "--config")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert_one_line(info.value, str(tmp_path), "cannot read")


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    error = error_for(tmp_path, '[node]\ndata_dir = "/d"\nport = = 5\n')
    assert_one_line(error, str(tmp_path / "dcbnode.toml"), "TOML syntax error at line 3", "fix the file")


def test_toml_syntax_error_at_end_of_file(tmp_path: Path) -> None:
    error = error_for(tmp_path, '[node]\ndata_dir = "/d')
    assert_one_line(error, str(tmp_path / "dcbnode.toml"), "TOML syntax error")


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[node]\nae_title = "\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert_one_line(info.value, str(path), "UTF-8")


def test_data_dir_required_in_file(tmp_path: Path) -> None:
    error = error_for(tmp_path, "[node]\nport = 104\n")
    assert_one_line(error, "node.data_dir", "missing", "/var/lib/dcbnode", "dcbnode.toml")


def test_data_dir_from_override_satisfies_requirement(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""), {"node.data_dir": str(tmp_path / "d")})
    assert config.node.data_dir == tmp_path / "d"


# ---------------------------------------------------------------- validation of values

# (TOML line in [node], expected key, fragments of the message)
NODE_ERRORS = [
    ("port = 70000", "node.port", "must be an integer between 0 and 65535, got 70000"),
    ("port = 0", "node.port", "0 turns the plain listener off, but [tls] port is not set either"),
    ('port = "104"', "node.port", 'got "104"', "remove the quotes"),
    ("port = true", "node.port", "got true"),
    ("port = 104.0", "node.port", "got 104.0"),
    ('ae_title = ""', "node.ae_title", "empty or all spaces"),
    ('ae_title = "    "', "node.ae_title", "empty or all spaces"),
    ('ae_title = "ABCDEFGHIJKLMNOPQ"', "node.ae_title", "1 to 16 characters", "(17 characters)"),
    ('ae_title = "BAD\\\\AE"', "node.ae_title", "backslash or control"),
    ('ae_title = "BAD\\tAE"', "node.ae_title", "backslash or control"),
    ('ae_title = "CAFÉ"', "node.ae_title", "printable ASCII"),
    ("ae_title = 5", "node.ae_title", "must be a string"),
    ('bind = "not a host!"', "node.bind", "IP address or host name", '"not a host!"'),
    ('bind = ""', "node.bind", "IP address or host name"),
    ('bind = "-bad.example.org"', "node.bind", "IP address or host name"),
    ("bind = 0", "node.bind", "must be a string"),
    ("acse_timeout = 0", "node.acse_timeout", "positive number of seconds, got 0"),
    ("dimse_timeout = -1.5", "node.dimse_timeout", "positive number of seconds, got -1.5"),
    ("network_timeout = inf", "node.network_timeout", "positive number of seconds"),
    ('network_timeout = "60"', "node.network_timeout", "positive number of seconds"),
    (
        'duplicate_policy = "overwrite"',
        "node.duplicate_policy",
        '"keep_first", "replace", "reject"',
        "overwrite",
    ),
    ('log_level = "TRACE"', "node.log_level", '"DEBUG", "INFO", "WARNING", "ERROR"', "TRACE"),
    ("max_associations = 0", "node.max_associations", "integer >= 1"),
    ("max_pdu_size = 100", "node.max_pdu_size", "4096", "0 for unlimited", "got 100"),
    ("max_pdu_size = 4294967296", "node.max_pdu_size", "4294967295"),
    ('data_dir = ""', "node.data_dir", "non-empty directory path"),
    ("data_dir = 3", "node.data_dir", "non-empty directory path"),
    (
        'database_url = "no url here"',
        "node.database_url",
        "not a valid database URL",
        "postgresql+psycopg://",
    ),
    ("database_url = 1", "node.database_url", "must be a string"),
    ('database_url = "mysql://u:p@db/dcb"', "node.database_url", "mysql is not supported", "SQLite and PostgreSQL"),
    ('compression = "lazy"', "node.compression", '"deferred", "inline"', "lazy"),
    ("compression_delay = 0", "node.compression_delay", "positive number of seconds"),
    ("prot = 104", "node.prot", "unknown key", "check the spelling", "port"),
]


@pytest.mark.parametrize(("line", "key", "fragments"), [(e[0], e[1], e[2:]) for e in NODE_ERRORS])
def test_node_validation_errors(tmp_path: Path, line: str, key: str, fragments: tuple[str, ...]) -> None:
    base = "" if line.startswith("data_dir") else 'data_dir = "/d"\n'
    path = write(tmp_path, f"[node]\n{base}{line}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert_one_line(info.value, key, *fragments, f"(in {path})")


def test_database_url_error_does_not_leak_value(tmp_path: Path) -> None:
    error = error_for(tmp_path, MINIMAL + 'database_url = "pw=hunter2 nonsense"\n')
    assert "hunter2" not in str(error)


OTHER_ERRORS = [
    ('[access]\nallowed_calling_aets = "CT01"\n', "access.allowed_calling_aets", "list of AE titles"),
    ('[access]\nallowed_calling_aets = ["CT01", "  "]\n', "access.allowed_calling_aets[1]", "empty"),
    ('[access]\nrequire_called_aet = "yes"\n', "access.require_called_aet", "true or false"),
    ("[access]\nrequire_called_aets = true\n", "access.require_called_aets", "unknown key"),
    ("[query]\ncase_insensitive_names = 1\n", "query.case_insensitive_names", "true or false"),
    ("[query]\nmax_responses = -1\n", "query.max_responses", "integer >= 0"),
    ('[storage]\naccept_unknown_sop_classes = "no"\n', "storage.accept_unknown_sop_classes", "true or false"),
    ("[storage]\ncommitment_give_up_after = 0\n", "storage.commitment_give_up_after", "positive number of seconds"),
    ("[logging]\nlevel = 1\n", "logging", "unknown table", "[peers.<AE title>]"),
    ("[peers.STORESCP]\nport = 11113\n", "peers.STORESCP.host", "missing"),
    ('[peers.STORESCP]\nhost = "127.0.0.1"\n', "peers.STORESCP.port", "missing"),
    ('[peers.STORESCP]\nhost = "127.0.0.1"\nport = 99999\n', "peers.STORESCP.port", "between 1 and 65535"),
    ('[peers.STORESCP]\nhost = "a b"\nport = 104\n', "peers.STORESCP.host", "IP address or host name"),
    ('[peers.STORESCP]\nhost = "h"\nport = 104\naet = "X"\n', "peers.STORESCP.aet", "unknown key"),
    ('[peers."TOO_LONG_AE_TITLE_X"]\nhost = "h"\nport = 104\n', "peers.TOO_LONG_AE_TITLE_X", "1 to 16"),
    ('[peers]\nSTORESCP = "127.0.0.1"\n', "peers.STORESCP", "must be a table"),
    ('[[peers]]\nhost = "h"\n', "peers", "must be a table"),
]


@pytest.mark.parametrize(("body", "key", "fragments"), [(e[0], e[1], e[2:]) for e in OTHER_ERRORS])
def test_other_validation_errors(tmp_path: Path, body: str, key: str, fragments: tuple[str, ...]) -> None:
    assert_one_line(error_for(tmp_path, MINIMAL + body), key, *fragments)


@pytest.mark.parametrize(
    ("top", "key", "fragment"),
    [("port = 1\n", "port", "unknown table or key"), ("access = 1\n", "access", "must be a table")],
)
def test_top_level_non_tables(tmp_path: Path, top: str, key: str, fragment: str) -> None:
    """Keys before the first [table] header live at the top level."""
    assert_one_line(error_for(tmp_path, top + MINIMAL), key, fragment)


def test_peer_titles_equal_after_trimming_are_rejected(tmp_path: Path) -> None:
    body = '[peers.PACS]\nhost = "a"\nport = 1\n[peers." PACS "]\nhost = "b"\nport = 2\n'
    assert_one_line(error_for(tmp_path, MINIMAL + body), "peers. PACS ", "duplicates peers.PACS")


# ---------------------------------------------------------------- accepted values


def test_valid_values_are_normalised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    text = """
[node]
ae_title = "  ARCHIVE1 "
bind = "::"
port = 104
data_dir = "relative/data"
log_level = "debug"
acse_timeout = 5
duplicate_policy = "reject"
max_pdu_size = 0
[access]
allowed_calling_aets = ["CT01 ", "MR 2"]
require_called_aet = false
[query]
case_insensitive_names = false
max_responses = 500
[peers."WS 7"]
host = "ws7.radiology.example.org"
port = 104
[peers.STORESCP]
host = "10.0.0.5"
port = 11113
"""
    config = load_config(write(tmp_path, text))
    assert config.node.ae_title == "ARCHIVE1"
    assert config.node.bind == "::"
    assert config.node.data_dir == tmp_path / "relative" / "data"  # relative to CWD at load time
    assert config.node.log_level == "DEBUG"
    assert config.node.acse_timeout == 5.0 and isinstance(config.node.acse_timeout, float)
    assert config.node.max_pdu_size == 0
    assert config.node.duplicate_status == 0xCD01
    assert config.access.allowed_calling_aets == ("CT01", "MR 2")
    assert config.access.require_called_aet is False
    assert config.query.max_responses == 500
    assert set(config.peers) == {"WS 7", "STORESCP"}
    assert config.peers["WS 7"].host == "ws7.radiology.example.org"


def test_relative_data_dir_uses_cwd_not_file_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    path = write(conf_dir, '[node]\ndata_dir = "data"\n')
    monkeypatch.chdir(work)
    assert load_config(path).node.data_dir == work / "data"


def test_explicit_sqlite_url_is_kept(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/elsewhere.sqlite"
    config = load_config(write(tmp_path, MINIMAL + f'database_url = "{url}"\n'))
    assert config.node.resolved_database_url == url


# ---------------------------------------------------------------- overrides


def test_overrides_win_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + 'ae_title = "FILEAE"\nport = 104\nlog_level = "INFO"\n')
    config = load_config(
        path,
        {
            "node.port": 11113,
            "node.ae_title": "X",
            "node.data_dir": "/tmp/d",
            "node.log_level": "WARNING",
            "node.database_url": None,  # unset CLI flags are passed as None and ignored
        },
    )
    assert (config.node.port, config.node.ae_title, config.node.log_level) == (11113, "X", "WARNING")
    assert config.node.data_dir == Path("/tmp/d")
    assert config.node.database_url == ""


def test_overrides_without_file(tmp_path: Path) -> None:
    config = load_config(
        None, {"node.bind": "127.0.0.1", "node.data_dir": tmp_path, "query.max_responses": 3}
    )
    assert config.node.bind == "127.0.0.1"
    assert config.node.data_dir == tmp_path
    assert config.query.max_responses == 3


def test_override_can_add_peer_with_dotted_ae_title() -> None:
    config = load_config(None, {"peers.PACS.MAIN.host": "10.1.1.1", "peers.PACS.MAIN.port": 104})
    assert config.peers == {"PACS.MAIN": PeerConfig(ae_title="PACS.MAIN", host="10.1.1.1", port=104)}


def test_override_masks_bad_file_value_and_is_validated(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "port = 104\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {"node.port": 70000})
    assert_one_line(info.value, "node.port", "got 70000", "(from a command-line override)")


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        ({"node.ae_title": "A" * 17}, "node.ae_title", "1 to 16"),
        ({"node.bind": "bad host"}, "node.bind", "IP address or host name"),
        ({"node.log_level": "verbose"}, "node.log_level", "must be one of"),
        ({"node.prot": 1}, "node.prot", "unknown key"),
        ({"nodes.port": 1}, "nodes.port", "not a valid setting name"),
        ({"port": 1}, "port", "not a valid setting name"),
        ({"peers.X": 1}, "peers.X", "not a valid setting name"),
    ],
)
def test_override_errors(overrides: dict[str, object], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert_one_line(info.value, key, fragment, "command-line override")


def test_file_error_mentions_file_not_override(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "port = 70000\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {"node.ae_title": "OK"})
    assert str(info.value).endswith(f"(in {path})")


# ---------------------------------------------------------------- reload merging


def test_with_peers_and_access_from(tmp_path: Path) -> None:
    first = load_config(
        write(tmp_path, MINIMAL + '[peers.OLD]\nhost = "a"\nport = 1\n', "a.toml"),
        {"node.port": 11113},
    )
    changed = """
[node]
data_dir = "/elsewhere"
port = 2000
ae_title = "NEWNAME"
[access]
allowed_calling_aets = ["CT01"]
require_called_aet = false
[query]
max_responses = 9
[peers.NEW]
host = "b"
port = 2
"""
    second = load_config(write(tmp_path, changed, "b.toml"))
    merged = first.with_peers_and_access_from(second)

    assert isinstance(merged, Config)
    assert merged.peers == {"NEW": PeerConfig(ae_title="NEW", host="b", port=2)}
    assert merged.access == AccessConfig(allowed_calling_aets=("CT01",), require_called_aet=False)
    # Everything else, including command-line overrides, is kept.
    assert merged.node == first.node
    assert merged.node.port == 11113
    assert merged.query == first.query
    assert merged.source == first.source
    # The originals are untouched (frozen dataclasses, copied dict).
    assert set(first.peers) == {"OLD"}
    merged.peers.clear()
    assert set(second.peers) == {"NEW"}


def test_data_dir_absolute_even_with_tilde(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config(None, {"node.data_dir": "~/archive"})
    assert config.node.data_dir == tmp_path / "archive"
    assert os.path.isabs(config.node.data_dir)


@pytest.mark.parametrize("value", [-1, 65, "2", True, 1.5])
def test_bad_rebuild_helpers(tmp_path: Path, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {"node.data_dir": str(tmp_path), "retrieve.rebuild_helpers": value})
    assert "retrieve.rebuild_helpers" in str(info.value)
    two = load_config(None, {"node.data_dir": str(tmp_path), "retrieve.rebuild_helpers": 2})
    assert two.retrieve.rebuild_helpers == 2
    assert load_config(None, {"node.data_dir": str(tmp_path)}).retrieve.rebuild_helpers == 0


@pytest.mark.parametrize("value", [[], ["original", "lossy"], ["htj2k", "htj2k"], "htj2k"])
def test_bad_syntax_preference(tmp_path: Path, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {"node.data_dir": str(tmp_path), "retrieve.syntax_preference": value})
    assert "retrieve.syntax_preference" in str(info.value)
