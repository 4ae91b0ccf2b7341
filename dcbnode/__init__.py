"""dcbnode: a DICOM network node that archives series losslessly in DCBS volumes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dcbnode")
except PackageNotFoundError:  # a source tree that was never installed: say so rather than guess
    __version__ = "unknown (not installed)"


def version_line(program: str) -> str:
    """``PROGRAM VERSION (Python …, pydicom …, pynetdicom …, SQLAlchemy …)`` for ``--version``.

    Read from the installed packages' metadata, so it is fast (nothing heavy is imported) and names the
    libraries a bug report needs.
    """
    import platform

    libraries = []
    for name in ("pydicom", "pynetdicom", "SQLAlchemy"):
        try:
            libraries.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            libraries.append(f"{name} missing")
    return f"{program} {__version__} (Python {platform.python_version()}, {', '.join(libraries)})"
