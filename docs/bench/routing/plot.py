#!/usr/bin/env python3
"""Summarise the routing benchmark: reads `<placement>/results.csv` (written by
`cargo run --release --example bench -- --nodes 8 --placement <placement> --backends
mesh-quic,mesh-quic+routing,mesh-ws,mesh-ws+routing --scenarios rooms@5000 --runs 3 --out
docs/bench/routing/<placement>`) for each placement, prints a Markdown table and writes
`routing.svg` beside this script: cross-node bytes and server CPU per delivery, routing off
against on. Standard library only.
"""
import csv
import pathlib

HERE = pathlib.Path(__file__).resolve().parent
PLACEMENTS = [("one", "a: a room's members on one node"), ("two", "b: on two nodes"),
              ("spread", "c: on every node")]
ROOM_SIZE = 10


def load(placement):
    rows = {}
    with open(HERE / placement / "results.csv") as f:
        for r in csv.DictReader(f):
            deliveries = float(r["achieved"]) * ROOM_SIZE * float(r["window_s"])
            rows[r["backend"]] = {
                "frames": int(r["commands"]) / deliveries,
                "bytes": int(r["command_bytes"]) / deliveries,
                "cpu": 1e6 * float(r["cpu_s"]) / deliveries,
                "p99": float(r["p99_ms"]),
                "lost": int(r["expected"]) - int(r["received"]),
                "routed_away": int(r["routed_away"]),
            }
    return rows


def main():
    data = {p: load(p) for p, _ in PLACEMENTS}
    print("| placement | transport | cross-node frames / delivery (off → on) | cross-node bytes / delivery (off → on) | traffic saved | server CPU ms / 1000 deliveries (off → on) | p99 (off → on) | lost (off, on) |")
    print("|---|---|---|---|---|---|---|---|")
    for p, label in PLACEMENTS:
        for t in ["quic", "ws"]:
            off, on = data[p].get(f"mesh-{t}"), data[p].get(f"mesh-{t}+routing")
            if not off or not on:
                continue
            saved = 100 * (1 - on["bytes"] / off["bytes"]) if off["bytes"] else 0
            print(f"| {label} | {t} | {off['frames']:.3f} → {on['frames']:.3f} | "
                  f"{off['bytes']:.1f} → {on['bytes']:.1f} | {saved:.0f} % | "
                  f"{off['cpu']:.1f} → {on['cpu']:.1f} | {off['p99']:.1f} → {on['p99']:.1f} ms | "
                  f"{off['lost']}, {on['lost']} |")
    svg(data)


def svg(data):
    w, h, pad = 900, 360, 60
    panels = [("bytes", "cross-node bytes per delivery"), ("cpu", "server CPU ms per 1000 deliveries")]
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>",
           "<rect width='100%' height='100%' fill='white'/>"]
    pw = (w - pad) / 2
    colors = {"off": "#999", "on": "#2a7"}
    for i, (key, title) in enumerate(panels):
        x0 = pad / 2 + i * pw
        top, bottom = 40, h - 70
        vals = [data[p][b][key] for p, _ in PLACEMENTS for b in data[p]]
        vmax = max(vals) * 1.1 or 1
        out.append(f"<text x='{x0 + pw / 2}' y='20' text-anchor='middle' font-weight='bold'>{title}</text>")
        out.append(f"<line x1='{x0 + 30}' y1='{bottom}' x2='{x0 + pw - 10}' y2='{bottom}' stroke='black'/>")
        groups = [(p, t) for p, _ in PLACEMENTS for t in ["quic", "ws"]]
        gw = (pw - 50) / len(groups)
        for g, (p, t) in enumerate(groups):
            gx = x0 + 35 + g * gw
            for j, (mode, backend) in enumerate([("off", f"mesh-{t}"), ("on", f"mesh-{t}+routing")]):
                v = data[p].get(backend, {}).get(key)
                if v is None:
                    continue
                bh = (bottom - top) * v / vmax
                bx = gx + 4 + j * (gw - 8) / 2
                out.append(f"<rect x='{bx:.1f}' y='{bottom - bh:.1f}' width='{(gw - 8) / 2 - 2:.1f}' height='{bh:.1f}' fill='{colors[mode]}'/>")
                out.append(f"<text x='{bx + (gw - 8) / 4:.1f}' y='{bottom - bh - 3:.1f}' text-anchor='middle' font-size='9'>{v:.0f}</text>")
            out.append(f"<text x='{gx + gw / 2:.1f}' y='{bottom + 14}' text-anchor='middle' font-size='10'>{t}</text>")
        for k, (p, label) in enumerate(PLACEMENTS):
            cx = x0 + 35 + (2 * k + 1) * gw
            out.append(f"<text x='{cx:.1f}' y='{bottom + 30}' text-anchor='middle' font-size='10'>{label.split(':')[0]}: {p}</text>")
    out.append(f"<rect x='{pad / 2 + 10}' y='{h - 25}' width='12' height='12' fill='{colors['off']}'/><text x='{pad / 2 + 26}' y='{h - 15}'>routing off (every node gets every broadcast)</text>")
    out.append(f"<rect x='{w / 2 + 10}' y='{h - 25}' width='12' height='12' fill='{colors['on']}'/><text x='{w / 2 + 26}' y='{h - 15}'>routing on</text>")
    out.append("</svg>")
    (HERE / "routing.svg").write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
