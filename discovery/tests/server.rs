//! The server's bounds, over real sockets: idle connections cannot starve the service, and
//! silent, idle or slow connections are closed by the timeouts, over plain HTTP and TLS.
//!
//! Timeouts that must elapse are configured short; the tests wait for the server to close
//! the connection (end of stream), with an upper bound, rather than sleeping.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use socketioxide_mesh::{DevCa, TlsConfig};
use socketioxide_mesh_discovery::{
    api::{self, AppState},
    registry::{Limits, Registry},
    server::{self, ServerConfig},
    stats::Cause,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    sync::oneshot,
    task::JoinHandle,
};
use tokio_rustls::{
    TlsAcceptor, TlsConnector,
    rustls::pki_types::{ServerName, pem::PemObject},
};

/// Upper bound on anything expected to happen "at once".
const PROMPT: Duration = Duration::from_secs(5);
/// A timeout the test does not want to elapse.
const LONG: Duration = Duration::from_secs(600);
/// A timeout the test waits for.
const SHORT: Duration = Duration::from_millis(200);

struct Server {
    addr: SocketAddr,
    state: Arc<AppState>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    async fn start(config: ServerConfig, tls: Option<TlsAcceptor>) -> Server {
        let registry = Registry::new(Duration::from_secs(30), Limits::default());
        Self::start_with(registry, config, tls).await
    }

    async fn start_with(
        registry: Registry,
        config: ServerConfig,
        tls: Option<TlsAcceptor>,
    ) -> Server {
        let state = AppState::new(registry);
        let router = api::router(state.clone(), 16 * 1024);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::serve(
            listener,
            state.clone(),
            router,
            tls,
            config,
            async move {
                let _ = stopped.await;
            },
        ));
        Server {
            addr,
            state,
            stop: Some(stop),
            task,
        }
    }

    fn count(&self, cause: Cause) -> u64 {
        self.state.stats().count(cause)
    }

    /// Wait (bounded) until `cause` was counted `n` times, and check it is not counted more:
    /// the server counts a closed connection just after the peer sees it closed.
    async fn counted(&self, cause: Cause, n: u64) {
        let deadline = Instant::now() + PROMPT;
        while self.count(cause) < n {
            assert!(Instant::now() < deadline, "{:?}", self.state.stats());
            tokio::task::yield_now().await;
        }
        assert_eq!(self.count(cause), n, "{:?}", self.state.stats());
    }
}

fn config() -> ServerConfig {
    ServerConfig {
        header_timeout: LONG,
        idle_timeout: LONG,
        request_timeout: LONG,
        tls_handshake_timeout: LONG,
        ..ServerConfig::default()
    }
}

/// Send `request` (which must ask for `Connection: close`) and read the answer to its end:
/// the status code and the body.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, request: &str) -> (u16, String) {
    s.write_all(request.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(PROMPT, s.read_to_end(&mut buf))
        .await
        .expect("an answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: discovery\r\nConnection: close\r\n\r\n")
}

fn post(path: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: discovery\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

async fn connect(addr: SocketAddr) -> TcpStream {
    tokio::time::timeout(PROMPT, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect")
}

/// Wait until the server closes `s` (end of stream or reset), within `bound`; returns what it
/// sent before.
async fn closed_within<S: AsyncRead + Unpin>(s: &mut S, bound: Duration) -> Vec<u8> {
    let mut buf = Vec::new();
    match tokio::time::timeout(bound, s.read_to_end(&mut buf)).await {
        Ok(_) => buf,
        Err(_) => panic!("still open after {bound:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cannot_starve_health_or_registration() {
    // Long timeouts: only the connection limit protects the service here.
    let server = Server::start(
        ServerConfig {
            max_connections: 64,
            ..config()
        },
        None,
    )
    .await;
    let mut idle = Vec::new();
    for _ in 0..300 {
        idle.push(connect(server.addr).await);
    }
    let started = Instant::now();
    let (status, body) = exchange(connect(server.addr).await, &get("/healthz")).await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    let (status, body) = exchange(
        connect(server.addr).await,
        &post(
            "/v1/clusters/chat/nodes",
            r#"{"node_id":"n1","addr":"10.0.0.1:7800"}"#,
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"seeds\""), "{body}");
    assert!(started.elapsed() < PROMPT, "took {:?}", started.elapsed());

    // The connections idle for the longest made room: the first ones are closed.
    for s in idle.iter_mut().take(10) {
        assert!(closed_within(s, PROMPT).await.is_empty());
    }
    assert!(server.state.stats().open_connections() <= 64);
    assert!(
        server.count(Cause::Evicted) >= 300 - 64,
        "{:?}",
        server.state.stats()
    );
    let (status, body) = exchange(connect(server.addr).await, &get("/v1/stats")).await;
    assert_eq!(status, 200);
    let stats: serde_json::Value = serde_json::from_str(&body).expect("JSON stats");
    assert_eq!(stats["connections"]["limit"], 64, "{stats}");
    assert!(
        stats["events"]["evicted_at_connection_limit"].as_u64() >= Some(300 - 64),
        "{stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_busy_with_a_request_are_not_evicted() {
    let server = Server::start(
        ServerConfig {
            max_connections: 2,
            ..config()
        },
        None,
    )
    .await;
    // Two connections in the middle of a request (the body is not sent yet).
    let head = "POST /v1/clusters/chat/nodes HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\
                Content-Type: application/json\r\nContent-Length: 39\r\n\r\n";
    let mut busy = Vec::new();
    for _ in 0..2 {
        let mut s = connect(server.addr).await;
        s.write_all(head.as_bytes()).await.expect("write");
        busy.push(s);
    }
    // Wait until both requests are in progress (no sleep: poll the counter).
    let deadline = Instant::now() + PROMPT;
    while server.state.stats().requests_in_progress() < 2 {
        assert!(Instant::now() < deadline);
        tokio::task::yield_now().await;
    }
    // A third client waits until one of them is done: a busy connection is never evicted.
    let third = tokio::spawn({
        let addr = server.addr;
        async move { exchange(connect(addr).await, &get("/healthz")).await }
    });
    let body = r#"{"node_id":"n1","addr":"10.0.0.1:7800"}"#;
    assert_eq!(body.len(), 39);
    let mut first = busy.remove(0);
    first.write_all(body.as_bytes()).await.expect("write");
    let answer = String::from_utf8_lossy(&closed_within(&mut first, PROMPT).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let (status, _) = tokio::time::timeout(PROMPT, third)
        .await
        .expect("the third client is served once a slot is free")
        .expect("join");
    assert_eq!(status, 200);
    // The other request was not cut to make room: it still completes.
    let mut second = busy.remove(0);
    second.write_all(body.as_bytes()).await.expect("write");
    let answer = String::from_utf8_lossy(&closed_within(&mut second, PROMPT).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_slow_heads_are_closed_after_the_header_timeout() {
    let server = Server::start(
        ServerConfig {
            header_timeout: SHORT,
            ..config()
        },
        None,
    )
    .await;
    let started = Instant::now();
    let mut silent = connect(server.addr).await;
    let mut slow = connect(server.addr).await;
    // A head that never ends (slowloris).
    slow.write_all(b"GET / HTTP/1.1\r\nHost: d\r\nX-Slow: 1")
        .await
        .expect("write");
    assert!(closed_within(&mut silent, PROMPT).await.is_empty());
    closed_within(&mut slow, PROMPT).await;
    assert!(started.elapsed() >= SHORT, "closed early");
    server.counted(Cause::HeaderTimeout, 2).await;
    // A prompt client is unaffected.
    let (status, _) = exchange(connect(server.addr).await, &get("/healthz")).await;
    assert_eq!(status, 200);
}

/// Read one answer with a `Content-Length` from a keep-alive connection.
async fn read_answer(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .expect("a content-length");
            if body.len() >= len {
                return text;
            }
        }
        let n = tokio::time::timeout(PROMPT, s.read(&mut chunk))
            .await
            .expect("an answer in time")
            .expect("read");
        assert!(n > 0, "closed before the answer: {text:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_connections_are_closed_when_idle() {
    let keep_alive = "GET /healthz HTTP/1.1\r\nHost: d\r\n\r\n";
    // The idle timeout, with a long header timeout.
    let server = Server::start(
        ServerConfig {
            idle_timeout: SHORT,
            ..config()
        },
        None,
    )
    .await;
    let mut s = connect(server.addr).await;
    for _ in 0..2 {
        s.write_all(keep_alive.as_bytes()).await.expect("write");
        assert!(read_answer(&mut s).await.starts_with("HTTP/1.1 200"));
    }
    let idle_since = Instant::now();
    assert!(closed_within(&mut s, PROMPT).await.is_empty());
    assert!(idle_since.elapsed() >= SHORT - Duration::from_millis(50));
    server.counted(Cause::IdleTimeout, 1).await;
    // A connection that never sends anything is idle too.
    let mut silent = connect(server.addr).await;
    assert!(closed_within(&mut silent, PROMPT).await.is_empty());
    server.counted(Cause::IdleTimeout, 2).await;

    // Hyper applies the header timeout between requests too: with a long idle timeout, a
    // keep-alive connection is closed after the header timeout.
    let server = Server::start(
        ServerConfig {
            header_timeout: SHORT,
            ..config()
        },
        None,
    )
    .await;
    let mut s = connect(server.addr).await;
    s.write_all(keep_alive.as_bytes()).await.expect("write");
    assert!(read_answer(&mut s).await.starts_with("HTTP/1.1 200"));
    assert!(closed_within(&mut s, PROMPT).await.is_empty());
    server.counted(Cause::HeaderTimeout, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_body_never_comes_is_answered_408() {
    let server = Server::start(
        ServerConfig {
            request_timeout: SHORT,
            ..config()
        },
        None,
    )
    .await;
    let mut s = connect(server.addr).await;
    s.write_all(
        b"POST /v1/clusters/chat/nodes HTTP/1.1\r\nHost: d\r\n\
          Content-Type: application/json\r\nContent-Length: 39\r\n\r\n{\"node_id\"",
    )
    .await
    .expect("write");
    let answer = String::from_utf8_lossy(&closed_within(&mut s, PROMPT).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"error\""), "{answer}");
    server.counted(Cause::RequestTimeout, 1).await;
}

/// A registry with one cluster of 1000 nodes: listing them answers about 60 kB.
fn big_registry() -> Registry {
    let mut registry = Registry::new(Duration::from_secs(600), Limits::default());
    let mut rng = fastrand::Rng::with_seed(1);
    let now = Instant::now();
    for n in 0..1000u16 {
        let [hi, lo] = n.to_be_bytes();
        registry
            .register(
                now,
                "big",
                &format!("node-{n}"),
                SocketAddr::from(([10, 0, hi, lo], 7800)),
                &mut rng,
            )
            .expect("register");
    }
    registry
}

async fn wait_for(server: &Server, cause: Cause) {
    let deadline = Instant::now() + PROMPT;
    while server.count(cause) == 0 || server.state.stats().open_connections() > 0 {
        assert!(Instant::now() < deadline, "{:?}", server.state.stats());
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_its_answers_is_closed() {
    let server = Server::start_with(
        big_registry(),
        ServerConfig {
            idle_timeout: SHORT,
            ..config()
        },
        None,
    )
    .await;
    // 300 pipelined requests (18 MB of answers, more than the socket buffers hold), and
    // nothing read: the server cannot send, and nothing moves.
    let mut s = connect(server.addr).await;
    let pipelined = "GET /v1/clusters/big/nodes HTTP/1.1\r\nHost: d\r\n\r\n".repeat(300);
    s.write_all(pipelined.as_bytes()).await.expect("write");
    wait_for(&server, Cause::IdleTimeout).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(PROMPT, s.read_to_end(&mut got))
        .await
        .expect("closed");
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 200"), "{got:.100}");
    assert!(
        got.matches("HTTP/1.1 200").count() < 300,
        "every answer was sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undialable_addresses_and_bad_ids_are_400_over_http() {
    let server = Server::start(config(), None).await;
    for addr in [
        "255.255.255.255:1",
        "224.0.0.1:1",
        "0.0.0.0:7800",
        "10.0.0.1:0",
    ] {
        let body = format!(r#"{{"node_id":"a","addr":"{addr}"}}"#);
        let (status, answer) = exchange(
            connect(server.addr).await,
            &post("/v1/clusters/chat/nodes", &body),
        )
        .await;
        assert_eq!(status, 400, "{addr}: {answer}");
    }
    let long = "n".repeat(129);
    let req = format!(
        "DELETE /v1/clusters/chat/nodes/{long} HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"
    );
    let (status, answer) = exchange(connect(server.addr).await, &req).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("invalid node id"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_not_held_by_idle_connections() {
    let mut server = Server::start(
        ServerConfig {
            drain_timeout: Duration::from_secs(60),
            ..config()
        },
        None,
    )
    .await;
    let mut idle = Vec::new();
    for _ in 0..10 {
        idle.push(connect(server.addr).await);
    }
    let mut keep_alive = connect(server.addr).await;
    keep_alive
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: d\r\n\r\n")
        .await
        .expect("write");
    assert!(
        read_answer(&mut keep_alive)
            .await
            .starts_with("HTTP/1.1 200")
    );
    let _ = server.stop.take().expect("running").send(());
    tokio::time::timeout(PROMPT, &mut server.task)
        .await
        .expect("stops without waiting for idle connections")
        .expect("join")
        .expect("serve");
    assert!(closed_within(&mut keep_alive, PROMPT).await.is_empty());
}

struct Tls {
    ca: DevCa,
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

fn tls() -> Tls {
    let ca = DevCa::generate("discovery test CA").expect("CA");
    let server = ca.issue_server(&["127.0.0.1"]).expect("server cert");
    let server_tls = TlsConfig::from_pem(
        ca.cert_pem().as_bytes(),
        server.cert_pem.as_bytes(),
        server.key_pem.as_bytes(),
    )
    .expect("server TLS");
    let acceptor = TlsAcceptor::from(Arc::new(
        server_tls
            .rustls_server_config(vec![b"http/1.1".to_vec()])
            .expect("server config"),
    ));
    let member = ca.node_tls("member").expect("member TLS");
    let connector = TlsConnector::from(Arc::new(
        member
            .rustls_client_config(vec![b"http/1.1".to_vec()])
            .expect("client config"),
    ));
    Tls {
        ca,
        acceptor,
        connector,
    }
}

async fn tls_exchange(connector: &TlsConnector, addr: SocketAddr, request: &str) -> (u16, String) {
    let tcp = connect(addr).await;
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let stream = tokio::time::timeout(PROMPT, connector.connect(name, tcp))
        .await
        .expect("handshake in time")
        .expect("handshake");
    exchange(stream, request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_idle_connections_cannot_starve_members() {
    let tls = tls();
    let server = Server::start(
        ServerConfig {
            max_connections: 16,
            ..config()
        },
        Some(tls.acceptor.clone()),
    )
    .await;
    // Connections that never start their handshake.
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(connect(server.addr).await);
    }
    let (status, body) = tls_exchange(&tls.connector, server.addr, &get("/healthz")).await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    let (status, body) = tls_exchange(
        &tls.connector,
        server.addr,
        &post(
            "/v1/clusters/chat/nodes",
            r#"{"node_id":"n1","addr":"10.0.0.1:7800"}"#,
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(closed_within(&mut idle[0], PROMPT).await.is_empty());
    assert!(server.count(Cause::Evicted) >= 100 - 16);

    // Clients without a certificate, or with one from another CA, are refused and counted.
    let anonymous = {
        let mut roots = tokio_rustls::rustls::RootCertStore::empty();
        let ca = cert_der(tls.ca.cert_pem());
        roots.add(ca).expect("root");
        TlsConnector::from(Arc::new(
            tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
                tokio_rustls::rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(&[&tokio_rustls::rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth(),
        ))
    };
    let rogue = DevCa::generate("rogue").expect("rogue CA");
    let rogue = TlsConnector::from(Arc::new(rogue_config(&tls.ca, &rogue)));
    for connector in [&anonymous, &rogue] {
        for _ in 0..5 {
            let tcp = connect(server.addr).await;
            let name = ServerName::try_from("127.0.0.1").expect("name");
            // TLS 1.3: the client may finish its side before the server refuses; the request
            // then fails.
            if let Ok(Ok(mut s)) = tokio::time::timeout(PROMPT, connector.connect(name, tcp)).await
            {
                let _ = s.write_all(get("/healthz").as_bytes()).await;
                let mut buf = Vec::new();
                let _ = tokio::time::timeout(PROMPT, s.read_to_end(&mut buf)).await;
                assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
            }
        }
    }
    let deadline = Instant::now() + PROMPT;
    while server.count(Cause::TlsRefused) < 10 {
        assert!(Instant::now() < deadline, "{:?}", server.state.stats());
        tokio::task::yield_now().await;
    }
}

/// A client config trusting `ca` and presenting a certificate from `rogue`.
fn rogue_config(ca: &DevCa, rogue: &DevCa) -> tokio_rustls::rustls::ClientConfig {
    let cert = rogue.issue("rogue").expect("cert");
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    roots.add(cert_der(ca.cert_pem())).expect("root");
    let chain = vec![cert_der(&cert.cert_pem)];
    let key =
        tokio_rustls::rustls::pki_types::PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes())
            .expect("key");
    tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&tokio_rustls::rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)
    .expect("client auth")
}

fn cert_der(pem: &str) -> tokio_rustls::rustls::pki_types::CertificateDer<'static> {
    tokio_rustls::rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshakes_that_stall_are_closed() {
    let tls = tls();
    let server = Server::start(
        ServerConfig {
            tls_handshake_timeout: SHORT,
            ..config()
        },
        Some(tls.acceptor.clone()),
    )
    .await;
    let mut silent = connect(server.addr).await;
    assert!(closed_within(&mut silent, PROMPT).await.is_empty());
    server.counted(Cause::TlsHandshakeTimeout, 1).await;
    let (status, _) = tls_exchange(&tls.connector, server.addr, &get("/healthz")).await;
    assert_eq!(status, 200);

    // The idle timeout applies during the handshake too.
    let server = Server::start(
        ServerConfig {
            idle_timeout: SHORT,
            ..config()
        },
        Some(tls.acceptor.clone()),
    )
    .await;
    let mut silent = connect(server.addr).await;
    assert!(closed_within(&mut silent, PROMPT).await.is_empty());
    server.counted(Cause::IdleTimeout, 1).await;
}
