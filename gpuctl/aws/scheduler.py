"""Read-only gateways for the scheduler's wiring, for `gpuctl doctor`: the Lambda's configuration (Lambda),
its alarms (CloudWatch) and its EventBridge rules (EventBridge) - one small class per service."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gpuctl.aws._errors import translate

__all__ = ["AlarmInfo", "Alarms", "FunctionInfo", "RuleInfo", "Rules", "SchedulerFunction"]


def _call(what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
    import botocore.exceptions

    try:
        return fn(**kwargs)
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
        raise translate(exc, what) from exc


@dataclass(frozen=True)
class FunctionInfo:
    name: str
    arn: str
    environment: dict[str, str] = field(default_factory=dict)


class SchedulerFunction:
    def __init__(self, client: Any, name: str) -> None:
        self._client = client
        self.name = name

    def configuration(self) -> FunctionInfo:
        """Raises: NotFound when the function does not exist."""
        answer = _call(f"the Lambda function {self.name}", self._client.get_function_configuration,
                       FunctionName=self.name)
        variables = answer.get("Environment", {}).get("Variables", {})
        return FunctionInfo(str(answer["FunctionName"]), str(answer["FunctionArn"]),
                            {str(k): str(v) for k, v in variables.items()})


@dataclass(frozen=True)
class AlarmInfo:
    name: str
    actions_enabled: bool
    actions: tuple[str, ...]


class Alarms:
    def __init__(self, client: Any) -> None:
        self._client = client

    def describe(self, name: str) -> AlarmInfo | None:
        answer = _call(f"the CloudWatch alarm {name}", self._client.describe_alarms, AlarmNames=[name])
        for alarm in [*answer.get("MetricAlarms", []), *answer.get("CompositeAlarms", [])]:
            return AlarmInfo(str(alarm["AlarmName"]), bool(alarm.get("ActionsEnabled", True)),
                             tuple(str(a) for a in alarm.get("AlarmActions", [])))
        return None


@dataclass(frozen=True)
class RuleInfo:
    name: str
    state: str
    targets: tuple[str, ...]


class Rules:
    def __init__(self, client: Any) -> None:
        self._client = client

    def describe(self, name: str) -> RuleInfo | None:
        from gpuctl.errors import NotFound

        try:
            rule = _call(f"the EventBridge rule {name}", self._client.describe_rule, Name=name)
        except NotFound:
            return None
        targets = _call(f"the EventBridge rule {name}", self._client.list_targets_by_rule, Rule=name)
        return RuleInfo(str(rule["Name"]), str(rule.get("State", "")),
                        tuple(str(t["Arn"]) for t in targets.get("Targets", [])))
