"""Versions of a dataset: one JSON manifest per version under `manifests/`, numbered from 1 and never overwritten,
what every manifest (of a clip or a predictions dataset) holds, and the names of a version's per-run tables."""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import fields

from pipeline.storage import Location, Storage

MANIFESTS_DIR = "manifests"
_MANIFEST_NAME = re.compile(r"^v(\d{6,})\.json$")
_DATASET_REF = re.compile(r"^(?P<dst>.+)@v?(?P<version>\d+|latest)$")


class ManifestError(RuntimeError):
    """No manifest, an unreadable one, or a dataset that does not match its manifest."""


# What every manifest, of a clip or a predictions dataset, holds for readers and gc, with the type of each value
_MANIFEST_KEYS = {"version": int, "shards": list, "source_tables": list, "num_sources": int}
_PART_KEYS = {"path": str, "rows": int, "sha256": str, "bytes": int}
_TABLE_KEYS = {"path": str, "rows": int}


def check_inside_root(path: str, what: str) -> None:
    """Refuse a path a manifest names (a shard, a source or errors table) unless it stays inside the dataset root:
    relative, `/`-separated, without `..`, and not a URI. A manifest that could point anywhere would let whoever
    writes one make readers load, and gc delete, objects of other datasets or buckets."""
    if not isinstance(path, str) or "://" in path or "\\" in path or {"", ".", ".."} & set(path.split("/")):
        raise ManifestError(
            f"the manifest names {what} {path!r}, which is not a relative path inside the dataset root (no leading "
            "'/', '..', '.', empty parts, backslashes or URIs): refused; the manifest was not written by uniformer "
            "or was edited"
        )


def manifest_json(text: bytes | str, where: str) -> dict:
    """The JSON object in a manifest file; ManifestError naming `where` when it is not JSON or not an object."""
    try:
        body = json.loads(text)
    except ValueError as error:  # a UnicodeDecodeError too
        raise ManifestError(f"{where} is not valid JSON ({error}): the manifest is damaged") from None
    if not isinstance(body, dict):
        raise ManifestError(f"{where} holds a JSON {type(body).__name__}, not a manifest's object")
    return body


def manifest_body(text: bytes | str | dict, where: str, kind: type | None = None, what: str = "") -> dict:
    """A manifest's object (`manifest_json`) with what readers and gc rely on checked: its version, parts, chain of
    source tables and errors table, each of the right type and inside the root, and with `kind` (the manifest's
    dataclass, `what` naming it in messages) no key that class lacks. A manifest that lacks or mistypes one of them is
    a ManifestError naming `where`, never a KeyError or TypeError later."""
    body = text if isinstance(text, dict) else manifest_json(text, where)
    if kind is not None:
        unknown = set(body) - {item.name for item in fields(kind)}
        if unknown:
            raise ManifestError(f"{where} has keys a {what} does not: {', '.join(sorted(unknown))}")
    _check_keys(body, _MANIFEST_KEYS, where, "")
    for index, part in enumerate(body["shards"]):
        _check_keys(part, _PART_KEYS, where, f"shards[{index}].")
        check_inside_root(part["path"], "shard")
    for index, table in enumerate(body["source_tables"]):
        _check_keys(table, _TABLE_KEYS, where, f"source_tables[{index}].")
        check_inside_root(table["path"], "source table")
    if body.get("errors") is not None:
        check_inside_root(body["errors"], "errors table")
    return body


def _check_keys(body, kinds: dict[str, type], where: str, prefix: str) -> None:
    if not isinstance(body, dict):
        raise ManifestError(f"{where}: {prefix.rstrip('.')} is a {type(body).__name__}, not an object")
    for key, kind in kinds.items():
        if key not in body:
            raise ManifestError(f"{where} lacks {prefix}{key}: the manifest is incomplete or was not written by uniformer")
        if not isinstance(body[key], kind) or isinstance(body[key], bool):
            raise ManifestError(f"{where}: {prefix}{key} is {body[key]!r}, not {kind.__name__}")


def manifest_references(body: dict) -> set[str]:
    """Every path (relative to the root) a manifest names: parts, source tables, the errors table."""
    paths = {shard["path"] for shard in body.get("shards", [])}
    paths |= {table["path"] for table in body.get("source_tables", [])}
    if body.get("errors"):
        paths.add(body["errors"])
    return paths


# ---- versions ------------------------------------------------------------------------------------------------------
def parse_dataset_ref(ref: str) -> tuple[str, int | None]:
    """`DST@3`, `DST@v3` or `DST@latest` -> (DST, 3 / None); a plain `DST` -> (DST, None)."""
    match = _DATASET_REF.match(ref)
    if not match:
        return ref, None
    version = match.group("version")
    return match.group("dst"), None if version == "latest" else int(version)


def manifest_location(root: Location, version: int) -> Location:
    return root.join(MANIFESTS_DIR, f"v{version:06d}.json")


def list_manifest_versions(root: Location, storage: Storage) -> list[int]:
    versions = []
    for info in storage.list_objects(root.join(MANIFESTS_DIR)):
        match = _MANIFEST_NAME.match(basename(info.location))
        if match:
            versions.append(int(match.group(1)))
    return sorted(versions)


def publish_manifest(
    root: Location, version: int, text: str, storage: Storage, error: type[Exception], job: str
) -> Location:
    """Publish manifest `version` (of a clip or a predictions dataset) under `root`; refuses to replace an existing
    one, raising `error`: two `job` runs raced for the same number."""
    location = manifest_location(root, version)
    try:
        storage.put_bytes(location, text.encode("utf-8"), if_absent=True)
    except FileExistsError:
        raise error(
            f"manifest version {version} already exists at {location.uri}: another {job} into the same "
            "destination finished first; re-run to build on it"
        ) from None
    return location


def new_run_token() -> str:
    return uuid.uuid4().hex[:12]


def run_table_path(folder: str, version: int, token: str) -> str:
    """Where a run that writes `version` puts one of its tables: a name no other run uses, so that of two runs
    racing for one version number the loser's table never replaces the winner's (the manifest names the table)."""
    return f"{folder}/v{version:06d}-{token}.parquet"


def basename(location: Location) -> str:
    """The object's name, the last part of its path."""
    return os.path.basename(location.path.replace("\\", "/"))
