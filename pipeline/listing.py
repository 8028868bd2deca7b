"""Listing the videos under a source and attaching labels (from a CSV, from class folders, or none).

A video's id is its key relative to the source root (forward slashes, unicode as is): stable across runs and
readable. Label names map to integer ids through a class map that only ever grows, so ids stay stable across
incremental runs.
"""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from dataclasses import dataclass, replace

from pipeline.schema import ErrorRecord
from pipeline.storage import Location, Storage, parse_uri

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm")


class LabelsError(ValueError):
    """The labels CSV cannot be used as a whole (bad header, unsafe path, conflicting labels)."""


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


def list_videos(
    src: str | Location, storage: Storage, extensions: tuple[str, ...] = VIDEO_EXTENSIONS
) -> list[SourceVideo]:
    """Every file under `src` whose name ends in one of `extensions` (any case), sorted by video id."""
    root = parse_uri(src) if isinstance(src, str) else src
    videos = []
    for info in storage.list_objects(root):
        if not info.location.path.lower().endswith(extensions):
            continue
        video_id = unicodedata.normalize("NFC", info.location.relative_to(root))
        videos.append(SourceVideo(info.location.uri, video_id, info.size, info.etag))
    videos.sort(key=lambda video: video.video_id)
    return videos


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


def parse_labels_csv(text: str, name: str = "labels CSV") -> dict[str, str]:
    """`path,label` rows (header required) -> {relative path: label name}."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or [column.strip().lower() for column in header[:2]] != ["path", "label"]:
        raise LabelsError(f"{name}: the first line must be the header 'path,label', found {header!r}")
    labels: dict[str, str] = {}
    for line_number, row in enumerate(reader, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        where = f"{name} line {line_number}"
        if len(row) < 2 or not row[1].strip():
            raise LabelsError(f"{where}: expected 'path,label', found {row!r}")
        path = normalise_relative_path(row[0], where)
        label = row[1].strip()
        if labels.get(path, label) != label:
            raise LabelsError(f"{where}: {path!r} is labelled both {labels[path]!r} and {label!r}")
        labels[path] = label
    return labels


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
    videos: list[SourceVideo],
    src: Location,
    labels_csv: dict[str, str] | None = None,
    labels_from_dirs: bool = False,
) -> tuple[list[SourceVideo], list[ErrorRecord]]:
    """Give each video its label name. Videos that cannot be labelled, and CSV rows naming no listed video, come
    back as error records (stage "labels") so that every input is accounted for."""
    if labels_csv is not None and labels_from_dirs:
        raise ValueError("choose one of a labels CSV and labels from folders, not both")
    errors: list[ErrorRecord] = []
    if labels_csv is None and not labels_from_dirs:
        return list(videos), errors
    labelled = []
    for video in videos:
        if labels_from_dirs:
            folder = video.video_id.rsplit("/", 1)[0] if "/" in video.video_id else ""
            label = folder.rsplit("/", 1)[-1] or None
            reason = ("NoClassFolder", "video is not inside a class folder (expected <class>/<name>)")
        else:
            label = labels_csv.get(video.video_id)
            reason = ("NotInLabels", "video is not named in the labels CSV")
        if label is None:
            errors.append(ErrorRecord(video.uri, video.etag, "labels", reason[0], reason[1]))
        else:
            labelled.append(replace(video, label_name=label))
    if labels_csv is not None:
        listed = {video.video_id for video in videos}
        for path in sorted(set(labels_csv) - listed):
            errors.append(
                ErrorRecord(
                    src.join(path).uri,
                    "",
                    "labels",
                    "MissingVideo",
                    f"the labels CSV names {path!r}, but no such video is listed under {src.uri}",
                )
            )
    return labelled, errors


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
