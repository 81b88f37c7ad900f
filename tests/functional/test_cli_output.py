"""Machine output that never lies: every JSON document matches its schema, -q prints one value (and its help
says which), nothing is cut when piped or on a narrow terminal, one time convention, no escape codes unless a
terminal asked for colour."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import typer.main

from gpuctl import schemas
from gpuctl.cli import app
from gpuctl.models import CANCEL_MESSAGE, JobRecord, JobStatus, JobType
from tests.helpers import REGION, Resources, invoke, png_bytes, put_object

pytestmark = pytest.mark.server

ISO_AGE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \((just now|\d+ (s|min|h|d) ago|in \d+ (s|min|h|d))\)")
LONG_URL = "s3://gpuctl-test-bucket/results/qwen-image-edit/" + "a-very-long-result-name-" * 4 + "x.png"


def _seed(res: Resources, status: JobStatus, **fields: Any) -> JobRecord:
    from gpuctl.aws.dynamo import JobTable
    from tests.helpers import _test_client

    now = time.time() - 30
    record = JobRecord(task_id=str(uuid.uuid4()), status=status, job_type=JobType.QWEN_IMAGE_EDIT.api_path,
                       job_kind="qwen-image-edit", created_at=now, updated_at=now,
                       request={"image_url": f"s3://{res.bucket}/in.png", "prompt": "p"}, **fields)
    JobTable(_test_client("dynamodb", res.endpoint_url), res.table_name).create(record)
    return record


def _commands(group: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    found = [(path, group)]
    if isinstance(getattr(group, "commands", None), dict):
        for name, command in sorted(group.commands.items()):
            found += _commands(command, (*path, name))
    return found


ALL = _commands(typer.main.get_command(app))
TEXT_ONLY = {("config", "set"), ("config", "unset"), ("config", "path"), ("completion",), ("local", "comfyui"),
             ("adapter", "run"), ("serve",)}  # serve: a daemon, its documents are the HTTP API's (OpenAPI)


def test_every_command_with_json_output_has_a_schema() -> None:
    """Each command that prints data has a schema definition, and each definition exists in the file."""
    leaves = {path for path, command in ALL if path and not isinstance(getattr(command, "commands", None), dict)}
    documented = {tuple(name.split()) for name in schemas.COMMANDS if "--" not in name}
    assert leaves - TEXT_ONLY - documented == set()
    for name in schemas.COMMANDS:
        schemas.definition(name)  # raises for a definition missing from the file
    jsonschema.Draft202012Validator.check_schema(schemas.load())


def test_every_quiet_option_says_which_value_it_prints() -> None:
    """`-q` help names the value of that command ("Print only the job id", "… the state …"), never a generic
    "job ids" on a command that prints none."""
    seen = 0
    for path, command in ALL:
        for param in getattr(command, "params", []):
            if param.name == "quiet" and path:
                seen += 1
                assert param.help.startswith("Print only "), (path, param.help)
                assert "(job ids)" not in param.help, path
    assert seen >= 20


def test_documents_match_their_schemas(server_aws: Resources, capsys: Any, tmp_path: Path) -> None:
    """The documents the exit-code table does not print: instance start/stop, release, queue redrive/purge,
    local down, and local up / demo built from their results."""
    env = server_aws.env() | {"GPUCTL_LOCAL_DIR": str(tmp_path / "local")}
    for args, name in ((["instance", "start"], "instance start"), (["instance", "stop", "--force"], "instance stop"),
                       (["instance", "hold", "--for", "1h"], "instance hold"),
                       (["instance", "release"], "instance release"), (["queue", "redrive"], "queue redrive"),
                       (["queue", "purge", "--yes"], "queue purge"), (["local", "down"], "local down")):
        got = invoke([*args, "--output", "json"], env, capsys)
        assert got.code == 0, (args, got.stderr)
        jsonschema.validate(json.loads(got.stdout), schemas.definition(name))
    from gpuctl.services.demo import DemoJob, DemoResult
    from gpuctl.services.local import BoxView, ComponentHealth, StatusResult, UpResult

    box = BoxView("up", "i-1", "running", 1.0e9, 2.0, "the adapter polls the queue", "http://127.0.0.1:8188", False,
                  300.0, boot_started_at=1.0e9, up_at=1.0e9 + 4, boot_seconds=4.0)
    status = StatusResult(True, tmp_path, "http://127.0.0.1:5000", False, "local",
                          [ComponentHealth("emulator", 123, True, True, "http://127.0.0.1:5000", "/x.log"),
                           ComponentHealth("adapter", 124, True, True, None, "/a.log", on_box=True)], box)
    up = UpResult("started", status, 12.3, tmp_path / "local.toml", [], ["alarm"])
    demo = DemoResult(tmp_path, up, [DemoJob("camera-angle", str(uuid.uuid4()), 0.2, 1.0, 2.0, 2.4, 0.1, 0.05,
                                             "completed", "s3://b/k.png", tmp_path / "a.png")], tmp_path / "s.png",
                      7.0, 1.2, 19.3, "off", box)
    jsonschema.validate(up.document(), schemas.definition("local up"))
    jsonschema.validate(status.document(), schemas.definition("local status"))
    jsonschema.validate(demo.document(), schemas.definition("demo"))
    from adapter.backends import Readiness

    report = Readiness("comfyui", "http://127.0.0.1:8188", False, problems=("no model",), checked=("models",))
    jsonschema.validate(report.to_dict(), schemas.definition("adapter check"))


def _one_line(got: Any) -> str:
    assert got.code == 0, got.stderr
    lines = got.stdout.splitlines()
    assert len(lines) == 1, got.stdout
    return lines[0]


def test_quiet_prints_the_one_essential_value(server_aws: Resources, capsys: Any, tmp_path: Path) -> None:
    """-q prints exactly the value its help names, one line, nothing else on stdout or stderr."""
    env = server_aws.env()
    uri = put_object(server_aws, "in.png", png_bytes())
    put_object(server_aws, "results/out.png", png_bytes((4, 4)))
    done = _seed(server_aws, JobStatus.COMPLETED, result_s3_uri=f"s3://{server_aws.bucket}/results/out.png")
    failed = _seed(server_aws, JobStatus.FAILED, error_message="boom")
    job = _one_line(invoke(["submit", "qwen-image-edit", uri, "--prompt", "p", "--no-start", "-q"], env, capsys))
    assert uuid.UUID(job)
    assert _one_line(invoke(["status", job, "-q"], env, capsys)) == "pending"
    assert _one_line(invoke(["jobs", "cancel", job, "-q"], env, capsys)) == job
    retried = _one_line(invoke(["jobs", "retry", failed.task_id, "--no-start", "-q"], env, capsys))
    assert uuid.UUID(retried) and retried != failed.task_id
    assert _one_line(invoke(["result", done.task_id, "-o", f"{tmp_path}/", "-q"], env, capsys)) == \
        f"{tmp_path}/{done.task_id}.png"
    assert _one_line(invoke(["result", done.task_id, "--url", "-q"], env, capsys)).startswith("http")
    assert _one_line(invoke(["watch", done.task_id, "-q"], env, capsys)) == done.result_s3_uri
    assert _one_line(invoke(["instance", "status", "-q"], env, capsys)) in ("running", "stopped")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ",
                        _one_line(invoke(["instance", "hold", "--for", "2h", "-q"], env, capsys)))
    assert _one_line(invoke(["queue", "stats", "-q"], env, capsys)).isdigit()
    listed = invoke(["jobs", "list", "-q"], env, capsys)
    assert listed.code == 0 and {done.task_id, failed.task_id, job, retried} == set(listed.stdout.split())
    shown = invoke(["config", "show", "-q"], env, capsys)
    assert f"queue_url={server_aws.queue_url}" in shown.stdout.splitlines()
    path = _one_line(invoke(["config", "set", "region", REGION, "-q"], env, capsys))
    assert path.endswith("default.toml")


def test_nothing_is_cut_when_piped(server_aws: Resources, capsys: Any) -> None:
    """Piped, tables are plain lines with every id, URL and error whole; times are ISO 8601 UTC with an age."""
    # GIVEN jobs with a long result URL and a long error
    error = "the backend said: " + "very long reason " * 10 + "end"
    done = _seed(server_aws, JobStatus.COMPLETED, result_s3_uri=LONG_URL)
    bad = _seed(server_aws, JobStatus.FAILED, error_message=error)
    cancelled = _seed(server_aws, JobStatus.FAILED, error_message=CANCEL_MESSAGE)
    # WHEN they are listed and shown as text (stdout is not a terminal here)
    listed = invoke(["jobs", "list"], server_aws.env(), capsys)
    status = invoke(["status", done.task_id], server_aws.env(), capsys)
    # THEN each row is one line holding the full values, with no ellipsis
    assert listed.code == 0 and "…" not in listed.stdout and "\x1b" not in listed.stdout + listed.stderr
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert LONG_URL in rows[done.task_id] and error in rows[bad.task_id]
    assert " cancelled " in rows[cancelled.task_id]
    assert ISO_AGE.search(rows[done.task_id])
    assert LONG_URL in status.stdout and ISO_AGE.search(status.stdout)
    assert re.search(r"^status +completed$", status.stdout, re.M)


def _on_a_terminal(args: list[str], env: dict[str, str], *, columns: int) -> str:
    """Run gpuctl with stdout/stderr on a pseudo-terminal of ``columns`` columns; returns what it printed."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    full_env = {**os.environ, **env, "COLUMNS": str(columns), "TERM": "xterm-256color"}
    proc = subprocess.Popen([sys.executable, "-m", "gpuctl", *args], stdin=subprocess.DEVNULL, stdout=slave,
                            stderr=slave, env=full_env, close_fds=True)
    os.close(slave)
    output = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    os.close(master)
    assert proc.wait(timeout=60) == 0, output
    return output.decode()


def test_a_narrow_terminal_folds_values_instead_of_cutting_them(server_aws: Resources) -> None:
    """On a 60-column terminal the table folds long values over lines; no value is cut short with '…'."""
    done = _seed(server_aws, JobStatus.COMPLETED, result_s3_uri=LONG_URL)
    shown = _on_a_terminal(["jobs", "list"], server_aws.env() | {"NO_COLOR": "1"}, columns=60)
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown)
    assert "…" not in plain
    # the one row's cells are folded over several lines: joined up column by column, each value is whole
    body = plain.split("┩", 1)[1].split("└", 1)[0]
    columns: dict[int, str] = {}
    for line in body.strip().splitlines():
        for i, piece in enumerate(line.split("│")[1:-1]):
            columns[i] = columns.get(i, "") + piece.strip()
    assert columns[0] == done.task_id
    assert columns[len(columns) - 1] == LONG_URL


def test_no_color_on_a_terminal_prints_no_style_codes(server_aws: Resources) -> None:
    """NO_COLOR=1 on a terminal: no colour or style codes; without it the same output is styled (so this test
    can tell)."""
    done = _seed(server_aws, JobStatus.COMPLETED, result_s3_uri="s3://b/k.png")
    sgr = re.compile(r"\x1b\[[0-9;]*m")
    plain = _on_a_terminal(["status", done.task_id], server_aws.env() | {"NO_COLOR": "1"}, columns=120)
    styled = _on_a_terminal(["status", done.task_id], server_aws.env() | {"NO_COLOR": ""}, columns=120)
    assert done.task_id in plain and not sgr.search(plain)
    assert sgr.search(styled)
