"""What the emulator's CloudFormation skips, created with the API calls CloudFormation would make.

moto's CloudFormation silently skips AWS::CloudWatch::Alarm and ignores a table's TimeToLiveSpecification
(reference/moto-capabilities.md §6). Both are read from the deployed template and created with the API calls
CloudFormation would make, so they cannot drift from it; an endpoint that did create them (LocalStack) is
left as it is. Also skipped, and not needed locally: the bucket policy (moto does not enforce policies),
CloudFront (off unless --enable-cdn), and the schedule rule's and alarm's invocations (the scheduler loop
stands in for them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from gpuctl.aws._session import AwsClients
from gpuctl.errors import GpuctlError

__all__ = ["fill_gaps"]

log = logging.getLogger(__name__)

Step = Callable[[str], None]
_NO_VALUE = object()  # what Ref AWS::NoValue resolves to: the key (or list item) is left out


def _cfn_yaml(text: str) -> dict[str, Any]:
    """Parse a CloudFormation YAML template, short-form intrinsics (!Ref, !Sub …) as their long form."""
    import yaml

    class Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]  # libyaml: 5x faster
        pass

    def construct(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
        value: Any
        if isinstance(node, yaml.ScalarNode):
            value = loader.construct_scalar(node)
        elif isinstance(node, yaml.SequenceNode):
            value = loader.construct_sequence(node, deep=True)
        else:
            assert isinstance(node, yaml.MappingNode)
            value = loader.construct_mapping(node, deep=True)
        if suffix == "GetAtt" and isinstance(value, str):
            value = value.split(".", 1)
        return {suffix if suffix in ("Ref", "Condition") else f"Fn::{suffix}": value}

    Loader.add_multi_constructor("!", construct)
    data = yaml.load(text, Loader=Loader)
    return data if isinstance(data, dict) else {}


class _Resolver:
    """Resolves Ref / Fn::Sub / Fn::GetAtt against the deployed stack (what CloudFormation would pass)."""

    def __init__(self, clients: AwsClients, stack_name: str, template: Mapping[str, Any]) -> None:
        self._clients = clients
        self._template = template
        stack = clients.cloudformation.describe_stacks(StackName=stack_name)["Stacks"][0]
        declared = template.get("Parameters", {})
        self._refs: dict[str, str] = {k: str(v.get("Default", "")) for k, v in declared.items()}
        self._refs.update({p["ParameterKey"]: p.get("ParameterValue", "") for p in stack.get("Parameters", [])})
        account = clients.client("sts").get_caller_identity()["Account"]
        self._refs.update({"AWS::StackName": stack["StackName"], "AWS::StackId": stack["StackId"],
                           "AWS::Region": str(clients.session.region_name), "AWS::AccountId": str(account),
                           "AWS::Partition": "aws", "AWS::URLSuffix": "amazonaws.com"})
        resources = clients.cloudformation.describe_stack_resources(StackName=stack_name)["StackResources"]
        # Skipped resources come back as entries without a LogicalResourceId: .get() (moto quirk).
        self._physical = {r["LogicalResourceId"]: r.get("PhysicalResourceId", "")
                          for r in resources if r.get("LogicalResourceId")}
        self._refs.update(self._physical)
        self._conditions: dict[str, bool] = {}

    def physical(self, logical_id: str) -> str | None:
        return self._physical.get(logical_id)

    def resolve(self, value: Any) -> Any:
        """``value`` with every intrinsic function replaced by what CloudFormation would pass (only the taken
        branch of an ``Fn::If`` is resolved; ``AWS::NoValue`` drops its key or list item)."""
        if isinstance(value, list):
            return [r for r in (self.resolve(v) for v in value) if r is not _NO_VALUE]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            (key, arg), = value.items()
            if key == "Ref":
                return _NO_VALUE if arg == "AWS::NoValue" else self._ref(str(arg))
            if key == "Fn::GetAtt":
                return self._get_att(str(arg[0]), str(arg[1]))
            if key == "Fn::Sub":
                return self._sub(arg)
            if key == "Fn::If":
                name, when_true, when_false = arg
                return self.resolve(when_true if self.condition(str(name)) else when_false)
            if key == "Fn::Select":
                return self.resolve(arg[1])[int(self.resolve(arg[0]))]
            if key == "Fn::Split":
                return str(self.resolve(arg[1])).split(str(arg[0]))
            if key == "Fn::Join":
                return str(arg[0]).join(str(v) for v in self.resolve(arg[1]))
            if key.startswith("Fn::"):
                raise GpuctlError(f"Local mode cannot resolve {key} in the template; extend "
                                  "gpuctl/local/stack_gaps.py (_Resolver).")
        resolved = {k: self.resolve(v) for k, v in value.items()}
        return {k: v for k, v in resolved.items() if v is not _NO_VALUE}

    def condition(self, name: str) -> bool:
        """A condition of the template, evaluated with the stack's parameters."""
        if name not in self._conditions:
            declared = self._template.get("Conditions", {})
            if name not in declared:
                raise GpuctlError(f"The template has no condition {name}.")
            self._conditions[name] = self._truth(declared[name])
        return self._conditions[name]

    def _truth(self, value: Any) -> bool:
        (key, arg), = dict(value).items()
        if key == "Condition":
            return self.condition(str(arg))
        if key == "Fn::Equals":
            return str(self.resolve(arg[0])) == str(self.resolve(arg[1]))
        if key == "Fn::Not":
            return not self._truth(arg[0])
        if key == "Fn::And":
            return all(self._truth(v) for v in arg)
        if key == "Fn::Or":
            return any(self._truth(v) for v in arg)
        raise GpuctlError(f"Local mode cannot evaluate the condition function {key}; extend "
                          "gpuctl/local/stack_gaps.py (_Resolver._truth).")

    def _ref(self, name: str) -> str:
        if name not in self._refs:
            raise GpuctlError(f"Local mode cannot resolve Ref {name}: the emulator did not create it.")
        return self._refs[name]

    def _sub(self, arg: Any) -> str:
        import re

        text, extra = (arg[0], self.resolve(arg[1])) if isinstance(arg, list) else (arg, {})

        def one(match: re.Match[str]) -> str:
            name = match.group(1)
            if name.startswith("!"):
                return "${" + name[1:] + "}"
            if name in extra:
                return str(extra[name])
            if "." in name and not name.startswith("AWS::"):
                logical, attribute = name.split(".", 1)
                return self._get_att(logical, attribute)
            return self._ref(name)

        return re.sub(r"\$\{([^}]+)\}", one, str(text))

    def _get_att(self, logical: str, attribute: str) -> str:
        physical = self._ref(logical)
        kind = self._template.get("Resources", {}).get(logical, {}).get("Type")
        if kind == "AWS::SQS::Queue" and attribute == "QueueName":
            return physical.rstrip("/").rsplit("/", 1)[-1]
        if kind == "AWS::SQS::Queue" and attribute == "Arn":
            attrs = self._clients.sqs.get_queue_attributes(QueueUrl=physical, AttributeNames=["QueueArn"])
            return attrs["Attributes"]["QueueArn"]
        if kind == "AWS::Lambda::Function" and attribute == "Arn":
            config = self._clients.client("lambda").get_function_configuration(FunctionName=physical)
            return str(config["FunctionArn"])
        if kind == "AWS::DynamoDB::Table" and attribute == "Arn":
            return self._clients.dynamodb.describe_table(TableName=physical)["Table"]["TableArn"]
        raise GpuctlError(f"Local mode cannot resolve {logical}.{attribute} ({kind}); extend "
                          "gpuctl/local/stack_gaps.py (_Resolver._get_att).")


_INT_KEYS = frozenset({"EvaluationPeriods", "DatapointsToAlarm", "Period"})


def _api_shape(value: Any, key: str = "") -> Any:
    """CloudFormation's strings to the API's types (a Ref to a Number parameter resolves to a string)."""
    if isinstance(value, dict):
        return {k: _api_shape(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_api_shape(v, key) for v in value]
    if key in _INT_KEYS:
        return int(value)
    if key == "Threshold":
        return float(value)
    if key in ("ReturnData", "ActionsEnabled", "Enabled") and isinstance(value, str):
        return value.lower() == "true"
    return value


def fill_gaps(clients: AwsClients, stack_name: str, *, template: Path | None = None,
              step: Step | None = None) -> list[str]:
    """Create the template's alarms and table TTLs that the endpoint's CloudFormation did not create.

    Returns what was created (``alarm NAME``, ``ttl TABLE.ATTRIBUTE``).
    """
    from gpuctl.services.deploy import find_sources

    path = template or find_sources().template
    parsed = _cfn_yaml(path.read_text(encoding="utf-8"))
    resolver = _Resolver(clients, stack_name, parsed)
    created: list[str] = []
    for logical, resource in parsed.get("Resources", {}).items():
        kind, props = resource.get("Type"), resource.get("Properties", {})
        if "Condition" in resource and not resolver.condition(str(resource["Condition"])):
            continue  # CloudFormation did not create it either
        if kind == "AWS::CloudWatch::Alarm":
            created += _ensure_alarm(clients, _api_shape(resolver.resolve(props)), step)
        elif kind == "AWS::DynamoDB::Table" and props.get("TimeToLiveSpecification"):
            table = resolver.physical(logical)
            spec = _api_shape(resolver.resolve(props["TimeToLiveSpecification"]))
            if table and spec.get("Enabled"):
                created += _ensure_ttl(clients, table, str(spec["AttributeName"]), step)
    log.info("local.gaps_filled", extra={"created": created})
    return created


def _ensure_alarm(clients: AwsClients, props: dict[str, Any], step: Step | None) -> list[str]:
    cloudwatch = clients.client("cloudwatch")
    name = str(props["AlarmName"])
    if cloudwatch.describe_alarms(AlarmNames=[name]).get("MetricAlarms"):
        return []
    if step is not None:
        step(f"Creating the alarm {name} (the emulator skips AWS::CloudWatch::Alarm) …")
    cloudwatch.put_metric_alarm(**props)
    return [f"alarm {name}"]


def _ensure_ttl(clients: AwsClients, table: str, attribute: str, step: Step | None) -> list[str]:
    current = clients.dynamodb.describe_time_to_live(TableName=table)["TimeToLiveDescription"]
    if current.get("TimeToLiveStatus") in ("ENABLED", "ENABLING"):
        return []
    if step is not None:
        step(f"Enabling TTL on {table}.{attribute} (the emulator ignores TimeToLiveSpecification) …")
    clients.dynamodb.update_time_to_live(
        TableName=table, TimeToLiveSpecification={"AttributeName": attribute, "Enabled": True})
    return [f"ttl {table}.{attribute}"]
