"""Checking one configuration value: each validator takes the raw TOML value and its dotted key and returns
the typed value, or raises :class:`ConfigError` with one line saying what is wrong and what to write
instead.  The tables' schemas (:mod:`dcbnode.config`) are made of these."""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Final

_AE_MAX_LEN: Final = 16
_PDU_MIN: Final = 4096
_PDU_MAX: Final = 0xFFFFFFFF
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")

Validator = Callable[[object, str], object]


class ConfigError(Exception):
    """A configuration problem, rendered as one line ``key: problem``.

    ``key`` is the dotted TOML key (``node.port``, ``peers.PACS.host``,
    ``access.allowed_calling_aets[2]``) or the file path for file-level
    problems (missing file, TOML syntax). ``origin`` optionally says where the
    bad value came from (the file, or a command-line override).
    """

    def __init__(self, key: str, problem: str, origin: str | None = None) -> None:
        super().__init__(key, problem, origin)
        self.key = key
        self.problem = problem
        self.origin = origin

    def __str__(self) -> str:
        text = f"{self.key}: {self.problem}"
        if self.origin:
            text += f" ({self.origin})"
        # Guarantee the one-line contract even if a value smuggled a newline in.
        return " ".join(text.splitlines())

    def with_origin(self, origin: str | None) -> ConfigError:
        """Return a copy that also names where the offending value came from."""
        return ConfigError(self.key, self.problem, origin)


def show(value: object) -> str:
    """Render a value for an error message, TOML-style and on one line."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str):
        text = json.dumps(value)  # quotes + escapes control characters
    elif isinstance(value, dict):
        text = "a table"
    elif isinstance(value, int | float):
        text = repr(value)
    else:
        text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def type_hint(value: object, expected: str) -> str:
    """Common 'wrong type' problem text, with a hint for quoted numbers."""
    hint = "; remove the quotes" if isinstance(value, str) and expected.startswith("an integer") else ""
    return f"must be {expected}, got {show(value)}{hint}"


def is_int(value: object) -> bool:
    # bool is a subclass of int in Python, but `port = true` is a mistake.
    return isinstance(value, int) and not isinstance(value, bool)


def int_between(low: int, high: int | None) -> Validator:
    """Validator for an integer in [low, high] (high None = unbounded)."""
    expected = f"an integer between {low} and {high}" if high is not None else f"an integer >= {low}"

    def check(value: object, key: str) -> int:
        if not is_int(value) or value < low or (high is not None and value > high):
            raise ConfigError(key, type_hint(value, expected))
        return value

    return check


def port(value: object, key: str) -> int:
    return int_between(1, 65535)(value, key)


def file_path(value: object, key: str) -> Path:
    """An existing file (certificates, keys); ``~`` expanded, relative to the working directory."""
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"must be a file path string, got {show(value)}")
    path = Path(os.path.abspath(os.path.expanduser(value)))
    if not path.is_file():
        raise ConfigError(key, f"{path} is not a readable file; check the path")
    return path


def pdu_size(value: object, key: str) -> int:
    if is_int(value) and (value == 0 or _PDU_MIN <= value <= _PDU_MAX):
        return value
    expected = f"an integer between {_PDU_MIN} and {_PDU_MAX} bytes, or 0 for unlimited"
    raise ConfigError(key, type_hint(value, expected))


def seconds(value: object, key: str) -> float:
    ok = (is_int(value) or isinstance(value, float)) and math.isfinite(value) and value > 0
    if not ok:
        raise ConfigError(key, f"must be a positive number of seconds, got {show(value)}")
    return float(value)


def boolean(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false (without quotes), got {show(value)}")
    return value


def string(value: object, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string in double quotes, got {show(value)}")
    return value


def ae_title(value: object, key: str) -> str:
    """An AE title per PS3.5 AE VR; returned without padding spaces."""
    text = string(value, key)
    stripped = text.strip(" ")
    if not stripped:
        raise ConfigError(key, f"AE title must not be empty or all spaces, got {show(text)}")
    if any(ch == "\\" or not " " <= ch <= "~" for ch in stripped):
        raise ConfigError(
            key,
            f"AE title must use printable ASCII without backslash or control characters, got {show(text)}",
        )
    if len(stripped) > _AE_MAX_LEN:
        raise ConfigError(
            key, f"AE title must be 1 to 16 characters, got {show(text)} ({len(stripped)} characters)"
        )
    return stripped


def is_hostname(text: str) -> bool:
    """RFC 1123 host name (a trailing dot is allowed)."""
    name = text[:-1] if text.endswith(".") else text
    return 0 < len(name) <= 253 and all(_HOST_LABEL.match(label) for label in name.split("."))


def host(value: object, key: str) -> str:
    text = string(value, key)
    try:
        ipaddress.ip_address(text)
    except ValueError:
        if not is_hostname(text):
            raise ConfigError(
                key,
                f'must be an IP address or host name such as "0.0.0.0" or "pacs.example.org", '
                f"got {show(text)}",
            ) from None
    return text


def data_dir(value: object, key: str) -> Path:
    if not isinstance(value, str | os.PathLike) or not os.fspath(value):
        raise ConfigError(key, f"must be a non-empty directory path string, got {show(value)}")
    # Relative paths are resolved against the CWD at load time (documented).
    return Path(os.path.abspath(os.path.expanduser(os.fspath(value))))


def database_url(value: object, key: str) -> str:
    text = string(value, key)
    if not text:
        return text
    from sqlalchemy.engine import make_url  # lazy: only needed for non-default URLs
    from sqlalchemy.exc import ArgumentError

    hint = '; use "" for the built-in SQLite index, "sqlite:////abs/path.sqlite" or "postgresql+psycopg://user:pw@host/db"'
    try:
        backend = make_url(text).get_backend_name()
    except (ArgumentError, ValueError):
        # Never echo the value: it may contain a password.
        raise ConfigError(key, "is not a valid database URL" + hint) from None
    if backend not in ("sqlite", "postgresql"):
        raise ConfigError(key, f"{backend} is not supported (SQLite and PostgreSQL are)" + hint)
    return text


def choice(allowed: tuple[str, ...], *, upper: bool = False) -> Validator:
    """Validator for one of a fixed set of strings (optionally case-insensitive)."""
    listing = ", ".join(f'"{item}"' for item in allowed)

    def check(value: object, key: str) -> str:
        text = value.upper() if upper and isinstance(value, str) else value
        if text not in allowed:
            raise ConfigError(key, f"must be one of {listing}, got {show(value)}")
        return text

    return check


def ae_title_list(value: object, key: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(key, f'must be a list of AE titles such as ["MODALITY1"], got {show(value)}')
    return tuple(ae_title(item, f"{key}[{index}]") for index, item in enumerate(value))
