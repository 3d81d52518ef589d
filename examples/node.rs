//! One mesh node serving Socket.IO: the program to run in a container or in three terminals.
//!
//! ```text
//! cargo run --example node -- gen-certs --out certs --nodes 3
//! cargo run --example node -- --http 127.0.0.1:3000 --mesh 127.0.0.1:7800 --certs certs/node-0
//! cargo run --example node -- --http 127.0.0.1:3001 --mesh 127.0.0.1:7801 --certs certs/node-1 --seeds 127.0.0.1:7800
//! cargo run --example node -- --http 127.0.0.1:3002 --mesh 127.0.0.1:7802 --certs certs/node-2 --seeds 127.0.0.1:7800
//! ```
//! Every flag has an environment variable (see `--help`); any other `MESH_*` variable of
//! `MeshConfig::from_env` applies too. Once listening, the node prints one JSON line
//! `{"event":"ready",...}` on stdout.

#[path = "common/app.rs"]
mod app;

use std::{collections::HashMap, io::Write, net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};
use socketioxide_mesh::{DevCa, Mesh, MeshConfig};

#[derive(Parser)]
#[command(about = "A socketioxide-mesh node serving Socket.IO")]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Socket.IO (HTTP) listen address.
    #[arg(long, env = "HTTP_ADDR", default_value = "127.0.0.1:3000")]
    http: SocketAddr,
    /// Mesh (peer transport) listen address.
    #[arg(long, env = "MESH_LISTEN_ADDR", default_value = "127.0.0.1:7800")]
    mesh: String,
    /// Address peers dial (defaults to the listen address, or $POD_IP).
    #[arg(long, env = "MESH_ADVERTISE_ADDR")]
    advertise: Option<String>,
    /// Comma-separated host:port seeds (names are re-resolved: a headless Service works).
    #[arg(long, env = "MESH_SEEDS")]
    seeds: Option<String>,
    /// Folder with ca.pem, node.pem, node.key.
    #[arg(long, env = "MESH_TLS_DIR")]
    certs: Option<PathBuf>,
    /// Cluster id: nodes only talk within the same cluster.
    #[arg(long, env = "MESH_CLUSTER_ID")]
    cluster: Option<String>,
    /// Socket.IO parser: `json` (default) or `msgpack`.
    #[arg(long, env = "SIO_PARSER", default_value = "json")]
    parser: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate a development CA and node certificates (one folder per node).
    GenCerts {
        /// Output folder.
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Number of node folders to write.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,socketioxide_mesh=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Some(Cmd::GenCerts { out, nodes }) = cli.cmd {
        let ca = DevCa::generate("socketioxide-mesh dev CA")?;
        for i in 0..nodes {
            let dir = out.join(format!("node-{i}"));
            ca.write_dir(&dir, &format!("node-{i}"))?;
            println!("wrote {}", dir.display());
        }
        println!("the CA key was not saved: generate again to add nodes");
        return Ok(());
    }

    // Flags override the environment; everything else comes from MESH_* variables.
    let mut vars: HashMap<&str, String> = HashMap::new();
    vars.insert("MESH_LISTEN_ADDR", cli.mesh);
    for (k, v) in [
        ("MESH_ADVERTISE_ADDR", cli.advertise),
        ("MESH_SEEDS", cli.seeds),
        ("MESH_CLUSTER_ID", cli.cluster),
        ("MESH_TLS_DIR", cli.certs.map(|p| p.display().to_string())),
    ] {
        if let Some(v) = v {
            vars.insert(k, v);
        }
    }
    let config =
        MeshConfig::from_lookup(|k| vars.get(k).cloned().or_else(|| std::env::var(k).ok()))?;
    let mesh = Mesh::start(config).await?;
    let msgpack = match cli.parser.as_str() {
        "json" => false,
        "msgpack" => true,
        other => anyhow::bail!("unknown parser {other:?}: use json or msgpack"),
    };
    let (http, _io) = app::serve(mesh.clone(), cli.http, msgpack).await?;
    let shutdown = shutdown_signal();
    let ready = serde_json::json!({
        "event": "ready",
        "http": http.to_string(),
        "mesh": mesh.advertise_addr().to_string(),
        "node_id": mesh.node_id().to_string(),
    });
    println!("{ready}");
    std::io::stdout().flush()?;
    tracing::info!(%http, "serving Socket.IO; open http://{http}/ for the chat page");

    shutdown.await;
    tracing::info!("shutting down");
    mesh.shutdown().await;
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
