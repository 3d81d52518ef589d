//! Commands from one node are applied on every peer in the order that node issued them, and a
//! request sees the commands its node issued before it.

use serde_json::json;

use socketioxide_mesh::TransportKind;

use crate::common::*;

async fn join_then_room_emit_arrives_on_a_remote_node(kind: TransportKind) -> anyhow::Result<()> {
    let c = Cluster::start(kind, 2).await?;
    let mut client = c.nodes[1].client(&["/"]).await?;
    let remote = c.nodes[0]
        .io
        .fetch_sockets()
        .await
        .sio()?
        .pop()
        .expect("the remote socket");
    assert_eq!(remote.data().id.to_string(), client.sid("/"));
    for round in 0..50 {
        let room = format!("fresh-{round}");
        // Two commands back to back from node 0, no waiting in between: the join must be
        // applied on node 1 before the emit to that room.
        remote.join(room.clone()).await.sio()?;
        c.nodes[0].io.to(room).emit("hello", &round).await.sio()?;
        let p = client.event("/", "hello").await?;
        assert_eq!(p.args(), vec![json!(round)]);
    }
    Ok(())
}

async fn thousand_sequential_broadcasts_arrive_in_order(kind: TransportKind) -> anyhow::Result<()> {
    let c = Cluster::start(kind, 2).await?;
    let mut client = c.nodes[1].client(&["/"]).await?;
    for i in 0..1000u32 {
        c.nodes[0].io.emit("seq", &i).await.sio()?;
    }
    for i in 0..1000u32 {
        let p = client.event("/", "seq").await?;
        assert_eq!(p.args(), vec![json!(i)], "broadcast {i} out of order");
    }
    Ok(())
}

async fn request_sees_the_commands_sent_before_it(kind: TransportKind) -> anyhow::Result<()> {
    let c = Cluster::start(kind, 3).await?;
    let mut _clients = Vec::new();
    for node in &c.nodes[1..] {
        _clients.push(node.client(&["/"]).await?);
    }
    let remotes = c.nodes[0].io.fetch_sockets().await.sio()?;
    assert_eq!(remotes.len(), 2);
    for round in 0..50 {
        let room = format!("q-{round}");
        for remote in &remotes {
            remote.join(room.clone()).await.sio()?;
        }
        let found = c.nodes[0].io.to(room.clone()).fetch_sockets().await.sio()?;
        assert_eq!(
            found.len(),
            2,
            "round {round}: the joins were not applied before the fetch"
        );
        c.nodes[0]
            .io
            .to(room.clone())
            .leave(room.clone())
            .await
            .sio()?;
        let rooms = c.nodes[0].io.rooms().await.sio()?;
        assert!(
            !rooms.iter().any(|r| *r == room),
            "round {round}: the leave was not applied before rooms()"
        );
    }
    Ok(())
}

both_transports!(
    join_then_room_emit_arrives_on_a_remote_node,
    thousand_sequential_broadcasts_arrive_in_order,
    request_sees_the_commands_sent_before_it
);
