"""The one time convention: epoch numbers plus ``_iso`` in JSON, ISO with a relative age in text."""

from __future__ import annotations

from gpuctl.times import ago, human, iso, parse_time, stamp


def test_stamp_gives_a_number_and_an_iso_string() -> None:
    assert stamp("created_at", 1796112745.0) == {"created_at": 1796112745, "created_at_iso": "2026-12-01T08:12:25Z"}
    assert stamp("created_at", 1796112745.25)["created_at"] == 1796112745.25
    assert stamp("finished_at", None) == {"finished_at": None, "finished_at_iso": None}


def test_human_text_has_the_age() -> None:
    assert human(1000.0, now=1180.0) == f"{iso(1000.0)} (3 min ago)"
    assert ago(1000.0, now=1000.5) == "just now"
    assert ago(1000.0, now=1000.0 - 600) == "in 10 min"
    assert ago(0.0, now=3 * 86400) == "3 d ago"


def test_parse_time_takes_numbers_and_iso_and_refuses_the_rest() -> None:
    assert parse_time("1796112745") == 1796112745.0
    assert parse_time("2026-12-01T08:12:25Z") == 1796112745.0
    assert parse_time(12) == 12.0
    for bad in (None, "", "2h", "tomorrow", "inf", "nan", True, float("inf")):
        assert parse_time(bad) is None
