"""Hypothesis over the option space of both `submit` commands and over `submit --from` rows: every run either
exits 0 having written exactly its record(s) and message(s) (and one upload per local image), or exits 2 with
one sentence and nothing written at all — records, messages and S3 objects counted before and after.

gpuctl's ``main()`` runs in this process against moto's server. Examples are bounded for CI
(GPUCTL_ATTACK_EXAMPLES, default 20 per property); `bench/` or a developer can raise it.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.helpers import (
    Counts,
    Resources,
    create_resources,
    emulator_counts,
    invoke,
    make_image,
    png_bytes,
    put_object,
)

pytestmark = pytest.mark.server

EXAMPLES = int(os.environ.get("GPUCTL_ATTACK_EXAMPLES", "20"))
ATTACK = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def world(moto_server: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Resources, Path]:
    httpx.post(f"{moto_server}/moto-api/reset", timeout=10).raise_for_status()
    res = create_resources(boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing"),
                           moto_server)
    tmp = tmp_path_factory.mktemp("properties")
    put_object(res, "in/ok.png", png_bytes())
    put_object(res, "in/notes.bin", b"plain text", content_type="text/plain")
    make_image(tmp / "ok.png")
    (tmp / "notes.txt").write_text("not an image\n")
    (tmp / "empty.png").write_bytes(b"")
    return res, tmp


# Image references, good and bad, local and remote (an IP-literal https URL is checked without DNS). Good values
# are drawn about as often as bad ones, so both outcomes are explored.
GOOD_IMAGES = ["{tmp}/ok.png", "s3://{bucket}/in/ok.png", "https://93.184.216.34/a.png"]
BAD_IMAGES = ["{tmp}/notes.txt", "{tmp}/empty.png", "{tmp}/missing.png", "{tmp}", "s3://{bucket}/in/missing.png",
              "s3://{bucket}/in/notes.bin", "s3://{bucket}", "https://10.0.0.7/a.png",
              "https://user:pw@93.184.216.34/a.png", "http://93.184.216.34/a", "ftp://x/y.png", ""]
IMAGE = st.one_of(st.sampled_from(GOOD_IMAGES), st.sampled_from(GOOD_IMAGES), st.sampled_from(BAD_IMAGES))
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
JUNK = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
                 st.sampled_from(["x", "1.5", "", "0x10", " 2", "nan", "-inf", "1e400"]), TEXT)


def _opt(name: str, good: st.SearchStrategy[Any], *, clean: bool) -> st.SearchStrategy[list[str]]:
    """Absent or a valid value; unless ``clean``, junk too."""
    value = good if clean else st.one_of(good, JUNK)
    return st.one_of(st.just([]), value.map(lambda v: [name, str(v)]))


def _flatten(parts: tuple[list[str], ...]) -> list[str]:
    return [a for part in parts for a in part]


KNOB = st.integers(-2, 2)
PROMPT = TEXT.filter(str.strip)


def _camera(clean: bool) -> st.SearchStrategy[list[str]]:
    return st.tuples(
        st.one_of(st.just([]), _opt("--prompt", PROMPT, clean=clean)),
        *[st.just([]) if clean else _opt(k, KNOB, clean=False) for k in ("--vertical", "--horizontal")],
        _opt("--zoom", st.integers(-1, 1), clean=clean), _opt("--seed", st.integers(0, 2**64 - 1), clean=clean),
        _opt("--steps", st.integers(1, 100), clean=clean),
    ).map(lambda parts: ["submit", "camera-angle", *_flatten(parts)])


def _qwen(clean: bool) -> st.SearchStrategy[list[str]]:
    image = st.sampled_from(GOOD_IMAGES) if clean else IMAGE
    return st.tuples(
        PROMPT.map(lambda p: ["--prompt", p]) if clean else
        st.one_of(PROMPT, TEXT).map(lambda p: ["--prompt", p]) | st.just([]),
        _opt("--image2", image, clean=clean), _opt("--image3", image, clean=clean),
        _opt("--steps", st.integers(1, 100), clean=clean), _opt("--cfg", st.floats(0, 100), clean=clean),
        _opt("--denoise", st.floats(0, 1), clean=clean), _opt("--sampler", PROMPT, clean=clean),
        _opt("--scheduler", PROMPT, clean=clean), _opt("--seed", st.integers(0, 2**64 - 1), clean=clean),
    ).map(lambda parts: ["submit", "qwen-image-edit", *_flatten(parts)])


BAD_EXTRAS = [["--wait", "--timeout", "-1"], ["--wait", "--timeout", "nan"], ["--download", "x.png"],
              ["--require-instance", "--no-start"], ["--vertical", "1", "--prompt", "p"]]
# Half the examples are all-valid combinations (they must be queued), half may hold anything (junk must write
# nothing), so both outcomes are explored in every run.
SUBMIT = st.one_of(
    st.tuples(st.one_of(_camera(True), _qwen(True)), st.sampled_from(GOOD_IMAGES),
              st.sampled_from([[], ["--no-start"]])),
    st.tuples(st.one_of(_camera(False), _qwen(False)), IMAGE,
              st.lists(st.sampled_from([["--no-start"], *BAD_EXTRAS]), max_size=2).map(_flatten)),
)


def _outcome(before: Counts, after: Counts, code: int, stderr: str, *, jobs: int, uploads: int) -> None:
    event(f"exit {code}")
    assert "Traceback" not in stderr and "site-packages" not in stderr, stderr
    if code == 0:
        assert (after.records - before.records, after.messages - before.messages) == (jobs, jobs), stderr
        assert after.objects - before.objects == uploads, stderr
    else:
        assert code == 2, stderr
        assert after == before, stderr
        last = stderr.rstrip("\n").splitlines()[-1]
        assert last.startswith("Error: ") and last.endswith((".", "integer", "number", ")")), stderr


def _expand(value: str, res: Resources, tmp: Path) -> str:
    return value.replace("{tmp}", str(tmp)).replace("{bucket}", res.bucket)


@ATTACK
@given(submit=SUBMIT)
def test_submit_writes_its_job_or_nothing(world: tuple[Resources, Path], capsys: Any,
                                         submit: tuple[list[str], str, list[str]]) -> None:
    """Any combination of options: exit 0 with one record and one message, or exit 2 and nothing written."""
    # GIVEN an option combination
    res, tmp = world
    command, image, extras = submit
    args = [_expand(a, res, tmp) for a in [*command[:2], image, *command[2:], *extras]]
    before = emulator_counts(res)
    # WHEN it is submitted
    got = invoke(args, res.env() | {"GPUCTL_INSTANCE_ID": res.instance_id}, capsys)
    # THEN it is all or nothing
    after = emulator_counts(res)
    local = sum(1 for a in args if a == f"{tmp}/ok.png")
    _outcome(before, after, got.code, got.stderr, jobs=1, uploads=local)
    if got.code == 0:
        assert len(got.stdout.split()) == 1


def _cell(good: st.SearchStrategy[Any], *, clean: bool) -> st.SearchStrategy[Any]:
    """A row value: valid, or (unless ``clean``) junk: None, lists, dicts, wrong types, out of range."""
    if clean:
        return good
    return st.one_of(good, JUNK, st.none(), st.lists(st.integers(), max_size=2),
                     st.dictionaries(TEXT, st.integers(), max_size=2))


GOOD_ROW_IMAGES = st.sampled_from(["ok.png", "s3://{bucket}/in/ok.png", "https://93.184.216.34/a.png"])
ROW_IMAGES = st.one_of(GOOD_ROW_IMAGES, st.sampled_from(["notes.txt", "missing.png", "s3://{bucket}/in/missing.png",
                                                         "https://10.0.0.7/a.png", "http://x/a.png", ""]))


def _row(clean: bool) -> st.SearchStrategy[dict[str, Any]]:
    image = GOOD_ROW_IMAGES if clean else ROW_IMAGES
    return st.one_of(
        st.fixed_dictionaries(
            {"job_type": _cell(st.just("camera-angle"), clean=clean), "image": image},
            optional={"zoom": _cell(st.integers(-1, 1), clean=clean), "steps": _cell(st.integers(1, 100), clean=clean),
                      "seed": _cell(st.integers(0, 2**64 - 1), clean=clean), "extra_field": TEXT,
                      **({} if clean else {"vertical": _cell(KNOB, clean=False), "prompt": _cell(TEXT, clean=False)})}),
        st.fixed_dictionaries(
            {"job_type": _cell(st.just("qwen-image-edit"), clean=clean), "image": image,
             "prompt": _cell(PROMPT, clean=clean)},
            optional={"image2": image, "cfg": _cell(st.floats(0, 100), clean=clean),
                      "denoise": _cell(st.floats(0, 1), clean=clean), "steps": _cell(st.integers(1, 100), clean=clean),
                      "sampler_name": _cell(PROMPT, clean=clean), "seed": _cell(st.integers(0, 2**64 - 1), clean=clean),
                      "unknown": TEXT}),
    )


ROWS = st.one_of(st.lists(_row(True), min_size=1, max_size=4), st.lists(_row(False), min_size=1, max_size=4))


def _write_rows(rows: list[dict[str, Any]], path: Path, fmt: str, res: Resources) -> None:
    def value(v: Any) -> Any:
        return _expand(v, res, path.parent) if isinstance(v, str) else v

    rows = [{k: value(v) for k, v in row.items()} for row in rows]
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
        return
    names = sorted({k for row in rows for k in row})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=names)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    path.write_text(buf.getvalue(), encoding="utf-8")


@ATTACK
@given(rows=ROWS, fmt=st.sampled_from(["jsonl", "csv"]))
def test_submit_from_writes_every_row_or_nothing(world: tuple[Resources, Path], capsys: Any,
                                                 rows: list[dict[str, Any]], fmt: str) -> None:
    """Any rows: exit 0 with one record and one message per row (and an upload per local image), or exit 2 with
    one sentence and nothing written."""
    # GIVEN a job file of these rows
    res, tmp = world
    path = tmp / f"jobs.{fmt}"
    _write_rows(rows, path, fmt, res)
    before = emulator_counts(res)
    # WHEN it is submitted
    got = invoke(["submit", "--from", str(path), "--no-start", "-q"], res.env(), capsys)
    # THEN every row is queued, or none is
    after = emulator_counts(res)
    uploads = sum(1 for row in rows for key in ("image", "image2") if row.get(key) == "ok.png")
    _outcome(before, after, got.code, got.stderr, jobs=len(rows), uploads=uploads)
    if got.code == 0:
        assert len(got.stdout.split()) == len(rows)
