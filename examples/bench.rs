//! Benchmark: cross-node broadcast throughput and latency, and `fetch_sockets` latency with
//! many requests in flight, for the mesh over QUIC, the mesh over WebSocket, and
//! socketioxide-redis, under the same load.
//!
//! ```text
//! cargo run --release --example bench                       # mesh-quic, mesh-ws
//! redis-server --daemonize yes && cargo run --release --example bench -- --backends mesh-quic,mesh-ws,redis
//! ```
//! Each backend runs in its own child process (so memory figures do not mix): 3 Socket.IO
//! nodes on 127.0.0.1, WebSocket clients spread evenly over them; a publisher on node 0
//! broadcasts timestamped events at a fixed rate; every client measures the delay. Then node 0
//! runs batches of concurrent `fetch_sockets`. Results go to stdout (a Markdown table) and to
//! `--out` (`results.csv`, `latency.svg`).

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use socketioxide::{
    SocketIo,
    adapter::{Adapter, Emitter},
};
use socketioxide_mesh::{DevCa, Mesh, MeshAdapter, MeshConfig, StaticSeeds, TransportKind};
use socketioxide_redis::{RedisAdapter, RedisAdapterCtr, drivers::redis::redis_client as redis};
use tokio_tungstenite::tungstenite::Message;

#[derive(Parser, Clone)]
struct Args {
    /// Backends to compare: mesh-quic, mesh-ws, redis.
    #[arg(long, default_value = "mesh-quic,mesh-ws", value_delimiter = ',')]
    backends: Vec<String>,
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// WebSocket clients, spread over the nodes.
    #[arg(long, default_value_t = 150)]
    clients: usize,
    /// Broadcasts per second from node 0 (each reaches every client).
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// Duration of the broadcast run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Concurrent fetch_sockets requests, per batch (comma-separated list).
    #[arg(long, default_value = "1,100,1000", value_delimiter = ',')]
    inflight: Vec<usize>,
    /// Batches per in-flight level.
    #[arg(long, default_value_t = 20)]
    batches: usize,
    /// Redis URL for the redis backend.
    #[arg(long, default_value = "redis://127.0.0.1:6379/?protocol=resp3")]
    redis: String,
    /// Runs per backend, interleaved; the report gives the median of each figure.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Where to write results.csv and latency.svg.
    #[arg(long, default_value = "bench")]
    out: PathBuf,
    /// Internal: run one backend and print its result as JSON.
    #[arg(long, hide = true)]
    child: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
struct Outcome {
    backend: String,
    clients: usize,
    rate: u32,
    /// Broadcasts per second the publisher actually achieved (emit may wait on the backend).
    achieved_rate: f64,
    deliveries_per_s: f64,
    expected: u64,
    received: u64,
    remote_p50_ms: f64,
    remote_p99_ms: f64,
    remote_max_ms: f64,
    local_p99_ms: f64,
    fetch: Vec<FetchOutcome>,
    rss_mib: f64,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
struct FetchOutcome {
    inflight: usize,
    p50_ms: f64,
    p99_ms: f64,
    per_s: f64,
    /// Answers missing some sockets (a node's answer lost or timed out).
    incomplete: usize,
}

static EPOCH: OnceLock<Instant> = OnceLock::new();
fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(backend) = args.child.clone() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let outcome = rt.block_on(run_backend(&backend, &args))?;
        println!("{}", serde_json::to_string(&outcome)?);
        return Ok(());
    }
    let mut runs: Vec<Vec<Outcome>> = vec![Vec::new(); args.backends.len()];
    for run in 0..args.runs {
        for (i, backend) in args.backends.iter().enumerate() {
            eprintln!("run {}/{}: {backend}...", run + 1, args.runs);
            let out = std::process::Command::new(std::env::current_exe()?)
                .args(std::env::args().skip(1))
                .arg("--child")
                .arg(backend)
                .stderr(std::process::Stdio::inherit())
                .output()?;
            anyhow::ensure!(out.status.success(), "{backend} failed");
            let line = String::from_utf8(out.stdout)?;
            runs[i].push(serde_json::from_str::<Outcome>(line.trim())?);
        }
    }
    let outcomes: Vec<Outcome> = runs.iter().map(|r| median(r)).collect();
    report(&args, &outcomes)
}

async fn run_backend(backend: &str, args: &Args) -> anyhow::Result<Outcome> {
    EPOCH.get_or_init(Instant::now);
    match backend {
        "mesh-quic" | "mesh-ws" => {
            let kind = if backend == "mesh-quic" {
                TransportKind::Quic
            } else {
                TransportKind::Ws
            };
            let ca = DevCa::generate("bench")?;
            let mut states = Vec::new();
            let mut seed = None;
            for i in 0..args.nodes {
                let mut cfg = MeshConfig::local(ca.node_tls(&format!("n{i}"))?)
                    .with_transport(kind)
                    .with_gossip_interval(Duration::from_millis(100))
                    .with_cluster_id("bench");
                if let Some(seed) = seed {
                    cfg = cfg.with_seeds(StaticSeeds::new([format!("{seed}")]));
                }
                let mesh = Mesh::start(cfg).await?;
                seed.get_or_insert(mesh.advertise_addr());
                states.push(mesh);
            }
            for mesh in &states {
                let mut m = mesh.watch_members();
                tokio::time::timeout(
                    Duration::from_secs(20),
                    m.wait_for(|m| m.len() == args.nodes - 1),
                )
                .await??;
            }
            let res = run::<MeshAdapter<Emitter>, _>(backend, states.clone(), args).await;
            for mesh in states {
                mesh.shutdown().await;
            }
            res
        }
        "redis" => {
            let client = redis::Client::open(args.redis.as_str())?;
            let mut states = Vec::new();
            for _ in 0..args.nodes {
                states.push(
                    RedisAdapterCtr::new_with_redis(&client)
                        .await
                        .context("connect to redis (is redis-server running?)")?,
                );
            }
            run::<RedisAdapter<Emitter>, _>(backend, states, args).await
        }
        other => anyhow::bail!("unknown backend {other}"),
    }
}

async fn run<A, E>(backend: &str, states: Vec<A::State>, args: &Args) -> anyhow::Result<Outcome>
where
    A: Adapter + socketioxide_core::adapter::DefinedAdapter,
    A::InitRes: std::future::IntoFuture<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    // Nodes.
    let mut ios = Vec::new();
    let mut addrs = Vec::new();
    for state in states {
        let (layer, io) = SocketIo::builder()
            .max_buffer_size(65536)
            .with_adapter::<A>(state)
            .build_layer();
        io.ns("/", async || {})
            .into_future()
            .await
            .map_err(|e| anyhow::anyhow!("namespace: {e}"))?;
        let app = axum::Router::new().layer(layer);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        addrs.push(listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await.ok() });
        ios.push(io);
    }

    // Clients, round-robin over the nodes.
    let mut clients = Vec::new();
    for i in 0..args.clients {
        let node = i % addrs.len();
        clients.push((node, BenchClient::connect(addrs[node]).await?));
    }
    // Everyone connected everywhere (redis and mesh alike take a moment to see them).
    let deadline = Instant::now() + Duration::from_secs(20);
    while ios[0].fetch_sockets().await.map(|s| s.len()).unwrap_or(0) < args.clients {
        anyhow::ensure!(
            Instant::now() < deadline,
            "not every socket is visible from node 0"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Broadcast run.
    let total = u64::from(args.rate) * args.seconds;
    let mut tasks = Vec::new();
    for (node, client) in clients {
        tasks.push((node, tokio::spawn(client.collect())));
    }
    let io0 = ios[0].clone();
    let started = Instant::now();
    let per_ms = f64::from(args.rate) / 1000.0;
    let mut sent = 0u64;
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while sent < total {
        ticker.tick().await;
        let due = ((started.elapsed().as_secs_f64() * 1000.0 * per_ms) as u64).min(total);
        while sent < due {
            io0.emit("tick", &now_ns()).await.ok();
            sent += 1;
        }
    }
    let publish_secs = started.elapsed().as_secs_f64();
    io0.emit("done", &()).await.ok();
    let mut remote = Vec::new();
    let mut local = Vec::new();
    let mut received = 0u64;
    let mut connected = Vec::new();
    for (node, task) in tasks {
        let (lat, client) = tokio::time::timeout(Duration::from_secs(60), task).await???;
        connected.push(client);
        received += lat.len() as u64;
        if node == 0 {
            local.extend(lat)
        } else {
            remote.extend(lat)
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    remote.sort_unstable();
    local.sort_unstable();

    // fetch_sockets with many in flight.
    let mut fetch = Vec::new();
    for &inflight in &args.inflight {
        let mut lats = Vec::new();
        let mut incomplete = 0usize;
        let t0 = Instant::now();
        for _ in 0..args.batches {
            let mut batch = Vec::with_capacity(inflight);
            for _ in 0..inflight {
                let io = ios[0].clone();
                batch.push(tokio::spawn(async move {
                    let t = Instant::now();
                    let n = io.fetch_sockets().await.map(|s| s.len()).unwrap_or(0);
                    (t.elapsed().as_nanos() as u64, n)
                }));
            }
            for t in batch {
                let (lat, n) = t.await?;
                if n != args.clients {
                    incomplete += 1;
                }
                lats.push(lat);
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        lats.sort_unstable();
        fetch.push(FetchOutcome {
            inflight,
            p50_ms: pct(&lats, 0.50),
            p99_ms: pct(&lats, 0.99),
            per_s: lats.len() as f64 / secs,
            incomplete,
        });
    }

    drop(connected);
    Ok(Outcome {
        backend: backend.into(),
        clients: args.clients,
        rate: args.rate,
        achieved_rate: total as f64 / publish_secs,
        deliveries_per_s: received as f64 / elapsed,
        expected: total * args.clients as u64,
        received,
        remote_p50_ms: pct(&remote, 0.50),
        remote_p99_ms: pct(&remote, 0.99),
        remote_max_ms: remote.last().copied().unwrap_or(0) as f64 / 1e6,
        local_p99_ms: pct(&local, 0.99),
        fetch,
        rss_mib: rss_mib(),
    })
}

/// The median of each figure over several runs of one backend.
fn median(runs: &[Outcome]) -> Outcome {
    let med = |f: &dyn Fn(&Outcome) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let mut out = runs[0].clone();
    out.achieved_rate = med(&|o| o.achieved_rate);
    out.deliveries_per_s = med(&|o| o.deliveries_per_s);
    out.received = med(&|o| o.received as f64) as u64;
    out.remote_p50_ms = med(&|o| o.remote_p50_ms);
    out.remote_p99_ms = med(&|o| o.remote_p99_ms);
    out.remote_max_ms = med(&|o| o.remote_max_ms);
    out.local_p99_ms = med(&|o| o.local_p99_ms);
    out.rss_mib = med(&|o| o.rss_mib);
    for (i, f) in out.fetch.iter_mut().enumerate() {
        f.p50_ms = med(&|o| o.fetch[i].p50_ms);
        f.p99_ms = med(&|o| o.fetch[i].p99_ms);
        f.per_s = med(&|o| o.fetch[i].per_s);
        f.incomplete = med(&|o| o.fetch[i].incomplete as f64) as usize;
    }
    out
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1e6
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// A minimal Engine.IO v4 / Socket.IO v5 WebSocket client that timestamps "tick" events.
struct BenchClient {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl BenchClient {
    async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket");
        let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
        ws.send(Message::Text("40".into())).await?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t.starts_with("40") => return Ok(Self { ws }),
                Some(Ok(_)) => {}
                other => anyhow::bail!("connect failed: {other:?}"),
            }
        }
    }

    /// Latencies (ns) of every "tick" until "done"; the client stays connected.
    async fn collect(mut self) -> anyhow::Result<(Vec<u64>, Self)> {
        let mut lats = Vec::new();
        while let Some(msg) = self.ws.next().await {
            let Message::Text(t) = msg? else { continue };
            if t.as_str() == "2" {
                self.ws.send(Message::Text("3".into())).await?;
                continue;
            }
            if let Some(rest) = t.strip_prefix("42[\"tick\",") {
                let sent: u64 = rest.trim_end_matches(']').parse()?;
                lats.push(now_ns().saturating_sub(sent));
            } else if t.starts_with("42[\"done\"") {
                break;
            }
        }
        Ok((lats, self))
    }
}

fn report(args: &Args, outcomes: &[Outcome]) -> anyhow::Result<()> {
    let mut md = String::new();
    writeln!(
        md,
        "{} nodes, {} clients, {} broadcasts/s for {} s from node 0 (each to every client); median of {} runs\n",
        args.nodes, args.clients, args.rate, args.seconds, args.runs
    )?;
    writeln!(
        md,
        "| backend | broadcasts/s achieved | deliveries/s | delivered | remote p50 | remote p99 | remote max | local p99 | peak RSS |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|")?;
    for o in outcomes {
        writeln!(
            md,
            "| {} | {:.0} | {:.0} | {}/{} | {:.2} ms | {:.2} ms | {:.1} ms | {:.2} ms | {:.0} MiB |",
            o.backend,
            o.achieved_rate,
            o.deliveries_per_s,
            o.received,
            o.expected,
            o.remote_p50_ms,
            o.remote_p99_ms,
            o.remote_max_ms,
            o.local_p99_ms,
            o.rss_mib
        )?;
    }
    writeln!(
        md,
        "\nfetch_sockets from node 0 ({} sockets on {} nodes), {} batches per level\n",
        args.clients, args.nodes, args.batches
    )?;
    writeln!(
        md,
        "| backend | in flight | p50 | p99 | requests/s | incomplete answers |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    for o in outcomes {
        for f in &o.fetch {
            writeln!(
                md,
                "| {} | {} | {:.2} ms | {:.2} ms | {:.0} | {}/{} |",
                o.backend,
                f.inflight,
                f.p50_ms,
                f.p99_ms,
                f.per_s,
                f.incomplete,
                f.inflight * args.batches
            )?;
        }
    }
    println!("{md}");

    std::fs::create_dir_all(&args.out)?;
    let mut csv = String::from("backend,metric,inflight,value\n");
    for o in outcomes {
        for (m, v) in [
            ("achieved_rate", o.achieved_rate),
            ("deliveries_per_s", o.deliveries_per_s),
            ("remote_p50_ms", o.remote_p50_ms),
            ("remote_p99_ms", o.remote_p99_ms),
            ("local_p99_ms", o.local_p99_ms),
            ("rss_mib", o.rss_mib),
        ] {
            writeln!(csv, "{},{m},,{v:.3}", o.backend)?;
        }
        for f in &o.fetch {
            writeln!(
                csv,
                "{},fetch_p50_ms,{},{:.3}",
                o.backend, f.inflight, f.p50_ms
            )?;
            writeln!(
                csv,
                "{},fetch_p99_ms,{},{:.3}",
                o.backend, f.inflight, f.p99_ms
            )?;
        }
    }
    std::fs::write(args.out.join("results.csv"), csv)?;
    std::fs::write(args.out.join("latency.svg"), svg(outcomes))?;
    std::fs::write(args.out.join("results.md"), md)?;
    eprintln!(
        "wrote {}/results.csv, latency.svg, results.md",
        args.out.display()
    );
    Ok(())
}

/// A grouped bar chart (log scale) of the latencies, self-contained SVG.
fn svg(outcomes: &[Outcome]) -> String {
    let mut groups: Vec<(String, Vec<f64>)> = vec![
        (
            "broadcast p50".into(),
            outcomes.iter().map(|o| o.remote_p50_ms).collect(),
        ),
        (
            "broadcast p99".into(),
            outcomes.iter().map(|o| o.remote_p99_ms).collect(),
        ),
    ];
    if let Some(first) = outcomes.first() {
        for (i, f) in first.fetch.iter().enumerate() {
            groups.push((
                format!("fetch p99, {} in flight", f.inflight),
                outcomes
                    .iter()
                    .map(|o| o.fetch.get(i).map(|f| f.p99_ms).unwrap_or(f64::NAN))
                    .collect(),
            ));
        }
    }
    let colors = ["#3b6fb6", "#e08a2c", "#4c9a52", "#b14a8a"];
    let (w, h, left, bottom, top) = (860.0, 360.0, 60.0, 60.0, 40.0);
    let plot_h = h - bottom - top;
    let max = groups
        .iter()
        .flat_map(|g| g.1.iter())
        .cloned()
        .filter(|v| v.is_finite())
        .fold(0.01f64, f64::max);
    let (lo, hi) = (0.01f64.log10(), (max * 2.0).log10());
    let y = |v: f64| top + plot_h * (1.0 - ((v.max(0.01)).log10() - lo) / (hi - lo));
    let gw = (w - left - 20.0) / groups.len() as f64;
    let bw = gw * 0.8 / outcomes.len().max(1) as f64;
    let mut s = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\n<rect width='100%' height='100%' fill='white'/>\n<text x='{left}' y='20' font-size='14'>latency (ms, log scale): lower is better</text>\n"
    );
    let mut tick = 0.01;
    while tick <= max * 2.0 {
        let ty = y(tick);
        let _ = writeln!(
            s,
            "<line x1='{left}' x2='{}' y1='{ty:.1}' y2='{ty:.1}' stroke='#ddd'/><text x='{}' y='{:.1}' text-anchor='end'>{tick}</text>",
            w - 20.0,
            left - 5.0,
            ty + 4.0
        );
        tick *= 10.0;
    }
    for (gi, (label, vals)) in groups.iter().enumerate() {
        let gx = left + gi as f64 * gw + gw * 0.1;
        for (bi, v) in vals.iter().enumerate() {
            if !v.is_finite() {
                continue;
            }
            let x = gx + bi as f64 * bw;
            let yv = y(*v);
            let _ = writeln!(
                s,
                "<rect x='{x:.1}' y='{yv:.1}' width='{:.1}' height='{:.1}' fill='{}'><title>{:.2} ms</title></rect>",
                bw * 0.9,
                (top + plot_h - yv).max(0.0),
                colors[bi % colors.len()],
                v
            );
        }
        let _ = writeln!(
            s,
            "<text x='{:.1}' y='{:.1}' text-anchor='middle'>{label}</text>",
            left + gi as f64 * gw + gw / 2.0,
            h - bottom + 18.0
        );
    }
    for (bi, o) in outcomes.iter().enumerate() {
        let x = left + bi as f64 * 140.0;
        let _ = writeln!(
            s,
            "<rect x='{x}' y='{}' width='12' height='12' fill='{}'/><text x='{}' y='{}'>{}</text>",
            h - 22.0,
            colors[bi % colors.len()],
            x + 16.0,
            h - 12.0,
            o.backend
        );
    }
    s.push_str("</svg>\n");
    s
}
