"""Fetch the query-reformulation data files and verify them against pinned sha256 hashes.

    python datasets/fetch.py                      # download from GitHub (alexdong/query-reformulation @ afb246c)
    python datasets/fetch.py --from ../shared/datasets   # copy from a local folder instead

Each file is written to a temp file beside its destination and renamed into place only when
its hash matches; on a mismatch the temp file is deleted and the script exits 1.
"""

import argparse
import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

COMMIT = "afb246c"
BASE_URL = f"https://raw.githubusercontent.com/alexdong/query-reformulation/{COMMIT}/data"
SHA256 = {
    "full.jsonl": "5c7d8400ca3f749de9be71d24cfb4081ff2bad7f403280fbc3d6d18a5e6d1e29",
    "dev.jsonl": "b95e790e4f3739960dff368c2178e8479e1a69fd5e6d0312cec91b715651347f",
}
CHUNK = 1 << 16


class FetchError(Exception):
    pass


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _open_source(name: str, source_dir: Path | None):
    """(readable binary stream, size or None, description)."""
    if source_dir is not None:
        path = source_dir / name
        try:
            return open(path, "rb"), path.stat().st_size, str(path)
        except OSError as e:
            raise FetchError(f"{name}: cannot read {path} ({e.strerror})") from None
    url = f"{BASE_URL}/{name}"
    try:
        response = urllib.request.urlopen(url, timeout=60)
    except (urllib.error.URLError, OSError) as e:
        raise FetchError(f"{name}: download from {url} failed ({getattr(e, 'reason', e)})") from None
    length = response.headers.get("Content-Length")
    return response, int(length) if length and length.isdigit() else None, url


def fetch_one(name: str, out_dir: Path, source_dir: Path | None, progress=None) -> str:
    """Copy or download ``name`` into ``out_dir`` if its hash matches; return what was done."""
    expected = SHA256[name]
    final = out_dir / name
    if final.is_file() and sha256_of(final) == expected:
        return f"{name}: already present, sha256 ok"
    stream, size, origin = _open_source(name, source_dir)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir)
    tmp = Path(tmp)
    try:
        digest = hashlib.sha256()
        task = progress.add_task(name, total=size) if progress is not None else None
        with stream, os.fdopen(fd, "wb") as out:
            while True:
                try:
                    chunk = stream.read(CHUNK)
                except OSError as e:
                    raise FetchError(f"{name}: reading {origin} failed ({e})") from None
                if not chunk:
                    break
                digest.update(chunk)
                out.write(chunk)
                if task is not None:
                    progress.advance(task, len(chunk))
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != expected:
            raise FetchError(f"{name}: sha256 mismatch for {origin}: expected {expected}, got {actual}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return f"{name}: {'copied' if source_dir else 'downloaded'} from {origin}, sha256 ok"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", type=Path, default=None,
                        help="copy full.jsonl and dev.jsonl from this folder instead of downloading")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                        help="destination folder (default: datasets/ beside this script)")
    args = parser.parse_args(argv)

    if args.source is not None and not args.source.is_dir():
        print(f"error: --from {args.source}: not a folder", file=sys.stderr)
        return 1
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: --out {args.out}: {e.strerror}", file=sys.stderr)
        return 1
    progress = None
    if sys.stderr.isatty():  # a bar only for a person watching; logs get the result lines alone
        try:
            from rich.console import Console
            from rich.progress import DownloadColumn, Progress

            progress = Progress(*Progress.get_default_columns(), DownloadColumn(), transient=True,
                                console=Console(stderr=True))
        except ImportError:  # the script also works with the standard library alone
            pass
    status = 0
    for name in SHA256:
        try:
            if progress is not None:
                with progress:
                    message = fetch_one(name, args.out, args.source, progress)
                    for task in progress.task_ids:
                        progress.remove_task(task)
            else:
                message = fetch_one(name, args.out, args.source)
            print(message)
        except FetchError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
