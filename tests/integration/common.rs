//! Test harness: real mesh nodes (QUIC + mTLS on 127.0.0.1, port 0), each serving Socket.IO
//! over HTTP with axum, and helpers to wait for events instead of sleeping.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use serde_json::Value;
use socketioxide::{
    SocketIo,
    adapter::Emitter,
    extract::{AckSender, Data, SocketRef},
    handler::ConnectHandler,
};
use socketioxide_mesh::{
    DevCa, Mesh, MeshAdapter, MeshConfig, StaticSeeds, TlsConfig, TransportKind,
};

pub use crate::client::{Client, WAIT};

pub type A = MeshAdapter<Emitter>;
pub const NAMESPACES: [&str; 2] = ["/", "/admin"];

/// Install a log subscriber once (set `RUST_LOG=socketioxide_mesh=debug` to see it).
pub fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// One node: a mesh, a Socket.IO server on it, an HTTP listener.
pub struct Node {
    pub mesh: Mesh,
    pub io: SocketIo<A>,
    pub http: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Node {
    pub async fn client(&self, namespaces: &[&str]) -> anyhow::Result<Client> {
        Client::connect(self.http, namespaces).await
    }

    /// Stop gracefully (tell peers we leave).
    pub async fn shutdown(self) {
        self.mesh.shutdown().await;
    }
}

/// Handlers every test node registers, in a connect *middleware*: socketioxide 0.18 answers
/// the client's connect before an (async) connect handler runs, so handlers registered there
/// could miss the client's first events. Middlewares run before the answer.
pub async fn register_handlers(s: SocketRef<A>) -> Result<(), std::convert::Infallible> {
    s.on(
        "join",
        async |s: SocketRef<A>, Data(room): Data<String>, ack: AckSender<A>| {
            s.join(room);
            let _ = ack.send("joined");
        },
    );
    s.on(
        "leave",
        async |s: SocketRef<A>, Data(room): Data<String>, ack: AckSender<A>| {
            s.leave(room);
            let _ = ack.send("left");
        },
    );
    s.on("echo", async |Data(v): Data<Value>, ack: AckSender<A>| {
        let _ = ack.send(&v);
    });
    Ok(())
}

/// `?` for socketioxide's errors, which are not `Sync` (so not `anyhow` compatible).
pub trait Sio<T> {
    fn sio(self) -> anyhow::Result<T>;
}

impl<T, E: std::fmt::Display> Sio<T> for Result<T, E> {
    fn sio(self) -> anyhow::Result<T> {
        self.map_err(|e| anyhow::anyhow!("{e}"))
    }
}

pub fn config(kind: TransportKind, ca: &DevCa, name: &str, seeds: &[SocketAddr]) -> MeshConfig {
    config_tls(kind, ca.node_tls(name).expect("node certificate"), seeds)
}

/// A test node's configuration with the given TLS material.
pub fn config_tls(kind: TransportKind, tls: TlsConfig, seeds: &[SocketAddr]) -> MeshConfig {
    MeshConfig::local(tls)
        .with_transport(kind)
        .with_cluster_id("test-cluster")
        .with_seeds(StaticSeeds::new(seeds.iter().map(|s| s.to_string())))
}

pub async fn start_node(config: MeshConfig) -> anyhow::Result<Node> {
    let mesh = Mesh::start(config).await?;
    serve(mesh).await
}

/// Serve Socket.IO on an existing mesh.
pub async fn serve(mesh: Mesh) -> anyhow::Result<Node> {
    serve_with_buffer(mesh, 4096).await
}

/// Serve Socket.IO on an existing mesh with socketioxide's per-socket buffer of
/// `max_buffer_size` packets (its default is 128).
pub async fn serve_with_buffer(mesh: Mesh, max_buffer_size: usize) -> anyhow::Result<Node> {
    let (layer, io) = SocketIo::builder()
        .ack_timeout(Duration::from_secs(30))
        .max_buffer_size(max_buffer_size)
        .with_adapter::<A>(mesh.clone())
        .build_layer();
    for ns in NAMESPACES {
        io.ns(ns, (async || {}).with(register_handlers)).await?;
    }
    let app = axum::Router::new().layer(layer);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let http = listener.local_addr()?;
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.ok();
    });
    Ok(Node {
        mesh,
        io,
        http,
        server,
    })
}

/// Wait until every node lists every other one as a member serving every test namespace.
pub async fn converge(nodes: &[&Node]) -> anyhow::Result<()> {
    let want = nodes.len() - 1;
    for node in nodes {
        let mut members = node.mesh.watch_members();
        tokio::time::timeout(
            WAIT,
            members.wait_for(|m| {
                m.len() == want && m.iter().all(|m| NAMESPACES.iter().all(|ns| m.serves(ns)))
            }),
        )
        .await
        .with_context(|| {
            format!(
                "node {} sees {:?}",
                node.mesh.node_id(),
                node.mesh.members()
            )
        })??;
    }
    Ok(())
}

/// A cluster of `n` nodes from one CA; node i>0 seeds from node 0.
pub struct Cluster {
    pub kind: TransportKind,
    pub ca: Arc<DevCa>,
    pub nodes: Vec<Node>,
}

impl Cluster {
    pub async fn start(kind: TransportKind, n: usize) -> anyhow::Result<Cluster> {
        Self::start_with(kind, n, |c| c).await
    }

    pub async fn start_with(
        kind: TransportKind,
        n: usize,
        tweak: impl Fn(MeshConfig) -> MeshConfig,
    ) -> anyhow::Result<Cluster> {
        logs();
        let ca = Arc::new(DevCa::generate("test CA")?);
        let first = start_node(tweak(config(kind, &ca, "node-0", &[]))).await?;
        let seed = first.mesh.advertise_addr();
        let mut nodes = vec![first];
        for i in 1..n {
            nodes.push(start_node(tweak(config(kind, &ca, &format!("node-{i}"), &[seed]))).await?);
        }
        converge(&nodes.iter().collect::<Vec<_>>()).await?;
        Ok(Cluster { kind, ca, nodes })
    }

    pub fn seed(&self) -> SocketAddr {
        self.nodes[0].mesh.advertise_addr()
    }

    /// The configuration of a node that tries to join this cluster with `tls` (seeded from
    /// node 0, same transport and cluster id: tweak them to test refusals).
    pub fn outsider(&self, tls: TlsConfig) -> MeshConfig {
        config_tls(self.kind, tls, &[self.seed()])
    }
}
