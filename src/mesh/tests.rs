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
    mem_mesh_with(net, tls, seeds, |c| c).await
}

async fn mem_mesh_with(
    net: &MemNetwork,
    tls: &crate::TlsConfig,
    seeds: &[SocketAddr],
    tune: impl FnOnce(MeshConfig) -> MeshConfig,
) -> Mesh {
    let cfg = MeshConfig::local(tls.clone())
        .with_cluster_id("mem")
        .with_gossip_interval(Duration::from_millis(20))
        .with_seeds(StaticSeeds::new(seeds.iter().map(|s| s.to_string())));
    let cfg = tune(cfg);
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

/// Two connected mem nodes with this batch delay, and a channel of the `u32` server events
/// the second receives.
async fn pair_with_delay(
    delay: Duration,
) -> (Mesh, Mesh, tokio::sync::mpsc::UnboundedReceiver<u32>) {
    let tls = DevCa::generate("mem").unwrap().node_tls("n").unwrap();
    let net = MemNetwork::new();
    // No probes during the test: they are commands too, and would share the writes counted.
    let tune = |c: MeshConfig| {
        c.with_batch_delay(delay)
            .with_probe(Duration::from_secs(60), Duration::from_secs(60))
    };
    let a = mem_mesh_with(&net, &tls, &[], tune).await;
    let b = mem_mesh_with(&net, &tls, &[a.advertise_addr()], tune).await;
    members(&a, 1).await;
    members(&b, 1).await;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    b.on_server_event(move |ev| {
        let _ = tx.send(ev.data::<u32>().unwrap());
    });
    (a, b, rx)
}

async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<u32>) -> u32 {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("delivered")
        .expect("open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_on_a_quiet_link_does_not_wait_for_the_batch_delay() {
    // A delay longer than the test's patience: the command must leave without it.
    let (a, _b, mut rx) = pair_with_delay(Duration::from_millis(100) * 600).await;
    a.server_side_emit("n", &7u32).await.unwrap();
    assert_eq!(next(&mut rx).await, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_link_sends_a_burst_in_one_write() {
    let (a, _b, mut rx) = pair_with_delay(Duration::from_millis(100)).await;
    let before = a.stats();
    a.server_side_emit("n", &0u32).await.unwrap();
    // The burst right behind the first command waits for the delay, then leaves in one write,
    // in order.
    for i in 1..=200u32 {
        a.server_side_emit("n", &i).await.unwrap();
    }
    for i in 0..=200u32 {
        assert_eq!(next(&mut rx).await, i);
    }
    let after = a.stats();
    assert_eq!(after.commands_sent - before.commands_sent, 201);
    let writes = after.batches_sent - before.batches_sent;
    assert!(
        (1..=3).contains(&writes),
        "{writes} writes for 201 commands"
    );
}
