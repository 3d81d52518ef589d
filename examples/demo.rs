//! A local mesh in one command: three nodes on 127.0.0.1 with a throw-away CA generated in
//! memory, each serving the chat page and Socket.IO on its own port.
//!
//! ```text
//! cargo run --example demo            # then open http://127.0.0.1:3000, :3001 and :3002
//! ```

#[path = "common/app.rs"]
mod app;

use std::{net::SocketAddr, time::Duration};

use socketioxide_mesh::{DevCa, Mesh, MeshConfig, StaticSeeds};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,socketioxide_mesh=info".into()),
        )
        .init();
    let base: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(3000);
    let ca = DevCa::generate("demo CA")?;
    let mut meshes = Vec::new();
    let mut seed: Option<SocketAddr> = None;
    for i in 0..3u16 {
        let mut config =
            MeshConfig::local(ca.node_tls(&format!("node-{i}"))?).with_cluster_id("demo");
        if let Some(seed) = seed {
            config = config.with_seeds(StaticSeeds::new([seed.to_string()]));
        }
        let mesh = Mesh::start(config).await?;
        seed.get_or_insert(mesh.advertise_addr());
        let (http, _io) = app::serve(
            mesh.clone(),
            SocketAddr::from(([127, 0, 0, 1], base + i)),
            false,
        )
        .await?;
        println!(
            "node {i}: mesh on {} (QUIC, mutual TLS), chat on http://{http}/",
            mesh.advertise_addr()
        );
        meshes.push(mesh);
    }
    for mesh in &meshes {
        let mut members = mesh.watch_members();
        tokio::time::timeout(Duration::from_secs(10), members.wait_for(|m| m.len() == 2)).await??;
    }
    println!(
        "mesh formed: every node sees the two others. Open the three pages and chat; Ctrl-C to stop."
    );
    tokio::signal::ctrl_c().await?;
    for mesh in meshes {
        mesh.shutdown().await;
    }
    Ok(())
}
