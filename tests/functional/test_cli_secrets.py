"""No credential, token, signature or request body in any output at any verbosity; shell completion works."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from gpuctl.cli._logging import SecretFilter, redact
from tests.helpers import Resources, png_bytes, put_object, run_cli

TOKEN = "IQoJb3JpZ2luX2VjEXAMPLESESSIONTOKENVALUE0123456789"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@pytest.mark.server
def test_very_verbose_output_carries_no_secret_and_no_body(server_aws: Resources) -> None:
    """`-vv submit` and `-vv result --url` log botocore's debug lines without the session token, the secret key,
    the Authorization header, a signature or the request bodies (the prompt)."""
    # GIVEN credentials with a session token, and a job to submit whose prompt must not be logged
    env = server_aws.env() | {"AWS_SESSION_TOKEN": TOKEN, "AWS_SECRET_ACCESS_KEY": SECRET}
    uri = put_object(server_aws, "in.png", png_bytes())
    # WHEN commands run at -vv
    submit = run_cli(["-vv", "submit", "qwen-image-edit", uri, "--prompt", "PROMPT-NOT-LOGGED", "-q"], env)
    status = run_cli(["-vv", "status", submit.stdout.strip()], env)
    # THEN botocore was heard from, but nothing secret was said
    assert submit.returncode == 0 and status.returncode == 0, submit.stderr[-2000:] + status.stderr[-2000:]
    logged = submit.stderr + status.stderr
    assert "Making request for OperationModel(name=PutItem)" in logged and "DEBUG botocore" in logged
    for needle in (TOKEN, SECRET, "X-Amz-Security-Token: ", "Authorization", "Signature=", "AWS4-HMAC-SHA256",
                   "PROMPT-NOT-LOGGED", "Response body"):
        assert needle not in logged, needle


def test_the_filter_masks_what_botocore_would_print() -> None:
    """Header dicts, canonical requests, presigned query strings and credential JSON are masked."""
    lines = [
        "Sending http request: <AWSPreparedRequest stream_output=False, method=POST, url=https://x/, "
        "headers={'Authorization': b'AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261201, Signature=abc123', "
        f"'X-Amz-Security-Token': b'{TOKEN}'}}>",
        f"CanonicalRequest:\nPOST\n/\n\nhost:x\nx-amz-security-token:{TOKEN}\n",
        f"https://b.s3.amazonaws.com/k?X-Amz-Credential=AKID%2F&X-Amz-Signature=deadbeef&X-Amz-Security-Token={TOKEN}",
        f'{{"Credentials": {{"SecretAccessKey": "{SECRET}", "SessionToken": "{TOKEN}"}}}}',
        "Making request for OperationModel(name=PutItem) with params: {'body': b'{\"prompt\": \"secret\"}'}",
    ]
    for line in lines:
        masked = redact(line, [TOKEN, SECRET])
        for needle in (TOKEN, SECRET, "abc123", "deadbeef", '"secret"'):
            assert needle not in masked, (line, masked)


def test_signature_records_are_dropped() -> None:
    """Records of botocore.auth (canonical request, string to sign, signature) never reach the handler."""
    record = logging.LogRecord("botocore.auth", logging.DEBUG, __file__, 1, "Signature:\n%s", ("deadbeef",), None)
    assert SecretFilter().filter(record) is False


def test_shell_completion_script_and_completions(tmp_path: os.PathLike[str]) -> None:
    """`gpuctl completion bash` prints a script; the completion protocol it uses answers with gpuctl's commands."""
    script = run_cli(["completion", "bash"], {})
    assert script.returncode == 0 and "_GPUCTL_COMPLETE=complete_bash" in script.stdout
    env = {**os.environ, "_GPUCTL_COMPLETE": "complete_bash", "COMP_WORDS": "gpuctl jo", "COMP_CWORD": "1"}
    proc = subprocess.run([sys.executable, "-m", "gpuctl"], env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert "jobs" in proc.stdout.split()
