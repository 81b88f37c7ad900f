"""Named bad inputs, each with its exact message and exit code, and nothing written (records, messages, S3
objects counted before and after). gpuctl's ``main()`` runs in this process (the same boundary as the real
process) against moto's server on 127.0.0.1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from tests.helpers import (
    Counts,
    Resources,
    create_resources,
    emulator_counts,
    invoke,
    make_image,
    png_bytes,
    png_claiming,
    put_object,
)

pytestmark = pytest.mark.server

UNKNOWN = "3f2b8c1e-4d5a-4b6c-8d7e-9f0a1b2c3d4e"
BUCKET = "gpuctl-test-bucket"


@dataclass
class World:
    res: Resources
    tmp: Path
    counts: Counts | None = None  # the emulator's counts after the last case (unchanged, as nothing is written)

    def expand(self, text: str) -> str:
        return text.replace("{tmp}", str(self.tmp)).replace("{bucket}", self.res.bucket)


@pytest.fixture(scope="module")
def world(moto_server: str, tmp_path_factory: pytest.TempPathFactory) -> World:
    httpx.post(f"{moto_server}/moto-api/reset", timeout=10).raise_for_status()
    res = create_resources(boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing"),
                           moto_server)
    tmp = tmp_path_factory.mktemp("bad-inputs")
    put_object(res, "in/ok.png", png_bytes())
    put_object(res, "in/notes.bin", b"hello, not an image", content_type="application/octet-stream")
    put_object(res, "in/bomb.bin", png_claiming(10000, 10000), content_type="binary/octet-stream")
    put_object(res, "in/empty.png", b"")
    make_image(tmp / "ok.png")
    (tmp / "notes.txt").write_text("not an image\n")
    (tmp / "empty.png").write_bytes(b"")
    (tmp / "folder").mkdir()
    (tmp / "bomb.png").write_bytes(png_claiming(10000, 10000))
    (tmp / "strip.png").write_bytes(png_claiming(40000, 4))
    (tmp / "cut.png").write_bytes(png_bytes()[:40])
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp / "icon.ico", format="ICO")
    (tmp / "latin1.jsonl").write_bytes('{"job_type": "qwen-image-edit", "prompt": "café"}\n'.encode("latin-1"))
    (tmp / "empty.jsonl").write_text("\n# only a comment\n")
    (tmp / "list.jsonl").write_text('["qwen-image-edit", "ok.png"]\n')
    (tmp / "broken.jsonl").write_text('{"job_type": "qwen-image-edit", "image": "ok.png", "prompt": "p"\n')
    (tmp / "deep.jsonl").write_text("[" * 5000 + "]" * 5000 + "\n")
    (tmp / "noheader.csv").write_text("")
    (tmp / "ragged.csv").write_text("job_type,image\ncamera-angle,ok.png,extra\n")
    (tmp / "paint.jsonl").write_text(json.dumps({"job_type": "paint", "image": "ok.png"}) + "\n")
    (tmp / "missing-s3.jsonl").write_text("\n".join(json.dumps(
        {"job_type": "qwen-image-edit", "image": f"s3://{res.bucket}/in/nope.png", "prompt": f"p{i}"})
        for i in range(3)) + "\n")
    (tmp / "nul.jsonl").write_bytes(b'{"job_type": "camera-angle", "image": "ok.png"}\x00\n')
    return World(res, tmp)


@dataclass(frozen=True)
class Bad:
    args: list[str]
    code: int
    message: str  # the whole last line of stderr
    env: dict[str, str] = field(default_factory=dict)


S3 = "s3://{bucket}/in/ok.png"
CA = ["submit", "camera-angle"]
QW = ["submit", "qwen-image-edit"]
CLICK = "Usage: "  # Click's usage errors: "Usage: …", "Try '… -h' for help.", then the Error line
BAD: dict[str, Bad] = {
    # --- types and ranges
    "vertical-3": Bad([*CA, S3, "--vertical", "3"], 2,
                      "Error: Invalid camera-angle request: vertical should be less than or equal to 2 (got 3)."),
    "zoom-minus-2": Bad([*CA, S3, "--zoom", "-2"], 2,
                        "Error: Invalid camera-angle request: zoom should be greater than or equal to -1 (got -2)."),
    "horizontal-word": Bad([*CA, S3, "--horizontal", "left"], 2,
                           "Error: Invalid value for '--horizontal': Input should be a valid integer, unable to parse "
                           "string as an integer"),
    "steps-0": Bad([*CA, S3, "--steps", "0"], 2,
                   "Error: Invalid camera-angle request: steps should be greater than or equal to 1 (got 0)."),
    "steps-101": Bad([*QW, S3, "--prompt", "p", "--steps", "101"], 2,
                     "Error: Invalid qwen-image-edit request: steps should be less than or equal to 100 (got 101)."),
    "seed-negative": Bad([*QW, S3, "--prompt", "p", "--seed", "-1"], 2,
                         "Error: Invalid qwen-image-edit request: seed should be greater than or equal to 0 (got -1)."),
    "seed-too-big": Bad([*QW, S3, "--prompt", "p", "--seed", str(2**64)], 2,
                        "Error: Invalid qwen-image-edit request: seed should be less than or equal to "
                        f"18446744073709551615 (got {2**64})."),
    "cfg-nan": Bad([*QW, S3, "--prompt", "p", "--cfg", "nan"], 2,
                   "Error: Invalid qwen-image-edit request: cfg must be a finite number (got nan)."),
    "cfg-denormal": Bad([*QW, S3, "--prompt", "p", "--cfg", "5e-324"], 2,
                        "Error: Invalid qwen-image-edit request: cfg is too close to zero or too large (got 5e-324)."),
    "cfg-word": Bad([*QW, S3, "--prompt", "p", "--cfg", "high"], 2,
                    "Error: Invalid value for '--cfg': Input should be a valid number, unable to parse string as a "
                    "number"),
    "denoise-1.5": Bad([*QW, S3, "--prompt", "p", "--denoise", "1.5"], 2,
                       "Error: Invalid qwen-image-edit request: denoise should be less than or equal to 1 (got 1.5)."),
    "prompt-empty": Bad([*QW, S3, "--prompt", "  "], 2,
                        "Error: Invalid qwen-image-edit request: prompt must not be empty (got '  ')."),
    "prompt-too-long": Bad([*QW, S3, "--prompt", "x" * 2001], 2,
                           "Error: Invalid qwen-image-edit request: prompt string should have at most 2000 characters "
                           "(got "
                           f"{('x' * 2001)!r:.59}…)."),
    "sampler-empty": Bad([*QW, S3, "--prompt", "p", "--sampler", ""], 2,
                         "Error: Invalid qwen-image-edit request: sampler_name string should have at least 1 character "
                         "(got '')."),
    "prompt-and-knobs": Bad([*CA, S3, "--prompt", "x", "--zoom", "1"], 2,
                            "Error: Give either --prompt or the --vertical/--horizontal/--zoom knobs, not both."),
    "prompt-missing": Bad([*QW, S3], 2, "Error: Missing option '--prompt'."),
    "unknown-job-type": Bad(["submit", "paint", S3], 2, "Error: No such command 'paint'."),
    "not-utf8-argument": Bad([*QW, S3, "--prompt", "caf\udce9"], 2,
                             "Error: Argument 5 is not valid UTF-8 text (byte 0xe9); gpuctl takes UTF-8 arguments."),
    "output-yaml": Bad(["jobs", "list", "--output", "yaml"], 2,
                       "Error: Invalid value for '--output' / '-o': 'yaml' is not one of 'text', 'json'."),
    # --- options that only make sense together
    "wait-timeout-negative": Bad([*CA, S3, "--wait", "--timeout", "-5"], 2,
                                 "Error: --timeout must be a positive number of seconds."),
    "wait-timeout-inf": Bad([*CA, S3, "--wait", "--timeout", "inf"], 2,
                            "Error: --timeout must be a positive number of seconds."),
    "download-without-wait": Bad([*CA, S3, "--download", "{tmp}/x.png"], 2,
                                 "Error: --download needs --wait (the result exists only once the job completes)."),
    "download-exists": Bad([*CA, S3, "--wait", "--download", "{tmp}/ok.png"], 2,
                           "Error: {tmp}/ok.png already exists; pass --force to overwrite it."),
    "no-start-and-require": Bad([*CA, S3, "--no-start", "--require-instance"], 2,
                                "Error: --require-instance and --no-start contradict each other; give one of them."),
    # --- local files
    "file-missing": Bad([*CA, "{tmp}/missing.png"], 2, "Error: Image file {tmp}/missing.png does not exist."),
    "file-is-a-folder": Bad([*CA, "{tmp}/folder"], 2, "Error: {tmp}/folder is a directory, not an image file."),
    "file-empty": Bad([*CA, "{tmp}/empty.png"], 2, "Error: Image file {tmp}/empty.png is empty."),
    "file-not-an-image": Bad([*CA, "{tmp}/notes.txt"], 2, "Error: Image file {tmp}/notes.txt is not an image gpuctl "
                                                          "can read (JPEG, PNG, WebP, BMP, GIF or TIFF)."),
    "file-bomb": Bad([*CA, "{tmp}/bomb.png"], 2,
                     "Error: Image file {tmp}/bomb.png is 10000×10000 pixels (100.0 megapixels), more than the 40 "
                     "megapixel limit (max_image_megapixels)."),
    "file-too-long": Bad([*CA, "{tmp}/strip.png"], 2, "Error: Image file {tmp}/strip.png is 40000×4 pixels; its "
                                                      "longest side may be at most 12000 pixels (max_image_side)."),
    "file-truncated": Bad([*CA, "{tmp}/cut.png"], 2, "Error: Image file {tmp}/cut.png is not an image gpuctl can "
                                                     "read (JPEG, PNG, WebP, BMP, GIF or TIFF)."),
    "file-ico": Bad([*CA, "{tmp}/icon.ico"], 2, "Error: Image file {tmp}/icon.ico is a ICO image; use JPEG, PNG, "
                                                "WebP, BMP, GIF or TIFF."),
    "file-over-size-limit": Bad([*CA, "{tmp}/ok.png"], 2,
                                "Error: Image file {tmp}/ok.png is 0 MB, larger than the 0 MB limit (max_image_mb).",
                                env={"GPUCTL_MAX_IMAGE_MB": "0.0001"}),
    # --- remote inputs
    "http-url": Bad([*QW, "http://example.com/a.png", "--prompt", "p"], 2,
                    "Error: http:// image URLs are not accepted; use https://, s3:// or a local file."),
    "https-with-password": Bad([*QW, "https://alice:hunter2@example.com/a.png", "--prompt", "p"], 2,
                               "Error: The image URL https://example.com/a.png carries a user name or password; "
                               "gpuctl refuses credentials in URLs (use a presigned URL or s3://)."),
    "https-private": Bad([*QW, "https://10.1.2.3/a.png?sig=secret", "--prompt", "p"], 2,
                         "Error: The image URL https://10.1.2.3/a.png?… points at 10.1.2.3, a private or reserved "
                         "address; gpuctl only fetches from public addresses."),
    "https-metadata": Bad([*QW, "https://169.254.169.254/latest", "--prompt", "p"], 2,
                          "Error: The image URL https://169.254.169.254/latest points at 169.254.169.254, a link-local "
                          "address (the instance metadata service lives there); gpuctl only fetches from public "
                          "addresses."),
    "https-localhost": Bad([*QW, "https://localhost/a.png", "--prompt", "p"], 2,
                           "Error: The image URL https://localhost/a.png points at 127.0.0.1, a loopback address; "
                           "gpuctl only fetches from public addresses."),
    "https-bidi-host": Bad([*QW, "https://exa\u202emple.com/a.png", "--prompt", "p"], 2,
                           "Error: The image host exa\\u202emple.com is not a valid host name."),
    "s3-missing": Bad([*QW, "s3://{bucket}/in/nope.png", "--prompt", "p"], 2,
                      "Error: The image s3://{bucket}/in/nope.png does not exist."),
    "s3-no-key": Bad([*QW, "s3://{bucket}", "--prompt", "p"], 2,
                     "Error: 's3://{bucket}' needs both a bucket and a key (s3://bucket/key)."),
    "s3-not-an-image": Bad([*QW, "s3://{bucket}/in/notes.bin", "--prompt", "p"], 2,
                           "Error: The image s3://{bucket}/in/notes.bin is not an image gpuctl can read (JPEG, PNG, "
                           "WebP, BMP, GIF or TIFF)."),
    "s3-bomb": Bad([*QW, "s3://{bucket}/in/bomb.bin", "--prompt", "p"], 2,
                   "Error: The image s3://{bucket}/in/bomb.bin is 10000×10000 pixels (100.0 megapixels), more than the "
                   "40 megapixel limit (max_image_megapixels)."),
    "s3-empty": Bad([*QW, "s3://{bucket}/in/empty.png", "--prompt", "p"], 2,
                    "Error: The image s3://{bucket}/in/empty.png is empty."),
    "s3-bucket-missing": Bad([*QW, "s3://no-such-bucket/a.png", "--prompt", "p"], 2,
                             "Error: The image s3://no-such-bucket/a.png does not exist."),
    # --- job ids and durations
    "id-malformed": Bad(["status", "not-a-uuid"], 2, "Error: 'not-a-uuid' is not a job id: job ids are UUIDs such as "
                                                     "3f2b8c1e-4d5a-4b6c-8d7e-9f0a1b2c3d4e."),
    "id-unknown": Bad(["status", UNKNOWN], 1, f"Error: Job {UNKNOWN} does not exist."),
    "id-control-characters": Bad(["jobs", "cancel", "\x1b[2Jabc"], 2,
                                 "Error: '\\x1b[2Jabc' is not a job id: job ids are UUIDs such as "
                                 "3f2b8c1e-4d5a-4b6c-8d7e-9f0a1b2c3d4e."),
    "since-fortnights": Bad(["jobs", "list", "--since", "3 fortnights"], 2,
                            "Error: --since '3 fortnights' is not a duration: use a number and a unit, e.g. 30m, 1h, "
                            "2d."),
    "limit-0": Bad(["jobs", "list", "--limit", "0"], 2, "Error: --limit must be at least 1 (got 0)."),
    "limit-huge": Bad(["jobs", "list", "--limit", "5000"], 2,
                      "Error: --limit may be at most 1000 (got 5000); use --next-token for more."),
    "hold-zero": Bad(["instance", "hold", "--for", "0m"], 2, "Error: --for '0m' must be longer than zero."),
    "hold-eight-days": Bad(["instance", "hold", "--for", "8d"], 2,
                           "Error: --for '8d' is longer than the maximum hold of 7 days; hold again later to extend "
                           "it."),
    "watch-interval-nan": Bad(["watch", UNKNOWN, "--interval", "nan"], 2,
                              "Error: --interval must be a positive number of seconds, at most 5."),
    # --- job files
    "jobs-file-not-utf8": Bad(["submit", "--from", "{tmp}/latin1.jsonl"], 2,
                              "Error: Job file {tmp}/latin1.jsonl is not UTF-8 text (byte 47 is not valid UTF-8)."),
    "jobs-file-empty": Bad(["submit", "--from", "{tmp}/empty.jsonl"], 2,
                           "Error: Job file {tmp}/empty.jsonl has no jobs in it."),
    "jobs-file-missing": Bad(["submit", "--from", "{tmp}/none.jsonl"], 2,
                             "Error: Job file {tmp}/none.jsonl does not exist."),
    "jobs-file-folder": Bad(["submit", "--from", "{tmp}/folder"], 2,
                            "Error: Job file {tmp}/folder is a directory, not a file."),
    "jobs-file-nul": Bad(["submit", "--from", "{tmp}/nul.jsonl"], 2,
                         "Error: Job file {tmp}/nul.jsonl is not a text file (it contains NUL bytes)."),
    "jobs-row-not-object": Bad(["submit", "--from", "{tmp}/list.jsonl"], 2,
                               "Error: 1 of 1 rows in {tmp}/list.jsonl are invalid, nothing was submitted: row 1: the "
                               "line is not a JSON object."),
    "jobs-row-broken-json": Bad(["submit", "--from", "{tmp}/broken.jsonl"], 2,
                                "Error: 1 of 1 rows in {tmp}/broken.jsonl are invalid, nothing was submitted: row 1: "
                                "the line is not valid JSON."),
    "jobs-row-too-deep": Bad(["submit", "--from", "{tmp}/deep.jsonl"], 2,
                             "Error: 1 of 1 rows in {tmp}/deep.jsonl are invalid, nothing was submitted: row 1: the "
                             "line is nested too deeply."),
    "jobs-csv-no-header": Bad(["submit", "--from", "{tmp}/noheader.csv"], 2,
                              "Error: Job file {tmp}/noheader.csv has no header row."),
    "jobs-csv-ragged": Bad(["submit", "--from", "{tmp}/ragged.csv"], 2,
                           "Error: 1 of 1 rows in {tmp}/ragged.csv are invalid, nothing was submitted: row 2: the line "
                           "has more cells than the header row has columns."),
    "jobs-row-unknown-type": Bad(["submit", "--from", "{tmp}/paint.jsonl"], 2,
                                 "Error: 1 of 1 rows in {tmp}/paint.jsonl are invalid, nothing was submitted: row 1: "
                                 "Unknown job type 'paint'; choose one of: camera-angle, qwen-image-edit."),
    "jobs-rows-missing-input": Bad(["submit", "--from", "{tmp}/missing-s3.jsonl"], 2,
                                   "Error: 3 of 3 rows in {tmp}/missing-s3.jsonl name an input that cannot be used, "
                                   "nothing was submitted: row 1: The image s3://{bucket}/in/nope.png does not exist; "
                                   "row 2: The image s3://{bucket}/in/nope.png does not exist; row 3: The image "
                                   "s3://{bucket}/in/nope.png does not exist."),
    # --- settings, endpoints, resources
    "no-queue-url": Bad([*CA, S3], 2,
                        "Error: No SQS queue URL is configured: set SQS_QUEUE_URL, or run `gpuctl config set queue_url "
                        "VALUE`, or `gpuctl deploy` to create the stack and record it.", env={"GPUCTL_QUEUE_URL": ""}),
    "no-bucket-for-upload": Bad([*CA, "{tmp}/ok.png"], 2, "Error: No S3 bucket for inputs and results is configured: "
                                                          "set GPUCTL_BUCKET, or run `gpuctl config set bucket VALUE`, "
                                                          "or `gpuctl deploy` to create the stack and record it.",
                                env={"GPUCTL_BUCKET": ""}),
    "no-instance-with-require": Bad([*CA, S3, "--require-instance"], 2,
                                    "Error: No GPU instance id is configured: set GPU_INSTANCE_ID, or run `gpuctl "
                                    "config set instance_id VALUE`, or `gpuctl deploy` to create the stack and record "
                                    "it.", env={"GPUCTL_INSTANCE_ID": ""}),
    "profile-that-does-not-exist": Bad(["--profile", "nosuch", "status", UNKNOWN], 2,
                                       "Error: There is no profile nosuch ({config}/nosuch.toml does not exist): "
                                       "`gpuctl --profile nosuch deploy` or `gpuctl --profile nosuch config set NAME "
                                       "VALUE` creates it."),
    "profile-local-after-down": Bad(["--profile", "local", "status", UNKNOWN], 2,
                                    "Error: There is no profile local ({config}/local.toml does not exist): `gpuctl "
                                    "local up` creates it."),
    "endpoint-not-a-url": Bad(["--endpoint-url", "not a url", "status", UNKNOWN], 2,
                              "Error: Invalid setting endpoint_url: 'not a url' is not an http:// or https:// URL."),
    "endpoint-with-password": Bad(["--endpoint-url", "https://bob:s3cret@127.0.0.1:9", "status", UNKNOWN], 2,
                                  "Error: Invalid setting endpoint_url: carries a user name or password; gpuctl "
                                  "refuses credentials in URLs."),
    "endpoint-down": Bad([*CA, S3], 4, 'Error: Cannot reach AWS for s3://{bucket}/in/ok.png: Could not connect to the '
                                       'endpoint URL: "http://127.0.0.1:9/{bucket}/in/ok.png".',
                         env={"GPUCTL_ENDPOINT_URL": "http://127.0.0.1:9", "GPUCTL_MAX_ATTEMPTS": "1"}),
    "queue-deleted": Bad(["queue", "stats"], 1, "Error: The SQS queue http://{endpoint}/123456789012/deleted does not "
                                                "exist (AWS.SimpleQueueService.NonExistentQueue).",
                         env={"GPUCTL_QUEUE_URL": "http://{endpoint}/123456789012/deleted"}),
    "table-deleted": Bad(["status", UNKNOWN], 1,
                         "Error: The DynamoDB table deleted does not exist (ResourceNotFoundException).",
                         env={"GPUCTL_TABLE_NAME": "deleted"}),
}


def _expand(world: World, text: str, config: Path) -> str:
    endpoint = (world.res.endpoint_url or "").removeprefix("http://")
    return world.expand(text).replace("{endpoint}", endpoint).replace("{config}", str(config))


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input(name: str, world: World, clean_env: Path, capsys: Any) -> None:
    """One sentence (the exact one) on stderr, the documented exit code, nothing on stdout, nothing written."""
    # GIVEN the bad input
    bad = BAD[name]
    env = world.res.env() | {k: _expand(world, v, clean_env) for k, v in bad.env.items()}
    before = world.counts or emulator_counts(world.res)
    # WHEN it is given to gpuctl
    got = invoke([_expand(world, a, clean_env) for a in bad.args], env, capsys)
    # THEN
    last = got.stderr.rstrip("\n").splitlines()[-1] if got.stderr else ""
    assert (got.code, last) == (bad.code, _expand(world, bad.message, clean_env)), got.stderr
    if not got.stderr.startswith(CLICK):
        assert got.stderr.count("\n") == 1, got.stderr  # one line: the sentence
    assert got.stdout == ""
    assert "Traceback" not in got.stderr and "site-packages" not in got.stderr
    world.counts = None  # counted again next time should this check fail
    assert emulator_counts(world.res) == before
    world.counts = before  # nothing was written: the next case starts from the same counts


def test_there_are_at_least_forty() -> None:
    """The issue asks for at least 40 named bad inputs."""
    assert len(BAD) >= 40


def test_no_message_echoes_a_password(world: World, clean_env: Path, capsys: Any) -> None:
    """URLs with a user or password are refused without the password ever being printed, wherever they go."""
    secret = "hunter2"
    cases = [
        [*QW, f"https://alice:{secret}@example.com/a.png", "--prompt", "p"],
        [*QW, S3, "--image2", f"https://alice:{secret}@example.com/b.png", "--prompt", "p"],
        [*QW, f"ftp://alice:{secret}@example.com/a.png", "--prompt", "p"],
        ["--endpoint-url", f"https://alice:{secret}@127.0.0.1:9", "queue", "stats"],
        ["config", "set", "queue_url", f"https://alice:{secret}@sqs.example.com/1/q"],
    ]
    for args in cases:
        got = invoke([_expand(world, a, clean_env) for a in args], world.res.env(), capsys)
        assert got.code == 2, (args, got.stderr)
        assert secret not in got.stderr + got.stdout, got.stderr
    rows = world.tmp / "password.jsonl"
    rows.write_text(json.dumps({"job_type": "qwen-image-edit", "prompt": "p",
                                "image": f"https://alice:{secret}@example.com/a.png"}) + "\n")
    got = invoke(["submit", "--from", str(rows)], world.res.env(), capsys)
    assert got.code == 2 and secret not in got.stderr, got.stderr

