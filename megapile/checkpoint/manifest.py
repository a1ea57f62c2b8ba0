"""A checkpoint's list of files with sizes and CRC32s: how a resume tells a good checkpoint from a damaged one."""
from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor

from megapile.reporting.progress import bar

MANIFEST = "manifest.json"
_CHUNK = 8 << 20


def crc32_of(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def files(directory: str) -> list[str]:
    found = []
    for root, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != MANIFEST:
                found.append(rel)
    return sorted(found)


def _crc_all(paths: list[str]) -> list[int]:
    """CRC32 of many files at once: zlib releases the GIL, so threads use every core."""
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        return list(pool.map(crc32_of, paths))


def write(directory: str, show_progress: bool = False) -> dict:
    """Checksum every file under `directory`, fsync them, and write manifest.json (fsynced too): one process."""
    return write_entries(directory, seal(directory, files(directory), show_progress))


def seal(directory: str, rels: list[str], show_progress: bool = False) -> dict[str, dict]:
    """fsync the files `rels` (relative to `directory`) and return their manifest entries (size, CRC32)."""
    paths = [os.path.join(directory, rel) for rel in rels]
    for path in bar(paths, desc="seal checkpoint", unit="file", enabled=show_progress):
        _fsync(path)
    return {rel: {"size": os.path.getsize(path), "crc32": crc} for rel, path, crc in zip(rels, paths, _crc_all(paths))}


def write_entries(directory: str, entries: dict[str, dict]) -> dict:
    """manifest.json (fsynced) listing `entries`; written last, so its presence means the files are complete."""
    manifest = {"format": 1, "files": dict(sorted(entries.items()))}
    path = os.path.join(directory, MANIFEST)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return manifest


def verify(directory: str, checksums: bool = True) -> list[str]:
    """Problems found, each naming a file; an empty list means the checkpoint is complete and intact."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except FileNotFoundError:
        return [f"{path} is missing (the save did not finish)"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return [f"{path} is unreadable"]
    problems, to_check = [], []
    for rel, entry in files.items():
        file = os.path.join(directory, rel)
        if not os.path.exists(file):
            problems.append(f"{file} is missing")
        elif os.path.getsize(file) != entry["size"]:
            problems.append(f"{file} has {os.path.getsize(file)} bytes, the manifest says {entry['size']}")
        elif checksums:
            to_check.append((file, entry["crc32"]))
    for (file, expected), crc in zip(to_check, _crc_all([f for f, _ in to_check])):
        if crc != expected:
            problems.append(f"{file} fails its checksum (the bytes changed after saving)")
    return problems


def total_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, rel)) for rel in files(directory))


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str) -> None:
    """Make a rename inside `directory` durable."""
    _fsync(directory)
