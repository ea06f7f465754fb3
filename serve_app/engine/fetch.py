"""Checkpoints from where operators keep them: a URI (file://, s3://, gs://, or any other
fsspec protocol whose package is installed) copied to local disk once per node when a
replica starts, and checked against the SHA256SUMS file beside the weights.

SHA256SUMS is `sha256sum`'s output for the files of the checkpoint, paths relative to
its folder; only the files it lists are copied. Make it where the weights are kept:

    python -m serve_app.engine.fetch /models/Z-Image-Turbo

The copy goes to $T2I_CACHE/fetched/ (see checkpoint.cache_dir). Replicas starting on
one node at once take a file lock: the first copies and checks, the others wait and
use its copy. A copy is written into a temporary folder and renamed into place only
once every file matched, so a half-copied or corrupt checkpoint is never loaded.
"""

import argparse
import fcntl
import hashlib
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from serve_app.errors import CheckpointError

logger = logging.getLogger(__name__)

SUMS = "SHA256SUMS"
VERIFIED = ".verified"  # in a finished copy: every file matched its sum
# Packages that give fsspec a protocol (installed with `pip install .[remote]`).
PROTOCOL_PACKAGES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
CHUNK = 8 * 2**20


def local_copy(uri: str, root: Path) -> Path:
    """The local folder holding the checkpoint at `uri`, copied and checked there first
    unless a finished copy already is (see the module's docstring).

    Raises: CheckpointError when the source or its SHA256SUMS is missing, unreadable or
    a file does not match its sum."""
    name = PurePosixPath(uri.rstrip("/")).name or "checkpoint"
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    dest = root / "fetched" / f"{name}-{digest}"
    if (dest / VERIFIED).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest.parent / f".{dest.name}.lock"):
        if (dest / VERIFIED).is_file():  # another replica copied it while this one waited
            return dest
        fs, path = _filesystem(uri)
        sums = _sums(fs, path, uri)
        partial = dest.parent / f".{dest.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            total = 0
            for relative, expected in sums.items():
                total += _copy_checked(fs, f"{path}/{relative}", partial / relative, expected, uri)
            (partial / SUMS).write_text("".join(f"{d}  {r}\n" for r, d in sums.items()))
            (partial / VERIFIED).touch()
            os.rename(partial, dest)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        logger.info("copied %s (%d files, %d bytes) to %s", uri, len(sums), total, dest)
    return dest


@contextmanager
def _locked(path: Path):
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _filesystem(uri: str):
    import fsspec

    scheme = uri.split("://", 1)[0]
    try:
        return fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        package = PROTOCOL_PACKAGES.get(scheme)
        hint = f": install {package} (`pip install .[remote]`)" if package else ""
        message = f"model={uri!r}: cannot read {scheme}:// URIs{hint} ({exc})"
        raise CheckpointError(message) from None


def _sums(fs, path: str, uri: str) -> dict[str, str]:
    """relative path -> sha256 hex, from the source's SHA256SUMS."""
    if not fs.isdir(path):
        raise CheckpointError(f"model={uri!r}: no such folder")
    try:
        text = fs.cat_file(f"{path}/{SUMS}").decode()
    except FileNotFoundError:
        raise CheckpointError(
            f"model={uri!r}: no {SUMS} in it; make one where the weights are kept with "
            f"`python -m serve_app.engine.fetch FOLDER` (or sha256sum)"
        ) from None
    sums = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        digest, _, relative = line.partition("  ")
        relative = relative.removeprefix("./").removeprefix("*")
        parts = PurePosixPath(relative).parts
        if len(digest) != 64 or not parts or ".." in parts or relative.startswith("/"):
            raise CheckpointError(f"model={uri!r}: {SUMS} line {number} is not 'SHA256  PATH'")
        sums[relative] = digest.lower()
    if not sums:
        raise CheckpointError(f"model={uri!r}: {SUMS} lists no files")
    return sums


def _copy_checked(fs, source: str, target: Path, expected: str, uri: str) -> int:
    target.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    try:
        with fs.open(source, "rb") as src, target.open("wb") as dst:
            while chunk := src.read(CHUNK):
                digest.update(chunk)
                dst.write(chunk)
                size += len(chunk)
    except FileNotFoundError:
        raise CheckpointError(f"model={uri!r}: {SUMS} lists {source}, which is missing") from None
    if digest.hexdigest() != expected:
        raise CheckpointError(
            f"model={uri!r}: {source} is corrupt: its sha256 is {digest.hexdigest()}, "
            f"{SUMS} says {expected}"
        )
    return size


def write_sums(folder: Path) -> Path:
    """Write folder/SHA256SUMS for every file under `folder` (hidden ones left out)."""
    lines = []
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = file.relative_to(folder).as_posix()
        if relative == SUMS or any(part.startswith(".") for part in Path(relative).parts):
            continue
        digest = hashlib.sha256()
        with file.open("rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        lines.append(f"{digest.hexdigest()}  {relative}\n")
    (folder / SUMS).write_text("".join(lines))
    return folder / SUMS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a checkpoint folder's SHA256SUMS.")
    parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    print(write_sums(args.folder))


if __name__ == "__main__":
    main()
