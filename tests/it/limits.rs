//! Bad input and backend faults: every one gets a precise status, JSON where braid
//! writes the body, and never a hang.

use std::time::Duration;

use crate::support::*;

async fn proxy_to(backend: &str) -> TestProxy {
    TestProxy::start(&format!(
        "routes:\n  - path_prefix: /\n    variants: [{{ name: only, backend: \"{backend}\" }}]\n    timeout: 300ms\n"
    ))
    .await
}

#[tokio::test]
async fn smuggling_forms_get_400_and_the_connection_closed() {
    let a = Backend::start("a").await;
    let proxy = proxy_to(&a.url()).await;
    let forms: [&[u8]; 4] = [
        // Both framings: hyper alone would pick chunked and keep going.
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
        // Repeated Content-Length, equal and different.
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
    ];
    for form in forms {
        let (resp, closed) = raw(proxy.addr, form).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
        assert!(closed, "connection left open after {resp}");
    }
    // Negative length.
    let (resp, closed) = raw(
        proxy.addr,
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 400") && closed, "{resp}");
    // The JSON body where braid writes the answer.
    let (resp, _) = raw(proxy.addr, forms[0]).await;
    assert!(
        resp.contains(r#"{"error":"ambiguous message framing"#),
        "{resp}"
    );
    assert_eq!(a.hits(), 0, "a smuggling attempt reached the backend");
    proxy.stop().await;
}

#[tokio::test]
async fn oversized_headers_get_431_and_oversized_bodies_get_413() {
    let a = Backend::start("a").await;
    let proxy = proxy_to(&a.url()).await;
    let big = "x".repeat(100 * 1024);
    let (resp, _) = raw(
        proxy.addr,
        format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(
        resp.starts_with("HTTP/1.1 431"),
        "{}",
        &resp[..resp.len().min(200)]
    );
    let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let (resp, _) = raw(
        proxy.addr,
        format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp}");

    let c = client();
    let body = vec![b'x'; 17 * 1024 * 1024];
    let r = send(&c, "POST", &proxy.url("/x"), &[], &body).await;
    assert_json_error(&r, 413, "limit");
    // Chunked, so no declared length: cut off while streaming.
    let (resp, _) = raw(
        proxy.addr,
        &[
            b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".as_slice(),
            &chunked(17 * 1024 * 1024),
        ]
        .concat(),
    )
    .await;
    assert!(
        resp.starts_with("HTTP/1.1 413"),
        "{}",
        &resp[..resp.len().min(200)]
    );
    assert_eq!(a.hits(), 0);
    proxy.stop().await;
}

fn chunked(total: usize) -> Vec<u8> {
    let chunk = vec![b'y'; 1 << 20];
    let mut out = Vec::new();
    let mut left = total;
    while left > 0 {
        let n = left.min(chunk.len());
        out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        out.extend_from_slice(&chunk[..n]);
        out.extend_from_slice(b"\r\n");
        left -= n;
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

#[tokio::test]
async fn refused_backend_is_a_503_json_with_retry_after() {
    let dead = dead_addr().await;
    let proxy = proxy_to(&format!("http://{dead}")).await;
    let r = get(&client(), &proxy.url("/x"), &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["retry-after"], "1");
    assert_eq!(r.variant(), "only");
    assert!(r.json()["error"].as_str().unwrap().contains("unreachable"));
    proxy.stop().await;
}

#[tokio::test]
async fn a_stalled_backend_is_a_504_at_the_route_timeout() {
    let slow = Backend::slow("slow", Duration::from_secs(30)).await;
    let proxy = proxy_to(&slow.url()).await;
    let r = get(&client(), &proxy.url("/x"), &[]).await;
    assert_json_error(&r, 504, "300ms");
    proxy.stop().await;
}

#[tokio::test]
async fn a_connection_that_never_finishes_its_head_is_closed() {
    let a = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_single_route(dir.path(), &a.url());
    let mut opts = options(&path);
    opts.limits.header_read_timeout = Duration::from_millis(200);
    let proxy = TestProxy::start_at(&path, opts).await;
    // `raw` waits up to 5 s: a close well before that is the header timeout at work.
    let (resp, closed) = raw(proxy.addr, b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ").await;
    assert!(closed, "half-sent head kept open");
    assert!(
        resp.is_empty() || resp.starts_with("HTTP/1.1 408"),
        "{resp}"
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_while_normal_clients_are_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = write_single_route(dir.path(), &a.url());
    let mut opts = options(&path);
    opts.limits.header_read_timeout = Duration::from_millis(500);
    let proxy = TestProxy::start_at(&path, opts).await;
    // Hundreds of connections, each sending its head one byte at a time, forever.
    let head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut attackers = Vec::new();
    for _ in 0..300 {
        let addr = proxy.addr;
        attackers.push(tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            for b in head.iter().cycle() {
                if s.write_all(&[*b]).await.is_err() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                let mut buf = [0u8; 64];
                // A closed connection reads 0 (or a 408) as soon as the timeout hits.
                if let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await
                    && (n == 0 || buf.starts_with(b"HTTP/1.1 408"))
                {
                    return true;
                }
            }
            false
        }));
    }
    // Meanwhile, ordinary clients are served.
    let c = client();
    for _ in 0..20 {
        let r = get(&c, &proxy.url("/v2/models/m/ready"), &[]).await;
        assert_eq!(r.status, 200);
    }
    for a in attackers {
        let closed = tokio::time::timeout(Duration::from_secs(20), a)
            .await
            .expect("a trickling connection was kept open")
            .unwrap();
        assert!(closed);
    }
    assert_eq!(a.hits(), 20, "nothing of the attack reached the backend");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_rapid_reset_flood_gets_goaway_and_reaches_nothing() {
    let a = Backend::start("a").await;
    let proxy = proxy_to(&a.url()).await;
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut h2, conn) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(conn);
    let mut refused = false;
    for _ in 0..10_000 {
        let req = http::Request::post(format!("http://{}/v2/models/m/infer", proxy.addr))
            .body(())
            .unwrap();
        let ready = match h2.ready().await {
            Ok(r) => r,
            Err(_) => {
                refused = true;
                break;
            }
        };
        h2 = ready;
        match h2.send_request(req, false) {
            Ok((_, mut stream)) => stream.send_reset(h2::Reason::CANCEL),
            Err(_) => {
                refused = true;
                break;
            }
        }
        tokio::task::yield_now().await;
    }
    let ended = tokio::time::timeout(Duration::from_secs(5), driver)
        .await
        .expect("connection not closed");
    let err = ended
        .unwrap()
        .expect_err("the connection should end in an error");
    // The server sends GOAWAY(ENHANCE_YOUR_CALM) and closes; a client still writing
    // may see the close (broken pipe) before it reads the GOAWAY.
    assert!(
        err.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) || err.is_io(),
        "expected GOAWAY or a closed connection, got {err:?}"
    );
    assert!(refused || err.is_go_away() || err.is_io());
    assert_eq!(a.hits(), 0, "no reset stream reached the backend");
    // Other clients are unaffected.
    let r = get(&client(), &proxy.url("/x"), &[]).await;
    assert_eq!(r.status, 200);
    proxy.stop().await;
}
