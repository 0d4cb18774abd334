"""Which migrations.kubevirt.io MigrationPolicy KubeVirt applies to a VMI's migration.

KubeVirt resolves a migration's configuration once, at the target pod's handoff: the KubeVirt
CR's settings with the one best-matching KubeVirt MigrationPolicy applied over them
(pkg/virt-controller/watch/migration/migration.go ``resolveMigrationConfig``). The best match
(pkg/virt-controller/watch/migration/migrationpolicy.go ``matchPolicy`` and
``countMatchingLabels``):

* a policy without ``spec.selectors`` never matches;
* every label of its ``virtualMachineInstanceSelector`` must be on the VMI and every label of its
  ``namespaceSelector`` on the VMI's namespace (plain maps, equality only); the score is how
  many of each matched. As coded there, both checks are skipped for a VMI without labels (the
  namespace check tests the VMI's labels for nil, not the namespace's): it matches with score 0;
* the highest total score wins; on an equal total, more matched VMI labels
  (``migrationPolicyMatchScore.greaterThan``); on equal scores, the name that sorts first.

So an administrator's own KubeVirt policy that selects more labels of a VMI than the one
virtshift renders (``virtshift.io/policy``, one label; a mode variant, two) wins -- and so does
one selecting as many, whose name sorts before ``virtshift-...``. ``policy.overridden`` reports
it on the virtshift MigrationPolicy. Pure: plain views in, names out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class KubeVirtPolicyView:
    """A migrations.kubevirt.io MigrationPolicy, as far as KubeVirt's matching reads it."""

    name: str
    has_selectors: bool = True  # spec.selectors is set
    vmi_selector: Mapping[str, str] | None = None  # virtualMachineInstanceSelector
    namespace_selector: Mapping[str, str] | None = None  # namespaceSelector


@dataclass(frozen=True, order=True)
class Score:
    """migrationPolicyMatchScore, ordered as greaterThan orders it: total, then VMI labels."""

    total: int
    vmi: int

    @classmethod
    def of(cls, vmi: int, namespace: int) -> Score:
        return cls(vmi + namespace, vmi)

    @property
    def namespace(self) -> int:
        return self.total - self.vmi


def _all_match(selector: Mapping[str, str] | None, labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def score(policy: KubeVirtPolicyView, vmi_labels: Mapping[str, str] | None,
          namespace_labels: Mapping[str, str] | None) -> Score | None:
    """countMatchingLabels: the policy's score for this VMI, None when it does not match."""
    if not policy.has_selectors:
        return None
    if not vmi_labels:  # nil in KubeVirt (the API server never stores an empty map)
        return Score.of(0, 0)
    if not _all_match(policy.vmi_selector, vmi_labels):
        return None
    if not _all_match(policy.namespace_selector, namespace_labels or {}):
        return None
    return Score.of(len(policy.vmi_selector or {}), len(policy.namespace_selector or {}))


def kubevirt_choice(policies: Sequence[KubeVirtPolicyView], vmi_labels: Mapping[str, str] | None,
                    namespace_labels: Mapping[str, str] | None
                    ) -> tuple[KubeVirtPolicyView, Score] | None:
    """matchPolicy: the policy KubeVirt applies to the VMI's migration, with its score."""
    best: tuple[Score, str, KubeVirtPolicyView] | None = None
    for policy in policies:
        s = score(policy, vmi_labels, namespace_labels)
        if s is None:
            continue
        if best is None or s > best[0] or (s == best[0] and policy.name < best[1]):
            best = (s, policy.name, policy)
    return (best[2], best[0]) if best else None
