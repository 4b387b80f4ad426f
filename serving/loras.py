"""The LoRA registry: names a client may ask for, each a safetensors file under one directory or fsspec URL:
`NAME.safetensors`, or `NAME/pytorch_lora_weights.safetensors` (what `cogrt train` exports). A client never passes
a path; a name that could leave the registry (a slash, `..`) is refused before any file is looked at."""
from __future__ import annotations

import re
from pathlib import Path

import fsspec

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
FILE = "pytorch_lora_weights.safetensors"


def valid_name(name: str) -> bool:
    return bool(NAME.fullmatch(name)) and ".." not in name


class LoraRegistry:
    def __init__(self, url: str | None, cache_dir: str | Path | None = None):
        self.url = url.rstrip("/") if url else None
        self.cache = Path(cache_dir or Path.home() / ".cache" / "cogrt" / "loras")
        self.fs, self.root = fsspec.core.url_to_fs(self.url) if self.url else (None, None)

    def names(self) -> list[str]:
        if self.fs is None or not self.fs.exists(self.root):
            return []
        out = []
        for info in self.fs.ls(self.root, detail=True):
            name = Path(info["name"]).name
            if info["type"] == "file" and name.endswith(".safetensors"):
                out.append(name[: -len(".safetensors")])
            elif info["type"] == "directory" and self.fs.exists(f"{info['name']}/{FILE}"):
                out.append(name)
        return sorted(n for n in out if valid_name(n))

    def path(self, name: str) -> str:
        """A local path to the LoRA `name` (fetched into the cache first from a remote registry)."""
        if not valid_name(name):
            raise KeyError(name)
        for rel in (f"{name}.safetensors", f"{name}/{FILE}"):
            src = f"{self.root}/{rel}"
            if self.fs is not None and self.fs.exists(src):
                if "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)):
                    return src
                dst = self.cache / rel
                if not dst.is_file() or dst.stat().st_size != self.fs.size(src):
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    self.fs.get_file(src, str(dst))
                return str(dst)
        raise KeyError(name)
