#!/usr/bin/env python3
"""The observability example parses, and every metric its dashboard and files query is one the
code records (src/telemetry.rs, or the discovery service's /metrics)."""
import json
import pathlib
import re
import sys

import yaml

root = pathlib.Path(__file__).resolve().parent.parent
obs = root / "examples" / "observability"
known = set(re.findall(r'"(socketioxide_mesh_[a-z_]+)"', (root / "src/telemetry.rs").read_text()))
known |= set(re.findall(r'"(socketioxide_mesh_discovery_[a-z_]+)"', (root / "discovery/src/api.rs").read_text()))
for path in obs.rglob("*.yml"):
    yaml.safe_load(path.read_text())
dashboard = json.loads((obs / "grafana/dashboards/socketioxide-mesh.json").read_text())
errors = []
for panel in dashboard["panels"]:
    for target in panel["targets"]:
        for name in re.findall(r"socketioxide_mesh_[a-z_]+", target["expr"]):
            base = re.sub(r"_(bucket|count|sum)$", "", name)
            if base not in known:
                errors.append(f"panel {panel['title']!r}: {name} is not recorded")
if errors:
    sys.exit("\n".join(errors))
print(f"observability example: {len(dashboard['panels'])} panels, every metric known")
