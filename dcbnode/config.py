"""Load and validate the dcbnode TOML configuration.

The configuration is read once at start-up with the standard library
:mod:`tomllib`, merged with command-line overrides and turned into frozen
dataclasses. Every problem is reported as a :class:`ConfigError` whose
``str()`` is a single line naming the key, the problem and what to do, so the
CLI can print it and exit with status 2 *before* the listening port is bound.

Path handling: a relative ``node.data_dir`` (from the file or from an
override) is resolved against the current working directory *at load time*,
not against the directory of the configuration file; ``~`` is expanded.

See ``docs/configuration.md`` for the user-facing description of every key.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Final

from . import config_values as checks
from .config_values import ConfigError

__all__ = [
    "DEFAULT_DATA_DIR",
    "DUPLICATE_POLICIES",
    "DUPLICATE_STATUS",
    "LOG_LEVELS",
    "PEER_SERVICES",
    "AccessConfig",
    "Config",
    "ConfigError",
    "NodeConfig",
    "PeerConfig",
    "QueryConfig",
    "RetrieveConfig",
    "StorageConfig",
    "TlsConfig",
    "load_config",
]

#: C-STORE response status returned for each ``node.duplicate_policy`` when a
#: SOP Instance UID that is already archived arrives again.
#:
#: * ``keep_first`` and ``replace`` answer 0000 Success: after the operation an
#:   instance with that UID is safely stored, which is exactly what Success
#:   means for a Storage SCP (PS3.4 B.2.2).
#: * ``reject`` answers 0xCD01, a *Failure* from the "Error: Cannot understand"
#:   range Cxxx of PS3.4 Table B.2-1, whose low bits the implementation
#:   defines. 0111H "Duplicate SOP Instance" is deliberately NOT used: PS3.7
#:   Annex C defines it for N-CREATE only and it is not among the C-STORE
#:   statuses; A7xx would tell the sender "out of resources" (it may retry
#:   forever) and A9xx "data set does not match SOP Class", both false.
#:   0xCD01 avoids the C0xx-C6xx values pynetdicom uses internally.
DUPLICATE_STATUS: Final[Mapping[str, int]] = MappingProxyType(
    {"keep_first": 0x0000, "replace": 0x0000, "reject": 0xCD01}
)
DUPLICATE_POLICIES: Final[tuple[str, ...]] = tuple(DUPLICATE_STATUS)
LOG_LEVELS: Final[tuple[str, ...]] = ("DEBUG", "INFO", "WARNING", "ERROR")
#: "deferred": acknowledge with the frames stored uncompressed, compress the series once it goes quiet;
#: "inline": compress before acknowledging (see docs/configuration.md).
COMPRESSION_MODES: Final[tuple[str, ...]] = ("deferred", "inline")
#: The names ``[retrieve] syntax_preference`` ranks transfer syntaxes by (see net/transfer.preferred_order).
SYNTAX_PREFERENCE_NAMES: Final[tuple[str, ...]] = ("original", "htj2k", "explicit", "implicit")
DEFAULT_SYNTAX_PREFERENCE: Final[tuple[str, ...]] = SYNTAX_PREFERENCE_NAMES
#: Used only when no configuration file is given (development, tests).
DEFAULT_DATA_DIR: Final[Path] = Path("dcbnode-data")

# DICOM limits: AE VR is at most 16 characters (PS3.5 Table 6.2-1); the PDU
# Maximum Length field is 32 bits (PS3.8 D.1.1). DCMTK, like most toolkits,
# refuses PDUs below 4 KiB, so smaller values would break interoperability.
_TOML_POSITION = re.compile(r"\s*\((at line (\d+), column (\d+)|at end of document)\)\s*$")


@dataclass(frozen=True)
class NodeConfig:
    """The ``[node]`` table: identity, listening socket, storage and limits."""

    ae_title: str = "DCBNODE"
    bind: str = "0.0.0.0"
    port: int = 11112
    data_dir: Path = DEFAULT_DATA_DIR
    # repr=False: a PostgreSQL URL carries a password that must not reach logs.
    database_url: str = field(default="", repr=False)
    max_associations: int = 10
    #: association worker processes behind the port; 0: one per CPU the node may run on
    workers: int = 0
    max_pdu_size: int = 1048576
    acse_timeout: float = 30.0
    association_request_timeout: float = 5.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    #: seconds an index write waits for a SQLite lock held by another process (then A700)
    index_busy_timeout: float = 10.0
    duplicate_policy: str = "keep_first"
    compression: str = "deferred"
    compression_delay: float = 10.0
    log_level: str = "INFO"

    @property
    def resolved_database_url(self) -> str:
        """The SQLAlchemy URL to use; ``""`` means ``<data_dir>/index.sqlite``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{Path(os.path.abspath(self.data_dir / 'index.sqlite'))}"

    @property
    def worker_count(self) -> int:
        """How many association worker processes to run (``workers``, or the usable CPUs for 0)."""
        return self.workers or len(os.sched_getaffinity(0))

    @property
    def redacted_database_url(self) -> str:
        """:attr:`resolved_database_url` with any password masked, for logging."""
        from sqlalchemy.engine import make_url  # lazy: keep config import cheap

        return make_url(self.resolved_database_url).render_as_string(hide_password=True)

    @property
    def duplicate_status(self) -> int:
        """C-STORE status to answer for a duplicate under the configured policy."""
        return DUPLICATE_STATUS[self.duplicate_policy]


#: What ``[peers.<AE>] allow`` may list: the DIMSE services a peer may ask the node for.
PEER_SERVICES: Final[tuple[str, ...]] = ("echo", "store", "find", "move", "get", "commit")


@dataclass(frozen=True)
class AccessConfig:
    """The ``[access]`` table: which associations are accepted."""

    allowed_calling_aets: tuple[str, ...] = ()
    require_called_aet: bool = True
    #: Only calling AE titles in [peers], connecting from their peer's host.
    require_known_peer: bool = False


@dataclass(frozen=True)
class PeerConfig:
    """One ``[peers.<AET>]`` table: a remote AE we can send to (C-MOVE etc.)."""

    ae_title: str
    host: str
    port: int
    #: The services this peer may ask for (``[peers.<AE>] allow``).
    allow: frozenset[str] = frozenset(PEER_SERVICES)
    #: C-MOVE sub-associations to this peer use TLS (``[tls]``).
    tls: bool = False


@dataclass(frozen=True)
class QueryConfig:
    """The ``[query]`` table: C-FIND matching behaviour."""

    case_insensitive_names: bool = True
    max_responses: int = 0


@dataclass(frozen=True)
class StorageConfig:
    """The ``[storage]`` table: what the Storage SCP accepts, and Storage Commitment."""

    accept_unknown_sop_classes: bool = True
    #: seconds before the first new attempt to deliver a storage commitment report on a new association
    #: (doubling after each failed attempt, up to ten times this)
    commitment_retry_interval: float = 60.0
    #: seconds after the request when an undelivered storage commitment report is given up (7 days)
    commitment_give_up_after: float = 604800.0


@dataclass(frozen=True)
class TlsConfig:
    """The ``[tls]`` table: DICOM over TLS (PS3.15 B.1) on a second port; ``port = 0``: none."""

    port: int = 0
    certificate: Path | None = None
    private_key: Path | None = None
    #: CA certificates that client certificates (and C-MOVE destinations with ``tls = true``) are checked
    #: against
    ca_certificates: Path | None = None
    require_client_certificate: bool = True


@dataclass(frozen=True)
class RetrieveConfig:
    """The ``[retrieve]`` table: how instances are sent (C-GET, C-MOVE)."""

    #: which accepted transfer syntax an instance goes out in, most wanted first
    syntax_preference: tuple[str, ...] = DEFAULT_SYNTAX_PREFERENCE
    #: helper processes per worker that rebuild retrieved instances (0: a thread of the worker does)
    rebuild_helpers: int = 0


@dataclass(frozen=True)
class Config:
    """The complete, validated node configuration."""

    node: NodeConfig = field(default_factory=NodeConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    peers: dict[str, PeerConfig] = field(default_factory=dict)
    query: QueryConfig = field(default_factory=QueryConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    retrieve: RetrieveConfig = field(default_factory=RetrieveConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    source: Path | None = None

    def with_peers_and_access_from(self, other: Config) -> Config:
        """Take ``[peers]`` and ``[access]`` from ``other``, keep everything else.

        Used on SIGHUP: those two tables can change safely while running,
        whereas e.g. the port or data directory need a restart.
        """
        return dataclasses.replace(self, peers=dict(other.peers), access=other.access)


# --------------------------------------------------------------------------
# Checks of this configuration's own (generic ones: dcbnode.config_values)
# --------------------------------------------------------------------------


def _check_tls(tls: TlsConfig, plain_port: int) -> None:
    """The [tls] keys that only make sense together."""
    if tls.port:
        for key in ("certificate", "private_key"):
            if getattr(tls, key) is None:
                raise ConfigError(f"tls.{key}", f"missing; the TLS listener (tls.port = {tls.port}) needs it")
        if tls.require_client_certificate and tls.ca_certificates is None:
            raise ConfigError("tls.ca_certificates", "missing; client certificates are verified against it "
                              "(or set require_client_certificate = false)")
        if tls.port == plain_port:
            raise ConfigError("tls.port", f"is node.port too ({plain_port}); use another port")
    elif plain_port == 0:
        raise ConfigError("node.port", "0 turns the plain listener off, but [tls] port is not set either")


def _syntax_preference(value: object, key: str) -> tuple[str, ...]:
    names = ", ".join(f'"{name}"' for name in SYNTAX_PREFERENCE_NAMES)
    if not isinstance(value, list) or not value or any(item not in SYNTAX_PREFERENCE_NAMES for item in value):
        raise ConfigError(key, f"must be a list of some of {names}, most wanted first; got {checks.show(value)}")
    if len(set(value)) != len(value):
        raise ConfigError(key, f"names each syntax once; got {checks.show(value)}")
    return tuple(value)


# --------------------------------------------------------------------------
# Table schemas
# --------------------------------------------------------------------------

_NODE_SCHEMA: Final[Mapping[str, checks.Validator]] = {
    "ae_title": checks.ae_title,
    "bind": checks.host,
    "port": checks.int_between(0, 65535),  # 0: no plain listener (TLS only)
    "data_dir": checks.data_dir,
    "database_url": checks.database_url,
    "max_associations": checks.int_between(1, None),
    "workers": checks.int_between(0, 256),
    "max_pdu_size": checks.pdu_size,
    "acse_timeout": checks.seconds,
    "association_request_timeout": checks.seconds,
    "dimse_timeout": checks.seconds,
    "network_timeout": checks.seconds,
    "index_busy_timeout": checks.seconds,
    "duplicate_policy": checks.choice(DUPLICATE_POLICIES),
    "compression": checks.choice(COMPRESSION_MODES),
    "compression_delay": checks.seconds,
    "log_level": checks.choice(LOG_LEVELS, upper=True),
}
_ACCESS_SCHEMA: Final[Mapping[str, checks.Validator]] = {
    "allowed_calling_aets": checks.ae_title_list,
    "require_called_aet": checks.boolean,
    "require_known_peer": checks.boolean,
}
def _services(value: object, key: str) -> frozenset[str]:
    listing = ", ".join(f'"{name}"' for name in PEER_SERVICES)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(key, f"must be a list of services from {listing}, got {checks.show(value)}")
    unknown = [item for item in value if item not in PEER_SERVICES]
    if unknown:
        raise ConfigError(key, f"unknown service {checks.show(unknown[0])}; use any of {listing}")
    return frozenset(value)


_PEER_SCHEMA: Final[Mapping[str, checks.Validator]] = {"host": checks.host, "port": checks.port, "allow": _services,
                                                       "tls": checks.boolean}
_PEER_REQUIRED: Final = ("host", "port")
_QUERY_SCHEMA: Final[Mapping[str, checks.Validator]] = {
    "case_insensitive_names": checks.boolean,
    "max_responses": checks.int_between(0, None),
}
_STORAGE_SCHEMA: Final[Mapping[str, checks.Validator]] = {
    "accept_unknown_sop_classes": checks.boolean,
    "commitment_retry_interval": checks.seconds,
    "commitment_give_up_after": checks.seconds,
}
_RETRIEVE_SCHEMA: Final[Mapping[str, checks.Validator]] = {"syntax_preference": _syntax_preference,
                                                      "rebuild_helpers": checks.int_between(0, 64)}
_TLS_SCHEMA: Final[Mapping[str, checks.Validator]] = {
    "port": checks.int_between(0, 65535),
    "certificate": checks.file_path,
    "private_key": checks.file_path,
    "ca_certificates": checks.file_path,
    "require_client_certificate": checks.boolean,
}
_TABLES: Final = ("node", "access", "peers", "query", "storage", "retrieve", "tls")
_TABLES_TEXT: Final = "[node], [access], [peers.<AE title>], [query], [storage], [retrieve] and [tls]"


def _require_table(value: object, key: str, hint: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise ConfigError(key, f"must be a table ({hint}), got {checks.show(value)}")
    return value


def _validate_table(raw: dict[str, object], name: str, schema: Mapping[str, checks.Validator]) -> dict[str, object]:
    """Reject unknown keys and run each present key through its validator."""
    for key in raw:
        if key not in schema:
            valid = ", ".join(schema)
            raise ConfigError(f"{name}.{key}", f"unknown key; check the spelling; valid keys here: {valid}")
    return {key: schema[key](value, f"{name}.{key}") for key, value in raw.items()}


def _section(raw: dict[str, object], name: str, schema: Mapping[str, checks.Validator]) -> dict[str, object]:
    """Validate the optional top-level table ``[name]`` (absent = all defaults)."""
    return _validate_table(_require_table(raw.get(name, {}), name, f"[{name}]"), name, schema)


def _build_peers(raw: object) -> dict[str, PeerConfig]:
    peers: dict[str, PeerConfig] = {}
    for raw_aet, table in _require_table(raw, "peers", "[peers.<AE title>] tables").items():
        prefix = f"peers.{raw_aet}"
        aet = checks.ae_title(raw_aet, prefix)
        if aet in peers:
            raise ConfigError(prefix, f"duplicates peers.{aet} (AE titles are compared without spaces)")
        values = _validate_table(_require_table(table, prefix, "with host and port"), prefix, _PEER_SCHEMA)
        for required in _PEER_REQUIRED:
            if required not in values:
                raise ConfigError(f"{prefix}.{required}", f"missing; add {required} = ... to [{prefix}]")
        peers[aet] = PeerConfig(ae_title=aet, **values)
    return peers


def _build_config(raw: dict[str, object], source: Path | None) -> Config:
    """Turn a parsed (and override-merged) TOML document into a Config."""
    for name in raw:
        if name not in _TABLES:
            raise ConfigError(name, f"unknown table or key; valid tables are {_TABLES_TEXT}")
    node = _section(raw, "node", _NODE_SCHEMA)
    if "data_dir" not in node:
        if source is not None:
            # A server silently writing into its CWD (often "/") is worse than refusing to start.
            raise ConfigError(
                "node.data_dir", 'missing; set data_dir = "/var/lib/dcbnode" (an absolute path) in [node]'
            )
        node["data_dir"] = checks.data_dir(str(DEFAULT_DATA_DIR), "node.data_dir")
    access = _section(raw, "access", _ACCESS_SCHEMA)
    query = _section(raw, "query", _QUERY_SCHEMA)
    storage = _section(raw, "storage", _STORAGE_SCHEMA)
    retrieve = _section(raw, "retrieve", _RETRIEVE_SCHEMA)
    tls = TlsConfig(**_section(raw, "tls", _TLS_SCHEMA))
    _check_tls(tls, int(node.get("port", NodeConfig.port)))
    return Config(
        node=NodeConfig(**node),
        access=AccessConfig(**access),
        peers=_build_peers(raw.get("peers", {})),
        query=QueryConfig(**query),
        storage=StorageConfig(**storage),
        retrieve=RetrieveConfig(**retrieve),
        tls=tls,
        source=source,
    )


# --------------------------------------------------------------------------
# File reading and overrides
# --------------------------------------------------------------------------


def _read_toml(path: Path) -> dict[str, object]:
    """Parse ``path``; file and syntax problems become a ConfigError naming the file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(str(path), "configuration file not found; check the --config path") from None
    except OSError as exc:
        problem = f"cannot read configuration file ({exc.strerror}); check the path and permissions"
        raise ConfigError(str(path), problem) from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(str(path), "configuration file is not UTF-8 text; re-save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), _describe_syntax_error(str(exc))) from None


def _describe_syntax_error(message: str) -> str:
    """Rewrite tomllib's message so the line number comes first."""
    match = _TOML_POSITION.search(message)
    detail = message[: match.start()] if match else message
    at_line = match is not None and match.group(2) is not None
    where = f"line {match.group(2)}, column {match.group(3)}" if at_line else "end of file"
    return f"TOML syntax error at {where}: {detail}; fix the file and retry"


def _split_override(key: str) -> tuple[str, ...]:
    """Split a dotted override key; AE titles in peers.<AET>.<field> may contain dots."""
    table, _, rest = key.partition(".")
    if table == "peers":
        aet, _, leaf = rest.rpartition(".")
        parts: tuple[str, ...] = (table, aet, leaf)
    else:
        parts = (table, rest)
    if not all(parts) or table not in _TABLES:
        problem = f"not a valid setting name; use table.key such as node.port (tables: {_TABLES_TEXT})"
        raise ConfigError(key, problem)
    return parts


def _apply_overrides(raw: dict[str, object], overrides: Mapping[str, object]) -> set[str]:
    """Merge overrides into ``raw`` in place; return the keys that were applied.

    ``None`` values are skipped so unset command-line flags can be passed
    straight through from argparse.
    """
    applied: set[str] = set()
    for key, value in overrides.items():
        if value is None:
            continue
        *tables, leaf = _split_override(key)
        target = raw
        for name in tables:
            child = target.setdefault(name, {})
            target = _require_table(child, ".".join(tables), "cannot override inside a non-table")
        target[leaf] = value
        applied.add(key)
    return applied


def _origin(error: ConfigError, overridden: set[str], path: Path | None) -> str | None:
    """Say where the value behind ``error`` came from (file or command line)."""
    base_key = error.key.split("[", 1)[0]
    if base_key in overridden:
        return "from a command-line override"
    if path is not None and error.key != str(path):
        return f"in {path}"
    return None


def load_config(path: Path | None, overrides: Mapping[str, object] | None = None) -> Config:
    """Load, merge and validate the configuration.

    Args:
        path: TOML file to read, or ``None`` for the built-in defaults
            (with ``node.data_dir = ./dcbnode-data``).
        overrides: dotted keys such as ``{"node.port": 11113}`` that win over
            the file (command-line flags). ``None`` values are ignored.

    Returns:
        The validated :class:`Config`; ``node.data_dir`` is absolute.

    Raises:
        ConfigError: for any problem, with a one-line message.
    """
    source = Path(os.path.abspath(path)) if path is not None else None
    raw: dict[str, object] = _read_toml(source) if source is not None else {}
    try:
        overridden = _apply_overrides(raw, overrides or {})
    except ConfigError as error:
        raise error.with_origin("from a command-line override") from None
    try:
        return _build_config(raw, source)
    except ConfigError as error:
        if error.origin is not None:
            raise
        raise error.with_origin(_origin(error, overridden, source)) from None
