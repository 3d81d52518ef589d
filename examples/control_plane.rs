//! Control-plane benchmark: what membership costs and how fast it moves, with N nodes in one
//! process on default settings, node 0 the only seed.
//!
//! ```text
//! cargo run --release --example control_plane                        # 10, 25 and 50 nodes, quic
//! cargo run --release --example control_plane -- --nodes 100 --transport ws
//! # loopback counters with only this run's packets (a network namespace of its own):
//! unshare -n sh -c 'ip link set lo up && target/release/examples/control_plane --nodes 100'
//! ```
//!
//! For each N it prints one Markdown row:
//! - **converge**: from starting nodes 1..N (all at once) until every node lists every other;
//! - **join seen by all**: one more node starts; until all N list it;
//! - **leave seen by all**: that node shuts down gracefully; until none lists it;
//! - **stop seen by all**: a node is dropped (its tasks end and its connections close, as
//!   when a process exits); until none lists it;
//! - **crash seen by all**: a node in a child process is killed with SIGKILL a second after
//!   joining (over QUIC nothing tells the others: only the probes can); until none lists it.
//!   Repeated `--crashes` times with a new child each time: the median and the worst;
//! - **idle**: per node and second, gossip payload bytes sent (before TLS and transport
//!   overhead) and every byte on the loopback interface (all packets, both directions, keep-
//!   alives and probes included, divided by N), and the process's CPU, all nodes together,
//!   over `--idle` seconds with no traffic.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use socketioxide_mesh::{DevCa, Mesh, MeshConfig, StaticSeeds, TlsConfig, TransportKind};

#[derive(Parser, Debug)]
struct Args {
    /// Cluster sizes to measure.
    #[arg(long, default_value = "10,25,50", value_delimiter = ',')]
    nodes: Vec<usize>,
    /// `quic` or `ws`.
    #[arg(long, default_value = "quic")]
    transport: String,
    /// The idle measurement window, in seconds.
    #[arg(long, default_value_t = 10)]
    idle: u64,
    /// How many crashes to measure per cluster size (one child process each).
    #[arg(long, default_value_t = 5)]
    crashes: usize,
    /// Gossip period in milliseconds (default: the library's).
    #[arg(long)]
    gossip_ms: Option<u64>,
    /// Internal: run one node with the TLS files of this directory, then wait to be killed.
    #[arg(long, hide = true)]
    child_dir: Option<std::path::PathBuf>,
    /// Internal: the child's seed.
    #[arg(long, hide = true)]
    child_seed: Option<SocketAddr>,
}

/// The longest any step may take before the benchmark gives up.
const PATIENCE: Duration = Duration::from_secs(60);

/// A node's configuration: default settings but the gossip period, on loopback.
fn config(args: &Args, tls: TlsConfig, seed: Option<SocketAddr>) -> anyhow::Result<MeshConfig> {
    let kind: TransportKind = args.transport.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut cfg = MeshConfig::new(tls)
        .with_transport(kind)
        .with_listen_addr(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .with_cluster_id("control-plane");
    if let Some(ms) = args.gossip_ms {
        cfg = cfg.with_gossip_interval(Duration::from_millis(ms));
    }
    if let Some(seed) = seed {
        cfg = cfg.with_seeds(StaticSeeds::new([seed.to_string()]));
    }
    Ok(cfg)
}

/// Bytes received plus sent on the loopback interface so far.
fn loopback_bytes() -> u64 {
    let Ok(dev) = std::fs::read_to_string("/proc/net/dev") else {
        return 0;
    };
    dev.lines()
        .find_map(|l| l.trim_start().strip_prefix("lo:"))
        .map(|rest| {
            let f: Vec<u64> = rest
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            // Receive bytes is field 0, transmit bytes field 8.
            f.first().copied().unwrap_or(0) + f.get(8).copied().unwrap_or(0)
        })
        .unwrap_or(0)
}

/// A node in a child process (this program again), killed to measure a crash.
async fn crash(
    args: &Args,
    ca: &DevCa,
    seed: SocketAddr,
    nodes: &[&Mesh],
) -> anyhow::Result<Duration> {
    let dir = std::env::temp_dir().join(format!("control-plane-{}", std::process::id()));
    ca.write_dir(&dir, "crash")?;
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args([
            "--transport",
            &args.transport,
            "--child-seed",
            &seed.to_string(),
        ])
        .arg("--child-dir")
        .arg(&dir)
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("child stdout")?;
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).map(|_| line)
    })
    .await??;
    let id = line.trim().to_string();
    anyhow::ensure!(!id.is_empty(), "the child did not start");
    until_all(nodes, "crash join", |m| {
        m.iter().any(|m| m.node_id.to_string() == id)
    })
    .await?;
    // Let it settle (probes running, gossip quiet) before the kill.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t = Instant::now();
    tracing::info!(node = %id, "killing the child");
    child.kill()?;
    let _ = child.wait();
    until_all(nodes, "crash", |m| {
        m.iter().all(|m| m.node_id.to_string() != id)
    })
    .await?;
    let took = t.elapsed();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(took)
}

/// The child: one node, its id on stdout, then nothing until killed.
fn child(args: &Args, dir: &std::path::Path, seed: SocketAddr) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let _mesh = Mesh::start(config(args, TlsConfig::from_dir(dir)?, Some(seed))?).await?;
        println!("{}", _mesh.node_id());
        std::future::pending().await
    })
}

/// CPU seconds this process used so far (user + system).
fn cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the command name (which may hold spaces): state is field 3, utime 14.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return f64::NAN;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // `rest` starts at field 3: utime (14) and stime (15) are at 11 and 12. 100 ticks/s.
    (ticks(11) + ticks(12)) / 100.0
}

/// Wait until `pred` holds for the members of every node in `nodes`.
async fn until_all(
    nodes: &[&Mesh],
    what: &str,
    pred: impl Fn(&[socketioxide_mesh::Member]) -> bool,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    for mesh in nodes {
        let mut members = mesh.watch_members();
        tokio::time::timeout(
            PATIENCE.saturating_sub(t0.elapsed()),
            members.wait_for(|m| pred(m)),
        )
        .await
        .with_context(|| {
            // Where it stands: how many members each node lists.
            let mut counts: Vec<usize> = nodes.iter().map(|m| m.members().len()).collect();
            counts.sort_unstable();
            format!("{what}: not within {PATIENCE:?}; members listed per node: {counts:?}")
        })??;
    }
    Ok(t0.elapsed())
}

async fn measure(args: &Args, n: usize) -> anyhow::Result<String> {
    let ca = DevCa::generate("control plane")?;
    let first = Mesh::start(config(args, ca.node_tls("n0")?, None)?).await?;
    let seed = first.advertise_addr();
    let t0 = Instant::now();
    let mut starting = Vec::new();
    for i in 1..n {
        let cfg = config(args, ca.node_tls(&format!("n{i}"))?, Some(seed))?;
        starting.push(tokio::spawn(Mesh::start(cfg)));
    }
    let mut nodes = vec![first];
    for s in starting {
        nodes.push(s.await??);
    }
    let all: Vec<&Mesh> = nodes.iter().collect();
    until_all(&all, "converge", |m| m.len() == n - 1).await?;
    let converge = t0.elapsed();

    // Idle: gossip only.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let bytes = |nodes: &[Mesh]| -> u64 { nodes.iter().map(|m| m.stats().gossip_bytes_sent).sum() };
    let (b0, l0, c0, w0) = (bytes(&nodes), loopback_bytes(), cpu_secs(), Instant::now());
    tokio::time::sleep(Duration::from_secs(args.idle)).await;
    let secs = w0.elapsed().as_secs_f64();
    let (b1, l1, c1) = (bytes(&nodes), loopback_bytes(), cpu_secs());
    let kb_per_node = (b1 - b0) as f64 / n as f64 / secs / 1000.0;
    // Loopback counts each packet once sent and once received.
    let wire_per_node = l1.saturating_sub(l0) as f64 / 2.0 / n as f64 / secs / 1000.0;
    let cpu_pct = 100.0 * (c1 - c0) / secs;

    // A node joins, then leaves gracefully.
    let extra = Mesh::start(config(args, ca.node_tls("extra")?, Some(seed))?).await?;
    let id = extra.node_id();
    let join = until_all(&all, "join", |m| m.iter().any(|m| m.node_id == id)).await?;
    extra.shutdown().await;
    let leave = until_all(&all, "leave", |m| m.iter().all(|m| m.node_id != id)).await?;

    // A node stops without leaving.
    let gone = nodes.pop().context("a node to stop")?;
    let id = gone.node_id();
    let t = Instant::now();
    drop(gone);
    let rest: Vec<&Mesh> = nodes.iter().collect();
    until_all(&rest, "stop", |m| m.iter().all(|m| m.node_id != id)).await?;
    let stop = t.elapsed();

    let mut crashes = Vec::new();
    for _ in 0..args.crashes.max(1) {
        crashes.push(crash(args, &ca, seed, &rest).await?);
    }
    crashes.sort_unstable();
    let (crash_median, crash_worst) = (crashes[crashes.len() / 2], crashes[crashes.len() - 1]);

    for mesh in &nodes {
        mesh.shutdown().await;
    }
    Ok(format!(
        "| {n} {} | {:.2} s | {:.2} s | {:.2} s | {:.2} s | {:.2} s / {:.2} s | {kb_per_node:.1} | {wire_per_node:.1} | {:.2} % |",
        args.transport,
        converge.as_secs_f64(),
        join.as_secs_f64(),
        leave.as_secs_f64(),
        stop.as_secs_f64(),
        crash_median.as_secs_f64(),
        crash_worst.as_secs_f64(),
        cpu_pct / n as f64,
    ))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Quiet unless asked (RUST_LOG): the table is the output.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let (Some(dir), Some(seed)) = (&args.child_dir, args.child_seed) {
        return child(&args, dir, seed);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!(
        "| N | converge | join seen by all | leave seen by all | stop seen by all | crash seen by all (median / worst) | idle gossip KB/s per node | idle wire KB/s per node | idle CPU per node (of one core) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for &n in &args.nodes {
        anyhow::ensure!(n >= 2, "at least 2 nodes");
        let row = rt.block_on(measure(&args, n))?;
        println!("{row}");
    }
    Ok(())
}
