"""JSON/JSONL reading that names `file:line`, and writes that appear whole or not at all."""

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from stages.lib.errors import StageError

# mkstemp/mkdtemp create private files; outputs should get the modes any other file would.
_UMASK = os.umask(0)
os.umask(_UMASK)


def require_path(path: str | Path, what: str = "input") -> Path:
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path}: {what} not found")
    return path


def iter_jsonl(path: str | Path, required: Sequence[str] = ()) -> Iterator[tuple[int, dict]]:
    """Yield `(line_number, record)`; blank lines are skipped, anything else must be an object."""
    path = require_path(path)
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise StageError(f"{path}:{number}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise StageError(f"{path}:{number}: malformed JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(record, dict):
                raise StageError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            for key in required:
                if key not in record:
                    raise StageError(f"{path}:{number}: record missing required field '{key}'")
            yield number, record


def read_json(path: str | Path) -> Any:
    path = require_path(path)
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise StageError(f"{path}:{err.lineno}: malformed JSON: {err.msg} (column {err.colno})") from None


def _temp_prefix(path: Path) -> str:
    """`.name.<pid>-`: the writer's pid in its temporary names tells a later write whether they were abandoned."""
    return f".{path.name}.{os.getpid()}-"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed writer whose parent has not reaped it yet still answers signal 0
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _remove_abandoned(path: str | Path) -> None:
    """Remove the temporary siblings of `path` that a killed writer left (SIGKILL runs no cleanup): those whose
    writer, the pid in their name, no longer runs. Those of a running writer stay."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)-\w+\.tmp")
    with contextlib.suppress(FileNotFoundError):
        for sibling in path.parent.iterdir():
            match = pattern.fullmatch(sibling.name)
            if match is None or _running(int(match.group(1))):
                continue
            if sibling.is_dir() and not sibling.is_symlink():
                shutil.rmtree(sibling, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    sibling.unlink()


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", encoding: str | None = "utf-8"):
    """Open a temporary sibling of `path` for writing; rename it over `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield an empty temporary sibling directory; it replaces `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_UMASK)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f"{_temp_prefix(path)}old.tmp")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_file(path) as handle:
        handle.write(dump_json(obj))


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_metrics(path: str | Path, metrics: dict) -> None:
    """A stage's metrics file, with the process's peak resident memory added to `metrics` (`peak_rss_mb`)."""
    metrics["peak_rss_mb"] = round(peak_rss_mb(), 1)
    write_json(path, metrics)


def write_jsonl(path: str | Path, records: Iterable[dict]) -> int:
    """Write one compact JSON object a line; returns the count. Key order is kept as given."""
    count = 0
    with atomic_file(path) as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def file_md5(path: str | Path) -> str:
    """The md5 DVC records for a file in dvc.lock."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
