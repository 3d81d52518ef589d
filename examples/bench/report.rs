//! The report: a Markdown summary and tables, a CSV of every figure, and an SVG plot.

use std::fmt::Write as _;

use crate::{Args, Outcome, Point, load::Kind};

/// The median of each figure over the runs of one backend at one point.
pub fn median(runs: &[Outcome]) -> Outcome {
    let med = |f: &dyn Fn(&Outcome) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let mut out = runs[0].clone();
    out.achieved = med(&|o| o.achieved);
    out.p50_ms = med(&|o| o.p50_ms);
    out.p99_ms = med(&|o| o.p99_ms);
    out.max_ms = med(&|o| o.max_ms);
    out.cpu_s = med(&|o| o.cpu_s);
    out.redis_cpu_s = med(&|o| o.redis_cpu_s);
    out.ctx_switches = med(&|o| o.ctx_switches as f64) as u64;
    // Loss: the run with the median loss, keeping its expected/received pair.
    let mut by_loss: Vec<&Outcome> = runs.iter().collect();
    by_loss.sort_by(|a, b| a.loss_pct().total_cmp(&b.loss_pct()));
    let m = by_loss[by_loss.len() / 2];
    out.expected = m.expected;
    out.received = m.received;
    let mut by_sends: Vec<&Outcome> = runs.iter().collect();
    by_sends.sort_by(|a, b| a.sends_per_command().total_cmp(&b.sends_per_command()));
    let m = by_sends[by_sends.len() / 2];
    out.commands = m.commands;
    out.peer_send_calls = m.peer_send_calls;
    out.peer_recv_calls = m.peer_recv_calls;
    out.syscalls = m.syscalls.clone();
    out.cutoffs = med(&|o| o.cutoffs as f64) as u64;
    out.commands_lost = med(&|o| o.commands_lost as f64) as u64;
    out.socket_drops = med(&|o| o.socket_drops as f64) as u64;
    out.command_bytes = med(&|o| o.command_bytes as f64) as u64;
    out.routed_away = med(&|o| o.routed_away as f64) as u64;
    out
}

/// The backends, points and outcomes of a `results.csv`, in their order.
pub fn read_csv(path: &std::path::Path) -> anyhow::Result<(Vec<String>, Vec<Point>, Vec<Outcome>)> {
    let text = std::fs::read_to_string(path)?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let (mut backends, mut points, mut outcomes) = (Vec::new(), Vec::new(), Vec::new());
    for line in lines.filter(|l| !l.is_empty()) {
        let cols: Vec<&str> = line.split(',').collect();
        let get = |name: &str| -> anyhow::Result<&str> {
            let i = header
                .iter()
                .position(|h| *h == name)
                .ok_or_else(|| anyhow::anyhow!("no column {name}"))?;
            cols.get(i)
                .copied()
                .ok_or_else(|| anyhow::anyhow!("short row"))
        };
        let num = |name: &str| -> anyhow::Result<f64> { Ok(get(name)?.parse()?) };
        let point: Point = get("point")?.parse()?;
        let o = Outcome {
            backend: get("backend")?.to_string(),
            point: point.to_string(),
            rate: point.rate,
            achieved: num("achieved")?,
            expected: num("expected")? as u64,
            received: num("received")? as u64,
            p50_ms: num("p50_ms")?,
            p99_ms: num("p99_ms")?,
            max_ms: num("max_ms")?,
            cpu_s: num("cpu_s")?,
            redis_cpu_s: num("redis_cpu_s")?,
            window_s: num("window_s")?,
            ctx_switches: num("ctx_switches")? as u64,
            commands: num("commands")? as u64,
            peer_send_calls: num("peer_send_calls")? as u64,
            peer_recv_calls: num("peer_recv_calls")? as u64,
            cutoffs: num("cutoffs")? as u64,
            commands_lost: num("commands_lost")? as u64,
            socket_drops: num("socket_drops")? as u64,
            command_bytes: num("command_bytes").unwrap_or(0.0) as u64,
            routed_away: num("routed_away").unwrap_or(0.0) as u64,
            syscalls: get("perf_syscalls")?
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
                .collect(),
            ..Default::default()
        };
        if !backends.contains(&o.backend) {
            backends.push(o.backend.clone());
        }
        if !points.contains(&point) {
            points.push(point);
        }
        outcomes.push(o);
    }
    Ok((backends, points, outcomes))
}

fn find<'a>(outcomes: &'a [Outcome], backend: &str, point: &Point) -> Option<&'a Outcome> {
    let p = point.to_string();
    outcomes
        .iter()
        .find(|o| o.backend == backend && o.point == p)
}

/// The outcomes of `points`, in order, one per backend that has one.
fn rows<'a>(
    args: &'a Args,
    outcomes: &'a [Outcome],
    points: &'a [&'a Point],
) -> impl Iterator<Item = (&'a Point, &'a Outcome)> + 'a {
    points.iter().flat_map(move |p| {
        args.backends
            .iter()
            .filter_map(move |b| find(outcomes, b, p).map(|o| (*p, o)))
    })
}

/// Server CPU, with Redis's own when there is one.
fn cpu_text(o: &Outcome) -> String {
    if o.redis_cpu_s > 0.0 {
        format!("{:.2} s + redis {:.2} s", o.cpu_s, o.redis_cpu_s)
    } else {
        format!("{:.2} s", o.cpu_s)
    }
}

/// Whether a point counts as sustained: nothing lost and p99 under 20 ms.
fn sustained(o: &Outcome) -> bool {
    o.lost() == 0 && o.p99_ms < 20.0
}

pub fn write(args: &Args, points: &[Point], outcomes: &[Outcome]) -> anyhow::Result<()> {
    let mut md = String::new();
    writeln!(
        md,
        "{} clients (rooms of {}, placed {}), clustered backends on {} nodes ({}); {} s window after {} s warm-up; median of {} run(s).\n",
        args.clients,
        args.room_size,
        args.placement,
        args.nodes,
        if args.node_procs {
            "one process each"
        } else {
            "one process, one runtime"
        },
        args.seconds,
        args.warmup,
        args.runs
    )?;
    summary(&mut md, args, points, outcomes)?;
    for (kind, title) in [
        (
            Kind::Rooms,
            "Rooms of 10: each publish reaches its room (R × 10 deliveries/s)",
        ),
        (
            Kind::All,
            "Broadcast to all: each publish reaches every client",
        ),
    ] {
        let pts: Vec<&Point> = points.iter().filter(|p| p.kind == kind).collect();
        if pts.is_empty() {
            continue;
        }
        writeln!(md, "\n### {title}\n")?;
        writeln!(
            md,
            "| publishes/s | backend | achieved | p50 | p99 | max | lost | server CPU | × local | ctx switches/s | peer sends/command | sendmsg+sendmmsg / writev+write (perf) | cut-offs |"
        )?;
        writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|---|")?;
        for (p, o) in rows(args, outcomes, &pts) {
            let local = find(outcomes, "local", p).map(|l| l.cpu_s);
            let cpu = cpu_text(o);
            let ratio = local
                .filter(|l| *l > 0.0)
                .map(|l| format!("{:.2}×", (o.cpu_s + o.redis_cpu_s) / l))
                .unwrap_or_default();
            let perf = if o.syscalls.is_empty() {
                "—".to_string()
            } else {
                let s = |n: &str| o.syscall(n).unwrap_or(0);
                format!(
                    "{} / {}",
                    s("sendmsg") + s("sendmmsg"),
                    s("writev") + s("write")
                )
            };
            let spc = o.sends_per_command();
            writeln!(
                md,
                "| {} | {} | {:.0} | {:.1} ms | {:.1} ms | {:.0} ms | {} ({:.2} %) | {cpu} | {ratio} | {:.0} | {} | {perf} | {} |",
                p.rate,
                o.backend,
                o.achieved,
                o.p50_ms,
                o.p99_ms,
                o.max_ms,
                o.lost(),
                o.loss_pct(),
                o.ctx_switches as f64 / o.window_s,
                if spc.is_finite() {
                    format!("{spc:.3}")
                } else {
                    "—".into()
                },
                o.cutoffs,
            )?;
        }
    }
    let meshes: Vec<&Point> = points.iter().filter(|p| p.kind != Kind::Fetch).collect();
    if args.backends.iter().any(|b| b.starts_with("mesh")) && !meshes.is_empty() {
        writeln!(
            md,
            "\n### Cluster traffic per delivered message (placement: {})\n",
            args.placement
        )?;
        writeln!(
            md,
            "| point | backend | deliveries in window | cross-node frames / delivery | cross-node bytes / delivery | peer deliveries routed away | server CPU ms / 1000 deliveries | p99 | lost |"
        )?;
        writeln!(md, "|---|---|---|---|---|---|---|---|---|")?;
        for (p, o) in rows(args, outcomes, &meshes) {
            let d = o.window_deliveries(args.room_size);
            if d <= 0.0 {
                continue;
            }
            writeln!(
                md,
                "| {p} | {} | {:.0} | {:.3} | {:.1} | {} | {:.1} | {:.1} ms | {} |",
                o.backend,
                d,
                o.commands as f64 / d,
                o.command_bytes as f64 / d,
                o.routed_away,
                1e6 * o.cpu_s / d,
                o.p99_ms,
                o.lost(),
            )?;
        }
    }
    let fetch: Vec<&Point> = points.iter().filter(|p| p.kind == Kind::Fetch).collect();
    if !fetch.is_empty() {
        writeln!(
            md,
            "\n### fetch_sockets from node 0 ({} sockets on every node of the backend)\n",
            args.clients
        )?;
        writeln!(
            md,
            "| in flight | backend | requests/s | p50 | p99 | max | incomplete answers | server CPU |"
        )?;
        writeln!(md, "|---|---|---|---|---|---|---|---|")?;
        for (p, o) in rows(args, outcomes, &fetch) {
            writeln!(
                md,
                "| {} | {} | {:.0} | {:.2} ms | {:.2} ms | {:.1} ms | {}/{} | {} |",
                p.rate,
                o.backend,
                o.achieved,
                o.p50_ms,
                o.p99_ms,
                o.max_ms,
                o.lost(),
                o.expected,
                cpu_text(o),
            )?;
        }
    }
    println!("{md}");

    std::fs::create_dir_all(&args.out)?;
    let mut csv = String::from(
        "backend,point,rate,achieved,expected,received,p50_ms,p99_ms,max_ms,cpu_s,redis_cpu_s,window_s,ctx_switches,commands,peer_send_calls,peer_recv_calls,cutoffs,commands_lost,socket_drops,perf_syscalls,command_bytes,routed_away\n",
    );
    for o in outcomes {
        let perf: Vec<String> = o.syscalls.iter().map(|(n, v)| format!("{n}={v}")).collect();
        writeln!(
            csv,
            "{},{},{},{:.1},{},{},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{},{},{},{},{},{},{},{},{},{}",
            o.backend,
            o.point,
            o.rate,
            o.achieved,
            o.expected,
            o.received,
            o.p50_ms,
            o.p99_ms,
            o.max_ms,
            o.cpu_s,
            o.redis_cpu_s,
            o.window_s,
            o.ctx_switches,
            o.commands,
            o.peer_send_calls,
            o.peer_recv_calls,
            o.cutoffs,
            o.commands_lost,
            o.socket_drops,
            perf.join(" "),
            o.command_bytes,
            o.routed_away,
        )?;
    }
    std::fs::write(args.out.join("results.csv"), csv)?;
    std::fs::write(args.out.join("results.md"), &md)?;
    std::fs::write(args.out.join("bench.svg"), svg(args, points, outcomes))?;
    eprintln!(
        "wrote {}/results.md, results.csv, bench.svg",
        args.out.display()
    );
    Ok(())
}

/// The goals of the data path, computed from the points that were measured.
fn summary(
    md: &mut String,
    args: &Args,
    points: &[Point],
    outcomes: &[Outcome],
) -> anyhow::Result<()> {
    writeln!(
        md,
        "| backend | highest rooms rate sustained (0 lost, p99 < 20 ms) | CPU vs local, rooms@10000 | p99 vs local, all@500 | peer sends/command, rooms@10000 |"
    )?;
    writeln!(md, "|---|---|---|---|---|")?;
    let rooms: Vec<&Point> = points.iter().filter(|p| p.kind == Kind::Rooms).collect();
    let best = |b: &str| {
        rooms
            .iter()
            .filter_map(|p| find(outcomes, b, p))
            .filter(|o| sustained(o))
            .map(|o| o.rate)
            .max()
    };
    let local_best = best("local");
    let at = |s: &str| s.parse::<Point>().ok();
    for b in &args.backends {
        let sus = match (best(b), local_best) {
            (Some(r), Some(l)) if b != "local" => {
                format!("{r}/s ({:.2}× local)", f64::from(r) / f64::from(l))
            }
            (Some(r), _) => format!("{r}/s"),
            (None, _) => "none measured".into(),
        };
        let ratio = |p: &str, f: &dyn Fn(&Outcome) -> f64| {
            let p = at(p)?;
            let (o, l) = (find(outcomes, b, &p)?, find(outcomes, "local", &p)?);
            Some(f(o) / f(l))
        };
        let cpu = ratio("rooms@10000", &|o| o.cpu_s + o.redis_cpu_s)
            .map(|r| format!("{r:.2}×"))
            .unwrap_or_else(|| "—".into());
        let p99 = ratio("all@500", &|o| o.p99_ms)
            .map(|r| format!("{r:.2}×"))
            .unwrap_or_else(|| "—".into());
        let spc = at("rooms@10000")
            .and_then(|p| find(outcomes, b, &p))
            .map(|o| o.sends_per_command())
            .filter(|v| v.is_finite())
            .map(|v| format!("{v:.3}"))
            .unwrap_or_else(|| "—".into());
        writeln!(md, "| {b} | {sus} | {cpu} | {p99} | {spc} |")?;
    }
    Ok(())
}

/// Two panels: p99 latency and server CPU against the rooms publish rate, one line per backend.
fn svg(args: &Args, points: &[Point], outcomes: &[Outcome]) -> String {
    let rooms: Vec<&Point> = points.iter().filter(|p| p.kind == Kind::Rooms).collect();
    let colors = ["#444444", "#3b6fb6", "#e08a2c", "#b14a8a", "#4c9a52"];
    let (pw, ph, left, top, gap) = (420.0, 260.0, 60.0, 40.0, 80.0);
    let w = left + 2.0 * pw + gap + 20.0;
    let h = top + ph + 80.0;
    let mut s = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\n<rect width='100%' height='100%' fill='white'/>\n"
    );
    if rooms.is_empty() {
        s.push_str("</svg>\n");
        return s;
    }
    let xmin = rooms.iter().map(|p| p.rate).min().unwrap_or(0) as f64;
    let xmax = rooms.iter().map(|p| p.rate).max().unwrap_or(1) as f64;
    let xs = |x0: f64, r: f64| {
        x0 + if xmax > xmin {
            (r - xmin) / (xmax - xmin) * pw
        } else {
            pw / 2.0
        }
    };
    type Metric<'a> = (&'a str, bool, &'a dyn Fn(&Outcome) -> f64);
    let metrics: [Metric; 2] = [
        ("p99 latency (ms, log scale)", true, &|o: &Outcome| o.p99_ms),
        (
            "server CPU seconds in the window (+ redis)",
            false,
            &|o: &Outcome| o.cpu_s + o.redis_cpu_s,
        ),
    ];
    for (mi, (title, log, f)) in metrics.iter().enumerate() {
        let x0 = left + mi as f64 * (pw + gap);
        let vals: Vec<f64> = outcomes
            .iter()
            .filter(|o| o.point.starts_with("rooms@"))
            .map(f)
            .filter(|v| v.is_finite() && *v > 0.0)
            .collect();
        let vmax = vals.iter().cloned().fold(0.0, f64::max).max(1.0) * 1.2;
        let vmin = if *log {
            1.0f64
                .min(vals.iter().cloned().fold(f64::MAX, f64::min))
                .max(0.1)
        } else {
            0.0
        };
        let y = |v: f64| {
            let t = if *log {
                (v.max(vmin).ln() - vmin.ln()) / (vmax.ln() - vmin.ln())
            } else {
                v / vmax
            };
            top + ph * (1.0 - t)
        };
        let _ = writeln!(s, "<text x='{x0}' y='24' font-size='13'>{title}</text>");
        let _ = writeln!(
            s,
            "<rect x='{x0}' y='{top}' width='{pw}' height='{ph}' fill='none' stroke='#999'/>"
        );
        // Grid: decades (log) or round steps of 1, 2 or 5 × 10^k (linear).
        let mut ticks = Vec::new();
        if *log {
            let mut t = 10f64.powf(vmin.log10().floor());
            while t <= vmax {
                ticks.push(t);
                t *= 10.0;
            }
        } else {
            let raw = vmax / 5.0;
            let mag = 10f64.powf(raw.log10().floor());
            let step = [1.0, 2.0, 5.0, 10.0]
                .into_iter()
                .map(|m| m * mag)
                .find(|s| *s >= raw)
                .unwrap_or(raw);
            let mut t = 0.0;
            while t <= vmax {
                ticks.push(t);
                t += step;
            }
        }
        for t in ticks {
            if t < vmin {
                continue;
            }
            let ty = y(t);
            let _ = writeln!(
                s,
                "<line x1='{x0}' x2='{}' y1='{ty:.1}' y2='{ty:.1}' stroke='#e4e4e4'/><text x='{}' y='{:.1}' text-anchor='end'>{}</text>",
                x0 + pw,
                x0 - 4.0,
                ty + 4.0,
                trim(t)
            );
        }
        if *log {
            let ty = y(20.0);
            let _ = writeln!(
                s,
                "<line x1='{x0}' x2='{}' y1='{ty:.1}' y2='{ty:.1}' stroke='#c33' stroke-dasharray='4 3'/><text x='{}' y='{:.1}' fill='#c33' text-anchor='end'>20 ms</text>",
                x0 + pw,
                x0 + pw - 4.0,
                ty + 14.0
            );
        }
        // Rate labels, skipping one too close to the previous.
        let mut last_label = f64::MIN;
        for p in &rooms {
            let px = xs(x0, f64::from(p.rate));
            if px - last_label < 34.0 {
                continue;
            }
            last_label = px;
            let k = f64::from(p.rate) / 1000.0;
            let _ = writeln!(
                s,
                "<text x='{px:.1}' y='{}' text-anchor='middle'>{}k</text>",
                top + ph + 16.0,
                trim(k)
            );
        }
        let _ = writeln!(
            s,
            "<text x='{}' y='{}' text-anchor='middle'>publishes per second (rooms of {})</text>",
            x0 + pw / 2.0,
            top + ph + 34.0,
            args.room_size
        );
        for (bi, b) in args.backends.iter().enumerate() {
            let pts: Vec<(f64, f64)> = rooms
                .iter()
                .filter_map(|p| find(outcomes, b, p).map(|o| (xs(x0, f64::from(p.rate)), f(o))))
                .filter(|(_, v)| v.is_finite())
                .map(|(x, v)| (x, y(v)))
                .collect();
            let c = colors[bi % colors.len()];
            let path: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            let _ = writeln!(
                s,
                "<polyline points='{}' fill='none' stroke='{c}' stroke-width='2'/>",
                path.join(" ")
            );
            for (x, y) in pts {
                let _ = writeln!(s, "<circle cx='{x:.1}' cy='{y:.1}' r='3' fill='{c}'/>");
            }
            // Points where deliveries were lost are ringed.
            for p in &rooms {
                if let Some(o) = find(outcomes, b, p).filter(|o| o.lost() > 0) {
                    let (x, v) = (xs(x0, f64::from(p.rate)), f(o));
                    if v.is_finite() {
                        let _ = writeln!(
                            s,
                            "<circle cx='{x:.1}' cy='{:.1}' r='7' fill='none' stroke='#c33' stroke-width='1.5'/>",
                            y(v)
                        );
                    }
                }
            }
        }
    }
    for (bi, b) in args.backends.iter().enumerate() {
        let x = left + bi as f64 * 130.0;
        let _ = writeln!(
            s,
            "<rect x='{x}' y='{}' width='12' height='12' fill='{}'/><text x='{}' y='{}'>{b}</text>",
            h - 24.0,
            colors[bi % colors.len()],
            x + 16.0,
            h - 14.0
        );
    }
    let x = left + args.backends.len() as f64 * 130.0;
    let _ = writeln!(
        s,
        "<circle cx='{}' cy='{}' r='6' fill='none' stroke='#c33' stroke-width='1.5'/><text x='{}' y='{}'>deliveries lost</text>",
        x + 6.0,
        h - 18.0,
        x + 16.0,
        h - 14.0
    );
    s.push_str("</svg>\n");
    s
}

/// A short label: no decimals where they say nothing.
fn trim(v: f64) -> String {
    if v.fract().abs() < 1e-9 || v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}
