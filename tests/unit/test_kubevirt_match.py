"""KubeVirt's choice of MigrationPolicy for a VMI (migrationpolicy.go matchPolicy,
countMatchingLabels), table-driven: the cases of KubeVirt's own unit tests
(pkg/virt-controller/watch/migration/migration_test.go, "Migration policy" / "matching and
precedence") and the rules read off its code."""

from __future__ import annotations

import pytest

from virtshift.domain.kubevirt_match import KubeVirtPolicyView, Score, kubevirt_choice, score

VMI = {"app": "db", "tier": "gold", "zone": "a", "size": "l"}
NS = {"team": "x", "env": "prod", "cost": "c1", "owner": "o"}


def pol(name: str, vmi: int = 0, ns: int = 0) -> KubeVirtPolicyView:
    """A policy selecting the first ``vmi`` labels of VMI and ``ns`` of NS (as KubeVirt's test
    helper preparePolicyAndVMIWithNSAndVMILabels builds them)."""
    return KubeVirtPolicyView(name, vmi_selector=dict(list(VMI.items())[:vmi]),
                              namespace_selector=dict(list(NS.items())[:ns]))


@pytest.mark.parametrize(("case", "policies", "vmi", "ns", "winner"), [
    # migration_test.go DescribeTable "must be done correctly"
    ("only one policy should be matched", [pol("one", 1, 4)], VMI, NS, "one"),
    ("most detailed policy should be matched", [pol("one", 1, 4), pol("two", 4, 2)], VMI, NS,
     "two"),
    ("same level: first name (1)", [pol("aa", 2, 2), pol("zz", 2, 2)], VMI, NS, "aa"),
    ("same level: first name (2)", [pol("zz", 2, 2), pol("aa", 2, 2)], VMI, NS, "aa"),
    # "policy with one non-fitting label should not match"
    ("one non-fitting label", [KubeVirtPolicyView("p", vmi_selector={**VMI, "app": "XYZ"},
                                                  namespace_selector=dict(NS))], VMI, NS, None),
    # "when no policies exist, MatchPolicy() should return nil"
    ("no policies", [], VMI, NS, None),
    # "VMI labels should have precedence over namespace labels"
    ("VMI labels before namespace labels", [pol("ns-labels", 0, 3), pol("vmi-labels", 3, 0)],
     VMI, NS, "vmi-labels"),
    ("... whatever the names", [pol("a-ns", 0, 2), pol("z-vmi", 2, 0)], VMI, NS, "z-vmi"),
    # Read off countMatchingLabels / greaterThan:
    ("more labels in total beat more VMI labels", [pol("vmi2", 2, 0), pol("vmi1-ns2", 1, 2)],
     VMI, NS, "vmi1-ns2"),
    ("no spec.selectors never matches", [KubeVirtPolicyView("none", has_selectors=False)], VMI,
     NS, None),
    ("empty selectors match with score 0", [KubeVirtPolicyView("empty")], VMI, NS, "empty"),
    ("a namespace selector needs the namespace's labels", [pol("ns", 0, 1)], VMI, None, None),
    ("a VMI without labels skips both checks", [pol("p", 2, 2)], None, NS, "p"),
    ("... and every match scores 0: name decides", [pol("b", 2, 0), pol("a", 0, 1)], None, NS,
     "a"),
])
def test_kubevirt_choice(case, policies, vmi, ns, winner) -> None:
    got = kubevirt_choice(policies, vmi, ns)
    assert (got[0].name if got else None) == winner, case


@pytest.mark.parametrize(("policy", "expected"), [
    (pol("p", 2, 1), Score.of(2, 1)),
    (pol("p", 0, 0), Score.of(0, 0)),
    (KubeVirtPolicyView("p", vmi_selector={"app": "web"}), None),
])
def test_score(policy, expected) -> None:
    assert score(policy, VMI, NS) == expected


def test_scores_order_as_kubevirt_compares_them() -> None:
    """greaterThan: the total first, then the VMI labels; lessThan is neither equal nor
    greater."""
    assert Score.of(1, 2) > Score.of(2, 0) > Score.of(1, 1) > Score.of(0, 2)
    assert Score.of(2, 2) == Score.of(2, 2) and Score.of(2, 1).namespace == 1
