#!/usr/bin/env python3
"""Imports run downward only (DESIGN.md §3): each module of the library may use modules of its
own layer or below, never above. Test-only code (`tests.rs`, `suite.rs`, `fuzz.rs`,
`#[cfg(test)]` modules) is exempt. Prints the module graph with `--graph`.
"""
import pathlib
import re
import sys

# Lowest first. A module's layer is its top-level module under src/.
LAYERS = [
    {"error", "backoff", "incidents", "wire", "tls"},  # protocol and material, no I/O
    {"peers", "answers", "interest", "probe"},        # sans-IO decisions
    {"transport", "membership", "seed"},               # I/O: frames, gossip, seeds
    {"config"},                                        # what a user configures
    {"mesh", "telemetry", "topology"},                 # the node
    {"adapter"},                                       # socketioxide's side
    {"lib"},
]
layer_of = {m: i for i, layer in enumerate(LAYERS) for m in layer}
# Items re-exported at the crate root, and the module that defines them.
ROOT_ITEMS = {
    "Error": "error", "ConfigError": "error", "PeerError": "error", "TlsError": "error",
    "IncidentCounts": "incidents", "TlsConfig": "tls", "DevCa": "tls", "NodeCert": "tls",
    "MeshConfig": "config", "TransportKind": "config", "DEFAULT_PORT": "config",
    "Member": "membership", "Mesh": "mesh", "MeshStats": "mesh", "ServerEvent": "mesh",
    "StaticSeeds": "seed", "DiscoverySeeds": "seed", "MeshAdapter": "adapter",
    "PROTOCOL_VERSION": "wire", "Topology": "topology",
}

src = pathlib.Path(__file__).resolve().parent.parent / "src"


def strip_tests(text):
    """Drop `#[cfg(test)]` items (a module or a single item) and comments."""
    text = re.sub(r"//[^\n]*", "", text)
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\((?:all\()?test[^\]]*\]\s*(?:mod\s+\w+\s*)?\{", text):
        if m.start() < i:
            continue
        out.append(text[i : m.start()])
        depth, j = 1, m.end()
        while depth and j < len(text):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def used_modules(text):
    found = set()
    for m in re.finditer(r"crate::(\{[^;]*\}|\w+)", text):
        group = m.group(1)
        if group.startswith("{"):
            names = re.findall(r"(?:^|[{,])\s*(\w+)", group)
        else:
            names = [group]
        for name in names:
            found.add(ROOT_ITEMS.get(name, name))
    return {f for f in found if f in layer_of}


errors, graph = [], {}
for path in sorted(src.rglob("*.rs")):
    rel = path.relative_to(src)
    if rel.name in ("tests.rs", "suite.rs", "fuzz.rs"):  # test-only modules
        continue
    module = "lib" if rel.parts[0] == "lib.rs" else rel.parts[0].removesuffix(".rs")
    if module not in layer_of:
        errors.append(f"{rel}: module {module} has no layer in .ci/check-layers.py")
        continue
    uses = used_modules(strip_tests(path.read_text())) - {module}
    graph.setdefault(module, set()).update(uses)
    for dep in uses:
        if layer_of[dep] > layer_of[module]:
            errors.append(f"{rel}: {module} (layer {layer_of[module]}) uses {dep} (layer {layer_of[dep]})")
# chitchat (pinned =0.11) stays in one module, so replacing it touches one file.
for path in sorted(src.rglob("*.rs")):
    rel = path.relative_to(src)
    if rel.as_posix() != "membership.rs" and re.search(r"\bchitchat::", strip_tests(path.read_text())):
        errors.append(f"{rel}: uses chitchat (only membership.rs may)")
if "--graph" in sys.argv:
    for module in sorted(graph, key=lambda m: (layer_of[m], m)):
        print(f"{layer_of[module]} {module} -> {', '.join(sorted(graph[module])) or '-'}")
if errors:
    sys.exit("upward imports:\n" + "\n".join(errors))
print(f"imports run downward: {len(graph)} modules in {len(LAYERS)} layers")
