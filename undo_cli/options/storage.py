"""`--search-storage URL`: the Optuna storage of a `--search`, checked when it is parsed.

A storage is an SQLAlchemy URL: `sqlite:///PATH` (the usual one: a file, created if absent,
in a directory that exists), or `postgresql://...` / `mysql://...` with their driver
installed. Anything else, a directory that does not exist, a directory given as the file or a
file that is not an SQLite database is refused naming the flag, before any work.
"""

from __future__ import annotations

from pathlib import Path

from undo_cli.errors import UsageError

FLAG = "--search-storage"
SCHEMES = ("sqlite", "postgresql", "mysql")
SQLITE_HEADER = b"SQLite format 3\x00"


def sqlite_path(url: str | None) -> Path | None:
    """The database file of an `sqlite:///PATH` URL (None for any other storage)."""
    if not url:
        return None
    scheme, sep, rest = url.strip().partition("://")
    if not sep or scheme.split("+")[0].lower() != "sqlite" or not rest.startswith("/"):
        return None
    path = rest[1:].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def parse_search_storage(text: str | None) -> str | None:
    """`text`, checked (module doc); `UsageError` naming the flag otherwise."""
    if text is None:
        return None
    url = str(text).strip()
    scheme, sep, rest = url.partition("://")
    base = scheme.split("+")[0].lower()
    if not sep or not base:
        raise UsageError(f"{FLAG} {text!r} is not a storage URL: give sqlite:///PATH (or a "
                         "postgresql:// or mysql:// URL)")
    if base not in SCHEMES:
        raise UsageError(f"{FLAG} {text!r}: unknown scheme {scheme!r}; give sqlite:///PATH "
                         "(or a postgresql:// or mysql:// URL)")
    if base != "sqlite":
        _check_driver(url)
        return url
    path = sqlite_path(url)
    if path is None:
        raise UsageError(f"{FLAG} {text!r} names no database file (an in-memory study cannot "
                         "resume): give sqlite:///PATH")
    _check_database_file(path)
    return url


def _check_database_file(path: Path) -> None:
    if path.is_dir():
        raise UsageError(f"{FLAG}: {path} is a directory; give the database file in it, e.g. "
                         f"sqlite:///{path / 'study.db'}")
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"{FLAG}: the directory {parent} of {path} does not exist")
    if not path.exists():
        return
    if not path.is_file():
        raise UsageError(f"{FLAG}: {path} is not a regular file")
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except OSError as e:
        raise UsageError(f"{FLAG}: cannot read {path} ({e.strerror or e})") from e
    if head and head != SQLITE_HEADER:  # SQLite takes an empty file as an empty database
        raise UsageError(f"{FLAG}: {path} is not an SQLite database; give a new file or a "
                         "study database written by an earlier --search")
    tables = _tables(path) if head else set()
    if tables and not tables >= OPTUNA_TABLES:
        raise UsageError(f"{FLAG}: {path} is an SQLite database of something else (it has no "
                         "Optuna studies), which undo will not add tables to; give a new file")


OPTUNA_TABLES = {"studies", "trials"}


def _tables(path: Path) -> set[str]:
    """The table names of the SQLite database `path`, opened read-only."""
    import sqlite3

    try:
        with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True) as db:
            return {row[0] for row in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error as e:
        raise UsageError(f"{FLAG}: {path} is not a readable SQLite database ({e})") from e


def _check_driver(url: str) -> None:
    """A postgresql/mysql URL must parse, and its database driver must be installed."""
    try:
        from sqlalchemy.engine import make_url
    except ImportError:  # no optuna either: --search says how to install it
        return
    try:
        make_url(url).get_dialect().import_dbapi()
    except Exception as e:  # noqa: BLE001 - SQLAlchemy raises several types
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise UsageError(f"{FLAG}: cannot use {url.split('://', 1)[0]}:// "
                         f"({lines[0] if lines else type(e).__name__})") from e
