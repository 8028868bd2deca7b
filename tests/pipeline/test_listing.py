import os

import pytest

from pipeline.listing import (
    LISTING_SCHEMA,
    ItemsOnDemand,
    LabelsError,
    ListingError,
    PlannedGroups,
    SourceVideo,
    VideoListing,
    attach_labels,
    extend_class_map,
    fixed_class_map,
    labels_by_segment,
    list_videos,
    parse_class_names,
    parse_labels_csv,
    split_segment,
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


def test_a_segments_csv_names_each_segment_by_its_media_fragment():
    labels = parse_labels_csv("path,start,end,label\na.mp4,0,4.25,jump\n./a.mp4,6.0004,10,run\nb.mp4,1.5,2,jump\n")
    assert labels == {"a.mp4#t=0,4.25": "jump", "a.mp4#t=6,10": "run", "b.mp4#t=1.5,2": "jump"}
    assert labels_by_segment(labels) and not labels_by_segment({"a.mp4": "jump"})
    assert split_segment("s3://bucket/x/a.mp4#t=6,10") == ("s3://bucket/x/a.mp4", (6.0, 10.0))
    assert split_segment("x/a#t=.mp4") == ("x/a#t=.mp4", None)


@pytest.mark.parametrize(
    "row,message",
    [("a.mp4,4,2,jump", "0 <= start < end"), ("a.mp4,-1,2,jump", "0 <= start < end"), ("a.mp4,1,1,jump", "start < end"),
     ("a.mp4,nan,2,jump", "0 <= start < end"), ("a.mp4,1,inf,jump", "0 <= start < end"),
     ("a.mp4,1:02,2,jump", "must be seconds"), ("a.mp4,1,2", "expected 'path,start,end,label'"),
     ("../a.mp4,1,2,jump", "'..'")],
)
def test_a_segments_csv_with_a_bad_row_is_refused_by_line(row, message):
    with pytest.raises(LabelsError, match="line 2") as caught:
        parse_labels_csv(f"path,start,end,label\n{row}\n")
    assert message in str(caught.value)


def test_a_segment_labelled_twice_differently_is_refused_and_a_plain_csv_cannot_name_one():
    with pytest.raises(LabelsError, match="labelled both"):
        parse_labels_csv("path,start,end,label\na.mp4,1,2,jump\na.mp4,1.0,2.0,run\n")
    with pytest.raises(LabelsError, match="names a segment"):
        parse_labels_csv("path,label\n\"a.mp4#t=1,2\",jump\n")


def test_segments_become_inputs_of_their_own_and_every_video_and_row_is_accounted_for():
    videos = [_video("a.mp4"), _video("b.mp4"), _video("c.mp4")]
    labels = parse_labels_csv("path,start,end,label\nb.mp4,5,9,run\nb.mp4,0,4,jump\na.mp4,1,2,run\ngone.mp4,0,1,run\n")
    labelled, errors = attach_labels(videos, parse_uri("/src"), labels_csv=labels)
    assert [(v.video_id, v.uri, v.label_name, v.etag) for v in labelled] == [
        ("a.mp4#t=1,2", "/src/a.mp4#t=1,2", "run", "10-1"),
        ("b.mp4#t=0,4", "/src/b.mp4#t=0,4", "jump", "10-1"),
        ("b.mp4#t=5,9", "/src/b.mp4#t=5,9", "run", "10-1"),
    ]
    assert sorted((e.source_uri, e.error_type) for e in errors) == [
        ("/src/c.mp4", "NotInLabels"), ("/src/gone.mp4#t=0,1", "MissingVideo")
    ]


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


def test_a_listing_of_many_pages_is_columnar_and_sorted_as_its_videos_would_be(tmp_path):
    # 2,500 files: three chunks of the listing; names whose sort by key and by video id differ ("a b" < "a/")
    for i in range(2500):
        folder = tmp_path / ("a b" if i % 3 else "a") / f"{i % 7}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"v{i:05d}.mp4").write_bytes(b"x" * (i % 5))
    listing = list_videos(str(tmp_path), Storage())
    assert isinstance(listing, VideoListing) and listing.table.schema == LISTING_SCHEMA
    videos = list(listing)
    assert [video.video_id for video in videos] == sorted(video.video_id for video in videos) and len(videos) == 2500
    assert listing[0] == videos[0] and listing[-1] == videos[-1] and listing[1234] == videos[1234]
    assert list(listing[10:20]) == videos[10:20] and list(listing.take([5, 3])) == [videos[5], videos[3]]
    assert list(VideoListing.of(videos)) == videos and VideoListing.of(listing) is listing
    with pytest.raises(IndexError, match="2500 out of range for 2500 videos"):
        listing[2500]
    labelled, errors = attach_labels(listing, parse_uri(str(tmp_path)), labels_from_dirs=True)
    assert [(v.video_id, v.label_name) for v in labelled] == [(v.video_id, v.video_id.split("/")[1]) for v in videos]
    assert errors == []


def test_two_names_of_one_video_id_keep_their_listing_order(tmp_path):
    nfd, nfc = "cafe\u0301.mp4", "caf\u00e9.mp4"  # one id, two keys
    (tmp_path / nfd).write_bytes(b"d")
    (tmp_path / nfc).write_bytes(b"cc")
    (tmp_path / "b.mp4").write_bytes(b"b")
    videos = list_videos(str(tmp_path), Storage())
    assert [(video.video_id, video.size) for video in videos] == [("b.mp4", 1), (nfc, 1), (nfc, 2)]  # key order


def test_listed_videos_take_columns_not_objects():
    listing = VideoListing.of(
        SourceVideo(f"s3://raw/class_{i % 400:03d}/video_{i:08d}.mp4", f"class_{i % 400:03d}/video_{i:08d}.mp4",
                    1000, f"{i:032x}") for i in range(20_000)
    )
    # 37 + 28 + 32 bytes of text, 8 of size, 32 of offsets: a SourceVideo object with its strings is ~430 bytes
    assert listing.table.nbytes / len(listing) <= 140


def test_planned_groups_make_each_group_when_asked_for():
    videos = VideoListing.of(_video(f"{i}.mp4") for i in range(7))
    made = []

    def record(video):
        made.append(video.video_id)
        return {"video_id": video.video_id}

    groups = PlannedGroups.cut(videos, 3, record, lambda records: "+".join(r["video_id"] for r in records))
    assert groups.names == ["0.mp4+1.mp4+2.mp4", "3.mp4+4.mp4+5.mp4", "6.mp4"] and len(groups) == 3
    made.clear()
    assert groups[-1] == {"shard": "6.mp4", "videos": [{"video_id": "6.mp4"}]} and made == ["6.mp4"]
    assert [group["shard"] for group in groups] == groups.names
    with pytest.raises(IndexError, match="group 3 out of range for 3 groups"):
        groups[3]


def test_items_on_demand_are_made_one_by_one_as_read():
    made = []
    items = ItemsOnDemand(3, lambda i: made.append(i) or {"i": i})
    assert len(items) == 3 and made == []
    assert items[1] == {"i": 1} and made == [1]
    assert list(items) == [{"i": 0}, {"i": 1}, {"i": 2}] and items[-1] == {"i": 2}
    with pytest.raises(IndexError, match="item 3 out of range for 3 items"):
        items[3]


def test_a_file_not_named_in_utf8_is_refused_by_name(tmp_path):
    (tmp_path / "good.mp4").write_bytes(b"x")
    with open(os.path.join(bytes(tmp_path), b"\xffbad.mp4"), "wb") as handle:
        handle.write(b"x")
    with pytest.raises(ListingError, match=r"bad\.mp4' is not named in UTF-8; rename it"):
        list_videos(str(tmp_path), Storage())


def test_a_labels_csv_that_is_not_csv_is_refused_by_line():
    with pytest.raises(LabelsError, match=r"labels CSV line 2: not readable as CSV \(new-line character"):
        parse_labels_csv("path,label\n\r0\n")
