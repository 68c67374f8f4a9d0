"""What a converter reads: the annotation files as distributed, and the dataset's video folder as distributed.

:class:`VideoRoot` finds a clip by the name its dataset gives it, wherever it lies under the root (flat, or in
``<split>/<label>/`` folders, ``NExTVideo/<group>/``, ``P01/videos/``, ...), with any video extension in any case
(EPIC-KITCHENS ends in ``.MP4``; ActivityNet copies hold ``.mp4``, ``.mkv`` and ``.webm``). It lists the root once,
the first time a name is looked up. :meth:`VideoRoot.join` is the one place where a path written in an annotation
file becomes a path under the root, and :meth:`VideoRoot.contains` the one judge of whether a path stays inside it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mirasol_ray import storage

VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")


class VideoRoot:
    """The dataset's video folder (local path, ``file://`` or ``s3://``)."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/") or root
        self.fs = storage.fsspec_fs(root)
        self._by_stem: dict[str, list[str]] | None = None

    def join(self, rel: str) -> str:
        """The full path of ``rel``, a path relative to the root as an annotation file writes it.

        The result may lie outside the root (``../x``, an absolute path, a link out): :meth:`contains` judges it
        before anything opens it."""
        return storage.join(self.root, rel)

    def contains(self, uri: str) -> bool:
        """Whether ``uri`` names something inside the root, judged before anything is opened.

        Local paths are compared after resolving every symlink (``os.path.realpath``), so ``../x``, an absolute
        path elsewhere, or a link inside the root that points out of it are all outside. On object storage, where
        nothing resolves ``..``, a key must start with the root's prefix and hold no ``.`` or ``..`` part."""
        if storage.is_remote(self.root):
            if not storage.is_remote(uri) or uri.split("://", 1)[0] != self.root.split("://", 1)[0]:
                return False
            root, path = storage.strip_scheme(self.root).rstrip("/"), storage.strip_scheme(uri)
            return path.startswith(root + "/") and not {".", "..", ""} & set(path[len(root) + 1:].split("/"))
        if storage.is_remote(uri):
            return False
        root = os.path.realpath(storage.strip_scheme(self.root))
        path = os.path.realpath(storage.strip_scheme(uri))
        return path != root and os.path.commonpath([root, path]) == root

    def find(self, *names: str) -> str | None:
        """The full path of the first of ``names`` present under the root, or None.

        A name is a file name without its extension (``video7``, ``v_abc``, ``P01_11``) or the end of a relative
        path without extension (``1025/4771403483``: any folder above it may differ). Several files with one
        name: the shortest path, then the first in sorted order.
        """
        index = self._index()
        for name in names:
            stem = posixpath.basename(name)
            hits = index.get(stem, [])
            if "/" in name:
                hits = [h for h in hits if h.rsplit(".", 1)[0] == name or h.rsplit(".", 1)[0].endswith("/" + name)]
            if hits:
                return self.join(min(hits, key=lambda h: (h.count("/"), h)))
        return None

    def _index(self) -> dict[str, list[str]]:
        if self._by_stem is None:
            base = storage.strip_scheme(self.root).rstrip("/")
            by_stem: dict[str, list[str]] = {}
            for path in self.fs.find(base):
                rel = path.lstrip("/")[len(base.lstrip("/")):].lstrip("/")
                name = posixpath.basename(rel)
                if "." not in name or name.rsplit(".", 1)[1].lower() not in VIDEO_EXTS:
                    continue
                by_stem.setdefault(name.rsplit(".", 1)[0], []).append(rel)
            self._by_stem = by_stem
        return self._by_stem


@dataclass
class Source:
    """Arguments every converter takes.

    ``split`` selects one of the splits a format holds ("" = every split found); ``labels`` keeps only these
    classes (Kinetics-Sounds is a class subset of Kinetics)."""

    annotations: str
    videos: VideoRoot
    split: str = ""
    labels: list[str] | None = None


def read_text(src: Source, path: str) -> str:
    return storage.read_text(path)


def exists(src: Source, path: str) -> bool:
    return storage.exists(path)


def is_dir(src: Source, path: str) -> bool:
    fs = storage.fsspec_fs(path)
    return fs.isdir(storage.strip_scheme(path))


def short(path: str) -> str:
    """How reports name an annotation file: its base name."""
    return posixpath.basename(path.rstrip("/")) or path


def load_json(src: Source, path: str) -> Any:
    """A JSON file; invalid JSON is an error naming the file, line and column."""
    try:
        return json.loads(read_text(src, path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None


def split_files(src: Source, template: str, known: tuple[str, ...]) -> list[tuple[str, str]]:
    """``[(split, path)]`` of the annotation files to convert, for a format that keeps one file per split.

    ``--annotations`` is either one file (its split read from its name by ``template``, e.g. ``{split}_qa.json``;
    ``--split`` must agree) or the folder holding the files as distributed: then ``--split`` picks one, or every
    file of ``known`` splits present is taken.
    """
    pattern = re.compile(re.escape(template).replace(re.escape("{split}"), "(?P<split>[A-Za-z0-9_-]+)") + "$")
    if not is_dir(src, src.annotations):
        m = pattern.search(short(src.annotations))
        name = m.group("split") if m else ""
        if src.split and name and src.split != name:
            raise ValueError(f"--split {src.split} but {src.annotations} is the {name} split")
        return [(src.split or name, src.annotations)]
    if src.split:
        path = storage.join(src.annotations, template.format(split=src.split))
        if not exists(src, path):
            raise FileNotFoundError(f"no {template.format(split=src.split)} in {src.annotations}")
        return [(src.split, path)]
    found = [(s, storage.join(src.annotations, template.format(split=s))) for s in known]
    found = [(s, p) for s, p in found if exists(src, p)]
    if not found:
        raise FileNotFoundError(f"no {template.format(split='{' + ','.join(known) + '}')} in {src.annotations}")
    return found


def beside(path: str, name: str) -> str:
    """The file ``name`` in the folder of ``path``."""
    return storage.join(posixpath.dirname(path.rstrip("/")) or ".", name) if "/" in path else name


def csv_rows(src: Source, path: str, columns: tuple[str, ...], header: bool | None = None
             ) -> Iterator[tuple[int, dict[str, str] | str]]:
    """``(line number, row)`` of a CSV file; ``row`` is a dict of ``columns`` or, for a malformed line, the
    reason as a string (the caller names ``FILE:LINE`` when it skips it).

    ``header``: True: the first line names the columns (extra columns are ignored, missing ones are malformed
    lines); False: no header, ``columns`` by position; None: a header if the first line holds the first column's
    name. Fields may be quoted and hold commas (``"male speech, man speaking"``).
    """
    text = read_text(src, path)
    reader = csv.reader(io.StringIO(text, newline=""))
    names: list[str] | None = None
    for row in reader:
        lineno = reader.line_num
        if not row or all(not f.strip() for f in row):
            continue
        if names is None and header is not False:
            if header or row[0].strip().lstrip("\ufeff") == columns[0]:
                names = [f.strip().lstrip("\ufeff") for f in row]
                missing = [c for c in columns if c not in names]
                if missing:
                    raise ValueError(f"{path}:{lineno}: header lacks column(s) {', '.join(missing)}")
                continue
            names = list(columns)
        if names is None:
            names = list(columns)
        if len(row) != len(names):
            yield lineno, f"expected {len(names)} fields, got {len(row)}"
            continue
        values = dict(zip(names, (f.strip() for f in row)))
        yield lineno, {c: values[c] for c in columns}


def as_int(value: str) -> int:
    """``"12"`` or ``"12.0"`` -> 12; anything else raises ValueError."""
    f = float(value)
    if not f.is_integer():
        raise ValueError(f"not a whole number: {value!r}")
    return int(f)
