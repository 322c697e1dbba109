//! braid's own HTTP/1.1 server, driven over real sockets byte by byte as clients send
//! them: `Expect: 100-continue`, HTTP/1.0, pipelining, bodiless answers, `Connection:
//! close`, chunked bodies with trailers and broken ones, a client that leaves while its
//! request is answered, the HTTP/2 preface arriving in pieces, and hyper's server
//! still there behind `--http1 hyper`.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// A proxy over one route to `backend`, with `limits` changed by `set`.
async fn proxy_with(backend: &str, set: impl FnOnce(&mut braid::server::Limits)) -> TestProxy {
    let dir = tempfile::tempdir().unwrap();
    let path = write_single_route(dir.path(), backend);
    let mut opts = options(&path);
    set(&mut opts.limits);
    let mut p = TestProxy::start_at(&path, opts).await;
    p._dir = Some(dir);
    p
}

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("{e}: {}", String::from_utf8_lossy(&self.body));
        })
    }
}

/// One client connection, reading answers exactly as framed.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(proxy: &TestProxy) -> Conn {
        Conn {
            s: TcpStream::connect(proxy.addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }

    async fn more(&mut self) -> usize {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(Duration::from_secs(10), self.s.read(&mut chunk))
            .await
            .expect("no answer within 10 s")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// The next answer; `bodiless` for a HEAD request's.
    async fn answer(&mut self, bodiless: bool) -> Answer {
        let (status, headers, used) = loop {
            let mut slots = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut slots);
            if let httparse::Status::Complete(used) = resp.parse(&self.buf).unwrap() {
                let headers = resp
                    .headers
                    .iter()
                    .map(|h| {
                        let v = String::from_utf8_lossy(h.value).into_owned();
                        (h.name.to_string(), v)
                    })
                    .collect::<Vec<_>>();
                break (resp.code.unwrap(), headers, used);
            }
            assert!(
                self.more().await > 0,
                "closed inside a head: {:?}",
                self.text()
            );
        };
        self.buf.drain(..used);
        let mut a = Answer {
            status,
            headers,
            body: Vec::new(),
        };
        let length = a
            .header("content-length")
            .map(|v| v.parse::<usize>().unwrap());
        let chunked = a.header("transfer-encoding") == Some("chunked");
        if bodiless || status == 204 || status == 304 || (100..200).contains(&status) {
            return a;
        }
        if chunked {
            loop {
                let Some(nl) = self.buf.windows(2).position(|w| w == b"\r\n") else {
                    assert!(self.more().await > 0, "closed inside chunks");
                    continue;
                };
                let size = usize::from_str_radix(std::str::from_utf8(&self.buf[..nl]).unwrap(), 16)
                    .unwrap();
                while self.buf.len() < nl + 2 + size + 2 {
                    assert!(self.more().await > 0, "closed inside a chunk");
                }
                a.body.extend_from_slice(&self.buf[nl + 2..nl + 2 + size]);
                self.buf.drain(..nl + 2 + size + 2);
                if size == 0 {
                    return a;
                }
            }
        }
        match length {
            Some(n) => {
                while self.buf.len() < n {
                    assert!(self.more().await > 0, "closed inside a body");
                }
                a.body = self.buf.drain(..n).collect();
            }
            None => {
                while self.more().await > 0 {}
                a.body = std::mem::take(&mut self.buf);
            }
        }
        a
    }

    /// The server closed the connection (and sent nothing more).
    async fn closed(&mut self) -> bool {
        self.more().await == 0 && self.buf.is_empty()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }
}

#[tokio::test]
async fn expect_100_continue_is_answered_before_the_body_and_never_for_a_refused_one() {
    let a = Backend::start("a").await;
    let proxy = proxy_with(&a.url(), |l| l.max_body_bytes = 1000).await;
    let mut c = Conn::open(&proxy).await;
    c.send(b"POST /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        .await;
    let interim = c.answer(false).await;
    assert_eq!(interim.status, 100);
    c.send(b"hello").await;
    let done = c.answer(false).await;
    assert_eq!(done.status, 200);
    assert_eq!(done.json()["body"], "hello");
    // Over the limit: refused at once, no 100, and closed (the body may never come).
    c.send(b"POST /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n")
        .await;
    let refused = c.answer(false).await;
    assert_eq!(refused.status, 413, "{refused:?}");
    assert!(refused.json()["error"].as_str().unwrap().contains("limit"));
    assert_eq!(refused.header("connection"), Some("close"));
    assert!(c.closed().await);
    assert_eq!(a.hits(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn http10_clients_get_a_length_and_their_own_keep_alive_choice() {
    let a = Backend::start("a").await;
    let proxy = proxy_with(&a.url(), |_| {}).await;
    let mut c = Conn::open(&proxy).await;
    c.send(b"GET /one HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await;
    let one = c.answer(false).await;
    assert_eq!(one.status, 200);
    assert!(one.header("content-length").is_some(), "{one:?}");
    assert!(one.header("transfer-encoding").is_none());
    assert_eq!(one.header("connection"), Some("keep-alive"));
    c.send(b"GET /two HTTP/1.0\r\n\r\n").await;
    let two = c.answer(false).await;
    assert_eq!(two.json()["path"], "/two");
    assert_eq!(two.header("connection"), Some("close"));
    assert!(
        c.closed().await,
        "an HTTP/1.0 request without keep-alive closes"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let a = Backend::start("a").await;
    let proxy = proxy_with(&a.url(), |_| {}).await;
    let mut c = Conn::open(&proxy).await;
    c.send(
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n\
          POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc\
          POST /3 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nxy\r\n0\r\n\r\n\
          GET /4 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    for (path, body) in [("/1", ""), ("/2", "abc"), ("/3", "xy"), ("/4", "")] {
        let r = c.answer(false).await;
        assert_eq!((r.status, r.json()["path"].as_str()), (200, Some(path)));
        assert_eq!(r.json()["body"], body);
    }
    assert!(c.closed().await);
    proxy.stop().await;
}

#[tokio::test]
async fn head_204_and_304_answers_carry_no_body_and_the_connection_goes_on() {
    let a = Backend::start("a").await;
    let proxy = proxy_with(&a.url(), |_| {}).await;
    let mut c = Conn::open(&proxy).await;
    c.send(b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let head = c.answer(true).await;
    assert_eq!(head.status, 200);
    assert!(
        head.header("content-length").is_some_and(|n| n != "0"),
        "{head:?}"
    );
    for status in [204u16, 304] {
        a.set(|f| {
            f.status = status;
            f.times = 1;
        });
        c.send(b"GET /s HTTP/1.1\r\nHost: a\r\n\r\n").await;
        let r = c.answer(false).await;
        assert_eq!(r.status, status);
        assert!(r.header("transfer-encoding").is_none(), "{r:?}");
        if status == 204 {
            assert!(r.header("content-length").is_none(), "{r:?}");
        }
    }
    // Nothing stray was left between the answers: the next one reads clean.
    c.send(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let r = c.answer(false).await;
    assert_eq!((r.status, r.json()["path"].as_str()), (200, Some("/after")));
    assert!(c.buf.is_empty(), "{}", c.text());
    proxy.stop().await;
}

#[tokio::test]
async fn chunked_bodies_with_trailers_arrive_whole_and_broken_ones_are_400() {
    let a = Backend::start("a").await;
    let proxy = proxy_with(&a.url(), |_| {}).await;
    let mut c = Conn::open(&proxy).await;
    c.send(b"POST /t HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;name=v\r\nabc\r\n")
        .await;
    c.send(b"4\r\ndefg\r\n0\r\nx-sum: 7\r\nx-more: 1\r\n\r\n")
        .await;
    let r = c.answer(false).await;
    assert_eq!(r.json()["body"], "abcdefg");
    // Leading zeros, however many, are a size (as hyper reads them).
    let mut c = Conn::open(&proxy).await;
    c.send(b"POST /t HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n00000000000000000000003\r\nabc\r\n0\r\n\r\n")
        .await;
    assert_eq!(c.answer(false).await.json()["body"], "abc");
    for (broken, status, why) in [
        // Data without its CRLF, a size that is not hex.
        ("3\r\nabcX\r\n0\r\n\r\n", 400, "chunk"),
        ("zz\r\nab\r\n0\r\n\r\n", 400, "chunk"),
        // A bare LF in an extension (RFC 9112 §7.1.1), or ending the size line.
        ("3;foo\nbar\r\nabc\r\n0\r\n\r\n", 400, "chunk"),
        ("3\nabc\r\n0\r\n\r\n", 400, "chunk"),
        // A bare LF ending the trailers: not the body's end and another request.
        (
            "3\r\nabc\r\n0\r\n\nGET /NEXT HTTP/1.1\r\nHost: a\r\n\r\n",
            400,
            "trailer",
        ),
        // Sizes past the body limit, 2^64-1 and past u64: refused as they are read.
        ("ffffffffffffffff\r\n", 413, "limit"),
        ("fffffffffffffffff\r\n", 413, "limit"),
        ("4000000\r\n", 413, "limit"),
    ] {
        let mut c = Conn::open(&proxy).await;
        let req =
            format!("POST /t HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{broken}");
        c.send(req.as_bytes()).await;
        let r = c.answer(false).await;
        assert_eq!(r.status, status, "{broken:?}: {r:?}");
        assert!(
            r.json()["error"].as_str().unwrap().contains(why),
            "{broken:?}: {r:?}"
        );
        assert!(c.closed().await, "{broken:?} left the connection open");
    }
    // Only the two good bodies reached the backend: nothing was read as a second request.
    assert_eq!(a.hits(), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn malformed_heads_are_refused_in_json_and_closed() {
    let a = Backend::start("a").await;
    let proxy = proxy_with(&a.url(), |_| {}).await;
    for (bad, status) in [
        (&b"GET / HTTP/1.1\r\nX-A: 1\r\n folded\r\n\r\n"[..], 400),
        (b"GET / HTTP/1.1\r\nX-A: 1\r2\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX-A : 1\r\n\r\n", 400),
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        // RFC 9112 §3.2: no Host, two, or one that is not host[:port].
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: user:pass@a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a:port\r\n\r\n", 400),
    ] {
        let mut c = Conn::open(&proxy).await;
        c.send(bad).await;
        let r = c.answer(false).await;
        assert_eq!(r.status, status, "{:?}", String::from_utf8_lossy(bad));
        assert!(r.json()["error"].is_string());
        assert_eq!(r.header("connection"), Some("close"));
        assert!(c.closed().await);
    }
    assert_eq!(a.hits(), 0);
    // `*` after an OPTIONS * on the same connection is still only for OPTIONS.
    let mut c = Conn::open(&proxy).await;
    c.send(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\nGET * HTTP/1.1\r\nHost: a\r\n\r\n")
        .await;
    assert_ne!(c.answer(false).await.status, 400);
    let r = c.answer(false).await;
    assert_eq!(r.status, 400, "{r:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn a_client_that_leaves_while_answered_cancels_its_request() {
    let slow = Backend::slow("slow", Duration::from_secs(30)).await;
    let proxy = proxy_with(&slow.url(), |_| {}).await;
    let mut c = Conn::open(&proxy).await;
    c.send(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
        .await;
    // Wait until the request is in flight, then leave.
    for _ in 0..500 {
        if metric(&proxy, "braid_requests_in_flight").await == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(metric(&proxy, "braid_requests_in_flight").await, 1.0);
    drop(c);
    for _ in 0..500 {
        if metric(&proxy, "braid_requests_in_flight").await == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(metric(&proxy, "braid_requests_in_flight").await, 0.0);
    assert_eq!(metric(&proxy, "braid_connections").await, 0.0);
    proxy.stop().await;
}

/// Writes at most a few bytes at a time, so a peer reads the HTTP/2 preface in pieces.
struct Trickle(TcpStream);

impl tokio::io::AsyncRead for Trickle {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Trickle {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let n = buf.len().min(5);
        let inner = &mut self.get_mut().0;
        match std::pin::Pin::new(&mut *inner).poll_write(cx, &buf[..n]) {
            std::task::Poll::Ready(Ok(n)) => {
                let _ = std::pin::Pin::new(inner).poll_flush(cx);
                std::task::Poll::Ready(Ok(n))
            }
            other => other,
        }
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn an_http2_preface_in_pieces_is_handed_to_hyper_whole() {
    let a = Backend::start("a").await;
    let proxy = proxy_with(&a.url(), |_| {}).await;
    let s = TcpStream::connect(proxy.addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let io = hyper_util::rt::TokioIo::new(Trickle(s));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/h2", proxy.addr))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-braid-variant"], "only");
    proxy.stop().await;
}

#[tokio::test]
async fn hypers_server_still_answers_behind_http1_hyper() {
    let a = Backend::start("a").await;
    let proxy = proxy_with(&a.url(), |l| l.http1 = braid::server::Http1::Hyper).await;
    let mut c = Conn::open(&proxy).await;
    c.send(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
        .await;
    let r = c.answer(false).await;
    assert_eq!((r.status, r.json()["body"].as_str()), (200, Some("hi")));
    let (resp, closed) = raw(
        proxy.addr,
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 400") && closed, "{resp}");
    proxy.stop().await;
}
