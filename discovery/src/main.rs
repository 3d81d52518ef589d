//! `socketioxide-mesh-discovery`: the seed discovery service binary.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::Parser;
use socketioxide_mesh::TlsConfig;
use socketioxide_mesh_discovery::{
    api,
    registry::{Limits, Registry},
    server::{self, ServerConfig},
};

/// File descriptors kept free of connections: listener, standard streams, the runtime's own.
const RESERVED_FDS: u64 = 64;

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[derive(Parser)]
#[command(
    version,
    about = "Seed discovery for socketioxide-mesh: hands out live seeds per cluster"
)]
struct Cli {
    /// Listen address. Default: 0.0.0.0:$PORT (PORT defaults to 8000).
    #[arg(long, env = "DISCOVERY_LISTEN")]
    listen: Option<SocketAddr>,
    /// Port when --listen is not given.
    #[arg(long, env = "PORT", default_value_t = 8000)]
    port: u16,
    /// Entries expire this long after their last renewal (milliseconds).
    #[arg(long, env = "DISCOVERY_TTL_MS", default_value_t = 30_000)]
    ttl_ms: u64,
    /// Clusters at most.
    #[arg(long, env = "DISCOVERY_MAX_CLUSTERS", default_value_t = 1024)]
    max_clusters: usize,
    /// Nodes at most per cluster.
    #[arg(long, env = "DISCOVERY_MAX_NODES", default_value_t = 1024)]
    max_nodes: usize,
    /// Seeds handed out per registration.
    #[arg(long, env = "DISCOVERY_SEEDS_PER_REPLY", default_value_t = 3)]
    seeds_per_reply: usize,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "DISCOVERY_MAX_BODY", default_value_t = 16 * 1024)]
    max_body: usize,
    /// Connections open at once at most (TLS handshakes included). At the limit, a new
    /// connection closes the one idle for the longest. Lowered, with a warning, to the open
    /// files limit (`ulimit -n`) less 64.
    #[arg(long, env = "DISCOVERY_MAX_CONNECTIONS", default_value_t = server::DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// A request head must arrive in full within this (milliseconds), on a new connection or
    /// between requests on a keep-alive connection.
    #[arg(long, env = "DISCOVERY_HEADER_TIMEOUT_MS", default_value_t = ms(server::DEFAULT_HEADER_TIMEOUT))]
    header_timeout_ms: u64,
    /// Close a connection with no request in progress and nothing read or written for this
    /// long (milliseconds).
    #[arg(long, env = "DISCOVERY_IDLE_TIMEOUT_MS", default_value_t = ms(server::DEFAULT_IDLE_TIMEOUT))]
    idle_timeout_ms: u64,
    /// Answer 408 to a request not read and answered within this (milliseconds).
    #[arg(long, env = "DISCOVERY_REQUEST_TIMEOUT_MS", default_value_t = ms(server::DEFAULT_REQUEST_TIMEOUT))]
    request_timeout_ms: u64,
    /// With TLS: a handshake must complete within this (milliseconds).
    #[arg(long, env = "DISCOVERY_TLS_HANDSHAKE_TIMEOUT_MS", default_value_t = ms(server::DEFAULT_TLS_HANDSHAKE_TIMEOUT))]
    tls_handshake_timeout_ms: u64,
    /// Refuse registrations at loopback addresses (127.0.0.0/8, ::1). Off by default so that
    /// nodes on one host (development, tests) can register; turn it on in production.
    #[arg(long, env = "DISCOVERY_REFUSE_LOOPBACK")]
    refuse_loopback: bool,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `debug`.
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Serve HTTPS with this certificate chain (PEM). Needs --tls-key and --tls-client-ca.
    #[arg(long, env = "DISCOVERY_TLS_CERT", requires_all = ["tls_key", "tls_client_ca"])]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "DISCOVERY_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): the mesh's cluster CA.
    #[arg(long, env = "DISCOVERY_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log_level).context("--log-level")?,
        )
        .with_writer(std::io::stderr)
        .init();
    anyhow::ensure!(cli.ttl_ms >= 100, "--ttl-ms must be at least 100");
    anyhow::ensure!(
        cli.max_clusters > 0 && cli.max_nodes > 0,
        "limits must be positive"
    );
    anyhow::ensure!(
        cli.seeds_per_reply > 0,
        "--seeds-per-reply must be positive"
    );
    anyhow::ensure!(
        (256..=1 << 24).contains(&cli.max_body),
        "--max-body must be within 256 B..16 MiB"
    );
    let (min, max) = (ms(server::TIMEOUT_RANGE.0), ms(server::TIMEOUT_RANGE.1));
    for (flag, value) in [
        ("--header-timeout-ms", cli.header_timeout_ms),
        ("--idle-timeout-ms", cli.idle_timeout_ms),
        ("--request-timeout-ms", cli.request_timeout_ms),
        ("--tls-handshake-timeout-ms", cli.tls_handshake_timeout_ms),
    ] {
        anyhow::ensure!(
            (min..=max).contains(&value),
            "{flag} must be within {min}..={max}"
        );
    }
    anyhow::ensure!(
        (1..=1_000_000).contains(&cli.max_connections),
        "--max-connections must be within 1..=1000000"
    );
    let mut max_connections = cli.max_connections;
    if let Some(files) = open_files_limit() {
        let usable = usize::try_from(files.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX);
        anyhow::ensure!(
            usable > 0,
            "the open files limit ({files}) is too low: raise it (ulimit -n) above {RESERVED_FDS}"
        );
        if max_connections > usable {
            tracing::warn!(
                requested = max_connections,
                open_files_limit = files,
                max_connections = usable,
                "--max-connections lowered to the open files limit less {RESERVED_FDS}: raise the limit (ulimit -n) for more"
            );
            max_connections = usable;
        }
    }
    let config = ServerConfig {
        max_connections,
        header_timeout: Duration::from_millis(cli.header_timeout_ms),
        idle_timeout: Duration::from_millis(cli.idle_timeout_ms),
        request_timeout: Duration::from_millis(cli.request_timeout_ms),
        tls_handshake_timeout: Duration::from_millis(cli.tls_handshake_timeout_ms),
        ..ServerConfig::default()
    };

    let tls = match (&cli.tls_cert, &cli.tls_key, &cli.tls_client_ca) {
        (Some(cert), Some(key), Some(ca)) => {
            let tls = TlsConfig::from_pem_files(ca, cert, key).context("discovery TLS material")?;
            let config = tls
                .rustls_server_config(vec![b"http/1.1".to_vec()])
                .context("discovery TLS configuration")?;
            Some(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)))
        }
        _ => None,
    };
    let listen = cli
        .listen
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], cli.port)));
    let limits = Limits {
        max_clusters: cli.max_clusters,
        max_nodes_per_cluster: cli.max_nodes,
        seeds_per_reply: cli.seeds_per_reply,
    };
    let state = api::AppState::new(
        Registry::new(Duration::from_millis(cli.ttl_ms), limits)
            .refusing_loopback(cli.refuse_loopback),
    );
    let router = api::router(state.clone(), cli.max_body);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("bind {listen}"))?;
    let addr = listener.local_addr()?;
    let shutdown = shutdown_signal();
    println!(
        "{}",
        serde_json::json!({
            "event": "ready",
            "addr": addr.to_string(),
            "tls": tls.is_some(),
            "max_connections": max_connections,
        })
    );
    tracing::info!(%addr, tls = tls.is_some(), ttl_ms = cli.ttl_ms, max_connections,
        refuse_loopback = cli.refuse_loopback, "discovery service listening");
    server::serve(listener, state, router, tls, config, shutdown).await?;
    tracing::info!("discovery service stopped");
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C. The handlers are installed when this is called, not when
/// the future is first polled: call it before announcing readiness, or a signal sent right
/// after would kill the process the default way.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let ctrl_c = tokio::signal::ctrl_c();
    async move {
        #[cfg(unix)]
        if let Some(mut term) = term {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
        let _ = ctrl_c.await;
    }
}

/// The soft limit on open files of this process, when known (Linux).
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}
