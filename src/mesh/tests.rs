//! Mesh-level tests over the in-memory transport: fast, and able to cut links.

use std::{net::SocketAddr, time::Duration};

use crate::{
    DevCa, Mesh, MeshConfig, StaticSeeds,
    transport::{
        Endpoint,
        mem::{MemIdentity, MemNetwork},
    },
};

async fn mem_mesh(net: &MemNetwork, tls: &crate::TlsConfig, seeds: &[SocketAddr]) -> Mesh {
    let cfg = MeshConfig::local(tls.clone())
        .with_cluster_id("mem")
        .with_gossip_interval(Duration::from_millis(20))
        .with_seeds(StaticSeeds::new(seeds.iter().map(|s| s.to_string())));
    let identity = MemIdentity {
        issued_by: "mem".into(),
        trusts: "mem".into(),
    };
    let transport = Endpoint::Mem(net.bind(identity, cfg.max_frame_size));
    Mesh::start_with_transport(cfg, transport)
        .await
        .expect("start")
}

async fn members(mesh: &Mesh, n: usize) {
    let mut rx = mesh.watch_members();
    tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|m| m.len() == n))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{} never saw {n} members: {:?}",
                mesh.node_id(),
                mesh.members()
            )
        })
        .expect("watch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_then_heal_reforms_the_mesh() {
    let tls = DevCa::generate("mem").unwrap().node_tls("n").unwrap();
    let net = MemNetwork::new();
    let a = mem_mesh(&net, &tls, &[]).await;
    let b = mem_mesh(&net, &tls, &[a.advertise_addr()]).await;
    members(&a, 1).await;
    members(&b, 1).await;

    net.cut(a.advertise_addr(), b.advertise_addr());
    members(&a, 0).await;
    members(&b, 0).await;
    assert_eq!(a.server_count("/"), 1);

    net.heal(a.advertise_addr(), b.advertise_addr());
    members(&a, 1).await;
    members(&b, 1).await;
    a.shutdown().await;
    members(&b, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_converge_through_one_seed() {
    let tls = DevCa::generate("mem").unwrap().node_tls("n").unwrap();
    let net = MemNetwork::new();
    let a = mem_mesh(&net, &tls, &[]).await;
    let b = mem_mesh(&net, &tls, &[a.advertise_addr()]).await;
    let c = mem_mesh(&net, &tls, &[a.advertise_addr()]).await;
    for m in [&a, &b, &c] {
        members(m, 2).await;
    }
    // b and c only knew a, yet they talk directly: a server event from b reaches c.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    c.on_server_event(move |ev| {
        let _ = tx.send(ev.event.clone());
    });
    b.server_side_emit("hello", &()).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some("hello"));
}
