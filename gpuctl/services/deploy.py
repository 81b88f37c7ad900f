"""Deploy the stack: zip the Lambda, upload it, create or update the stack through a change set, follow
its events, and record its outputs in the profile so every other command works without environment
variables. Also destroy, status and outputs.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpuctl.aws.cfn import (
    SUCCESS_STATUSES,
    UPDATABLE_STATUSES,
    ArtifactBucket,
    NoChanges,
    ResourceChange,
    StackEvent,
    StackFailed,
    StackInfo,
    Stacks,
    caller_account,
    explain_failure,
)
from gpuctl.errors import ConfigError, Conflict, GpuctlError, NotFound, UsageError

if TYPE_CHECKING:
    from gpuctl.aws._session import AwsClients
    from gpuctl.settings import Settings

__all__ = [
    "OUTPUT_SETTINGS",
    "DeployPlan",
    "DeployResult",
    "DeploySources",
    "DestroyPlan",
    "DestroyResult",
    "Existing",
    "FleetSpec",
    "KeptData",
    "LambdaBundle",
    "build_lambda_zip",
    "deploy",
    "destroy",
    "find_sources",
    "stack_outputs",
    "stack_status",
]

log = logging.getLogger(__name__)

#: Stack output → the setting `gpuctl deploy` writes into the profile's config file.
OUTPUT_SETTINGS: dict[str, str] = {
    "QueueUrl": "queue_url",
    "DeadLetterQueueUrl": "dlq_url",
    "TableName": "table_name",
    "BucketName": "bucket",
    "InstanceId": "instance_id",
    "CdnDomain": "cdn_domain",
    "Region": "region",
    "LogGroupName": "scheduler_log_group",
    "HistoryTableName": "history_table",
    "FleetGroupName": "fleet_group",
}
# Only CAPABILITY_IAM is needed today (generated IAM names); NAMED_IAM keeps a template that names its
# roles deployable too. Both are acknowledgements, not permissions.
CAPABILITIES = ["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM"]
#: CloudFormation's limit for an inline TemplateBody; larger templates go through S3 (TemplateURL).
TEMPLATE_BODY_LIMIT = 51_200

_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry
_ZIP_MODE = 0o100644 << 16  # a regular file, rw-r--r--, in the high bits of external_attr (Unix)
_SKIP_DIRS = frozenset({"__pycache__"})
_SKIP_SUFFIXES = (".pyc", ".pyo")

Step = Callable[[str], None]


# --- sources: the template and the Lambda folder ---------------------------------------------------

@dataclass(frozen=True)
class DeploySources:
    template: Path
    lambda_dir: Path


def find_sources() -> DeploySources:
    """The template and the Lambda folder: a repository checkout first, else the copy bundled in the wheel.

    Raises:
        ConfigError: neither is there (a broken installation).
    """
    import gpuctl

    package = Path(gpuctl.__file__).resolve().parent
    for infra, code in ((package.parent / "infra", package.parent / "lambda"),
                        (package / "_bundled" / "infra", package / "_bundled" / "lambda")):
        template = infra / "cloudformation.yaml"
        if template.is_file() and (code / "handler.py").is_file():
            return DeploySources(template, code)
    raise ConfigError("gpuctl cannot find its CloudFormation template and Lambda code (infra/ and lambda/ "
                      "in a checkout, gpuctl/_bundled in an installed wheel): reinstall gpuctl.")


# --- the Lambda zip --------------------------------------------------------------------------------

@dataclass(frozen=True)
class LambdaBundle:
    """The zipped Lambda folder: byte-for-byte the same for the same files, so its hash names it."""

    data: bytes
    sha256: str
    files: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"lambda/gpuctl-lambda-{self.sha256[:16]}.zip"


def _included(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    if any(p in _SKIP_DIRS or p.startswith(".") for p in parts):
        return False
    return path.is_file() and not path.name.endswith(_SKIP_SUFFIXES)


def build_lambda_zip(folder: Path) -> LambdaBundle:
    """Zip ``folder`` deterministically: sorted entries, fixed timestamps and permissions, no bytecode.

    Raises:
        ConfigError: the folder has no handler.py.
    """
    if not (folder / "handler.py").is_file():
        raise ConfigError(f"The Lambda folder {folder} has no handler.py.")
    files = sorted((p.relative_to(folder).as_posix(), p) for p in folder.rglob("*") if _included(p, folder))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, path in files:
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # Unix, so external_attr means a mode whatever OS builds the zip
            info.external_attr = _ZIP_MODE
            archive.writestr(info, path.read_bytes(), compresslevel=9)
    data = buffer.getvalue()
    return LambdaBundle(data, hashlib.sha256(data).hexdigest(), tuple(name for name, _ in files))


# --- beside the running system: existing queue, dead-letter queue, table, bucket -----------------------

@dataclass(frozen=True)
class Existing:
    """Resources of the running system the stack uses instead of creating them (None: keep the stack's choice,
    for a new stack: create it)."""

    queue_url: str | None = None
    dlq_url: str | None = None
    table: str | None = None
    bucket: str | None = None

    def parameters(self) -> dict[str, str | None]:
        return {"ExistingQueueUrl": self.queue_url, "ExistingDeadLetterQueueUrl": self.dlq_url,
                "ExistingTableName": self.table, "ExistingBucketName": self.bucket}


def _queue_arn_parts(url: str) -> tuple[str, str]:
    """(account, name) of a queue URL (https://sqs.REGION.amazonaws.com/ACCOUNT/NAME, or an emulator's)."""
    parts = url.rstrip("/").split("/")
    if len(parts) < 5 or not parts[-2].isdigit():
        raise UsageError(f"{url!r} is not an SQS queue URL (https://sqs.REGION.amazonaws.com/ACCOUNT/NAME).")
    return parts[-2], parts[-1]


def check_existing(clients: AwsClients, existing: Existing, *, region: str, account: str) -> Existing:
    """Check the running system's resources before the stack points at them; fill in the dead-letter queue.

    The queue must exist in this region and account and have a redrive policy (without one a job that fails
    every time keeps the GPU up until its message expires); its dead-letter queue is the one that policy
    names (``dlq_url``, when given, must be that one). The table must exist and have the status index
    (``status-created_at-index``: hash ``status``, range ``created_at``), which listing and the scheduler use.

    Raises:
        UsageError: one sentence saying what is missing and how to add it.
    """
    from gpuctl.aws.dynamo import JobTable
    from gpuctl.aws.sqs import JobQueue

    dlq_url = existing.dlq_url
    if existing.queue_url:
        queue = JobQueue(clients.sqs, existing.queue_url)
        q_account, q_name = _queue_arn_parts(existing.queue_url)
        try:
            attrs = queue.attributes()
        except NotFound:
            raise UsageError(f"The queue {existing.queue_url} does not exist (in {region}); check the URL.") from None
        arn = attrs.get("QueueArn", "")
        if arn and (arn.split(":")[3], arn.split(":")[4]) != (region, account):
            raise UsageError(f"The queue {existing.queue_url} is in {arn.split(':')[3]} (account "
                             f"{arn.split(':')[4]}); deploy the stack in that region and account.")
        if queue.max_receive_count() is None:
            raise UsageError(
                f"The queue {q_name} has no redrive policy: a job that fails every time would be retried until its "
                "message expires, keeping the GPU up. Give it a dead-letter queue first, e.g. `aws sqs "
                f"set-queue-attributes --queue-url {existing.queue_url} --attributes '{{\"RedrivePolicy\": "
                f"\"{{\\\"deadLetterTargetArn\\\":\\\"arn:aws:sqs:{region}:{q_account}:{q_name}_dlq\\\","
                "\\\"maxReceiveCount\\\":\\\"5\\\"}\"}'` (after `aws sqs create-queue --queue-name "
                f"{q_name}_dlq`), then deploy again.")
        target = queue.dlq_url()
        if dlq_url and target and dlq_url.rstrip("/") != target.rstrip("/"):
            raise UsageError(f"The queue {q_name} dead-letters to {target}, not to {dlq_url}: leave out "
                             "--existing-dlq-url, or pass that queue.")
        dlq_url = dlq_url or target
    elif existing.dlq_url:
        raise UsageError("--existing-dlq-url needs --existing-queue-url (the dead-letter queue of that queue).")
    if existing.table:
        table = JobTable(clients.dynamodb, existing.table)
        try:
            info = table.describe()
        except NotFound:
            raise UsageError(f"The table {existing.table} does not exist (in {region}); check the name.") from None
        if not info.has_status_index():
            raise UsageError(
                f"The table {existing.table} has no status-created_at-index (hash key status, range key created_at, "
                "all attributes projected): gpuctl lists jobs and the scheduler counts open jobs with it. Add it "
                f"with `aws dynamodb update-table --table-name {existing.table} --attribute-definitions "
                "AttributeName=status,AttributeType=S AttributeName=created_at,AttributeType=N "
                "--global-secondary-index-updates '[{\"Create\": {\"IndexName\": \"status-created_at-index\", "
                "\"KeySchema\": [{\"AttributeName\": \"status\", \"KeyType\": \"HASH\"}, {\"AttributeName\": "
                "\"created_at\", \"KeyType\": \"RANGE\"}], \"Projection\": {\"ProjectionType\": \"ALL\"}}}]'`, "
                "wait until it is ACTIVE, then deploy again.")
    if existing.bucket:
        _check_bucket(clients, existing.bucket, region)
    return Existing(existing.queue_url, dlq_url, existing.table, existing.bucket)


def _check_bucket(clients: AwsClients, bucket: str, region: str) -> None:
    import botocore.exceptions

    from gpuctl.aws._errors import error_code, translate

    try:
        clients.s3.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as exc:
        if error_code(exc) in ("404", "NoSuchBucket", "NotFound"):
            raise UsageError(f"The bucket {bucket} does not exist; check the name.") from None
        raise translate(exc, f"the bucket {bucket}") from exc
    except botocore.exceptions.BotoCoreError as exc:
        raise translate(exc, f"the bucket {bucket}") from exc


# --- fleet mode (issue 13) -------------------------------------------------------------------------

#: The template's instance-type parameters (a mixed-instances policy of up to this many types).
MAX_FLEET_TYPES = 3


@dataclass(frozen=True)
class FleetSpec:
    """``gpuctl deploy --fleet``: an Auto Scaling group instead of one instance (``max_instances`` 0: back to
    single-instance mode)."""

    max_instances: int
    launch_template: str | None = None
    ami: str | None = None
    instance_types: tuple[str, ...] = ()
    subnets: tuple[str, ...] = ()
    jobs_per_instance: int | None = None

    def check(self) -> None:
        """Raises: UsageError: one sentence naming what is missing or wrong."""
        if self.max_instances == 0:
            return
        if not self.subnets:
            raise UsageError("--fleet needs --subnets (one or more subnet ids, ideally in several Availability "
                             "Zones, e.g. --subnets subnet-0a1b,subnet-2c3d).")
        if not self.launch_template and not (self.ami and self.instance_types):
            raise UsageError("--fleet needs --launch-template ID, or --ami AMI with --instance-type TYPE.")
        if self.launch_template and self.ami:
            raise UsageError("Give --launch-template or --ami, not both (the launch template names its AMI).")
        if len(self.instance_types) > MAX_FLEET_TYPES:
            raise UsageError(f"--instance-type takes at most {MAX_FLEET_TYPES} types, got "
                             f"{len(self.instance_types)}.")

    def parameters(self) -> dict[str, str | None]:
        if self.max_instances == 0:
            return {"FleetMaxInstances": "0"}
        types = [*self.instance_types, "", "", ""][:MAX_FLEET_TYPES]
        return {
            "FleetMaxInstances": str(self.max_instances),
            "FleetSubnets": ",".join(self.subnets),
            "FleetLaunchTemplateId": self.launch_template or "",
            "FleetAmiId": self.ami or "",
            **{f"FleetInstanceType{i + 1}": t for i, t in enumerate(types)},
            "FleetJobsPerInstance": None if self.jobs_per_instance is None else str(self.jobs_per_instance),
            "InstanceId": "",  # the group replaces the single instance
        }


# --- deploy ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeployPlan:
    """What a deploy is about to do: shown before it is executed (and all that --dry-run does)."""

    stack_name: str
    change_type: str  # CREATE | UPDATE
    changes: list[ResourceChange]
    parameters: dict[str, str]
    parameter_changes: dict[str, tuple[str | None, str]]  # key: (current, new)

    def document(self) -> dict[str, Any]:
        return {
            "change_type": self.change_type,
            "changes": [c.document() for c in self.changes],
            "parameters": dict(sorted(self.parameters.items())),
            "parameter_changes": {k: {"current": old, "new": new}
                                  for k, (old, new) in sorted(self.parameter_changes.items())},
        }


@dataclass(frozen=True)
class DeployResult:
    stack_name: str
    action: str  # created | updated | no-changes | dry-run | cancelled
    status: str | None
    code_bucket: str
    code_key: str
    code_sha256: str
    code_uploaded: bool
    plan: DeployPlan | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    config_path: Path | None = None
    settings_written: dict[str, Any] = field(default_factory=dict)

    def document(self) -> dict[str, Any]:
        """The stable JSON shape of ``gpuctl deploy --output json``."""
        return {
            "stack_name": self.stack_name,
            "action": self.action,
            "status": self.status,
            "plan": self.plan.document() if self.plan else None,
            "outputs": dict(sorted(self.outputs.items())),
            "lambda_code": {"bucket": self.code_bucket, "key": self.code_key, "sha256": self.code_sha256,
                            "uploaded": self.code_uploaded},
            "config_file": str(self.config_path) if self.config_path else None,
            "settings_written": {k: v for k, v in sorted(self.settings_written.items()) if v is not None},
        }


def _check_deployable(info: StackInfo | None) -> None:
    if info is None or info.status == "REVIEW_IN_PROGRESS" or info.status in UPDATABLE_STATUSES:
        return
    if info.status in ("ROLLBACK_COMPLETE", "ROLLBACK_FAILED", "CREATE_FAILED", "DELETE_FAILED"):
        raise Conflict(f"The stack {info.name} is {info.status} and cannot be updated: run "
                       f"`gpuctl destroy --stack {info.name}`, then deploy again.")
    if info.status == "UPDATE_ROLLBACK_FAILED":
        raise Conflict(f"The stack {info.name} is UPDATE_ROLLBACK_FAILED: continue the rollback in the "
                       "CloudFormation console (ContinueUpdateRollback), then deploy again.")
    raise Conflict(f"The stack {info.name} is busy ({info.status}); wait for it to finish "
                   "(`gpuctl stack status`) and deploy again.")


def _effective_parameters(declared: Mapping[str, str | None], current: Mapping[str, str],
                          overrides: Mapping[str, str | None]) -> dict[str, str]:
    """Each declared parameter's value: the flag, else the stack's current value, else the template default.

    A flag left out therefore never resets a setting; current values are sent explicitly rather than with
    UsePreviousValue (which the emulator cannot resolve for a parameter that took its default).

    Raises:
        UsageError: a required parameter has no value (the instance id of a new stack).
    """
    unknown = sorted(k for k, v in overrides.items() if v is not None and k not in declared)
    if unknown:
        raise UsageError(f"The template has no parameter {unknown[0]}; this gpuctl and its template do not match.")
    values: dict[str, str] = {}
    for key, default in declared.items():
        value = overrides.get(key)
        if value is None:
            value = current.get(key, default)
        if value is None:
            hint = " (pass --instance-id, or set GPU_INSTANCE_ID)" if key == "InstanceId" else ""
            raise UsageError(f"The stack needs a value for its parameter {key}{hint}.")
        values[key] = value
    return values


def _explicit(values: Mapping[str, str], declared: Mapping[str, str | None]) -> dict[str, str]:
    """The values to send: those that differ from the template default (an omitted one takes its default,
    on create and on update alike). Sending defaults too would make the emulator see every resource that
    refers to them as modified, and it silently drops resources it cannot update (the DynamoDB table)."""
    return {k: v for k, v in values.items() if v != declared.get(k)}


def _profile_values(settings: Settings, stack_name: str, outputs: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {"stack_name": stack_name}
    for output, setting in OUTPUT_SETTINGS.items():
        if output in outputs:
            values[setting] = outputs[output]
        elif output in ("CdnDomain", "FleetGroupName"):
            values[setting] = None  # the CDN is off / single-instance mode: forget it from an earlier deploy
    if settings.endpoint_url:
        values["endpoint_url"] = settings.endpoint_url
    return values


def _record(settings: Settings, stack_name: str, outputs: Mapping[str, str]) -> tuple[Path, dict[str, Any]]:
    from gpuctl.settings import write_profile

    values = _profile_values(settings, stack_name, outputs)
    path = write_profile(settings.profile, values, settings.config_dir)
    log.info("deploy.profile_written", extra={"profile": settings.profile, "path": str(path)})
    return path, values


def deploy(
    clients: AwsClients,
    settings: Settings,
    *,
    stack_name: str | None = None,
    instance_id: str | None = None,
    idle_minutes: int | None = None,
    enable_cdn: bool | None = None,
    max_receive_count: int | None = None,
    existing_resources: Existing | None = None,
    cdn_certificate_arn: str | None = None,
    cdn_domain: str | None = None,
    results_expire_days: int | None = None,
    fleet: FleetSpec | None = None,
    dry_run: bool = False,
    review: Callable[[DeployPlan], bool] | None = None,
    on_event: Callable[[StackEvent], None] | None = None,
    on_step: Step | None = None,
    sources: DeploySources | None = None,
    timeout: float = 3600.0,
    poll_delay: float = 5.0,
) -> DeployResult:
    """Create or update the stack through a change set and record its outputs in the profile.

    Flags left as None keep the stack's current value (or the template default for a new stack); the
    instance id of a new stack falls back to the ``instance_id`` setting. ``review`` sees the plan before it
    is executed and may decline it. With ``dry_run`` nothing is changed and the Lambda is not uploaded (only a
    template too large to send inline is, as CloudFormation must read it from S3): the change set is
    computed, returned and deleted, and a new stack's empty REVIEW_IN_PROGRESS shell is deleted too.

    ``existing_resources`` names the running system's queue, table and bucket to use instead of creating them (checked
    first, see :func:`check_existing`). ``fleet`` deploys fleet mode (an Auto Scaling group, see
    :class:`FleetSpec`); the profile then records the group as ``fleet_group``.

    Raises:
        UsageError: a required value is missing, an existing resource is missing or incomplete, or
            CloudFormation rejected a value.
        NotFound: the GPU instance does not exist.
        Conflict: the stack is busy or in a state that cannot be updated.
        StackFailed: the stack ended in a failure or rollback (the first failed resource and why).
        WaitTimeout: it did not finish within ``timeout`` seconds.
    """
    from gpuctl.aws._session import is_local_endpoint

    step = on_step or (lambda _message: None)
    name = stack_name or settings.stack_name
    sources = sources or find_sources()
    body = sources.template.read_text(encoding="utf-8")
    bundle = build_lambda_zip(sources.lambda_dir)
    stacks = Stacks(clients.cloudformation)
    region = str(clients.session.region_name)
    account = caller_account(clients.client("sts"))
    artifacts = ArtifactBucket(clients.s3, f"gpuctl-artifacts-{account}-{region}", region)
    result_base: dict[str, Any] = {"stack_name": name, "code_bucket": artifacts.name, "code_key": bundle.key,
                                   "code_sha256": bundle.sha256}

    existing = stacks.describe(name)
    _check_deployable(existing)
    creating = existing is None or existing.status == "REVIEW_IN_PROGRESS"
    current = {} if existing is None or creating else existing.parameters

    template = _template_source(body, artifacts, name, settings, step)
    declared = {p.key: p.default for p in stacks.template_parameters(
        body=template.get("TemplateBody"), url=template.get("TemplateURL"))}
    if fleet is not None:
        fleet.check()
        if instance_id and fleet.max_instances:
            raise UsageError("--instance-id is for single-instance mode; fleet mode launches its own instances.")
    given = existing_resources or Existing()
    if given != Existing():
        given = check_existing(clients, given, region=region, account=account)
    overrides: dict[str, str | None] = {
        "InstanceId": instance_id or (settings.instance_id if creating else None),
        "IdleMinutes": None if idle_minutes is None else str(idle_minutes),
        "MaxReceiveCount": None if max_receive_count is None else str(max_receive_count),
        "EnableCdn": None if enable_cdn is None else str(enable_cdn).lower(),
        "CdnCertificateArn": cdn_certificate_arn,
        "CdnAliases": cdn_domain,
        "ResultsExpireDays": None if results_expire_days is None else str(results_expire_days),
        "LambdaCodeBucket": artifacts.name,
        "LambdaCodeKey": bundle.key,
        **given.parameters(),
        **(fleet.parameters() if fleet is not None else {}),
    }
    if fleet is not None and fleet.max_instances == 0 and overrides["InstanceId"] is None:
        overrides["InstanceId"] = current.get("InstanceId") or None
    effective = _effective_parameters(declared, current, overrides)
    if effective.get("FleetMaxInstances", "0") == "0" and not effective.get("InstanceId"):
        raise UsageError("The stack needs a value for its parameter InstanceId (pass --instance-id, or set "
                         "GPU_INSTANCE_ID).")
    _check_cdn(effective)
    wanted = _explicit(effective, declared)
    if effective.get("InstanceId") and effective["InstanceId"] != current.get("InstanceId"):
        _check_instance(clients, effective["InstanceId"])
    changed = {k: (current.get(k), v) for k, v in effective.items() if current.get(k) != v}

    if existing is not None and not creating and not changed and stacks.template_body(name) == body:
        # Same template, same parameters: CloudFormation would answer "didn't contain changes".
        return _no_changes(settings, existing, result_base, record=not dry_run)

    uploaded = False
    if not dry_run:
        uploaded = _upload(artifacts, bundle, step)
    result_base["code_uploaded"] = uploaded

    change_type = "CREATE" if creating else "UPDATE"
    step(f"Preparing the change set ({change_type.lower()})…")
    try:
        change_set_id = stacks.create_change_set(
            name, f"gpuctl-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}", change_set_type=change_type,
            template=template, parameters=wanted, capabilities=CAPABILITIES,
            description=f"gpuctl deploy (lambda {bundle.sha256[:16]})",
        )
        change_set = stacks.wait_change_set(change_set_id)
        if change_set.no_changes:
            stacks.delete_change_set(change_set_id)
            raise NoChanges(f"Nothing to change in the stack {name}.")
    except NoChanges:
        info = stacks.describe(name)
        if info is None:
            raise
        return _no_changes(settings, info, result_base, record=not dry_run)
    plan = DeployPlan(name, change_type, change_set.changes, effective, changed)

    if dry_run or (review is not None and not review(plan)):
        _discard(stacks, change_set_id, name, drop_stack=existing is None)
        return DeployResult(**result_base, action="dry-run" if dry_run else "cancelled",
                            status=existing.status if existing else None, plan=plan)

    seen: set[str] = set()
    if creating and is_local_endpoint(settings.endpoint_url):
        # The local emulator (moto) never rebuilds a stack's outputs when it executes a change set
        # (moto/cloudformation/models.py execute_change_set), so a stack created through one has no
        # outputs there. Locally the reviewed change set is dropped and the same template and parameters
        # are created with CreateStack; on AWS the change set itself is executed.
        _discard(stacks, change_set_id, name, drop_stack=True)
        step("Creating the stack…")
        stack_id = stacks.create_stack(name, template=template, parameters=wanted, capabilities=CAPABILITIES)
    else:
        stack_id = change_set.stack_id or name
        seen = stacks.event_ids(stack_id)
        step("Creating the stack…" if creating else "Updating the stack…")
        stacks.execute_change_set(change_set_id)
    info, events = stacks.follow(stack_id, seen=seen, on_event=on_event, timeout=timeout, delay=poll_delay)
    if info.status not in SUCCESS_STATUSES:
        raise StackFailed(explain_failure(name, info.status, info.status_reason, events), status=info.status)
    log.info("deploy.done", extra={"stack": name, "status": info.status, "change_type": change_type})
    path, values = _record(settings, name, info.outputs)
    return DeployResult(**result_base, action="created" if creating else "updated", status=info.status,
                        plan=plan, outputs=info.outputs, config_path=path, settings_written=values)


def _check_cdn(values: Mapping[str, str]) -> None:
    """The template's rules, said before CloudFormation says them less plainly."""
    if values.get("EnableCdn") != "true":
        return
    if values.get("ExistingBucketName"):
        raise UsageError("--enable-cdn needs a bucket the stack creates (its bucket policy would replace the "
                         "existing bucket's); serve an existing bucket through its own CDN (set cdn_domain).")
    if not values.get("CdnCertificateArn") or not values.get("CdnAliases"):
        raise UsageError("--enable-cdn needs --cdn-certificate-arn and --cdn-domain: CloudFront's default "
                         "certificate cannot enforce TLS 1.2, so the CDN serves your own domain with an ACM "
                         "certificate from us-east-1.")


def _template_source(body: str, artifacts: ArtifactBucket, stack_name: str, settings: Settings,
                     step: Step) -> dict[str, str]:
    """``TemplateBody`` when it fits, else the template uploaded to the artifacts bucket (``TemplateURL``)."""
    from gpuctl.aws._session import is_local_endpoint

    data = body.encode("utf-8")
    if len(data) <= TEMPLATE_BODY_LIMIT:
        return {"TemplateBody": body}
    key = f"templates/{stack_name}-{hashlib.sha256(data).hexdigest()[:16]}.yaml"
    step(f"Uploading the template to s3://{artifacts.name}/{key}…")
    artifacts.ensure()
    if not artifacts.has(key):
        artifacts.put(key, data, content_type="application/x-yaml")
    return {"TemplateURL": artifacts.template_url(key, path_style_global=is_local_endpoint(settings.endpoint_url))}


def _upload(artifacts: ArtifactBucket, bundle: LambdaBundle, step: Step) -> bool:
    """Upload the Lambda zip unless an object with its hash is already there; True when it was uploaded."""
    if artifacts.ensure():
        step(f"Created the artifacts bucket {artifacts.name}.")
    if artifacts.has(bundle.key):
        return False
    step(f"Uploading the Lambda code to s3://{artifacts.name}/{bundle.key}…")
    artifacts.put(bundle.key, bundle.data)
    return True


def _check_instance(clients: AwsClients, instance_id: str) -> None:
    from gpuctl.aws.ec2 import GpuInstance

    GpuInstance(clients.ec2, instance_id).describe()


def _discard(stacks: Stacks, change_set_id: str, name: str, *, drop_stack: bool) -> None:
    """Delete an unexecuted change set, and the empty REVIEW_IN_PROGRESS stack a CREATE change set made."""
    stacks.delete_change_set(change_set_id)
    if drop_stack:
        info = stacks.describe(name)
        if info is not None and info.status == "REVIEW_IN_PROGRESS":
            stacks.delete_stack(name)


def _no_changes(settings: Settings, info: StackInfo, base: Mapping[str, Any], *, record: bool) -> DeployResult:
    """Nothing to deploy; the outputs are still recorded (deploy is also how a new machine gets its config)."""
    path, values = _record(settings, info.name, info.outputs) if record else (None, {})
    return DeployResult(**{**base, "code_uploaded": False}, action="no-changes", status=info.status,
                        outputs=info.outputs, config_path=path, settings_written=values)


# --- destroy, status, outputs ----------------------------------------------------------------------

@dataclass(frozen=True)
class KeptData:
    """A data store the stack created and keeps when it is deleted (DeletionPolicy Retain)."""

    kind: str  # table | bucket
    name: str
    count: int | None  # items / objects, None when it could not be counted
    exact: bool = True  # False: at least ``count``

    @property
    def counted(self) -> str:
        noun = "items" if self.kind == "table" else "objects"
        if self.count is None:
            return f"an unknown number of {noun}"
        return f"{'' if self.exact else 'at least '}{self.count} {noun[:-1] if self.count == 1 else noun}"

    def how_to_remove(self) -> str:
        if self.kind == "table":
            return (f"aws dynamodb update-table --table-name {self.name} --no-deletion-protection-enabled && "
                    f"aws dynamodb delete-table --table-name {self.name}")
        return (f"empty s3://{self.name} of every object version (it is versioned), e.g. in the S3 console, then "
                f"aws s3 rb s3://{self.name}")

    def document(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "count": self.count, "count_exact": self.exact,
                "how_to_remove": self.how_to_remove()}


@dataclass(frozen=True)
class DestroyPlan:
    """What destroy is about to delete and keep, shown before it asks."""

    info: StackInfo
    kept: list[KeptData]
    queued_messages: int | None  # messages in a queue the stack created (lost with it)
    existing: dict[str, str]  # resources of the running system the stack only pointed at: untouched


@dataclass(frozen=True)
class DestroyResult:
    stack_name: str
    stack_id: str
    deleted: bool
    forgotten: list[str] = field(default_factory=list)
    config_path: Path | None = None
    kept: list[KeptData] = field(default_factory=list)
    data_deleted: list[KeptData] = field(default_factory=list)
    untouched: dict[str, str] = field(default_factory=dict)

    def document(self) -> dict[str, Any]:
        return {"stack_name": self.stack_name, "stack_id": self.stack_id,
                "status": "DELETE_COMPLETE" if self.deleted else "cancelled", "settings_removed": self.forgotten,
                "config_file": str(self.config_path) if self.config_path else None,
                "kept": [k.document() for k in self.kept],
                "data_deleted": [{"kind": k.kind, "name": k.name, "count": k.count} for k in self.data_deleted],
                "untouched": dict(sorted(self.untouched.items()))}


def _require_stack(stacks: Stacks, name: str, region: str | None) -> StackInfo:
    info = stacks.describe(name)
    if info is None:
        where = f" in {region}" if region else ""
        raise NotFound(f"There is no stack {name}{where}; `gpuctl deploy --stack {name}` creates it.")
    return info


def _destroy_plan(clients: AwsClients, info: StackInfo) -> DestroyPlan:
    """What the stack keeps (the table and bucket it created, counted) and what it only pointed at."""
    from gpuctl.aws.dynamo import JobTable
    from gpuctl.aws.sqs import JobQueue

    params, outputs = info.parameters, info.outputs
    kept: list[KeptData] = []
    existing = {k: v for k, v in (("queue", params.get("ExistingQueueUrl", "")),
                                  ("dead-letter queue", params.get("ExistingDeadLetterQueueUrl", "")),
                                  ("table", params.get("ExistingTableName", "")),
                                  ("bucket", params.get("ExistingBucketName", ""))) if v}
    table_name, bucket = outputs.get("TableName"), outputs.get("BucketName")
    if table_name and "table" not in existing:
        try:
            count, exact = JobTable(clients.dynamodb, table_name).count_items()
        except GpuctlError:
            count, exact = None, False
        kept.append(KeptData("table", table_name, count, exact))
    if bucket and "bucket" not in existing:
        kept.append(KeptData("bucket", bucket, *_count_objects(clients, bucket)))
    queued: int | None = None
    if outputs.get("QueueUrl") and "queue" not in existing:
        try:
            stats = JobQueue(clients.sqs, outputs["QueueUrl"]).stats(include_dlq=False)
            queued = stats.visible + stats.in_flight + stats.delayed
        except GpuctlError:
            queued = None
    return DestroyPlan(info, kept, queued, existing)


def _count_objects(clients: AwsClients, bucket: str, *, max_pages: int = 10) -> tuple[int | None, bool]:
    """Object versions in the bucket (and delete markers), up to ``max_pages`` pages of 1,000."""
    import botocore.exceptions

    kwargs: dict[str, Any] = {"Bucket": bucket}
    total = 0
    try:
        for _ in range(max_pages):
            page = clients.s3.list_object_versions(**kwargs)
            total += len(page.get("Versions", [])) + len(page.get("DeleteMarkers", []))
            if not page.get("IsTruncated"):
                return total, True
            kwargs.update(KeyMarker=page.get("NextKeyMarker"), VersionIdMarker=page.get("NextVersionIdMarker"))
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError):
        return None, False
    return total, False


def _empty_and_delete_bucket(clients: AwsClients, bucket: str) -> None:
    """Delete every object version and delete marker, 1,000 a request, then the bucket."""
    import botocore.exceptions

    from gpuctl.aws._errors import translate

    try:
        paginator = clients.s3.get_paginator("list_object_versions")
        for page in paginator.paginate(Bucket=bucket):
            keys = [{"Key": v["Key"], "VersionId": v["VersionId"]}
                    for v in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]]
            for start in range(0, len(keys), 1000):
                clients.s3.delete_objects(Bucket=bucket, Delete={"Objects": keys[start:start + 1000],  # type: ignore[typeddict-item]
                                                                 "Quiet": True})
        clients.s3.delete_bucket(Bucket=bucket)
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
        raise translate(exc, f"the bucket {bucket}") from exc


def destroy(clients: AwsClients, settings: Settings, *, stack_name: str | None = None,
            confirm: Callable[[DestroyPlan], bool] | None = None, delete_data: bool = False,
            confirm_data: Callable[[DestroyPlan], bool] | None = None, timeout: float = 3600.0,
            poll_delay: float = 5.0) -> DestroyResult:
    """Delete the stack and wait until it is gone; then drop the settings deploy recorded from it.

    The table and the bucket the stack created are kept (DeletionPolicy Retain; the table's deletion protection
    stays on) and reported in ``kept`` with how to remove them. With ``delete_data`` they are deleted too, once
    ``confirm_data`` (which sees their names and counts) agreed. Resources of the running system that the stack
    only pointed at (``--existing-...``) are never touched. ``confirm`` sees the plan before anything is deleted
    and may decline. Only profile values still equal to the stack's outputs are removed; region, endpoint and the
    instance id (not part of the stack) stay.

    Raises:
        NotFound: there is no such stack.
        Conflict: the stack is busy with another operation.
        StackFailed: deletion failed (the first failed resource and why).
        WaitTimeout: it was still deleting after ``timeout`` seconds.
    """
    from gpuctl.aws.dynamo import JobTable
    from gpuctl.settings import read_profile, write_profile

    name = stack_name or settings.stack_name
    stacks = Stacks(clients.cloudformation)
    info = _require_stack(stacks, name, settings.region)
    if info.status.endswith("_IN_PROGRESS") and info.status not in ("REVIEW_IN_PROGRESS", "DELETE_IN_PROGRESS"):
        raise Conflict(f"The stack {name} is busy ({info.status}); wait for it to finish and try again.")
    plan = _destroy_plan(clients, info)
    if confirm is not None and not confirm(plan):
        return DestroyResult(name, info.stack_id, deleted=False)
    remove_data = delete_data and bool(plan.kept) and (confirm_data is None or confirm_data(plan))
    if delete_data and plan.kept and not remove_data:
        return DestroyResult(name, info.stack_id, deleted=False)
    stacks.delete_stack(name)
    stacks.wait_deleted(name, timeout=timeout, delay=max(1, round(poll_delay)))
    log.info("deploy.destroyed", extra={"stack": name, "stack_id": info.stack_id})
    deleted: list[KeptData] = []
    if remove_data:
        for data in plan.kept:
            if data.kind == "table":
                JobTable(clients.dynamodb, data.name).delete_table(timeout=timeout)
            else:
                _empty_and_delete_bucket(clients, data.name)
            deleted.append(data)
            log.info("deploy.data_deleted", extra={"kind": data.kind, "name": data.name})
    profile = read_profile(settings.profile, settings.config_dir)
    recorded = {setting: info.outputs[output] for output, setting in OUTPUT_SETTINGS.items()
                if output in info.outputs and setting not in ("region", "instance_id")}
    forget = sorted(k for k, v in recorded.items() if profile.get(k) == v)
    path = None
    if forget:
        path = write_profile(settings.profile, dict.fromkeys(forget), settings.config_dir)
    kept = [k for k in plan.kept if k not in deleted]
    return DestroyResult(name, info.stack_id, deleted=True, forgotten=forget, config_path=path, kept=kept,
                         data_deleted=deleted, untouched=plan.existing)


def stack_status(clients: AwsClients, settings: Settings, *, stack_name: str | None = None) -> StackInfo:
    """The stack's status, parameters and outputs.

    Raises:
        NotFound: there is no such stack.
    """
    name = stack_name or settings.stack_name
    return _require_stack(Stacks(clients.cloudformation), name, settings.region)


def stack_outputs(clients: AwsClients, settings: Settings, *, stack_name: str | None = None) -> dict[str, str]:
    """The stack's outputs (``OutputKey`` → value).

    Raises:
        NotFound: there is no such stack.
    """
    return dict(sorted(stack_status(clients, settings, stack_name=stack_name).outputs.items()))
