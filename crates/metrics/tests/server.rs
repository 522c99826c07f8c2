//! The listener over real TCP connections on loopback.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers outside #[test] fns: a failure is the test failing"
)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use enrichd_metrics::{
    Metrics, ProbeFuture, Probes, ProviderLabel, ServerOptions, serve, serve_with,
};
use enrichd_testkit::eventually;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Answers whatever the test last set.
struct FakeProbes {
    healthy: Mutex<bool>,
    ready: Mutex<Result<(), String>>,
}

impl FakeProbes {
    fn new(healthy: bool, ready: Result<(), String>) -> Arc<Self> {
        Arc::new(Self {
            healthy: Mutex::new(healthy),
            ready: Mutex::new(ready),
        })
    }
}

impl Probes for FakeProbes {
    fn healthy(&self) -> ProbeFuture<'_, bool> {
        let healthy = *self.healthy.lock().unwrap();
        Box::pin(async move { healthy })
    }
    fn ready(&self) -> ProbeFuture<'_, Result<(), String>> {
        let ready = self.ready.lock().unwrap().clone();
        Box::pin(async move { ready })
    }
}

/// Never answers: a wedged actor system or a hung database call.
struct HangingProbes;

impl Probes for HangingProbes {
    fn healthy(&self) -> ProbeFuture<'_, bool> {
        Box::pin(std::future::pending())
    }
    fn ready(&self) -> ProbeFuture<'_, Result<(), String>> {
        Box::pin(std::future::pending())
    }
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Send raw bytes, read until the server closes. `Err` when it closed without an answer.
async fn exchange(addr: SocketAddr, raw: &[u8]) -> std::io::Result<Answer> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.write_all(raw).await?;
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut bytes))
        .await
        .expect("server answers within 10 s")?;
    let text = String::from_utf8(bytes).expect("answer is UTF-8");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no complete answer: {text:?}")))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    Ok(Answer {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    })
}

async fn get(addr: SocketAddr, path: &str) -> Answer {
    exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap()
}

async fn start(probes: Arc<dyn Probes>, options: ServerOptions) -> (Arc<Metrics>, SocketAddr) {
    let metrics = Arc::new(Metrics::new());
    let (addr, _task) = serve_with(loopback(), Arc::clone(&metrics), probes, options)
        .await
        .unwrap();
    (metrics, addr)
}

#[tokio::test]
async fn answers_each_path_over_tcp() {
    let (exported, addr) = start(FakeProbes::new(true, Ok(())), ServerOptions::default()).await;
    exported.events_acked.inc_by(5);
    assert_ne!(addr.port(), 0);

    let metrics = get(addr, "/metrics").await;
    assert_eq!(metrics.status, 200);
    assert_eq!(
        metrics.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert_eq!(metrics.body, exported.render());
    assert!(metrics.body.contains("enrichd_events_acked_total 5\n"));
    assert_eq!(
        metrics.header("content-length"),
        Some(metrics.body.len().to_string().as_str())
    );

    let with_query = get(addr, "/metrics?name[]=x").await;
    assert_eq!(with_query.status, 200);

    let health = get(addr, "/healthz").await;
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    let ready = get(addr, "/readyz").await;
    assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"));

    assert_eq!(get(addr, "/").await.status, 404);
    assert_eq!(get(addr, "/metrics/extra").await.status, 404);

    let post = exchange(
        addr,
        b"POST /metrics HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi",
    )
    .await
    .unwrap();
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));

    let head = exchange(addr, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(head.body, "");
    assert_eq!(
        head.header("content-length"),
        Some(metrics.body.len().to_string().as_str())
    );
}

#[tokio::test]
async fn failing_probes_answer_503_with_a_one_line_reason() {
    let probes = FakeProbes::new(
        false,
        Err("database unreachable\nconnection refused".into()),
    );
    let (_, addr) = start(probes.clone(), ServerOptions::default()).await;

    let health = get(addr, "/healthz").await;
    assert_eq!((health.status, health.body.as_str()), (503, "unhealthy\n"));
    let ready = get(addr, "/readyz").await;
    assert_eq!(
        (ready.status, ready.body.as_str()),
        (503, "not ready: database unreachable connection refused\n")
    );

    // The probes are asked on every request, not once.
    *probes.healthy.lock().unwrap() = true;
    *probes.ready.lock().unwrap() = Ok(());
    assert_eq!(get(addr, "/healthz").await.status, 200);
    assert_eq!(get(addr, "/readyz").await.status, 200);
}

#[tokio::test]
async fn a_hanging_probe_counts_as_failed() {
    let options = ServerOptions {
        probe_timeout: Duration::from_millis(100),
        ..ServerOptions::default()
    };
    let (_, addr) = start(Arc::new(HangingProbes), options).await;
    let health = get(addr, "/healthz").await;
    assert_eq!(
        (health.status, health.body.as_str()),
        (503, "unhealthy: probe timed out\n")
    );
    let ready = get(addr, "/readyz").await;
    assert_eq!(
        (ready.status, ready.body.as_str()),
        (503, "not ready: probe timed out\n")
    );
    // Metrics do not depend on the probes.
    assert_eq!(get(addr, "/metrics").await.status, 200);
}

#[tokio::test]
async fn garbage_request_gets_400_and_the_server_keeps_serving() {
    let (_, addr) = start(FakeProbes::new(true, Ok(())), ServerOptions::default()).await;
    for garbage in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"[..],
        b"hello there\r\n\r\n",
        b"GET /metrics HTTP/9.9\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nthis is not a header\r\n\r\n",
    ] {
        let answer = exchange(addr, garbage).await.unwrap();
        assert_eq!(answer.status, 400, "{garbage:?}");
        assert_eq!(get(addr, "/healthz").await.status, 200);
    }

    // A head cut short by the client closing its side.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"GET /metr").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");

    // Connecting and leaving without a byte (a TCP check) is not an error either.
    drop(TcpStream::connect(addr).await.unwrap());
    assert_eq!(get(addr, "/healthz").await.status, 200);
}

#[tokio::test]
async fn malformed_heads_get_400() {
    let (_, addr) = start(FakeProbes::new(true, Ok(())), ServerOptions::default()).await;
    for bad in [
        &b"GET /metrics\r\n\r\n"[..],
        b"GET  /metrics HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/2.0\r\n\r\n",
        b"GET metrics HTTP/1.1\r\n\r\n",
        b"G(T /metrics HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost : a\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
        b"GET /\xff HTTP/1.1\r\n\r\n",
        b"\x01\x02\x03\r\n\r\n",
    ] {
        let answer = exchange(addr, bad).await.unwrap();
        assert_eq!(answer.status, 400, "{:?}", String::from_utf8_lossy(bad));
    }
}

#[tokio::test]
async fn routes_origin_and_absolute_targets_without_the_query() {
    let (_, addr) = start(FakeProbes::new(true, Ok(())), ServerOptions::default()).await;
    let ready = exchange(addr, b"GET /readyz?verbose=1 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"));
    // Absolute form (a proxy's request), after an empty line RFC 9112 lets a server ignore.
    let ready = exchange(addr, b"\r\nGET http://host:9464/readyz HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"));
    let root = exchange(addr, b"GET http://host HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(root.status, 404);
    // Bare LF line ends, which RFC 9112 lets a server accept.
    let health = exchange(addr, b"GET /healthz HTTP/1.1\nHost: a\n\n")
        .await
        .unwrap();
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
}

#[tokio::test]
async fn oversized_request_head_gets_431() {
    let (_, addr) = start(FakeProbes::new(true, Ok(())), ServerOptions::default()).await;
    let mut raw = b"GET /metrics HTTP/1.1\r\nX-Padding: ".to_vec();
    raw.extend(std::iter::repeat_n(b'a', 20_000));
    raw.extend_from_slice(b"\r\n\r\n");
    let answer = exchange(addr, &raw).await.unwrap();
    assert_eq!(answer.status, 431);
    assert_eq!(get(addr, "/healthz").await.status, 200);
}

#[tokio::test]
async fn slow_client_gets_408_while_others_are_served() {
    let options = ServerOptions {
        read_timeout: Duration::from_millis(300),
        ..ServerOptions::default()
    };
    let (_, addr) = start(FakeProbes::new(true, Ok(())), options).await;
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: te")
        .await
        .unwrap();

    assert_eq!(get(addr, "/healthz").await.status, 200);

    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), slow.read_to_string(&mut answer))
        .await
        .expect("server gives up on the slow client")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer:?}");
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_and_serving_resumes() {
    let options = ServerOptions {
        max_connections: 2,
        ..ServerOptions::default()
    };
    let (_, addr) = start(FakeProbes::new(true, Ok(())), options).await;
    // Connections are accepted in the order they were made, so these two hold both slots
    // before the third is looked at.
    let idle_a = TcpStream::connect(addr).await.unwrap();
    let idle_b = TcpStream::connect(addr).await.unwrap();
    let refused = exchange(addr, b"GET /healthz HTTP/1.1\r\n\r\n").await;
    assert!(refused.is_err(), "{refused:?}");

    drop(idle_a);
    drop(idle_b);
    let served = eventually(Duration::from_secs(5), || async {
        matches!(
            exchange(addr, b"GET /healthz HTTP/1.1\r\n\r\n").await,
            Ok(Answer { status: 200, .. })
        )
    })
    .await;
    assert!(
        served,
        "listener serves again once the idle connections left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_scrapes_all_succeed() {
    let (metrics, addr) = start(FakeProbes::new(true, Ok(())), ServerOptions::default()).await;
    metrics.backlog.set(3);
    let clients: Vec<_> = (0..48)
        .map(|_| tokio::spawn(async move { get(addr, "/metrics").await }))
        .collect();
    for client in clients {
        let answer = client.await.unwrap();
        assert_eq!(answer.status, 200);
        assert!(answer.body.contains("enrichd_backlog 3\n"));
    }
}

#[tokio::test]
async fn serve_binds_a_free_port_for_the_global_registry_and_abort_closes_it() {
    enrichd_metrics::global()
        .cache_hits
        .get_or_create(&ProviderLabel {
            provider: "test_served",
        })
        .inc();
    let (addr, task) = serve(loopback(), FakeProbes::new(true, Ok(())))
        .await
        .unwrap();
    assert_ne!(addr.port(), 0);
    let metrics = get(addr, "/metrics").await;
    assert!(
        metrics
            .body
            .contains("enrichd_cache_hits_total{provider=\"test_served\"} 1\n"),
        "{}",
        metrics.body
    );

    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "listener closed with its task"
    );
}

#[tokio::test]
async fn binding_a_taken_address_is_an_error() {
    let (addr, _task) = serve(loopback(), FakeProbes::new(true, Ok(())))
        .await
        .unwrap();
    assert!(serve(addr, FakeProbes::new(true, Ok(()))).await.is_err());
}
