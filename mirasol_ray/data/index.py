"""Which samples a dataset holds, where each one lies, and the order training reads them in. Pure: no Ray.

**Shards are what the manifest says.** A folder with a ``manifest.json`` is read through it: its shard list is
the dataset (a tar the manifest does not list, e.g. a stale shard from an earlier build, is never read), and its
sample counts and byte offsets give epoch sizes and progress without scanning. A folder whose manifest lists
several splits (the root of a ``shards build`` with ``train/`` and ``val/``) is refused with a message naming
the split folders: a split is always read alone, so training never sees a sibling split. A folder without a
manifest means the tars directly in it (never those of its subfolders). Globs, brace lists and single tars are
taken as given.

**Sample index.** Every sample is a byte range of its tar (a run of adjacent members sharing a key, the
WebDataset convention): :class:`SampleIndex` holds (shard, start, end) per sample, from the manifest's
``offsets`` (written by :class:`~mirasol_ray.data.shards.ShardWriter`) or, for shards built elsewhere, from a
scan of their tar headers. A reader fetches one sample with one ranged read (one GET on object storage), so the
decode stage can take samples in any order and in blocks of any size.

**Order and exact resume.** Ray Data has no mid-epoch resume (ray#37633); this module gives one in the way
MosaicML Streaming does, by making the order a pure function of the data and the seed and the loader's state a
count. Training reads an endless *stream* of positions ``g = 0, 1, 2, ...``; position ``g`` is sample
``epoch_permutation(N, seed, e)[g % N]`` of epoch ``e = g // N`` (N samples). The frame positions the decoder
samples in a clip come from :func:`sample_rng` ``(seed, epoch, key)``. Workers take the stream by index: of the
positions not consumed yet, in order, worker ``r`` of ``W`` takes the ``r``-th, ``r + W``-th, ... .
:class:`ReadPosition` is what has been consumed: every position below ``prefix`` and the few in ``extra`` above
it (workers run a little ahead of one another when some of their samples fail to decode, since a failed sample
uses a position and gives no row). A checkpoint stores it; a resumed run, with any number of workers, deals out
exactly the positions not consumed yet, in the same order: none twice, none lost, and with the same number of
workers exactly the batches the uninterrupted run would have had. Epochs follow one another without a gap: a
batch may hold the last samples of one epoch and the first of the next, and nothing is dropped at an epoch's end.
"""

from __future__ import annotations

import io
import json
import math
import posixpath
import tarfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
from braceexpand import braceexpand

from mirasol_ray import storage
from mirasol_ray.data.decode import cut_message

MANIFEST = "manifest.json"


# --------------------------------------------------------------------------------------------------------------
# Finding shards


@dataclass
class ShardList:
    """The tars of a dataset, as the manifest (or the URL) gives them."""

    url: str
    paths: list[str]
    """Shard paths without a scheme (``bucket/key`` on S3), as pyarrow and fsspec take them."""
    sizes: list[int | None]
    """Samples per shard when the manifest says, else None."""
    offsets: list[list[int] | None]
    """Per shard, the byte offset where each sample starts plus the end of the last one, when the manifest says."""
    manifest: dict[str, Any] | None = None

    @property
    def num_samples(self) -> int | None:
        return None if any(s is None for s in self.sizes) else sum(self.sizes)  # type: ignore[arg-type]


def _expand_braces(pattern: str) -> list[str]:
    return list(braceexpand(pattern))


def _read_json(uri: str) -> dict[str, Any] | None:
    try:
        if not storage.exists(uri):
            return None
        value = json.loads(storage.read_text(uri))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _folder_of(url: str) -> str:
    base = url
    for ch in "*?[{":
        if ch in base:
            base = base[: base.index(ch)]
    base = base.rstrip("/")
    return posixpath.dirname(base) if base.endswith(".tar") else base


def find_manifest(url: str) -> dict[str, Any] | None:
    """The manifest describing the shards at ``url``: the folder's own ``manifest.json``, or for a split folder
    without one, its parent's narrowed to that split (its shards, sample count and summary)."""
    folder = _folder_of(url)
    if not folder:
        return None
    own = _read_json(storage.join(folder, MANIFEST))
    if own is not None:
        return own
    parent = posixpath.dirname(folder.rstrip("/"))
    name = posixpath.basename(folder.rstrip("/"))
    if not parent or parent == folder:
        return None
    up = _read_json(storage.join(parent, MANIFEST))
    if up is None:
        return None
    split = next((k for k, v in (up.get("splits") or {}).items() if isinstance(v, dict) and v.get("path") == name),
                 None)
    if split is None:
        return None
    shards = [dict(s, name=s["name"][len(name) + 1:]) for s in up.get("shards", [])
              if str(s.get("name", "")).startswith(name + "/")]
    return dict(up, shards=shards, num_samples=sum(s["samples"] for s in shards), split=split,
                splits={split: up["splits"][split]})


def manifest_tokenizer(url: str) -> str | None:
    """The tokenizer file the manifest of the shards at ``url`` names (``shards synth``, ``shards build --tokenizer
    learn``), as a URI; None when it names none or the file is not there. The manifest names it relative to its own
    folder: the split folder's, or the root's above it."""
    manifest = find_manifest(url) or {}
    name = manifest.get("tokenizer")
    folder = _folder_of(url)
    if not name or not folder:
        return None
    scheme = folder.split("://", 1)[0] + "://" if "://" in folder else ""
    base = folder[len(scheme):].rstrip("/")
    for where in (base, posixpath.dirname(base)):
        uri = scheme + posixpath.normpath(posixpath.join(where, str(name)))
        try:
            if storage.exists(uri):
                return uri
        except OSError:
            return None
    return None


def _split_folders(manifest: dict[str, Any]) -> list[str]:
    """The split folders a root manifest lists (empty for a one-split manifest)."""
    if manifest.get("split"):
        return []
    return sorted({str(s["name"]).split("/", 1)[0] for s in manifest.get("shards", []) if "/" in str(s["name"])})


def resolve_shards(url: str) -> ShardList:
    """A folder, a glob, a brace list (``shard-{000..009}.tar``) or a single tar, local or ``s3://``, to its
    shards (see the module docstring for the rules). Raises FileNotFoundError naming the URL when nothing is
    there, or the first shard a manifest lists that is missing; ValueError for a folder of several splits."""
    storage.check_bucket(url)  # a missing bucket is named as such, not as "no shards"
    fs = storage.fsspec_fs(url)
    s3 = storage.is_s3(url)
    if not any(c in url for c in "*?[{") and not url.rstrip("/").endswith(".tar"):
        return _resolve_folder(url, fs)
    found: list[str] = []
    for pattern in _expand_braces(url):
        path = storage.strip_scheme(pattern)
        if any(c in path for c in "*?["):
            found += [p for p in fs.glob(path) if p.endswith(".tar")]
        elif path.endswith(".tar"):
            if not fs.exists(path):
                raise FileNotFoundError(f"shard not found: {pattern}")
            found.append(path)
        else:
            found += _resolve_folder(pattern, fs).paths
    if not found:
        raise FileNotFoundError(f"no .tar shards found at {url}")
    paths = sorted(dict.fromkeys(p.lstrip("/") if s3 else p for p in found))
    # sizes and offsets from the folder's manifest when it lists these very files
    manifest = find_manifest(url)
    listed: dict[str, dict[str, Any]] = {}
    if manifest is not None:
        folder = storage.strip_scheme(_folder_of(url))
        folder = folder.lstrip("/") if s3 else folder
        listed = {posixpath.join(folder, s["name"]): s for s in manifest.get("shards", [])}
    return ShardList(url, paths, [listed.get(p, {}).get("samples") for p in paths],
                     [listed.get(p, {}).get("offsets") for p in paths], manifest)


def _resolve_folder(url: str, fs) -> ShardList:
    s3 = storage.is_s3(url)
    folder = storage.strip_scheme(url)
    if not fs.isdir(folder):
        raise FileNotFoundError(f"no shards at {url}")
    manifest = find_manifest(url)
    present = {p.lstrip("/") if s3 else p for p in fs.ls(folder, detail=False)}
    base = folder.lstrip("/") if s3 else folder
    if manifest is not None and "shards" in manifest:
        splits = _split_folders(manifest)
        if len(splits) > 1:
            raise ValueError(f"{url} holds the splits {', '.join(s + '/' for s in splits)}: give one of them, "
                             f"e.g. {storage.join(url, splits[0])}")
        shards = manifest["shards"]
        paths = [posixpath.join(base, s["name"]) for s in shards]
        in_sub = {posixpath.dirname(p) for p in paths} - {base}
        for sub in in_sub:  # a one-split manifest whose shards sit in a subfolder
            present |= {p.lstrip("/") if s3 else p for p in fs.ls(sub, detail=False)}
        for p, s in zip(paths, shards):
            if p not in present:
                raise FileNotFoundError(f"{url}: the manifest lists {s['name']}, which is not there")
        if not paths:
            raise FileNotFoundError(f"the manifest at {url} lists no shards")
        return ShardList(url, paths, [s.get("samples") for s in shards], [s.get("offsets") for s in shards],
                         manifest)
    tars = sorted(p for p in present if p.endswith(".tar"))
    if not tars:
        subs = sorted({posixpath.basename(posixpath.dirname(p)) for p in fs.glob(posixpath.join(folder, "*", "*.tar"))})
        if subs:
            raise FileNotFoundError(f"no .tar directly in {url}; its subfolders {', '.join(s + '/' for s in subs)} "
                                    "hold shards: give one of them")
        raise FileNotFoundError(f"no .tar shards found at {url}")
    return ShardList(url, tars, [None] * len(tars), [None] * len(tars), None)


# --------------------------------------------------------------------------------------------------------------
# Samples inside tars


def split_name(name: str) -> tuple[str, str]:
    """``dir/clip.000.mp4`` -> (``dir/clip``, ``000.mp4``): the key ends at the first dot of the file name
    (WebDataset's convention, as Ray's ``read_webdataset``)."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext if dot else "")


SHARD_REASONS = {
    "not_a_tar": "the shard file is not a tar archive (or is empty)",
    "truncated_shard": "the tar ends inside a member or header: the samples before the cut are kept",
    "unreadable_shard": "the shard cannot be opened or read (permissions, vanished file, storage error)",
    "bad_shard": "the tar breaks its layout mid-file (e.g. a bad header): the samples before it are kept",
}
"""Reasons a whole shard (counted once, by file name) is not read whole; sample-level ones are
``rows.SKIP_REASONS``."""


def scan_tar_until_failure(fileobj) -> tuple[list[int], BaseException | None, int]:
    """Sample boundaries of a tar read from ``fileobj`` (as :func:`scan_tar`), up to the first failure: the
    boundaries of every sample read before it, the failure (None: the tar reads to its end), and how many member
    headers were read (0 with a failure: the file is not a tar).

    A member counts as read once tarfile has moved past it (on its way to the next header it checks that the
    member's data is all there). When the data of a member is cut, the sample in progress is left out (a member
    of it is cut); when a header is cut short or is garbage, tarfile itself stops there as if at the archive's
    end, so the bytes after the last member are checked (end-of-archive blocks are zeros): the samples before it
    are kept, and the failure is reported. A tar cut at a sample boundary ends cleanly."""
    offsets: list[int] = []
    end = 0  # end of the last member read
    last_key = None
    members = 0
    failure: BaseException | None = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            for m in tar:
                members += 1
                if not m.isfile():
                    continue
                key, _ = split_name(m.name)
                if key != last_key:
                    offsets.append(m.offset)
                    last_key = key
                end = m.offset_data + ((m.size + 511) // 512) * 512
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        failure = e
        if offsets:
            end = offsets.pop()  # the sample in progress: one of its members is cut
    else:
        fileobj.seek(end)
        tail = fileobj.read(1024)
        if tail.strip(b"\0"):
            failure = tarfile.ReadError(f"a header cut short (truncated) at byte {end}" if len(tail) < 512
                                        else f"invalid header at byte {end}")
    return (offsets + [end]) if offsets else [0], failure, members


def scan_tar(fileobj) -> list[int]:
    """Sample boundaries of a tar read from ``fileobj``: ``[o_0, ..., o_n]``, sample i spanning bytes
    ``[o_i, o_{i+1})`` (its members' headers and data). Reads headers only (it seeks past member data).
    Raises what tarfile raises on a tar that is not whole (:func:`scan_tar_until_failure` keeps what precedes)."""
    offsets, failure, _ = scan_tar_until_failure(fileobj)
    if failure is not None:
        raise failure
    return offsets


def shard_failure(error: BaseException, members: int) -> str:
    """The :data:`SHARD_REASONS` key of a failure to read a shard after ``members`` member headers."""
    message = str(error)
    if isinstance(error, tarfile.ReadError) and not members:
        return "not_a_tar"
    if isinstance(error, tarfile.ReadError) and ("unexpected end" in message or "truncated" in message):
        return "truncated_shard"
    if isinstance(error, OSError) and not isinstance(error, tarfile.TarError):
        return "unreadable_shard"
    return "bad_shard"


def parse_sample(chunk: bytes) -> dict[str, Any]:
    """One sample's bytes (as :func:`scan_tar` delimits them) -> ``{"__key__": key, ext: bytes, ...}``;
    extensions lower-cased."""
    sample: dict[str, Any] = {}
    with tarfile.open(fileobj=io.BytesIO(chunk), mode="r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, ext = split_name(m.name)
            sample.setdefault("__key__", key)
            f = tar.extractfile(m)
            sample[ext.lower()] = f.read() if f is not None else b""
    return sample


@dataclass
class SampleIndex:
    """Every sample of a dataset as a byte range of a shard, in the dataset's canonical order (shards in
    order, samples in tar order)."""

    url: str
    shards: list[str]
    """Shard paths (no scheme), as :class:`ShardList` gives them."""
    shard: np.ndarray
    """int32 [N]: the shard of sample i."""
    start: np.ndarray
    """int64 [N]: byte offset of sample i's first header in its shard."""
    end: np.ndarray
    """int64 [N]: end of sample i's last member (padded to 512)."""
    bad_shards: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Shards not indexed whole: path -> (reason from :data:`SHARD_REASONS`, one-line message). A shard that
    cannot be read at all is left out; one that breaks mid-file keeps the complete samples before the break."""

    def __len__(self) -> int:
        return len(self.shard)

    def refs(self, samples: np.ndarray) -> dict[str, np.ndarray]:
        """Columns (shard, start, end) of the given sample indices: what a reader needs."""
        samples = np.asarray(samples, dtype=np.int64)
        return {"sample": samples, "shard": self.shard[samples], "start": self.start[samples],
                "end": self.end[samples]}

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "shards": self.shards, "shard": self.shard, "start": self.start, "end": self.end,
                "bad_shards": self.bad_shards}

    @classmethod
    def concat(cls, indexes: list[SampleIndex]) -> SampleIndex:
        """The sets of a mixture as one index: their samples one set after the other (set k's from the sum of the
        sizes before it on), their shards likewise. Read through the first set's URL: the sets share a filesystem
        (all local, or all on one object store)."""
        shift = np.cumsum([0] + [len(i.shards) for i in indexes[:-1]])
        return cls(indexes[0].url, [p for i in indexes for p in i.shards],
                   _cat([i.shard + np.int32(d) for i, d in zip(indexes, shift)], np.int32),
                   _cat([i.start for i in indexes], np.int64), _cat([i.end for i in indexes], np.int64),
                   {k: v for i in indexes for k, v in i.bad_shards.items()})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SampleIndex:
        return cls(d["url"], list(d["shards"]), np.asarray(d["shard"], np.int32), np.asarray(d["start"], np.int64),
                   np.asarray(d["end"], np.int64),
                   {k: tuple(v) for k, v in (d.get("bad_shards") or {}).items()})


def scan_shard(url: str, path: str) -> tuple[list[int], BaseException | None, int]:
    """:func:`scan_tar_until_failure` of one shard (``path`` as in :class:`ShardList`). On object storage each
    header is one small ranged read (no block read-ahead: the member data between headers is never fetched)."""
    fs = storage.fsspec_fs(url)
    kwargs = {"block_size": 4096, "cache_type": "none"} if storage.is_s3(url) else {}
    with fs.open(path, "rb", **kwargs) as f:
        return scan_tar_until_failure(f)


def build_index(shards: ShardList,
                map_fn: Callable[[Callable[[str], Any], list[str]], Iterable[Any]] = map) -> SampleIndex:
    """The sample index of ``shards``: offsets from the manifest where it has them, otherwise each shard's
    headers are scanned (``map_fn`` maps the scan over those shards: the built-in ``map``, or a parallel one).
    A shard that cannot be read whole is named in ``bad_shards``, with the complete samples before its break
    (none for a file that is not a tar or cannot be opened) kept."""
    todo = [p for p, o in zip(shards.paths, shards.offsets) if o is None]
    scanned: dict[str, Any] = {}
    if todo:
        scanned = dict(zip(todo, map_fn(_ScanOne(shards.url), todo)))
    shard_ids, starts, ends, bad = [], [], [], {}
    for i, (path, offsets) in enumerate(zip(shards.paths, shards.offsets)):
        if offsets is None:
            offsets, reason, message = scanned[path]
            if reason is not None:
                bad[path] = (reason, message)
        o = np.asarray(offsets, np.int64)
        n = len(o) - 1
        shard_ids.append(np.full(n, i, np.int32))
        starts.append(o[:-1])
        ends.append(o[1:])
    return SampleIndex(shards.url, shards.paths, _cat(shard_ids, np.int32), _cat(starts, np.int64),
                       _cat(ends, np.int64), bad)


def _cat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


class _ScanOne:
    """Picklable scan of one shard: (offsets of its complete samples, None or the :data:`SHARD_REASONS` key of
    why it is not read whole, a one-line message). It may run in a Ray task: it carries the storage settings of the
    process that made it."""

    def __init__(self, url: str):
        self.url, self.storage = url, storage.settings()

    def __call__(self, path: str) -> tuple[list[int], str | None, str]:
        storage.configure(**self.storage)
        try:
            offsets, failure, members = scan_shard(self.url, path)
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:  # could not even open it
            offsets, failure, members = [0], e, 0
        if failure is None:
            return offsets, None, ""

        return offsets, shard_failure(failure, members), cut_message(str(failure) or type(failure).__name__)


def read_samples(url: str, shards: list[str], refs: dict[str, np.ndarray]) -> list[dict[str, Any] | Exception]:
    """The samples at ``refs`` (columns shard, start, end), one ranged read each, fetched together; a sample
    that cannot be read or parsed comes back as its exception."""
    fs = storage.fsspec_fs(url)
    paths = [shards[int(s)] for s in refs["shard"]]
    starts, ends = [int(x) for x in refs["start"]], [int(x) for x in refs["end"]]
    try:
        chunks = fs.cat_ranges(paths, starts, ends, on_error="return")
    except Exception as e:  # the whole call failed (e.g. no connection): every sample fails the same way
        return [e] * len(paths)
    out: list[dict[str, Any] | Exception] = []
    for chunk in chunks:
        if isinstance(chunk, Exception):
            out.append(chunk)
            continue
        try:
            out.append(parse_sample(chunk))
        except (tarfile.TarError, EOFError, ValueError) as e:
            out.append(e)
    return out


# --------------------------------------------------------------------------------------------------------------
# Order


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True, part: int = 0) -> np.ndarray:
    """int64 [n]: the samples of epoch ``epoch`` in reading order (the identity without ``shuffle``). ``part``: the
    set of a mixture (:class:`MixtureOrder`); set 0's permutations are a single set's."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.random.default_rng([seed, epoch, 0x6D697261] + ([part] if part else [])).permutation(n).astype(np.int64)


class StreamOrder:
    """The training stream of one dataset of ``n`` samples: position g is sample ``epoch_permutation(n, seed,
    g // n)[g % n]``, of epoch ``g // n`` (module docstring)."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle

    def __len__(self) -> int:
        """Positions per pass of the stream (``ReadPosition.epoch``, ``worker_positions``): one epoch."""
        return self.n

    def samples(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sample index, the sample's epoch) of each stream position."""
        g = np.asarray(positions, np.int64)
        epochs = g // max(self.n, 1)
        samples = np.empty_like(g)
        for e in np.unique(epochs).tolist():
            m = epochs == e
            samples[m] = epoch_permutation(self.n, self.seed, e, self.shuffle)[g[m] - e * self.n]
        return samples, epochs


MIX_ROUND = 1000
"""The longest round of a mixture's stream (:func:`round_counts`)."""


def round_counts(weights: list[float]) -> np.ndarray:
    """int64 [K]: positions of each set in one round of a mixture's stream. The weights' exact ratio in smallest
    integers when those sum to at most :data:`MIX_ROUND` (3:1 -> 3, 1; 0.7:0.3 -> 7, 3), else a largest-remainder
    apportionment of :data:`MIX_ROUND` positions (every share within 1/:data:`MIX_ROUND` of its weight's), each
    set at least one."""
    w = [float(x) for x in weights]
    if not w or any(not (x > 0 and math.isfinite(x)) for x in w):
        raise ValueError(f"mixture weights must be positive numbers, got {weights}")
    fr = [Fraction(x).limit_denominator(MIX_ROUND) for x in w]
    den = math.lcm(*(f.denominator for f in fr))
    ints = [int(f * den) for f in fr]
    if all(ints):
        g = math.gcd(*ints)
        ints = [i // g for i in ints]
        if sum(ints) <= MIX_ROUND and all(abs(i / sum(ints) - x / sum(w)) < 1e-6 for i, x in zip(ints, w)):
            return np.asarray(ints, np.int64)
    share = np.asarray(w) / sum(w) * MIX_ROUND
    out = np.maximum(np.floor(share).astype(np.int64), 1)
    for k in np.argsort(-(share - np.floor(share)), kind="stable"):  # the largest remainders first
        if out.sum() >= MIX_ROUND:
            break
        out[k] += 1
    while out.sum() > MIX_ROUND:  # sets raised to 1 took positions from the largest
        out[int(np.argmax(out))] -= 1
    return out


class MixtureOrder:
    """The training stream of a weighted mixture of K sets (``data.train`` as a list), a pure function of the
    sizes, weights and seed, like a single set's (:class:`StreamOrder`): every position of the stream is read
    and resumed exactly as with one set (:class:`ReadPosition` is unchanged); only which sample a position holds
    differs.

    The stream goes in rounds of R positions (:func:`round_counts`: set k holds ``counts[k]`` of each round, so any
    window of the stream holds the sets in the weights' proportions to within a round), in an order drawn per round
    from (seed, round). The j-th position of set k in the stream is that set's own position j: sample
    ``epoch_permutation(N_k, seed, j // N_k, part=k)[j % N_k]`` of its epoch ``j // N_k``. So each set goes
    through its epochs at its own pace, starting the next when it runs out, whatever the others do. Samples are
    numbered across the sets in order (set k's are ``offsets[k]`` on: :meth:`SampleIndex.concat`). A mixture of one
    set is that set's :class:`StreamOrder`.

    A pass of the stream (``len``) is the rounds that hold the sets' total size: the unit of ``ReadPosition.epoch``
    and of a worker's reads, not any set's epoch (:meth:`epochs_seen` counts those)."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int, shuffle: bool = True):
        if len(sizes) != len(weights) or not sizes or min(sizes) <= 0:
            raise ValueError(f"a mixture needs one positive size per weight, got sizes {sizes}, weights {weights}")
        self.sizes = np.asarray(sizes, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.counts = round_counts(weights)
        self.round = int(self.counts.sum())
        self.seed, self.shuffle = seed, shuffle
        self.period = self.round * -(-int(self.sizes.sum()) // self.round)
        self._rounds: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return self.period

    def _round(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """(the set of each position of round r, its index among that set's positions in the round)."""
        got = self._rounds.get(r)
        if got is None:
            sets = np.repeat(np.arange(len(self.counts), dtype=np.int64), self.counts)
            if self.shuffle:
                sets = np.random.default_rng([self.seed, r, 0x6D6978]).permutation(sets)
            rank = np.empty_like(sets)
            for k in range(len(self.counts)):
                at = np.flatnonzero(sets == k)
                rank[at] = np.arange(len(at))
            if len(self._rounds) > 4096:
                self._rounds.clear()
            got = self._rounds[r] = (sets, rank)
        return got

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(set, the set's own position) of each stream position."""
        g = np.asarray(positions, np.int64)
        r, o = np.divmod(g, self.round)
        sets, local = np.empty_like(g), np.empty_like(g)
        for rr in np.unique(r).tolist():
            m = r == rr
            pat, rank = self._round(rr)
            sets[m] = pat[o[m]]
            local[m] = rr * self.counts[sets[m]] + rank[o[m]]
        return sets, local

    def samples(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sample index across the sets, the sample's epoch of its own set) of each stream position."""
        k, j = self.locate(positions)
        epochs = j // self.sizes[k]
        samples = np.empty_like(j)
        for kk, e in {(int(a), int(b)) for a, b in zip(k.tolist(), epochs.tolist())}:
            m = (k == kk) & (epochs == e)
            perm = self._perms.get((kk, e))
            if perm is None:
                if len(self._perms) > 64:
                    self._perms.clear()
                perm = self._perms[(kk, e)] = epoch_permutation(int(self.sizes[kk]), self.seed, e, self.shuffle,
                                                                part=kk)
            samples[m] = self.offsets[kk] + perm[j[m] - e * self.sizes[kk]]
        return samples, epochs

    def counts_below(self, g: int) -> np.ndarray:
        """int64 [K]: positions of each set among stream positions 0 .. g-1."""
        r, o = divmod(int(g), self.round)
        return r * self.counts + np.bincount(self._round(r)[0][:o], minlength=len(self.counts))

    def epochs_seen(self, position: ReadPosition) -> np.ndarray:
        """float [K]: epochs of each set that ``position`` has consumed (2.5: two whole epochs and half the
        third)."""
        c = position.consumed()
        seen = self.counts_below(c.prefix)
        if c.extra:
            seen = seen + np.bincount(self.locate(np.asarray(c.extra, np.int64))[0], minlength=len(self.counts))
        return seen / self.sizes


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The generator behind a sample's random choices (frame positions, span start) in a given epoch: the same
    (seed, epoch, key) always decode to the same tensors, whichever worker or run decodes them."""
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode("utf-8"))])


@dataclass(frozen=True)
class ReadPosition:
    """What training has consumed of the stream of positions (module docstring).

    A *dealing* hands the positions not consumed at its start (all below ``prefix`` and those in ``extra`` are)
    to ``world`` workers by index: worker r takes the r-th, (r + world)-th, ... of them. ``last[r]`` is the last
    position worker r has consumed under it (-1: none). Resuming with the same number of workers continues the
    dealing, so each worker goes on exactly where it stopped; with another number, :meth:`for_world` starts a
    new dealing of what is left."""

    prefix: int = 0
    extra: tuple[int, ...] = ()
    world: int = 0
    """Workers of the current dealing (0: none started)."""
    last: tuple[int, ...] = ()

    def _rank_of(self, g: int) -> int:
        """Index of position g (not consumed at the dealing's start) among those positions."""
        return g - self.prefix - int(np.searchsorted(np.asarray(self.extra, np.int64), g))

    def _at(self, j: int) -> int:
        """The j-th position not consumed at the dealing's start."""
        g = self.prefix + j
        for e in self.extra:
            if e <= g:
                g += 1
            else:
                break
        return g

    def for_world(self, world: int) -> ReadPosition:
        """This position, dealt to ``world`` workers: the same dealing when ``world`` is its own, else a new one
        of every position not consumed yet."""
        if world <= 0:
            raise ValueError(f"world must be positive, got {world}")
        if world == self.world:
            return self
        base = self.consumed()
        return ReadPosition(base.prefix, base.extra, world, (-1,) * world)

    def consumed(self) -> ReadPosition:
        """The consumed set alone, compacted (no dealing): all below ``prefix`` and ``extra``."""
        if not self.world or all(g < 0 for g in self.last):
            return ReadPosition(self.prefix, self.extra)
        W = self.world
        idx = [self._rank_of(g) if g >= 0 else r - W for r, g in enumerate(self.last)]
        m = min(i + W for i in idx)  # the first index not consumed
        new_prefix = self._at(m)
        extra = {e for e in self.extra if e > new_prefix}
        for r, i in enumerate(idx):
            j = m + ((r - m) % W)  # worker r's first index at or after m
            while j <= i:
                extra.add(self._at(j))
                j += W
        return ReadPosition(new_prefix, tuple(sorted(extra)))

    def epoch(self, n: int) -> int:
        """The epoch of the earliest position not consumed."""
        return self.consumed().prefix // max(n, 1)

    def worker_positions(self, epoch: int, n: int, rank: int) -> np.ndarray:
        """int64: the positions of epoch ``epoch`` (of ``n`` samples) that worker ``rank`` reads, in order."""
        if not self.world:
            raise ValueError("no dealing yet: call for_world(number of workers) first")
        a, b = max(self.prefix, epoch * n, self.last[rank] + 1), (epoch + 1) * n
        if a >= b:
            return np.zeros(0, np.int64)
        g = np.arange(a, b, dtype=np.int64)
        if self.extra:
            g = g[~np.isin(g, np.asarray(self.extra, np.int64))]
        if not len(g):
            return g
        first = self._rank_of(int(g[0]))  # index of g[0] in the dealing
        return g[(rank - first) % self.world::self.world]

    def advance(self, last: list[int]) -> ReadPosition:
        """The position once each worker r has consumed its positions up to ``last[r]`` (-1: none yet)."""
        if len(last) != self.world:
            raise ValueError(f"need one last position per worker ({self.world}), got {len(last)}")
        return ReadPosition(self.prefix, self.extra, self.world,
                            tuple(max(int(a), int(b)) for a, b in zip(self.last, last)))

    def to_dict(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "extra": list(self.extra), "world": self.world, "last": list(self.last)}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ReadPosition:
        if not d:
            return cls()
        return cls(int(d["prefix"]), tuple(sorted(int(x) for x in d.get("extra", []))), int(d.get("world", 0)),
                   tuple(int(x) for x in d.get("last", [])))
