//! Clients that misbehave leave braid with the capacity it had: timed-out and reset
//! requests give their in-flight slot back, header values cannot overflow the clock,
//! connections that send nothing (or a partial preface) and idle HTTP/2 connections
//! are closed, stalled bodies get 408, buffered bytes stay within one budget, the
//! connection cap holds new ones in the backlog, and the admin port changes state only
//! for callers inside the pod.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

const INFLIGHT: &str = "braid_requests_in_flight";
const BUFFERED: &str = "braid_buffered_bytes";
const CONNECTIONS: &str = "braid_connections";

/// A proxy over one route to `backend`, with `limits` changed by `set`.
async fn proxy_with(
    backend: &str,
    route_extra: &str,
    set: impl FnOnce(&mut braid::server::Limits),
) -> TestProxy {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("braid.yaml");
    let config = format!(
        "routes:\n  - path_prefix: /\n    variants: [{{ name: only, backend: \"{backend}\" }}]\n{route_extra}"
    );
    std::fs::write(&path, config).unwrap();
    let mut opts = options(&path);
    set(&mut opts.limits);
    let mut p = TestProxy::start_at(&path, opts).await;
    p._dir = Some(dir);
    p
}

/// Polls a gauge until it reads `want` (bounded).
async fn wait_gauge(proxy: &TestProxy, series: &str, want: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let v = metric(proxy, series).await;
        if v == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} stuck at {v}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads until the peer closes (true) or `within` passes (false).
async fn closed_within(s: &mut TcpStream, within: Duration) -> (bool, String) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (true, String::from_utf8_lossy(&out).into()),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (false, String::from_utf8_lossy(&out).into()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_time_out_or_reset_give_their_slot_back() {
    let slow = Backend::start("slow").await;
    // The outage of the issue: four slots, four clients that give up on a slow model.
    let proxy = proxy_with(&slow.url(), "", |l| l.max_inflight = 4).await;
    let c = client();
    let url = proxy.url("/x");
    let hurried = (0..4).map(|_| {
        let (c, url) = (c.clone(), url.clone());
        async move {
            let req = send(&c, "GET", &url, &[("x-delay-ms", "2000")], b"");
            assert!(
                tokio::time::timeout(Duration::from_millis(200), req)
                    .await
                    .is_err()
            );
        }
    });
    futures_util::future::join_all(hurried).await;
    wait_gauge(&proxy, INFLIGHT, 0.0).await;
    let r = get(&c, &url, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    proxy.stop().await;

    // With the default limits: many timed-out HTTP/1.1 requests and reset HTTP/2 streams.
    let proxy = proxy_with(&slow.url(), "", |_| {}).await;
    let url = proxy.url("/x");
    let h2 = h2_client();
    let gone = (0..60).map(|i| {
        let c = if i % 2 == 0 { client() } else { h2.clone() };
        let url = url.clone();
        async move {
            let req = send(&c, "POST", &url, &[("x-delay-ms", "3000")], b"{}");
            assert!(
                tokio::time::timeout(Duration::from_millis(300), req)
                    .await
                    .is_err()
            );
        }
    });
    futures_util::future::join_all(gone).await;
    wait_gauge(&proxy, INFLIGHT, 0.0).await;
    assert_eq!(get(&c, &url, &[]).await.status, 200);
    assert_eq!(get(&h2, &url, &[]).await.status, 200);
    wait_gauge(&proxy, INFLIGHT, 0.0).await;
    proxy.stop().await;
}

#[tokio::test]
async fn deadline_headers_beyond_the_clock_are_capped_not_a_panic() {
    let a = Backend::start("a").await;
    let proxy = proxy_with(&a.url(), "    timeout: 5s\n", |_| {}).await;
    let c = client();
    for (name, value) in [
        ("x-braid-timeout", "10000000000000000000s"),
        ("x-braid-timeout", "99999999999h"),
        ("grpc-timeout", "99999999H"),
    ] {
        let r = get(&c, &proxy.url("/x"), &[(name, value)]).await;
        assert_eq!(r.status, 200, "{name}: {value}: {}", r.text());
    }
    // Past what a duration can hold at all: refused, naming the header.
    let r = get(
        &c,
        &proxy.url("/x"),
        &[("x-braid-timeout", "18446744073709551616s")],
    )
    .await;
    assert_json_error(&r, 400, "x-braid-timeout");
    // And on a route without a timeout of its own.
    let none = proxy_with(&a.url(), "", |_| {}).await;
    let r = get(
        &c,
        &none.url("/x"),
        &[("x-braid-timeout", "10000000000000000000s")],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = get(&c, &none.url("/x"), &[("x-braid-timeout", "1e400s")]).await;
    assert_json_error(&r, 400, "x-braid-timeout");
    wait_gauge(&proxy, INFLIGHT, 0.0).await;
    proxy.stop().await;
    none.stop().await;
}

#[tokio::test]
async fn connections_without_a_request_and_idle_http2_connections_are_closed() {
    let a = Backend::start("a").await;
    let proxy = proxy_with(&a.url(), "", |l| {
        l.header_read_timeout = Duration::from_millis(300);
        l.idle_timeout = Duration::from_millis(300);
    })
    .await;
    // Nothing at all, 23 bytes of the HTTP/2 preface, and the whole preface with its
    // SETTINGS but no request: each closed after the header timeout.
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let settings = [0u8, 0, 0, 4, 0, 0, 0, 0, 0];
    let openings: [Vec<u8>; 3] = [
        vec![],
        preface[..23].to_vec(),
        [preface.as_slice(), &settings].concat(),
    ];
    for opening in openings {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(&opening).await.unwrap();
        let (closed, _) = closed_within(&mut s, Duration::from_secs(5)).await;
        assert!(closed, "a connection that sent {opening:?} was kept");
    }
    // An HTTP/2 connection that served a request and then idles gets GOAWAY.
    let h2 = h2_client();
    assert_eq!(get(&h2, &proxy.url("/x"), &[]).await.status, 200);
    wait_gauge(&proxy, CONNECTIONS, 0.0).await;
    // A fresh connection still works after its pooled one was closed.
    assert_eq!(get(&h2, &proxy.url("/x"), &[]).await.status, 200);
    proxy.stop().await;
}

#[tokio::test]
async fn a_stalled_or_trickled_body_gets_408_and_its_slot_back() {
    let a = Backend::start("a").await;
    let proxy = proxy_with(&a.url(), "    timeout: 1s\n", |l| {
        l.body_idle_timeout = Duration::from_millis(300);
    })
    .await;
    // Two bytes of ten, then silence.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nab")
        .await
        .unwrap();
    let (closed, resp) = closed_within(&mut s, Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(
        resp.contains(r#"{"error":"the request body did not arrive in time"#),
        "{resp}"
    );
    assert!(closed, "the connection of a stalled body stays open");
    // One byte every 150 ms never stalls, but the route's 1 s timeout still ends it.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let trickle = async {
        for _ in 0..100 {
            if s.write_all(b"x").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(1500), trickle).await;
    let (_, resp) = closed_within(&mut s, Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(resp.contains("timeout passed"), "{resp}");
    assert!(started.elapsed() < Duration::from_secs(3));
    wait_gauge(&proxy, INFLIGHT, 0.0).await;
    wait_gauge(&proxy, BUFFERED, 0.0).await;
    assert_eq!(a.hits(), 0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_bytes_stay_within_the_budget_and_come_back() {
    let a = Backend::start("a").await;
    let proxy = proxy_with(&a.url(), "", |l| l.max_buffered_bytes = 1_000_000).await;
    // One request declares 800 kB and sends half: its reservation is held.
    let mut held = TcpStream::connect(proxy.addr).await.unwrap();
    held.write_all(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 800000\r\n\r\n")
        .await
        .unwrap();
    held.write_all(&vec![b'x'; 400_000]).await.unwrap();
    wait_gauge(&proxy, BUFFERED, 800_000.0).await;
    let c = client();
    let r = send(&c, "POST", &proxy.url("/x"), &[], &vec![b'y'; 300_000]).await;
    assert_json_error(&r, 503, "max-buffered-bytes");
    assert_eq!(r.headers["retry-after"], "1");
    // Chunked, with no declared length: refused once it grows past what is left.
    let (resp, _) = raw(
        proxy.addr,
        &[
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".as_slice(),
            format!("{:x}\r\n", 300_000).as_bytes(),
            &vec![b'z'; 300_000],
            b"\r\n0\r\n\r\n",
        ]
        .concat(),
    )
    .await;
    assert!(
        resp.starts_with("HTTP/1.1 503"),
        "{}",
        &resp[..resp.len().min(300)]
    );
    // The held request finishes: answered, and every byte is back.
    held.write_all(&vec![b'x'; 400_000]).await.unwrap();
    let mut head = [0u8; 12];
    held.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    drop(held);
    wait_gauge(&proxy, BUFFERED, 0.0).await;
    let r = send(&c, "POST", &proxy.url("/x"), &[], &vec![b'y'; 300_000]).await;
    assert_eq!(r.status, 200);
    wait_gauge(&proxy, BUFFERED, 0.0).await;
    proxy.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_in_the_backlog() {
    let a = Backend::start("a").await;
    let proxy = proxy_with(&a.url(), "", |l| l.max_connections = 2).await;
    let first = TcpStream::connect(proxy.addr).await.unwrap();
    let _second = TcpStream::connect(proxy.addr).await.unwrap();
    wait_gauge(&proxy, CONNECTIONS, 2.0).await;
    // The kernel completes the handshake; braid reads nothing until a slot frees.
    let mut third = TcpStream::connect(proxy.addr).await.unwrap();
    third
        .write_all(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 12];
    let early = tokio::time::timeout(Duration::from_millis(300), third.read(&mut buf)).await;
    assert!(early.is_err(), "a connection beyond the cap was served");
    drop(first);
    third.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 200");
    proxy.stop().await;
}

#[tokio::test]
async fn chunked_bodies_that_look_like_headers_pass_and_unknown_codings_are_refused() {
    let a = Backend::start("a").await;
    let proxy = proxy_with(&a.url(), "", |_| {}).await;
    let data = "content-length: 1\r\ntransfer-encoding: chunked\r\n";
    let req = format!(
        "POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{data}\r\n0\r\n\r\n",
        data.len()
    );
    let (resp, _) = raw(proxy.addr, req.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    for coding in ["gzip, chunked", "gzip", "chunked, chunked", "identity"] {
        let req =
            format!("POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: {coding}\r\n\r\n0\r\n\r\n");
        let (resp, closed) = raw(proxy.addr, req.as_bytes()).await;
        assert!(
            resp.starts_with("HTTP/1.1 501") || resp.starts_with("HTTP/1.1 400"),
            "{coding}: {resp}"
        );
        assert!(closed, "{coding}: connection kept");
    }
    assert_eq!(a.hits(), 1);
    proxy.stop().await;
}

/// A network namespace with a veth pair to this one: braid listens on `host`, and
/// commands run inside the namespace reach it from `peer`, a non-loopback address.
struct Netns {
    name: String,
    host: std::net::IpAddr,
}

impl Netns {
    fn create() -> Netns {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = std::process::id() % 10_000;
        let name = format!("braid-t{id}-{n}");
        let (veth, inner) = (format!("bh{id}x{n}"), format!("bp{id}x{n}"));
        // 198.18.0.0/15, a /30 per namespace.
        let third = (id % 250) as u8;
        let fourth = ((n % 60) * 4) as u8;
        let host = format!("198.18.{third}.{}", fourth + 1);
        let peer = format!("198.18.{third}.{}", fourth + 2);
        let ns = Netns {
            name: name.clone(),
            host: host.parse().unwrap(),
        };
        for cmd in [
            vec!["netns", "add", &name],
            vec!["link", "add", &veth, "type", "veth", "peer", "name", &inner],
            vec!["link", "set", &inner, "netns", &name],
            vec!["addr", "add", &format!("{host}/30"), "dev", &veth],
            vec!["link", "set", &veth, "up"],
            vec![
                "-n",
                &name,
                "addr",
                "add",
                &format!("{peer}/30"),
                "dev",
                &inner,
            ],
            vec!["-n", &name, "link", "set", &inner, "up"],
            vec!["-n", &name, "link", "set", "lo", "up"],
        ] {
            let out = std::process::Command::new("ip")
                .args(&cmd)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "ip {cmd:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        ns
    }

    /// `curl` inside the namespace: (status, body).
    async fn curl(&self, method: &str, url: &str) -> (u16, String) {
        let out = tokio::process::Command::new("ip")
            .args([
                "netns", "exec", &self.name, "curl", "-s", "-m", "5", "-X", method,
            ])
            .args(["-w", "\n%{http_code}", url])
            .output()
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and so the pair.
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[tokio::test]
async fn the_admin_port_is_read_only_from_outside_the_pod() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let ns = Netns::create();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("braid.yaml");
    std::fs::write(&path, ab_config(&a.url(), &b.url(), 1.0, 1.0)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind(SocketAddr::new(ns.host, 0))
        .await
        .unwrap();
    let mut running = braid::run::start(options(&path), listener, admin)
        .await
        .unwrap();
    let admin = running.admin_addr;
    let url = |p: &str| format!("http://{admin}{p}");
    // Reads from another pod: scrapes and probes work.
    let (code, body) = ns.curl("GET", &url("/metrics")).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("braid_requests_in_flight"));
    let (code, _) = ns.curl("GET", &url("/experiments")).await;
    assert_eq!(code, 200);
    // A state change from another pod: 403, with a JSON error.
    let route = "sentiment";
    let (code, body) = ns
        .curl("POST", &url(&format!("/experiments/{route}/reset")))
        .await;
    assert_eq!(code, 403, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["error"].as_str().unwrap().contains("loopback"), "{body}");
    for method in ["PUT", "DELETE"] {
        let (code, _) = ns.curl(method, &url("/config")).await;
        assert_eq!(code, 403, "{method}");
    }
    running.shutdown();
    running.wait().await;
}

/// Waits (bounded) until a line of the process's log contains `needle`; returns the log.
async fn wait_log(p: &BraidProcess, needle: &str) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = p.log.lock().unwrap().clone();
        if log.iter().any(|l| l.contains(needle)) {
            return log;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never logged {needle:?}; the log's last lines: {:#?}",
            &log[log.len().saturating_sub(20)..]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[kind, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[tokio::test]
async fn a_peers_http2_protocol_noise_does_not_fill_the_log() {
    let a = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_single_route(dir.path(), &a.url());
    // A short poll: the marker below must not wait on inotify, which a busy machine can
    // run out of (braid then polls, and says so).
    let braid = BraidProcess::start(&path, &["--config-poll", "200ms"]);
    // Unsolicited PING acks, which h2 warns about once each, then a PING of our own:
    // its ack means every frame before it was processed.
    let mut s = TcpStream::connect(braid.addr).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(4, 0, 0, &[]));
    for i in 0..50u8 {
        out.extend(h2_frame(6, 1, 0, &[i; 8]));
    }
    out.extend(h2_frame(6, 0, 0, b"braid-ok"));
    s.write_all(&out).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(8).any(|w| w == b"braid-ok") {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the PING was answered")
            .unwrap();
        assert!(n > 0, "closed before answering the PING");
        seen.extend_from_slice(&buf[..n]);
    }
    // A line known to come after: an invalid config's rejection.
    write_atomically(&path, "routes: 7\n");
    let log = wait_log(&braid, "config rejected").await;
    let noise: Vec<&String> = log.iter().filter(|l| l.contains("PING")).collect();
    assert!(
        noise.is_empty(),
        "{} lines of noise: {:?}",
        noise.len(),
        noise.first()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_large_bodies_stay_within_the_sidecars_memory_limit() {
    let a = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_single_route(dir.path(), &a.url());
    // The defaults: 16 MiB bodies, a 64 MiB budget.
    let braid = BraidProcess::start(&path, &[]);
    let body = bytes::Bytes::from(vec![b'x'; 15 * 1024 * 1024]);
    let url = format!("http://{}/x", braid.addr);
    let sends = (0..20).map(|_| {
        let (c, url, body) = (client(), url.clone(), body.clone());
        async move {
            let req = http::Request::post(&url)
                .body(http_body_util::Full::new(body))
                .unwrap();
            match c.request(req).await {
                Ok(r) => Some((r.status().as_u16(), r.headers().contains_key("retry-after"))),
                // Refused from its declared length while still sending: a reset.
                Err(_) => None,
            }
        }
    });
    let answers = futures_util::future::join_all(sends).await;
    let ok = answers
        .iter()
        .filter(|a| matches!(a, Some((200, _))))
        .count();
    for a in answers.iter().flatten() {
        assert!(a.0 == 200 || (a.0 == 503 && a.1), "answered {a:?}");
    }
    assert!(ok >= 4, "only {ok} of 20 served: {answers:?}");
    let peak_kb = braid.peak_rss_kb();
    eprintln!(
        "braid's peak RSS under 20 concurrent 15 MiB bodies: {} MiB",
        peak_kb / 1024
    );
    assert!(
        peak_kb < 256 * 1024,
        "peak RSS {peak_kb} kB is over the sidecar's 256Mi"
    );
}
