"""Where outputs live: a local directory by default, or any fsspec URL (s3://, gs://, memory:// in tests).

Files are put whole: the engine writes the mp4 to a local temporary file and renames it into place (a local
directory), or uploads the finished file (object stores, where an object appears only once complete). So a
crash never leaves a partial mp4 under a job's name."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import fsspec


class Storage:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = "file" in self.fs.protocol if isinstance(self.fs.protocol, tuple) else self.fs.protocol == "file"
        if self.local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def scratch(self) -> Path:
        """A local directory for files being written: inside a local store, so that moving one in is a rename."""
        d = Path(self.root) / ".partial" if self.local else Path(tempfile.gettempdir()) / "cogrt-partial"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def put_file(self, local: str | os.PathLike, key: str) -> str:
        """Move a finished local file under `key` (atomically on a local directory). -> key."""
        dst = self.path(key)
        if self.local:
            Path(dst).parent.mkdir(parents=True, exist_ok=True)
            os.replace(local, dst) if _same_fs(local, dst) else shutil.move(str(local), dst)
        else:
            self.fs.put_file(str(local), dst)
            Path(local).unlink(missing_ok=True)
        return key

    def put_bytes(self, data: bytes, key: str) -> str:
        dst = self.path(key)
        if self.local:
            Path(dst).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(dst).with_name(f".{Path(dst).name}.part")
            tmp.write_bytes(data)
            os.replace(tmp, dst)
        else:
            self.fs.pipe_file(dst, data)
        return key

    def size(self, key: str) -> int:
        return int(self.fs.size(self.path(key)))

    def exists(self, key: str) -> bool:
        return bool(key) and self.fs.exists(self.path(key))

    def read(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        """Bytes [start, end) of the file."""
        with self.fs.open(self.path(key), "rb") as f:
            f.seek(start)
            return f.read(-1 if end is None else end - start)

    def fetch(self, key: str, local_dir: str | os.PathLike) -> Path:
        """A local copy of `key` (the file itself on a local directory)."""
        if self.local:
            return Path(self.path(key))
        dst = Path(local_dir) / Path(key).name
        self.fs.get_file(self.path(key), str(dst))
        return dst

    def remove(self, *keys: str | None) -> None:
        for key in keys:
            if key and self.fs.exists(self.path(key)):
                self.fs.rm_file(self.path(key))


def _same_fs(a, b) -> bool:
    try:
        return os.stat(a).st_dev == os.stat(Path(b).parent).st_dev
    except OSError:
        return False
