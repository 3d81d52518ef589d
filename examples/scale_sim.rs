//! Past the full mesh, on paper: a cost model of three topologies for 10, 100, 500 and 1,000
//! nodes, computed on simulated graphs (no network). For each: connections per node and in
//! total, hops and messages per broadcast to every node (mean and worst over sources), and
//! the idle keep-alive traffic the connections cost.
//!
//! ```text
//! cargo run --release --example scale_sim
//! cargo run --release --example scale_sim -- --degree 8 --cell 25 --sizes 10,100,500,1000
//! ```
//!
//! - **full mesh** (today): every pair connected; a broadcast is one hop to each node.
//! - **partial mesh**: each node keeps `degree` links (a random graph, connected), and a
//!   broadcast is relayed once along the shortest-path tree from its source (every node
//!   forwards to the neighbours it is the tree parent of): N − 1 messages, more hops.
//! - **cells**: full meshes of `cell` nodes; one gateway per cell, the gateways a full mesh
//!   among themselves. A broadcast goes to its cell, to its gateway, to every other gateway,
//!   and from each to its cell: at most 3 hops.

use std::collections::VecDeque;

use clap::Parser;

#[derive(Parser, Debug)]
struct Args {
    /// Cluster sizes.
    #[arg(long, default_value = "10,100,500,1000", value_delimiter = ',')]
    sizes: Vec<usize>,
    /// Links per node of the partial mesh.
    #[arg(long, default_value_t = 8)]
    degree: usize,
    /// Nodes per cell.
    #[arg(long, default_value_t = 25)]
    cell: usize,
    /// Keep-alive bytes per connection per second, both directions (QUIC pings every 500 ms,
    /// ~60 bytes each way with headers: the default here).
    #[arg(long, default_value_t = 240)]
    keepalive_bytes: u64,
    /// Seed of the random graphs.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// An undirected graph as adjacency lists.
struct Graph {
    adj: Vec<Vec<usize>>,
}

impl Graph {
    fn edges(&self) -> usize {
        self.adj.iter().map(Vec::len).sum::<usize>() / 2
    }

    fn connect(&mut self, a: usize, b: usize) -> bool {
        if a == b || self.adj[a].contains(&b) {
            return false;
        }
        self.adj[a].push(b);
        self.adj[b].push(a);
        true
    }

    /// Hop distance from `src` to every node (`usize::MAX`: unreachable).
    fn bfs(&self, src: usize) -> Vec<usize> {
        let mut dist = vec![usize::MAX; self.adj.len()];
        dist[src] = 0;
        let mut queue = VecDeque::from([src]);
        while let Some(u) = queue.pop_front() {
            for &v in &self.adj[u] {
                if dist[v] == usize::MAX {
                    dist[v] = dist[u] + 1;
                    queue.push_back(v);
                }
            }
        }
        dist
    }
}

/// A connected random graph where every node has about `degree` links: a ring (so it is
/// connected), then random links until each node has `degree`.
fn partial_mesh(n: usize, degree: usize, rng: &mut fastrand::Rng) -> Graph {
    let mut g = Graph {
        adj: vec![Vec::new(); n],
    };
    for i in 0..n {
        g.connect(i, (i + 1) % n);
    }
    let degree = degree.min(n - 1);
    for i in 0..n {
        let mut tries = 0;
        while g.adj[i].len() < degree && tries < 50 * degree {
            let j = rng.usize(..n);
            if g.adj[j].len() < degree {
                g.connect(i, j);
            }
            tries += 1;
        }
    }
    g
}

/// Mean and worst of the largest hop count of a broadcast, over sources.
fn depth(g: &Graph, sources: &[usize]) -> (f64, usize) {
    let depths: Vec<usize> = sources
        .iter()
        .map(|&s| g.bfs(s).into_iter().max().unwrap_or(0))
        .collect();
    let mean = depths.iter().sum::<usize>() as f64 / depths.len() as f64;
    (mean, depths.into_iter().max().unwrap_or(0))
}

struct Row {
    topology: String,
    links_per_node: f64,
    links_total: usize,
    hops_mean: f64,
    hops_max: usize,
    messages: usize,
    keepalive_kbs: f64,
}

fn main() {
    let args = Args::parse();
    let mut rng = fastrand::Rng::with_seed(args.seed);
    println!(
        "| nodes | topology | links per node | links in all | hops to the farthest node (mean / worst) | messages per broadcast | idle keep-alive, whole cluster |"
    );
    println!("|---|---|---|---|---|---|---|");
    for &n in &args.sizes {
        let sources: Vec<usize> = (0..n.min(50)).map(|_| rng.usize(..n)).collect();
        let ka = |links: usize| links as f64 * args.keepalive_bytes as f64 / 1000.0;
        let mut rows = Vec::new();

        let full = n * (n - 1) / 2;
        rows.push(Row {
            topology: "full mesh".into(),
            links_per_node: (n - 1) as f64,
            links_total: full,
            hops_mean: 1.0,
            hops_max: 1,
            messages: n - 1,
            keepalive_kbs: ka(full),
        });

        let g = partial_mesh(n, args.degree, &mut rng);
        let (mean, max) = depth(&g, &sources);
        rows.push(Row {
            topology: format!("partial mesh, {} links each, relayed", args.degree),
            links_per_node: 2.0 * g.edges() as f64 / n as f64,
            links_total: g.edges(),
            hops_mean: mean,
            hops_max: max,
            // A relay along the shortest-path tree: each node receives once.
            messages: n - 1,
            keepalive_kbs: ka(g.edges()),
        });

        let cells = n.div_ceil(args.cell);
        if cells > 1 {
            let mut c = Graph {
                adj: vec![Vec::new(); n],
            };
            let cell_of = |i: usize| i / args.cell;
            for i in 0..n {
                for j in i + 1..n {
                    if cell_of(i) == cell_of(j) {
                        c.connect(i, j);
                    }
                }
            }
            // Gateway of each cell: its first node.
            let gateways: Vec<usize> = (0..cells).map(|k| k * args.cell).collect();
            for (a, &ga) in gateways.iter().enumerate() {
                for &gb in &gateways[a + 1..] {
                    c.connect(ga, gb);
                }
            }
            // Hops: within the cell 1; elsewhere source → gateway (if not it) → gateway →
            // node (if not the gateway). Messages: own cell, own gateway's forward to the
            // other gateways, and each of those to its cell.
            let (mut hop_sum, mut hop_max) = (0.0, 0);
            for &s in &sources {
                let own_gateway = s == cell_of(s) * args.cell;
                let far = if own_gateway { 2 } else { 3 };
                hop_sum += far as f64;
                hop_max = hop_max.max(far);
            }
            let cell_size = |k: usize| (n - k * args.cell).min(args.cell);
            let messages = {
                let s = sources[0];
                let own = cell_of(s);
                let mut m = cell_size(own) - 1; // own cell (the gateway among them)
                m += cells - 1; // gateway to the other gateways
                m += (0..cells)
                    .filter(|&k| k != own)
                    .map(|k| cell_size(k) - 1)
                    .sum::<usize>();
                m
            };
            let max_links = (0..n).map(|i| c.adj[i].len()).max().unwrap_or(0);
            rows.push(Row {
                topology: format!(
                    "cells of {} (full meshes) + gateway mesh; gateways keep {max_links} links",
                    args.cell
                ),
                links_per_node: 2.0 * c.edges() as f64 / n as f64,
                links_total: c.edges(),
                hops_mean: hop_sum / sources.len() as f64,
                hops_max: hop_max,
                messages,
                keepalive_kbs: ka(c.edges()),
            });
        }
        for r in rows {
            println!(
                "| {n} | {} | {:.1} | {} | {:.1} / {} | {} | {:.0} KB/s |",
                r.topology,
                r.links_per_node,
                r.links_total,
                r.hops_mean,
                r.hops_max,
                r.messages,
                r.keepalive_kbs
            );
        }
    }
}
