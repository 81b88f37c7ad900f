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
from gpuctl.errors import ConfigError, Conflict, NotFound, UsageError

if TYPE_CHECKING:
    from gpuctl.aws._session import AwsClients
    from gpuctl.settings import Settings

__all__ = [
    "OUTPUT_SETTINGS",
    "DeployPlan",
    "DeployResult",
    "DeploySources",
    "DestroyResult",
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
        elif output == "CdnDomain":
            values[setting] = None  # the CDN is off: forget a domain from an earlier deploy
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

    Raises:
        UsageError: a required value is missing or CloudFormation rejected a value.
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
    overrides: dict[str, str | None] = {
        "InstanceId": instance_id or (settings.instance_id if creating else None),
        "IdleMinutes": None if idle_minutes is None else str(idle_minutes),
        "MaxReceiveCount": None if max_receive_count is None else str(max_receive_count),
        "EnableCdn": None if enable_cdn is None else str(enable_cdn).lower(),
        "LambdaCodeBucket": artifacts.name,
        "LambdaCodeKey": bundle.key,
    }
    effective = _effective_parameters(declared, current, overrides)
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
class DestroyResult:
    stack_name: str
    stack_id: str
    deleted: bool
    forgotten: list[str] = field(default_factory=list)
    config_path: Path | None = None

    def document(self) -> dict[str, Any]:
        return {"stack_name": self.stack_name, "stack_id": self.stack_id,
                "status": "DELETE_COMPLETE" if self.deleted else "cancelled", "settings_removed": self.forgotten,
                "config_file": str(self.config_path) if self.config_path else None}


def _require_stack(stacks: Stacks, name: str, region: str | None) -> StackInfo:
    info = stacks.describe(name)
    if info is None:
        where = f" in {region}" if region else ""
        raise NotFound(f"There is no stack {name}{where}; `gpuctl deploy --stack {name}` creates it.")
    return info


def destroy(clients: AwsClients, settings: Settings, *, stack_name: str | None = None,
            confirm: Callable[[StackInfo], bool] | None = None, timeout: float = 3600.0,
            poll_delay: float = 5.0) -> DestroyResult:
    """Delete the stack and wait until it is gone; then drop the settings deploy recorded from it.

    ``confirm`` sees the stack before anything is deleted and may decline. Only profile values still equal
    to the stack's outputs are removed; region, endpoint and the instance id (not part of the stack) stay.

    Raises:
        NotFound: there is no such stack.
        Conflict: the stack is busy with another operation.
        StackFailed: deletion failed (the first failed resource and why).
        WaitTimeout: it was still deleting after ``timeout`` seconds.
    """
    from gpuctl.settings import read_profile, write_profile

    name = stack_name or settings.stack_name
    stacks = Stacks(clients.cloudformation)
    info = _require_stack(stacks, name, settings.region)
    if info.status.endswith("_IN_PROGRESS") and info.status not in ("REVIEW_IN_PROGRESS", "DELETE_IN_PROGRESS"):
        raise Conflict(f"The stack {name} is busy ({info.status}); wait for it to finish and try again.")
    if confirm is not None and not confirm(info):
        return DestroyResult(name, info.stack_id, deleted=False)
    stacks.delete_stack(name)
    stacks.wait_deleted(name, timeout=timeout, delay=max(1, round(poll_delay)))
    log.info("deploy.destroyed", extra={"stack": name, "stack_id": info.stack_id})
    profile = read_profile(settings.profile, settings.config_dir)
    recorded = {setting: info.outputs[output] for output, setting in OUTPUT_SETTINGS.items()
                if output in info.outputs and setting not in ("region", "instance_id")}
    forget = sorted(k for k, v in recorded.items() if profile.get(k) == v)
    path = None
    if forget:
        path = write_profile(settings.profile, dict.fromkeys(forget), settings.config_dir)
    return DestroyResult(name, info.stack_id, deleted=True, forgotten=forget, config_path=path)


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
