"""Types shared by both virtshift CRDs: selectors, conditions, and the string formats we accept.

The CRD schemas in ``crds/`` are generated from these models (``virtshift crds``), so the
patterns and CEL rules here are what the API server enforces at admission.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

# Go-style durations, as time.ParseDuration and CEL's duration() accept them.
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"
# Kubernetes resource quantities (k8s.io/apimachinery/pkg/api/resource).
QUANTITY_PATTERN = (
    r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$"
)
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# IANA zone names such as Europe/Berlin or America/Argentina/Buenos_Aires, or UTC.
TIMEZONE_PATTERN = r"^[A-Za-z][A-Za-z0-9_+-]*(/[A-Za-z0-9_+-]+)*$"


def _cron_field(atom: str) -> str:
    item = rf"(\*|({atom})(-({atom}))?)(/[1-9][0-9]?)?"  # a step of 0 never fires
    return rf"{item}(,{item})*"


_MONTHS = "JAN|FEB|MAR|APR|MAY|JUN|JUL|AUG|SEP|OCT|NOV|DEC"
_DAYS = "SUN|MON|TUE|WED|THU|FRI|SAT"
CRON_PATTERN = (
    r"^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|"
    + r" +".join(
        _cron_field(a)
        for a in (
            r"[0-5]?[0-9]",  # minute
            r"[01]?[0-9]|2[0-3]",  # hour
            r"0?[1-9]|[12][0-9]|3[01]",  # day of month
            rf"0?[1-9]|1[0-2]|{_MONTHS}",  # month
            rf"[0-7]|{_DAYS}",  # day of week
        )
    )
    + r")$"
)


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    out = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


def validations(*rules: dict[str, str]) -> dict[str, Any]:
    return {"x-kubernetes-validations": list(rules)}


Duration = Annotated[str, Field(pattern=DURATION_PATTERN, max_length=32)]
PositiveDuration = Annotated[
    str,
    Field(
        pattern=DURATION_PATTERN,
        max_length=32,
        json_schema_extra=validations(
            cel("duration(self) > duration('0s')", "must be a duration greater than zero")
        ),
    ),
]
PositiveQuantity = Annotated[
    str,
    Field(
        pattern=QUANTITY_PATTERN,
        max_length=32,
        json_schema_extra=validations(
            cel(
                "isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))",
                "must be a quantity greater than zero, such as 500Mi or 1Gi",
            )
        ),
    ),
]
Cron = Annotated[str, Field(pattern=CRON_PATTERN, max_length=128)]
TimeZone = Annotated[str, Field(pattern=TIMEZONE_PATTERN, max_length=64)]
ResourceName = Annotated[str, Field(pattern=DNS_SUBDOMAIN_PATTERN, min_length=1, max_length=253)]


class Model(BaseModel):
    """Base of every API model: camelCase on the wire, snake_case in Python, unknown kept out."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", use_enum_values=True
    )

    def wire(self) -> dict[str, Any]:
        """The JSON-ready dict as the API server stores it (aliases, no unset Nones)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class SelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class LabelSelectorRequirement(Model):
    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.operator in ['In', 'NotIn'] ? has(self.values) && size(self.values) > 0"
                " : !has(self.values) || size(self.values) == 0",
                "values must be non-empty for In and NotIn, and empty for Exists and DoesNotExist",
            )
        )
    )
    key: str = Field(description="The label key the requirement applies to.", max_length=317)
    operator: SelectorOperator = Field(
        description="How the key relates to the values: In, NotIn, Exists or DoesNotExist."
    )
    values: list[Annotated[str, Field(max_length=63)]] | None = Field(
        None, description="The values for In and NotIn; empty for Exists and DoesNotExist.",
        max_length=64,
    )


class LabelSelector(Model):
    match_labels: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        None,
        description="Labels that must all be present with these values (ANDed with "
        "matchExpressions).",
    )
    match_expressions: list[LabelSelectorRequirement] | None = Field(
        None, description="Set-based requirements, all of which must hold.", max_length=32
    )


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(Model):
    """A metav1.Condition: one aspect of the object's state, Kubernetes API conventions."""

    type: str = Field(description="The aspect this condition reports, such as Ready.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    observed_generation: int | None = Field(
        None, description="The metadata.generation this condition was computed from."
    )
    last_transition_time: str | None = Field(
        None, description="When status last changed (RFC 3339).", json_schema_extra={
            "format": "date-time"}
    )
    reason: str = Field(description="A CamelCase word saying why, for machines.")
    message: str = Field("", description="A sentence saying why, for people.")


class ObjectName(Model):
    name: ResourceName = Field(description="The name of the referenced cluster-scoped object.")
