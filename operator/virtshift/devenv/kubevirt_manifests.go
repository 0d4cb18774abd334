// virtshift-manifests prints, as one YAML document, what a KubeVirt control plane needs installed,
// each object made by KubeVirt's own constructors (nothing here describes a KubeVirt object):
//
//	crds:                            install.GenerateCurrentInstallStrategy's CRDs (its list of
//	                                 components.New*Crd) and components.NewKubeVirtCrd
//	validatingWebhookConfigurations: components.NewVirtAPIValidatingWebhookConfiguration
//	mutatingWebhookConfigurations:   components.NewVirtAPIMutatingWebhookConfiguration
//	rbac: {controller, apiServer, handler}: rbac.GetAllController, GetAllApiServer, GetAllHandler
//
// This file is virtshift's (Apache-2.0), not KubeVirt's. virtshift builds it inside an unpacked
// KubeVirt source tree as kubevirt.io/kubevirt/cmd/virtshift-manifests (a `go build -overlay`
// entry, so the tree itself is never written), with GOFLAGS=-mod=vendor:
// operator/virtshift/devenv/binaries.py builds it, operator/virtshift/devenv/kubevirt.py runs it.
package main

import (
	"flag"
	"fmt"
	"os"

	"sigs.k8s.io/yaml"

	"kubevirt.io/kubevirt/pkg/virt-operator/resource/generate/components"
	"kubevirt.io/kubevirt/pkg/virt-operator/resource/generate/install"
	"kubevirt.io/kubevirt/pkg/virt-operator/resource/generate/rbac"
	operatorutil "kubevirt.io/kubevirt/pkg/virt-operator/util"
)

func main() {
	namespace := flag.String("namespace", "kubevirt", "the namespace KubeVirt is installed in")
	flag.Parse()

	// The install strategy virt-operator itself deploys (no monitoring namespace: no
	// ServiceMonitor or PrometheusRule); its CRD list is the one of this KubeVirt version.
	config := &operatorutil.KubeVirtDeploymentConfig{Namespace: *namespace}
	strategy, err := install.GenerateCurrentInstallStrategy(config, "", *namespace)
	if err != nil {
		fail("generating the install strategy", err)
	}
	kubevirtCrd, err := components.NewKubeVirtCrd()
	if err != nil {
		fail("generating the KubeVirt CRD", err)
	}
	crds := []interface{}{}
	for _, crd := range strategy.CRDs() {
		crds = append(crds, crd)
	}
	crds = append(crds, kubevirtCrd)

	out, err := yaml.Marshal(map[string]interface{}{
		"crds": crds,
		"validatingWebhookConfigurations": []interface{}{
			components.NewVirtAPIValidatingWebhookConfiguration(*namespace),
		},
		"mutatingWebhookConfigurations": []interface{}{
			components.NewVirtAPIMutatingWebhookConfiguration(*namespace),
		},
		"rbac": map[string]interface{}{
			// The network-attachment-definition rules unless external injection is on, as
			// GenerateCurrentInstallStrategy passes it.
			"controller": rbac.GetAllController(*namespace, !config.ExternalNetResourceInjectionEnabled()),
			"apiServer":  rbac.GetAllApiServer(*namespace),
			"handler":    rbac.GetAllHandler(*namespace),
		},
	})
	if err != nil {
		fail("marshalling", err)
	}
	if _, err := os.Stdout.Write(out); err != nil {
		fail("writing", err)
	}
}

func fail(what string, err error) {
	fmt.Fprintf(os.Stderr, "virtshift-manifests: %s: %v\n", what, err)
	os.Exit(1)
}
