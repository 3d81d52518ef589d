//! Interest-based routing (`MeshConfig::with_routing`): a room broadcast crosses only the links
//! to nodes with members in its rooms, with the same deliveries as sending it everywhere for
//! every ordering the mesh promises, and nodes without routing (the previous release) keep
//! getting everything.

use std::time::Duration;

use serde_json::json;

use socketioxide_mesh::{MeshConfig, TransportKind};

use crate::{client::Client, common::*};

const ROUTED: fn(MeshConfig) -> MeshConfig = |c| c.with_routing(true);

async fn join(client: &mut Client, room: &str) -> anyhow::Result<()> {
    let ack = client.emit_with_ack("/", "join", vec![json!(room)]).await?;
    assert_eq!(ack, vec![json!("joined")]);
    Ok(())
}

/// Wait until `node` knows that the member `of` announced `rooms` (exactly) in "/".
async fn announced(node: &Node, of: &Node, rooms: &[&str]) -> anyhow::Result<()> {
    let want: Vec<String> = rooms.iter().map(|r| r.to_string()).collect();
    let of = of.mesh.node_id().to_string();
    let started = std::time::Instant::now();
    loop {
        let topo = node.mesh.topology();
        let seen = topo
            .peers
            .iter()
            .find(|p| p.node_id == of)
            .and_then(|p| p.interest.clone())
            .and_then(|ns| ns.into_iter().find(|n| n.namespace == "/"));
        if let Some(n) = &seen
            && !n.every_room
            && n.rooms == want
        {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < WAIT,
            "node {} never saw {of} announce {want:?}: {seen:?}",
            node.mesh.node_id()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn applied(node: &Node, kind: &str) -> u64 {
    node.mesh.stats().commands_applied_by_kind[kind]
}

/// Emit `event` to every socket from `node`, and wait until `client` got it: everything
/// `node` sent to `client`'s node before has been applied there.
async fn barrier(node: &Node, client: &mut Client, event: &str) -> anyhow::Result<()> {
    node.io.emit(event, &()).await.sio()?;
    client.event("/", event).await?;
    Ok(())
}

/// A room broadcast goes to the node with a member in the room, not to the others; a
/// broadcast to everyone still goes everywhere.
async fn room_broadcasts_go_only_where_the_room_has_members(
    kind: TransportKind,
) -> anyhow::Result<()> {
    let c = Cluster::start_with(kind, 3, ROUTED).await?;
    let mut cl = Vec::new();
    for node in &c.nodes {
        cl.push(node.client(&["/"]).await?);
    }
    join(&mut cl[1], "red").await?;
    announced(&c.nodes[0], &c.nodes[1], &["red"]).await?;
    announced(&c.nodes[0], &c.nodes[2], &[]).await?;
    let before = applied(&c.nodes[2], "broadcast");

    c.nodes[0].io.to("red").emit("to-red", &1).await.sio()?;
    cl[1].event("/", "to-red").await?;
    // Several rooms: the union of their members' nodes.
    c.nodes[0]
        .io
        .to(["blue", "red"])
        .emit("to-red-or-blue", &2)
        .await
        .sio()?;
    cl[1].event("/", "to-red-or-blue").await?;
    barrier(&c.nodes[0], &mut cl[2], "after").await?;
    // Node 2 got only the broadcast to everyone.
    assert_eq!(applied(&c.nodes[2], "broadcast"), before + 1);
    assert_eq!(c.nodes[0].mesh.stats().broadcasts_routed_away, 2);
    // A room nobody is in: it leaves the node for nowhere.
    c.nodes[0].io.to("nobody").emit("lost", &3).await.sio()?;
    assert_eq!(c.nodes[0].mesh.stats().broadcasts_routed_away, 4);

    // The member leaves: its node stops getting the room's broadcasts.
    let ack = cl[1]
        .emit_with_ack("/", "leave", vec![json!("red")])
        .await?;
    assert_eq!(ack, vec![json!("left")]);
    announced(&c.nodes[0], &c.nodes[1], &[]).await?;
    let before = applied(&c.nodes[1], "broadcast");
    c.nodes[0].io.to("red").emit("to-red", &4).await.sio()?;
    barrier(&c.nodes[0], &mut cl[1], "after-leave").await?;
    assert_eq!(applied(&c.nodes[1], "broadcast"), before + 1);
    Ok(())
}

/// The ordering the mesh promises holds with routing: a join a node sends (a remote socket's
/// join, or `io.in(..).join(..)`) followed by that node's broadcast to the room reaches the
/// joined socket, in a fresh room every time, before any announcement could have come back.
async fn a_join_then_a_broadcast_from_the_same_node_reaches_the_joined_socket(
    kind: TransportKind,
) -> anyhow::Result<()> {
    let c = Cluster::start_with(kind, 3, ROUTED).await?;
    let mut far = c.nodes[2].client(&["/"]).await?;
    let far_sid = far.sid("/");
    join(&mut far, "group").await?;
    announced(&c.nodes[0], &c.nodes[2], &["group"]).await?;
    let remote = c.nodes[0]
        .io
        .fetch_sockets()
        .await
        .sio()?
        .into_iter()
        .find(|s| s.data().id.to_string() == far_sid)
        .expect("the far socket");
    // A remote socket's join goes to its node only.
    for i in 0..20 {
        let room = format!("fresh-{i}");
        remote.join(room.clone()).await.sio()?;
        c.nodes[0].io.to(room).emit("fresh", &i).await.sio()?;
    }
    for i in 0..20 {
        let p = far.event("/", "fresh").await?;
        assert_eq!(p.args(), vec![json!(i)]);
    }
    // Node 1 has no member in those rooms: none of them went there.
    let mut near = c.nodes[1].client(&["/"]).await?;
    barrier(&c.nodes[0], &mut near, "after").await?;
    assert_eq!(applied(&c.nodes[1], "broadcast"), 1);
    // `io.in(room).join(..)` goes to every node (any may have members in "group").
    for i in 0..20 {
        let room = format!("also-{i}");
        c.nodes[0]
            .io
            .within("group")
            .join(room.clone())
            .await
            .sio()?;
        c.nodes[0].io.to(room).emit("also", &i).await.sio()?;
    }
    for i in 0..20 {
        let p = far.event("/", "also").await?;
        assert_eq!(p.args(), vec![json!(i)]);
    }
    Ok(())
}

/// A rolling upgrade: a node without routing (as the previous release: it neither announces
/// nor understands announcements) beside nodes with it. It gets every broadcast, its own
/// broadcasts go everywhere, nobody breaks the protocol, and the routing nodes still route
/// between themselves.
async fn nodes_without_routing_get_everything_as_before(kind: TransportKind) -> anyhow::Result<()> {
    let ca = std::sync::Arc::new(socketioxide_mesh::DevCa::generate("mixed CA")?);
    logs();
    let a = start_node(config(kind, &ca, "node-a", &[]).with_routing(true)).await?;
    let seed = [a.mesh.advertise_addr()];
    let b = start_node(config(kind, &ca, "node-b", &seed).with_routing(true)).await?;
    let old = start_node(config(kind, &ca, "node-old", &seed)).await?;
    converge(&[&a, &b, &old]).await?;
    let (mut ca_, mut cb, mut cold) = (
        a.client(&["/"]).await?,
        b.client(&["/"]).await?,
        old.client(&["/"]).await?,
    );
    join(&mut ca_, "shared").await?;
    join(&mut cb, "shared").await?;
    join(&mut cold, "shared").await?;
    join(&mut ca_, "only-a").await?;
    announced(&b, &a, &["only-a", "shared"]).await?;
    announced(&a, &b, &["shared"]).await?;
    // The old node shows as a member without routing, whose rooms nobody knows.
    let topo = a.mesh.topology();
    let peer = topo
        .peers
        .iter()
        .find(|p| p.node_id == old.mesh.node_id().to_string())
        .expect("old node listed");
    assert!(!peer.routing && peer.interest.is_none(), "{peer:?}");

    for (i, node) in [&a, &b, &old].into_iter().enumerate() {
        node.io.to("shared").emit("shared", &i).await.sio()?;
    }
    for client in [&mut ca_, &mut cb, &mut cold] {
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(client.event("/", "shared").await?.args()[0].clone());
        }
        got.sort_by_key(|v| v.as_u64());
        assert_eq!(got, vec![json!(0), json!(1), json!(2)]);
    }
    // A room only node a has: b skips it, the old node still gets it (it announced nothing).
    let (b_before, old_before) = (applied(&b, "broadcast"), applied(&old, "broadcast"));
    b.io.to("only-a").emit("only-a", &()).await.sio()?;
    ca_.event("/", "only-a").await?;
    barrier(&b, &mut cold, "after").await?;
    assert_eq!(
        applied(&old, "broadcast"),
        old_before + 2,
        "only-a and the barrier"
    );
    a.io.to("only-a").emit("only-a-local", &()).await.sio()?;
    barrier(&a, &mut cb, "after-a").await?;
    assert_eq!(applied(&b, "broadcast"), b_before + 1, "only the barrier");
    // The old node never received an announcement, and nobody broke the protocol.
    assert_eq!(applied(&old, "interest"), 0);
    for node in [&a, &b, &old] {
        assert_eq!(node.mesh.stats().protocol_errors, 0);
    }
    Ok(())
}

/// A node that restarts loses its rooms with its sockets; once its client is back in the
/// room, it announces it again (a snapshot on the new connection) and gets the room's
/// broadcasts again.
async fn a_restarted_node_announces_its_rooms_again(kind: TransportKind) -> anyhow::Result<()> {
    let mut c = Cluster::start_with(kind, 3, ROUTED).await?;
    let mut cl = c.nodes[1].client(&["/"]).await?;
    join(&mut cl, "red").await?;
    announced(&c.nodes[0], &c.nodes[1], &["red"]).await?;
    drop(cl);
    let gone = c.nodes.remove(1);
    let gone_id = gone.mesh.node_id();
    gone.shutdown().await;
    let mut members = c.nodes[0].mesh.watch_members();
    tokio::time::timeout(
        WAIT,
        members.wait_for(|m| m.iter().all(|m| m.node_id != gone_id)),
    )
    .await??;
    let back = start_node(ROUTED(config(kind, &c.ca, "node-1b", &[c.seed()]))).await?;
    converge(&[&c.nodes[0], &c.nodes[1], &back]).await?;
    let mut cl = back.client(&["/"]).await?;
    announced(&c.nodes[0], &back, &[]).await?;
    join(&mut cl, "red").await?;
    announced(&c.nodes[0], &back, &["red"]).await?;
    c.nodes[0]
        .io
        .to("red")
        .emit("welcome-back", &())
        .await
        .sio()?;
    cl.event("/", "welcome-back").await?;
    Ok(())
}

both_transports!(
    room_broadcasts_go_only_where_the_room_has_members,
    a_join_then_a_broadcast_from_the_same_node_reaches_the_joined_socket,
    nodes_without_routing_get_everything_as_before,
    a_restarted_node_announces_its_rooms_again,
);
