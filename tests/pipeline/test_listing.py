import os

import pytest

from pipeline.listing import (
    LabelsError,
    SourceVideo,
    attach_labels,
    extend_class_map,
    fixed_class_map,
    list_videos,
    parse_class_names,
    parse_labels_csv,
)
from pipeline.storage import Storage, parse_uri


def test_list_videos_keeps_spaces_and_unicode_and_skips_other_files(tmp_path):
    (tmp_path / "jump rope").mkdir()
    (tmp_path / "jump rope" / "clip 1.mp4").write_bytes(b"x")
    (tmp_path / "café").mkdir()
    (tmp_path / "café" / "vidéo_ü.MP4").write_bytes(b"yy")
    (tmp_path / "notes.txt").write_text("not a video")
    videos = list_videos(str(tmp_path), Storage())
    assert [video.video_id for video in videos] == ["café/vidéo_ü.MP4", "jump rope/clip 1.mp4"]
    assert videos[1].uri == os.path.join(str(tmp_path), "jump rope", "clip 1.mp4")
    assert videos[0].size == 2


def test_local_fingerprint_changes_when_a_file_is_rewritten(tmp_path):
    path = tmp_path / "a.mp4"
    path.write_bytes(b"one")
    before = list_videos(str(tmp_path), Storage())[0].etag
    path.write_bytes(b"two")
    os.utime(path, ns=(1, 10**18))
    after = list_videos(str(tmp_path), Storage())[0].etag
    assert before != after and after.startswith("3-")


def test_labels_csv_is_parsed_and_normalised():
    labels = parse_labels_csv("path,label\n./a/x.mp4,left\nb.mp4, right \n\n")
    assert labels == {"a/x.mp4": "left", "b.mp4": "right"}


@pytest.mark.parametrize(
    "path",
    ["../outside.mp4", "a/../../b.mp4", "/etc/passwd", "C:\\videos\\a.mp4", "s3://other-bucket/a.mp4", "\\\\host\\a"],
)
def test_labels_csv_with_escaping_or_absolute_paths_is_refused(path):
    with pytest.raises(LabelsError, match="line 2") as caught:
        parse_labels_csv(f"path,label\n{path},left\n")
    assert "refused" in str(caught.value) or "'..'" in str(caught.value)


def test_labels_csv_needs_its_header():
    with pytest.raises(LabelsError, match="header"):
        parse_labels_csv("a.mp4,left\n")


def test_labels_csv_with_conflicting_labels_is_refused():
    with pytest.raises(LabelsError, match="both"):
        parse_labels_csv("path,label\na.mp4,left\n./a.mp4,right\n")


def _video(video_id: str) -> SourceVideo:
    return SourceVideo(f"/src/{video_id}", video_id, 10, "10-1")


def test_labels_from_csv_account_for_unlabelled_videos_and_missing_files():
    videos = [_video("a.mp4"), _video("b.mp4"), _video("c.mp4")]
    labelled, errors = attach_labels(
        videos, parse_uri("/src"), labels_csv={"a.mp4": "left", "b.mp4": "up", "gone.mp4": "down"}
    )
    assert [(v.video_id, v.label_name) for v in labelled] == [("a.mp4", "left"), ("b.mp4", "up")]
    by_type = {error.error_type: error for error in errors}
    assert by_type["NotInLabels"].source_uri == "/src/c.mp4"
    assert by_type["MissingVideo"].source_uri == "/src/gone.mp4" and "gone.mp4" in by_type["MissingVideo"].message
    assert all(error.stage == "labels" for error in errors)


def test_labels_from_class_folders():
    videos = [_video("left/a.mp4"), _video("k400/up/b.mp4"), _video("loose.mp4")]
    labelled, errors = attach_labels(videos, parse_uri("/src"), labels_from_dirs=True)
    assert [(v.video_id, v.label_name) for v in labelled] == [("left/a.mp4", "left"), ("k400/up/b.mp4", "up")]
    assert [(e.source_uri, e.error_type) for e in errors] == [("/src/loose.mp4", "NoClassFolder")]


def test_no_labels_keeps_every_video_unlabelled():
    labelled, errors = attach_labels([_video("a.mp4")], parse_uri("/src"))
    assert labelled[0].label_name is None and errors == []


def test_class_map_only_grows_and_keeps_ids():
    first = extend_class_map({}, ["up", "left", "left"])
    assert first == {"left": 0, "up": 1}
    second = extend_class_map(first, ["up", "down", "right"])
    assert second == {"left": 0, "up": 1, "down": 2, "right": 3}


def test_a_class_list_fixes_ids_in_its_order_and_must_agree_with_the_dataset():
    names = parse_class_names("abseiling\nair drumming\n\nanswering questions\n")
    assert names == ["abseiling", "air drumming", "answering questions"]
    assert fixed_class_map(names, {}) == {"abseiling": 0, "air drumming": 1, "answering questions": 2}
    assert fixed_class_map(names, {"air drumming": 1}) == fixed_class_map(names, {})
    with pytest.raises(LabelsError, match="'air drumming' is 0 \\(list: 1\\)"):
        fixed_class_map(names, {"air drumming": 0})
    with pytest.raises(LabelsError, match="'zumba' is 3 \\(list: None\\)"):
        fixed_class_map(names, {"zumba": 3})
    with pytest.raises(LabelsError, match="line 3: 'a' is listed twice \\(first on line 1\\)"):
        parse_class_names("a\nb\na\n")
    with pytest.raises(LabelsError, match="names no class"):
        parse_class_names("\n \n")
