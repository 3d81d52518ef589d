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
    out
}

fn find<'a>(outcomes: &'a [Outcome], backend: &str, point: &Point) -> Option<&'a Outcome> {
    let p = point.to_string();
    outcomes
        .iter()
        .find(|o| o.backend == backend && o.point == p)
}

/// Whether a point counts as sustained: nothing lost and p99 under 20 ms.
fn sustained(o: &Outcome) -> bool {
    o.lost() == 0 && o.p99_ms < 20.0
}

pub fn write(args: &Args, points: &[Point], outcomes: &[Outcome]) -> anyhow::Result<()> {
    let mut md = String::new();
    writeln!(
        md,
        "{} clients (rooms of {}), clustered backends on {} nodes; {} s window after {} s warm-up; median of {} run(s).\n",
        args.clients, args.room_size, args.nodes, args.seconds, args.warmup, args.runs
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
        for p in pts {
            for b in &args.backends {
                let Some(o) = find(outcomes, b, p) else {
                    continue;
                };
                let local = find(outcomes, "local", p).map(|l| l.cpu_s);
                let cpu = if o.redis_cpu_s > 0.0 {
                    format!("{:.2} s + redis {:.2} s", o.cpu_s, o.redis_cpu_s)
                } else {
                    format!("{:.2} s", o.cpu_s)
                };
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
        for p in fetch {
            for b in &args.backends {
                let Some(o) = find(outcomes, b, p) else {
                    continue;
                };
                writeln!(
                    md,
                    "| {} | {} | {:.0} | {:.2} ms | {:.2} ms | {:.1} ms | {}/{} | {:.2} s{} |",
                    p.rate,
                    o.backend,
                    o.achieved,
                    o.p50_ms,
                    o.p99_ms,
                    o.max_ms,
                    o.lost(),
                    o.expected,
                    o.cpu_s,
                    if o.redis_cpu_s > 0.0 {
                        format!(" + redis {:.2} s", o.redis_cpu_s)
                    } else {
                        String::new()
                    },
                )?;
            }
        }
    }
    println!("{md}");

    std::fs::create_dir_all(&args.out)?;
    let mut csv = String::from(
        "backend,point,rate,achieved,expected,received,p50_ms,p99_ms,max_ms,cpu_s,redis_cpu_s,window_s,ctx_switches,commands,peer_send_calls,peer_recv_calls,cutoffs,commands_lost,socket_drops,perf_syscalls\n",
    );
    for o in outcomes {
        let perf: Vec<String> = o.syscalls.iter().map(|(n, v)| format!("{n}={v}")).collect();
        writeln!(
            csv,
            "{},{},{},{:.1},{},{},{:.3},{:.3},{:.3},{:.3},{:.3},{:.3},{},{},{},{},{},{},{},{}",
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
            perf.join(" ")
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
        // Grid: decades (log) or five steps (linear).
        let mut ticks = Vec::new();
        if *log {
            let mut t = 10f64.powf(vmin.log10().floor());
            while t <= vmax {
                ticks.push(t);
                t *= 10.0;
            }
        } else {
            for i in 0..=5 {
                ticks.push(vmax / 1.2 * i as f64 / 5.0);
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
                "<line x1='{x0}' x2='{}' y1='{ty:.1}' y2='{ty:.1}' stroke='#c33' stroke-dasharray='4 3'/><text x='{}' y='{:.1}' fill='#c33'>20 ms</text>",
                x0 + pw,
                x0 + 4.0,
                ty - 4.0
            );
        }
        for p in &rooms {
            let px = xs(x0, f64::from(p.rate));
            let _ = writeln!(
                s,
                "<text x='{px:.1}' y='{}' text-anchor='middle'>{}k</text>",
                top + ph + 16.0,
                p.rate / 1000
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
    s.push_str("</svg>\n");
    s
}

fn trim(v: f64) -> String {
    if v >= 10.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}
