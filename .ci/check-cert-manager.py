#!/usr/bin/env python3
"""The cert-manager example issues what a node accepts as a peer certificate.

kubernetes-validate has no schema for cert-manager's CRDs, so this checks what matters here:
the node Certificate names the cluster DNS name and carries both usages (see src/tls.rs), and
every issuerRef points to an Issuer defined in the file.
"""
import sys

import yaml

NODE_NAME = "socketioxide-mesh.internal"
path = sys.argv[1]
docs = [d for d in yaml.safe_load_all(open(path)) if d]
issuers = {d["metadata"]["name"] for d in docs if d["kind"] in ("Issuer", "ClusterIssuer")}
errors = []
for d in docs:
    assert d["apiVersion"] == "cert-manager.io/v1", d["apiVersion"]
    if d["kind"] != "Certificate":
        continue
    spec = d["spec"]
    name = d["metadata"]["name"]
    if spec["issuerRef"]["name"] not in issuers:
        errors.append(f"{name}: issuer {spec['issuerRef']['name']} is not defined")
    if spec.get("isCA"):
        continue
    if NODE_NAME not in spec.get("dnsNames", []):
        errors.append(f"{name}: no DNS name {NODE_NAME}")
    for usage in ("server auth", "client auth"):
        if usage not in spec.get("usages", []):
            errors.append(f"{name}: usage {usage!r} missing: peers would refuse it")
if errors:
    sys.exit("\n".join(errors))
print(f"{path}: {len(docs)} resources, node certificates as peers expect")
