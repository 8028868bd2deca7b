"""Listing the videos under a source and attaching labels (from a CSV, from class folders, or none).

A video's id is its key relative to the source root (forward slashes, unicode as is): stable across runs and
readable. Label names map to integer ids through a class map that only ever grows, so ids stay stable across
incremental runs.

Untrimmed videos (ActivityNet, HACS) are labelled by segments: a CSV `path,start,end,label` makes each row an input
of its own, named with a media-fragment suffix (`videos/a.mp4#t=12.5,20`, W3C Media Fragments' temporal form) in its
id and URI, so that incremental runs, failures and deletions work per segment exactly as they do per video.
"""

from __future__ import annotations

import csv
import io
import math
import re
import unicodedata
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.schema import ErrorRecord
from pipeline.storage import Location, Storage, parse_uri

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm")


class LabelsError(ValueError):
    """The labels CSV cannot be used as a whole (bad header, unsafe path, conflicting labels)."""


class ListingError(ValueError):
    """A listed object cannot be named in the dataset (a local file named in another encoding than UTF-8)."""


@dataclass(frozen=True)
class SourceVideo:
    uri: str
    video_id: str  # key relative to the source root
    size: int
    etag: str  # fingerprint, see pipeline.storage
    label_name: str | None = None

    @property
    def fingerprint(self) -> tuple[str, str, int]:
        return (self.video_id, self.etag, self.size)


# SourceVideo's fields in its order; large strings: a column's text may pass 2 GB (tens of millions of keys)
LISTING_SCHEMA = pa.schema(
    [("uri", pa.large_string()), ("video_id", pa.large_string()), ("size", pa.int64()), ("etag", pa.large_string()),
     ("label_name", pa.large_string())]
)
_ROWS_PER_CHUNK = 1000  # rows turned into Python objects at a time


def _position(index: int, length: int, what: str, things: str) -> int:
    """A sequence index (negative ones count from the end) as a position; IndexError outside the sequence."""
    position = index + length if index < 0 else index
    if not 0 <= position < length:
        raise IndexError(f"{what} {index} out of range for {length} {things}")
    return position


class VideoListing(Sequence):
    """Listed videos as Arrow columns (LISTING_SCHEMA), a sequence of SourceVideo made on the fly when indexed or
    iterated. A million videos held as SourceVideo objects cost the driver about 3 times the memory of these columns
    (benchmarks/scale.py: README, "A million videos"). A selection (`take`) keeps the positions of its rows in the
    same columns, not a copy of them."""

    def __init__(self, table: pa.Table, rows: pa.Array | None = None):
        self._table, self._rows = table, rows
        self._chunk: tuple[int, list[tuple]] = (-1, [])  # the rows last indexed, as Python: indexing goes in order

    @classmethod
    def of(cls, videos: Iterable[SourceVideo]) -> VideoListing:
        if isinstance(videos, VideoListing):
            return videos
        return cls(pa.Table.from_pylist([video.__dict__ for video in videos], schema=LISTING_SCHEMA))

    @property
    def table(self) -> pa.Table:
        return self._table if self._rows is None else self._table.take(self._rows)

    def __len__(self) -> int:
        return self._table.num_rows if self._rows is None else len(self._rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.take(range(*index.indices(len(self))))
        chunk, offset = divmod(_position(index, len(self), "listing index", "videos"), _ROWS_PER_CHUNK)
        if self._chunk[0] != chunk:
            self._chunk = (chunk, self._python_rows(chunk * _ROWS_PER_CHUNK))
        return SourceVideo(*self._chunk[1][offset])

    def __iter__(self) -> Iterator[SourceVideo]:
        for start in range(0, len(self), _ROWS_PER_CHUNK):
            for row in self._python_rows(start):
                yield SourceVideo(*row)

    def _python_rows(self, start: int) -> list[tuple]:
        if self._rows is None:
            rows = self._table.slice(start, _ROWS_PER_CHUNK)
        else:
            rows = self._table.take(self._rows.slice(start, _ROWS_PER_CHUNK))
        return list(zip(*(column.to_pylist() for column in rows.columns)))

    def take(self, positions: Iterable[int]) -> VideoListing:
        positions = pa.array(positions, pa.int64())
        return VideoListing(self._table, positions if self._rows is None else self._rows.take(positions))

    def column(self, name: str) -> pa.ChunkedArray:
        column = self._table.column(name)
        return column if self._rows is None else column.take(self._rows)


class ItemsOnDemand(Sequence):
    """`length` items, item i made by `item(i)` when asked for: what Ray Data's `from_items` reads one block at a time,
    so that a plan reaches the object store without all its items in the driver at once."""

    def __init__(self, length: int, item: Callable[[int], dict]):
        self._length, self._item = length, item

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[position] for position in range(*index.indices(len(self)))]
        return self._item(_position(index, len(self), "item", "items"))


class PlannedGroups(Sequence):
    """A plan's groups (one shard each): consecutive runs of `size` videos of a listing, `names[i]` the shard of group
    i. A group's dict ({"shard": name, "videos": records}) is made when asked for, its records by `record(video)`, so
    that a plan of a million pending videos holds their columns, not a million records."""

    def __init__(self, videos: VideoListing, size: int, names: list[str], record: Callable[[SourceVideo], dict]):
        self.videos, self.size, self.names, self._record = videos, size, names, record

    @classmethod
    def cut(cls, videos: VideoListing, size: int, record: Callable[[SourceVideo], dict],
            name: Callable[[list[dict]], str]) -> PlannedGroups:
        """Groups of `size` videos, each named by `name(its records)`."""
        groups = cls(videos, size, [], record)
        groups.names = [name(groups._records(index)) for index in range(-(-len(videos) // size))]
        return groups

    def _records(self, index: int) -> list[dict]:
        return [self._record(video) for video in self.videos[index * self.size : (index + 1) * self.size]]

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[position] for position in range(*index.indices(len(self)))]
        position = _position(index, len(self), "group", "groups")
        return {"shard": self.names[position], "videos": self._records(position)}


def list_videos(
    src: str | Location, storage: Storage, extensions: tuple[str, ...] = VIDEO_EXTENSIONS
) -> VideoListing:
    """Every file under `src` whose name ends in one of `extensions` (any case), sorted by video id (stable: of two
    keys with the same NFC form, the first listed comes first)."""
    root = parse_uri(src) if isinstance(src, str) else src
    uris, video_ids, etags, sizes = _TextColumn(), _TextColumn(), _TextColumn(), array("q")
    for info in storage.list_objects(root):
        if not info.location.path.lower().endswith(extensions):
            continue
        try:
            uris.append(info.location.uri)
        except UnicodeEncodeError:  # a local file named in another encoding: ids, shards and manifests are UTF-8
            raise ListingError(f"{info.location.uri!r} is not named in UTF-8; rename it to list {root.uri}") from None
        video_ids.append(unicodedata.normalize("NFC", info.location.relative_to(root)))
        etags.append(info.etag)
        sizes.append(info.size)
    count = len(sizes)
    columns = [uris.finish(), video_ids.finish(), pa.Array.from_buffers(pa.int64(), count, [None, pa.py_buffer(sizes)]),
               etags.finish(), pa.nulls(count, pa.large_string())]
    table = pa.Table.from_arrays(columns, schema=LISTING_SCHEMA)
    ids = table.column("video_id")
    if len(ids) < 2 or pc.all(pc.less_equal(ids[:-1], ids[1:])).as_py():
        return VideoListing(table)  # S3 lists in key order: ids in order unless a key's NFC form moves it
    return VideoListing(table, pc.sort_indices(table, [("video_id", "ascending")]))


class _TextColumn:
    """Strings appended to one buffer, then one Arrow column: a million keys cost their bytes, not a million Python
    strings, and need no second copy to join pages (Arrow's take on a column of many chunks joins them first)."""

    def __init__(self):
        self._text, self._offsets = bytearray(), array("q", [0])

    def append(self, text: str) -> None:
        self._text += text.encode("utf-8")
        self._offsets.append(len(self._text))

    def finish(self) -> pa.Array:
        return pa.LargeStringArray.from_buffers(
            len(self._offsets) - 1, pa.py_buffer(self._offsets), pa.py_buffer(self._text)
        )


_ABSOLUTE = re.compile(r"^(/|\\|[A-Za-z]:[\\/]|[A-Za-z][A-Za-z0-9+.-]*://)")


def normalise_relative_path(raw: str, where: str) -> str:
    """A CSV path as a clean relative key; absolute paths, URIs and `..` segments are refused."""
    path = unicodedata.normalize("NFC", raw.strip())
    if not path:
        raise LabelsError(f"{where}: empty path")
    if _ABSOLUTE.match(path):
        raise LabelsError(f"{where}: absolute path or URI {raw!r} refused; paths must be relative to the source")
    parts = [part for part in path.replace("\\", "/").split("/") if part not in ("", ".")]
    if ".." in parts:
        raise LabelsError(f"{where}: path {raw!r} contains '..'; paths must stay inside the source")
    return "/".join(parts)


_SEGMENT = re.compile(r"#t=(\d+(?:\.\d+)?),(\d+(?:\.\d+)?)$")


def segment_key(path: str, start: float, end: float) -> str:
    """A segment's id or URI: `path` with its bounds as a media fragment, in seconds to the millisecond."""

    def seconds(value: float) -> str:
        return f"{value:.3f}".rstrip("0").rstrip(".")

    return f"{path}#t={seconds(start)},{seconds(end)}"


def split_segment(key: str) -> tuple[str, tuple[float, float] | None]:
    """A video id or URI -> (the video's, the segment's bounds in seconds or None for a whole video)."""
    match = _SEGMENT.search(key)
    if match is None:
        return key, None
    return key[: match.start()], (float(match.group(1)), float(match.group(2)))


def _segment_bounds(row: list[str], where: str) -> tuple[float, float]:
    try:
        start, end = float(row[1]), float(row[2])
    except ValueError:
        raise LabelsError(f"{where}: start and end must be seconds, found {row[1]!r} and {row[2]!r}") from None
    if not (math.isfinite(start) and math.isfinite(end) and 0 <= start < end):
        raise LabelsError(f"{where}: a segment needs 0 <= start < end (seconds), found {row[1]!r} and {row[2]!r}")
    return start, end


def _csv_rows(text: str, name: str) -> Iterator[list[str]]:
    reader = csv.reader(io.StringIO(text))
    try:
        yield from reader
    except csv.Error as error:  # e.g. a bare carriage return inside a field
        raise LabelsError(f"{name} line {reader.line_num}: not readable as CSV ({error})") from None


_LABELS_HEADERS = {("path", "label"): "path,label", ("path", "start", "end", "label"): "path,start,end,label"}


def parse_labels_csv(text: str, name: str = "labels CSV") -> dict[str, str]:
    """`path,label` rows -> {relative path: label name}, or `path,start,end,label` rows (labelled segments of
    untrimmed videos, seconds) -> {segment_key(path, start, end): label name}. The header says which."""
    reader = _csv_rows(text, name)
    header = next(reader, None)
    columns = tuple(column.strip().lower() for column in header or ())
    layout = next((layout for layout in _LABELS_HEADERS if columns[: len(layout)] == layout), None)
    if layout is None:
        raise LabelsError(
            f"{name}: the first line must be the header 'path,label' or 'path,start,end,label', found {header!r}"
        )
    labels: dict[str, str] = {}
    for line_number, row in enumerate(reader, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        where = f"{name} line {line_number}"
        if len(row) < len(layout) or not row[len(layout) - 1].strip():
            raise LabelsError(f"{where}: expected '{_LABELS_HEADERS[layout]}', found {row!r}")
        key = path = normalise_relative_path(row[0], where)
        if len(layout) == 2 and split_segment(path)[1] is not None:
            raise LabelsError(f"{where}: {path!r} names a segment; segments need the header 'path,start,end,label'")
        if len(layout) == 4:
            key = segment_key(path, *_segment_bounds(row, where))
        label = row[len(layout) - 1].strip()
        if labels.get(key, label) != label:
            raise LabelsError(f"{where}: {key!r} is labelled both {labels[key]!r} and {label!r}")
        labels[key] = label
    return labels


def labels_by_segment(labels: dict[str, str]) -> bool:
    """Whether a parsed labels CSV labels segments (its keys carry their bounds) rather than whole videos."""
    return any(split_segment(key)[1] is not None for key in labels)


def read_labels_csv(uri: str, storage: Storage) -> dict[str, str]:
    location = parse_uri(uri)
    if not storage.exists(location):
        raise LabelsError(f"labels CSV {uri} does not exist")
    data = storage.read_bytes(location)
    return parse_labels_csv(data.decode("utf-8-sig"), name=f"labels CSV {uri}")


def parse_class_names(text: str, name: str = "class list") -> list[str]:
    """One class name per line (MMAction2's label_map_k400.txt layout); line order is class id order."""
    names: list[str] = []
    seen: dict[str, int] = {}
    for line_number, raw in enumerate(text.splitlines(), start=1):
        class_name = unicodedata.normalize("NFC", raw.strip())
        if not class_name:
            continue
        if class_name in seen:
            first = seen[class_name]
            raise LabelsError(f"{name} line {line_number}: {class_name!r} is listed twice (first on line {first})")
        seen[class_name] = line_number
        names.append(class_name)
    if not names:
        raise LabelsError(f"{name} names no class")
    return names


def read_class_names(uri: str, storage: Storage) -> list[str]:
    location = parse_uri(uri)
    if not storage.exists(location):
        raise LabelsError(f"class list {uri} does not exist")
    return parse_class_names(storage.read_bytes(location).decode("utf-8-sig"), name=f"class list {uri}")


def attach_labels(
    videos: Sequence[SourceVideo],
    src: Location,
    labels_csv: dict[str, str] | None = None,
    labels_from_dirs: bool = False,
) -> tuple[VideoListing, list[ErrorRecord]]:
    """Give each video its label name; with a segments CSV, each video becomes one input per labelled segment (id and
    URI with the segment's media fragment), sorted by id. Videos that cannot be labelled, and CSV rows naming no
    listed video, come back as error records (stage "labels") so that every input is accounted for."""
    if labels_csv is not None and labels_from_dirs:
        raise ValueError("choose one of a labels CSV and labels from folders, not both")
    errors: list[ErrorRecord] = []
    listing = VideoListing.of(videos)
    if labels_csv is None and not labels_from_dirs:
        return listing, errors
    segments: dict[str, list[str]] = {}  # video id -> its segments' keys, for a segments CSV
    if labels_csv is not None and labels_by_segment(labels_csv):
        for key in labels_csv:
            segments.setdefault(split_segment(key)[0], []).append(key)
    positions, label_chunks, labels, keys = [], [], [], []  # labels in listing order, None where there is none
    for position, video in enumerate(listing):
        if labels_from_dirs:
            folder = video.video_id.rsplit("/", 1)[0] if "/" in video.video_id else ""
            label = folder.rsplit("/", 1)[-1] or None
            reason = ("NoClassFolder", "video is not inside a class folder (expected <class>/<name>)")
        else:
            label = labels_csv.get(video.video_id)
            reason = ("NotInLabels", "video is not named in the labels CSV")
        video_segments = segments.get(video.video_id, [])
        if label is None and not video_segments:
            errors.append(ErrorRecord(video.uri, video.etag, "labels", reason[0], reason[1]))
        positions.extend([position] * (len(video_segments) or int(label is not None)))
        keys.extend(video_segments)
        labels.append(label)
        if len(labels) == _ROWS_PER_CHUNK:
            label_chunks.append(pa.array(labels, pa.large_string()))
            labels = []
    label_chunks.append(pa.array(labels, pa.large_string()))
    if labels_csv is not None:
        listed = set(listing.column("video_id").to_pylist())
        for key in sorted(labels_csv):
            path = split_segment(key)[0]
            if path in listed:
                continue
            errors.append(
                ErrorRecord(
                    src.join(path).uri + key[len(path) :],
                    "",
                    "labels",
                    "MissingVideo",
                    f"the labels CSV names {key!r}, but no such video is listed under {src.uri}",
                )
            )
    if segments:
        return _segment_listing(listing, positions, keys, labels_csv), errors
    labelled_table = listing.table.set_column(4, "label_name", pa.concat_arrays(label_chunks))
    return VideoListing(labelled_table, pa.array(positions, pa.int64())), errors


def _segment_listing(listing: VideoListing, positions: list[int], keys: list[str], labels: dict[str, str]):
    """One row per segment: its video's row with the segment's id, URI (the video's plus the same fragment) and
    label, sorted by id like any listing."""
    table = listing.table.take(pa.array(positions, pa.int64()))
    fragments = [key[len(split_segment(key)[0]) :] for key in keys]
    uris = [uri + fragment for uri, fragment in zip(table.column("uri").to_pylist(), fragments)]
    for name, values in [("uri", uris), ("video_id", keys), ("label_name", [labels[key] for key in keys])]:
        table = table.set_column(LISTING_SCHEMA.get_field_index(name), name, pa.array(values, pa.large_string()))
    return VideoListing(table, pc.sort_indices(table, [("video_id", "ascending")]))


def segment_inputs(listed: VideoListing, segments: VideoListing) -> VideoListing:
    """What a run with a segments CSV accounts for, sorted by id: each labelled segment, and each listed video that
    has none (an unlabelled input). A video's segments replace it: a segment left out of the CSV leaves the dataset
    like a deleted video."""
    cut = {split_segment(video_id)[0] for video_id in segments.column("video_id").to_pylist()}
    whole = pc.invert(pc.is_in(listed.column("video_id"), value_set=pa.array(sorted(cut), pa.large_string())))
    table = pa.concat_tables([listed.table.filter(whole), segments.table])
    return VideoListing(table, pc.sort_indices(table, [("video_id", "ascending")]))


def fixed_class_map(class_names: list[str], existing: dict[str, int]) -> dict[str, int]:
    """Class ids in the order of a class list (e.g. Kinetics-400's 400 names, so ids match a checkpoint's head however
    few classes the videos show); a dataset's existing ids must agree with it."""
    class_map = {class_name: class_id for class_id, class_name in enumerate(class_names)}
    disagreeing = sorted(name for name, class_id in existing.items() if class_map.get(name) != class_id)
    if disagreeing:
        shown = ", ".join(f"{name!r} is {existing[name]} (list: {class_map.get(name)})" for name in disagreeing[:5])
        raise LabelsError(f"the class list disagrees with the dataset's class ids: {shown}")
    return class_map


def extend_class_map(class_map: dict[str, int], names) -> dict[str, int]:
    """Existing ids never change; new names get the next ids, in sorted order."""
    extended = dict(class_map)
    next_id = max(class_map.values(), default=-1) + 1
    for name in sorted(set(names) - set(class_map)):
        extended[name] = next_id
        next_id += 1
    return extended
