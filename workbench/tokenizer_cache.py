"""Client-side tokenizers, rebuilt from the files the server sends.

The server ships its tokenizer's files (`get_tokenizer` op), so a client needs neither the
model hub nor the server's disk. Files are cached by content hash under the user cache dir.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

_cache: dict[tuple[str, str], Any] = {}
_lock = threading.Lock()


def tokenizer_from_files(files: dict[str, bytes]) -> Any:
    import platformdirs
    from transformers import AutoTokenizer

    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + bytes(files[name]) + b"\0")
    folder = Path(platformdirs.user_cache_dir("tinker-workbench")) / "tokenizers" / digest.hexdigest()[:32]
    if not (folder / ".complete").exists():
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            if "/" in name or name.startswith("."):
                raise ValueError(f"refusing tokenizer file name {name!r}")
            (folder / name).write_bytes(bytes(data))
        (folder / ".complete").write_text("ok")
    return AutoTokenizer.from_pretrained(str(folder))


def get_tokenizer(connection, base_model: str) -> Any:
    key = (connection.url, base_model)
    with _lock:
        if key not in _cache:
            files = connection.call("get_tokenizer", {"base_model": base_model}).result()["files"]
            _cache[key] = tokenizer_from_files(files)
        return _cache[key]
