//! The request head parser: its refusals one by one, every cut of a valid request,
//! and a difference test against hyper's own server: whatever braid reads as a request,
//! hyper reads as the same request.

use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use http::Response;
use proptest::prelude::*;

use super::*;
use crate::http1::chunked::{Chunked, Decoded};

const LIMITS: HeadLimits = HeadLimits {
    max_headers: 100,
    max_bytes: 64 * 1024,
};

fn parse(bytes: &[u8]) -> Result<Option<RequestHead>, ProxyError> {
    let mut buf = BytesMut::from(bytes);
    parse_request(&mut buf, &LIMITS, &mut Scratch::new())
}

fn refused(bytes: &str) -> (u16, String) {
    match parse(bytes.as_bytes()) {
        Err(e) => (e.status().as_u16(), e.to_string()),
        Ok(h) => panic!("accepted {bytes:?}: {h:?}"),
    }
}

#[test]
fn a_plain_head_is_read_with_its_framing_and_the_rest_left() {
    let mut buf = BytesMut::from(
        &b"\r\nPOST /v2/models/m/infer?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nX-A: 1\r\nx-a: 2\r\n\r\nabcGET"[..],
    );
    let head = parse_request(&mut buf, &LIMITS, &mut Scratch::new())
        .unwrap()
        .unwrap();
    assert_eq!(head.parts.method, Method::POST);
    assert_eq!(head.parts.uri, "/v2/models/m/infer?x=1");
    assert_eq!(head.parts.version, Version::HTTP_11);
    assert_eq!(head.framing, Framing::Length(3));
    assert!(head.keep_alive && !head.expect_continue);
    let xa: Vec<_> = head.parts.headers.get_all("x-a").iter().collect();
    assert_eq!(xa, ["1", "2"]);
    assert_eq!(&buf[..], b"abcGET");
}

#[test]
fn keep_alive_follows_the_version_and_connection() {
    let ka = |req: &str| parse(req.as_bytes()).unwrap().unwrap().keep_alive;
    assert!(ka("GET / HTTP/1.1\r\nHost: a\r\n\r\n"));
    assert!(!ka(
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    ));
    assert!(!ka(
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade, Close\r\n\r\n"
    ));
    assert!(!ka("GET / HTTP/1.0\r\n\r\n"));
    assert!(ka("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
    let h =
        parse(b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n");
    assert!(h.unwrap().unwrap().expect_continue);
    let h = parse(b"PUT / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n");
    assert!(
        !h.unwrap().unwrap().expect_continue,
        "1.0 clients get no 100"
    );
}

#[test]
fn ambiguous_or_unsupported_framing_is_refused() {
    let head = |h: &str| format!("POST / HTTP/1.1\r\nHost: a\r\n{h}\r\n\r\n");
    for smuggling in [
        "Content-Length: 4\r\nTransfer-Encoding: chunked",
        "Transfer-Encoding: chunked\r\nContent-Length: 4",
        "Content-Length: 4\r\nContent-Length: 4",
        "Content-Length: 4\r\ncontent-length: 5",
    ] {
        let (status, why) = refused(&head(smuggling));
        assert_eq!(status, 400, "{smuggling}");
        assert!(why.contains("ambiguous"), "{why}");
    }
    for coding in [
        "Transfer-Encoding: gzip, chunked",
        "Transfer-Encoding: identity",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
        "Transfer-Encoding: chunked, chunked",
    ] {
        assert_eq!(refused(&head(coding)).0, 501, "{coding}");
    }
    for length in [
        "-1",
        "+4",
        "4 4",
        "4,4",
        "0x4",
        "",
        "99999999999999999999999",
    ] {
        let (status, why) = refused(&head(&format!("Content-Length: {length}")));
        assert_eq!(status, 400, "{length}");
        assert!(why.contains("Content-Length"), "{why}");
    }
    let te10 = "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert_eq!(refused(te10).0, 400);
    let ok = parse(head("Transfer-Encoding:  Chunked ").as_bytes());
    assert_eq!(ok.unwrap().unwrap().framing, Framing::Chunked);
}

#[test]
fn malformed_lines_are_400_and_oversized_heads_431() {
    for bad in [
        // Obsolete line folding.
        "GET / HTTP/1.1\r\nX-A: 1\r\n  folded\r\n\r\n",
        // A bare CR inside a line, and ending one.
        "GET / HTTP/1.1\r\nX-A: 1\r2\r\n\r\n",
        "GET / HTTP/1.1\rX-A: 1\r\n\r\n",
        // No colon, a space before it, a control byte in a value.
        "GET / HTTP/1.1\r\nX-A\r\n\r\n",
        "GET / HTTP/1.1\r\nX-A : 1\r\n\r\n",
        "GET / HTTP/1.1\r\nX-A: \x01\r\n\r\n",
        "GET / HTTP/2.0\r\n\r\n",
        "GET example.com HTTP/1.1\r\n\r\n",
        "GET * HTTP/1.1\r\n\r\n",
        "CONNECT example.com:443 HTTP/1.1\r\n\r\n",
    ] {
        assert_eq!(refused(bad).0, 400, "{bad:?}");
    }
    // Bare LF line ends are read as hyper reads them.
    assert!(parse(b"GET / HTTP/1.1\nHost: a\n\n").unwrap().is_some());
    assert!(
        parse(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap()
            .is_some()
    );
    assert!(
        parse(b"GET http://a/b HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap()
            .is_some()
    );
    let many: String = (0..101).map(|i| format!("X-{i}: v\r\n")).collect();
    let (status, why) = refused(&format!("GET / HTTP/1.1\r\n{many}\r\n"));
    assert_eq!(status, 431);
    assert!(why.contains("--max-headers"), "{why}");
    let big = format!("GET / HTTP/1.1\r\nX-Big: {}", "x".repeat(LIMITS.max_bytes));
    assert_eq!(refused(&big).0, 431, "a partial head over the limit");
    let big = format!("{big}\r\n\r\n");
    assert_eq!(refused(&big).0, 431, "a whole head over the limit");
}

#[test]
fn responses_are_framed_as_rfc_9112_says() {
    let h = HeaderMap::new();
    let mut declared = HeaderMap::new();
    declared.insert(header::CONTENT_LENGTH, HeaderValue::from(7));
    let ok = StatusCode::OK;
    assert_eq!(
        response_framing(ok, false, &h, Some(3), false),
        Out::Length(3)
    );
    assert_eq!(response_framing(ok, false, &h, None, false), Out::Chunked);
    assert_eq!(response_framing(ok, false, &h, None, true), Out::Close);
    assert_eq!(
        response_framing(ok, false, &declared, None, false),
        Out::Length(7)
    );
    assert_eq!(response_framing(ok, true, &h, Some(3), false), Out::None);
    for bodiless in [StatusCode::NO_CONTENT, StatusCode::NOT_MODIFIED] {
        assert_eq!(
            response_framing(bodiless, false, &h, Some(3), false),
            Out::None
        );
    }
    let written = |status: StatusCode, headers: &HeaderMap, framing, keep, http10| {
        let (mut parts, ()) = Response::new(()).into_parts();
        parts.status = status;
        parts.headers = headers.clone();
        let mut out = Vec::new();
        let date = || *b"Tue, 01 Dec 2026 00:00:00 GMT";
        encode_response_head(&parts, framing, keep, http10, date, &mut out);
        String::from_utf8(out).unwrap()
    };
    let head = written(ok, &declared, Out::Length(3), true, false);
    assert_eq!(
        head,
        "HTTP/1.1 200 OK\r\ndate: Tue, 01 Dec 2026 00:00:00 GMT\r\ncontent-length: 3\r\n\r\n"
    );
    // A HEAD answer keeps the resource's length; a 204 never carries one.
    let head = written(ok, &declared, Out::None, false, false);
    assert!(head.contains("content-length: 7\r\n") && head.contains("connection: close\r\n"));
    let head = written(StatusCode::NO_CONTENT, &declared, Out::None, true, true);
    assert!(!head.contains("content-length"), "{head}");
    assert!(head.contains("connection: keep-alive\r\n"), "{head}");
    // The backend's date is passed on, alone, and the clock is not read for it.
    let (mut parts, ()) = Response::new(()).into_parts();
    parts.headers.insert(
        header::DATE,
        "Mon, 30 Nov 2026 23:59:59 GMT".parse().unwrap(),
    );
    let mut out = Vec::new();
    let unread = || -> [u8; 29] { panic!("the clock was read for an answer with a date") };
    encode_response_head(&parts, Out::Length(0), true, false, unread, &mut out);
    let head = String::from_utf8(out).unwrap();
    assert_eq!(head.matches("date: ").count(), 1, "{head}");
    assert!(
        head.contains("date: Mon, 30 Nov 2026 23:59:59 GMT\r\n"),
        "{head}"
    );
}

// === every cut of a valid request ===

/// A request as a client writes it, and what it says.
#[derive(Debug, Clone)]
struct Sent {
    wire: Vec<u8>,
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn token() -> impl Strategy<Value = String> {
    "[a-zA-Z][a-zA-Z0-9!#$%&'*+.^_`|~-]{0,15}"
}

fn valid_request() -> impl Strategy<Value = Sent> {
    (
        prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"]),
        "/[a-zA-Z0-9/._~%!$&'()*+,;=:@-]{0,40}(\\?[a-zA-Z0-9=&]{0,20})?",
        prop::collection::vec((token(), "[ -~]{0,30}"), 0..8),
        prop::collection::vec(any::<u8>(), 0..300),
        prop::option::of(prop::collection::vec(1usize..64, 1..6)),
        any::<bool>(),
    )
        .prop_map(|(method, target, headers, body, chunks, lf_only)| {
            let nl = if lf_only { "\n" } else { "\r\n" };
            let headers: Vec<(String, String)> = headers
                .into_iter()
                .filter(|(n, _)| {
                    ![
                        "content-length",
                        "transfer-encoding",
                        "connection",
                        "expect",
                        "host",
                    ]
                    .contains(&n.to_ascii_lowercase().as_str())
                })
                .map(|(n, v)| (n, v.trim().to_string()))
                .collect();
            let mut headers = headers;
            headers.insert(0, ("Host".to_string(), "braid.test:8080".to_string()));
            let mut wire = format!("{method} {target} HTTP/1.1{nl}");
            for (n, v) in &headers {
                wire.push_str(&format!("{n}: {v}{nl}"));
            }
            let mut wire = match &chunks {
                None => format!("{wire}Content-Length: {}{nl}{nl}", body.len()).into_bytes(),
                Some(_) => format!("{wire}Transfer-Encoding: chunked{nl}{nl}").into_bytes(),
            };
            match chunks {
                None => wire.extend_from_slice(&body),
                Some(sizes) => {
                    let mut rest = &body[..];
                    for n in sizes.iter().cycle() {
                        if rest.is_empty() {
                            break;
                        }
                        let (c, r) = rest.split_at((*n).min(rest.len()));
                        wire.extend_from_slice(format!("{:x};ext=1\r\n", c.len()).as_bytes());
                        wire.extend_from_slice(c);
                        wire.extend_from_slice(b"\r\n");
                        rest = r;
                    }
                    wire.extend_from_slice(b"0\r\nx-trailer: t\r\n\r\n");
                }
            }
            Sent {
                wire,
                method: method.to_string(),
                target,
                headers,
                body,
            }
        })
}

/// Reads a request as the connection does, its bytes arriving in two pieces.
fn read_back(wire: &[u8], cut: usize) -> (RequestHead, Vec<u8>) {
    let (first, second) = wire.split_at(cut);
    let mut pieces = [first, second].into_iter();
    let mut buf = BytesMut::new();
    let mut scratch = Scratch::new();
    let head = loop {
        if let Some(h) = parse_request(&mut buf, &LIMITS, &mut scratch).unwrap() {
            break h;
        }
        buf.extend_from_slice(pieces.next().expect("ended inside the head"));
    };
    let mut body = Vec::new();
    match head.framing {
        Framing::Length(n) => {
            while (buf.len() as u64) < n {
                buf.extend_from_slice(pieces.next().expect("ended inside the body"));
            }
            body.extend_from_slice(&buf.split_to(n as usize));
        }
        Framing::Chunked => {
            let mut dec = Chunked::default();
            loop {
                match dec.decode(&mut buf).unwrap() {
                    Decoded::Data(d) => body.extend_from_slice(&d),
                    Decoded::Trailers(_) | Decoded::End => break,
                    Decoded::NeedMore => {
                        buf.extend_from_slice(pieces.next().expect("ended inside the chunks"))
                    }
                }
            }
        }
    }
    for p in pieces {
        buf.extend_from_slice(p);
    }
    assert!(buf.is_empty(), "bytes left after the request: {buf:?}");
    (head, body)
}

#[test]
fn content_lengths_are_digits_within_u64() {
    let cases: [(&[u8], Option<u64>); 10] = [
        (b"0", Some(0)),
        (b"101", Some(101)),
        (b"007", Some(7)),
        (b"18446744073709551615", Some(u64::MAX)),
        (b"18446744073709551616", None),
        (b"", None),
        (b"+1", None),
        (b"1 ", None),
        (b"0x10", None),
        ("\u{661}".as_bytes(), None),
    ];
    for (value, want) in cases {
        assert_eq!(
            content_length(value),
            want,
            "{:?}",
            String::from_utf8_lossy(value)
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn a_content_length_reads_as_the_standard_library_reads_its_digits(
        value in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..24),
            "[0-9]{0,22}".prop_map(String::into_bytes),
        ]
    ) {
        let digits = !value.is_empty() && value.iter().all(u8::is_ascii_digit);
        let std = std::str::from_utf8(&value).ok().filter(|_| digits).and_then(|v| v.parse::<u64>().ok());
        prop_assert_eq!(content_length(&value), std);
    }

    #[test]
    fn a_valid_request_cut_anywhere_reads_back_whole(sent in valid_request()) {
        for cut in 0..=sent.wire.len() {
            let (head, body) = read_back(&sent.wire, cut);
            prop_assert_eq!(head.parts.method.as_str(), sent.method.as_str());
            prop_assert_eq!(head.parts.uri.to_string(), sent.target.clone());
            let got: Vec<(String, String)> = head
                .parts
                .headers
                .iter()
                .filter(|(n, _)| *n != header::CONTENT_LENGTH && *n != header::TRANSFER_ENCODING)
                .map(|(n, v)| (n.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                .collect();
            let mut want: Vec<(String, String)> = sent
                .headers
                .iter()
                .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
                .collect();
            let mut got = got;
            got.sort();
            want.sort();
            prop_assert_eq!(got, want);
            prop_assert_eq!(&body, &sent.body, "cut at {}", cut);
        }
    }
}

// === whatever braid accepts, hyper accepts the same ===

/// A request as read: method, target, version and headers in order.
type ReadAs = (String, String, Version, Vec<(String, Vec<u8>)>);

/// What hyper's HTTP/1 server made of the bytes: the first request it was called with.
fn hyper_reads(bytes: &[u8]) -> Option<ReadAs> {
    hyper_reads_whole(bytes).map(|(head, _)| head)
}

/// A body as read: its bytes and trailers, or `None` when reading it failed.
type BodyAs = Option<(Vec<u8>, Vec<(String, Vec<u8>)>)>;

/// What hyper's server made of the first request in the bytes, head and body.
fn hyper_reads_whole(bytes: &[u8]) -> Option<(ReadAs, BodyAs)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let seen = Arc::new(Mutex::new(None));
        let (client, server) = tokio::io::duplex(1 << 20);
        let record = seen.clone();
        let service =
            hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let record = record.clone();
                async move {
                    use http_body_util::BodyExt;
                    let first = record.lock().unwrap().is_none();
                    let headers = req
                        .headers()
                        .iter()
                        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                        .collect();
                    let head = (
                        req.method().to_string(),
                        req.uri().to_string(),
                        req.version(),
                        headers,
                    );
                    if first {
                        *record.lock().unwrap() = Some((head, None));
                        let body = req.into_body().collect().await.ok().map(|c| {
                            let trailers = c
                                .trailers()
                                .map(|t| {
                                    t.iter()
                                        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                                        .collect()
                                })
                                .unwrap_or_default();
                            (c.to_bytes().to_vec(), trailers)
                        });
                        if let Some(slot) = record.lock().unwrap().as_mut() {
                            slot.1 = body;
                        }
                    }
                    Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
                }
            });
        // Half-close: the client's EOF after its bytes must not cancel the request
        // before its body is read.
        let conn = hyper::server::conn::http1::Builder::new()
            .half_close(true)
            .max_headers(LIMITS.max_headers)
            .max_buf_size(LIMITS.max_bytes)
            .serve_connection(hyper_util::rt::TokioIo::new(server), service);
        let mut client = client;
        let write = async {
            use tokio::io::AsyncWriteExt;
            let _ = client.write_all(bytes).await;
            let _ = client.shutdown().await;
            // Keep reading so hyper's writes never block.
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut client, &mut sink).await;
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            tokio::join!(conn, write)
        })
        .await;
        seen.lock().unwrap().take()
    })
}

/// Bytes a fuzzer would try at the edges of the grammar.
fn edits() -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    let byte = prop::sample::select(vec![
        b' ', b'\t', b'\r', b'\n', b':', b',', b'/', b'?', b'#', b'*', 0, 0x7f, 0x80, 0xff, b'a',
        b'Z', b'0', b'9', b'"', b'(', b'{', b'%', b'@', b'\\',
    ]);
    // (where, what, how): 0 replace, 1 insert, 2 delete.
    prop::collection::vec((any::<usize>(), byte, 0u8..3), 1..4)
}

fn mutate(mut wire: Vec<u8>, edits: &[(usize, u8, u8)]) -> Vec<u8> {
    for &(at, b, how) in edits {
        if wire.is_empty() {
            break;
        }
        let at = at % wire.len();
        match how {
            0 => wire[at] = b,
            1 => wire.insert(at, b),
            _ => {
                wire.remove(at);
            }
        }
    }
    wire
}

fn braid_agrees_with_hyper(bytes: &[u8]) -> Result<(), TestCaseError> {
    let ours = parse(bytes);
    let Ok(Some(head)) = ours else {
        return Ok(());
    };
    let theirs = hyper_reads(bytes);
    let Some((method, uri, version, headers)) = theirs else {
        return Err(TestCaseError::fail(format!(
            "braid read a request hyper refuses: {:?}",
            String::from_utf8_lossy(bytes)
        )));
    };
    prop_assert_eq!(head.parts.method.as_str(), method.as_str());
    prop_assert_eq!(head.parts.uri.to_string(), uri);
    prop_assert_eq!(head.parts.version, version);
    let ours: Vec<(String, Vec<u8>)> = head
        .parts
        .headers
        .iter()
        .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
        .collect();
    prop_assert_eq!(ours, headers);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic_and_never_read_what_hyper_refuses(
        bytes in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        braid_agrees_with_hyper(&bytes)?;
    }

    #[test]
    fn edited_requests_are_read_as_hyper_reads_them_or_refused(
        sent in valid_request(),
        edits in edits(),
    ) {
        braid_agrees_with_hyper(&mutate(sent.wire, &edits))?;
    }
}

#[test]
fn host_is_required_once_and_valid() {
    for bad in [
        "GET / HTTP/1.1\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n",
        "GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: user@a\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a:port\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a:99999\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a:80:90\r\n\r\n",
        "GET http://a/b HTTP/1.1\r\n\r\n",
    ] {
        let (status, why) = refused(bad);
        assert_eq!(status, 400, "{bad:?}");
        assert!(why.contains("Host"), "{bad:?}: {why}");
    }
    for ok in [
        "GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a:80\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a:\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n",
        "GET / HTTP/1.1\r\nHost:\r\n\r\n",
        "GET / HTTP/1.0\r\n\r\n",
    ] {
        assert!(parse(ok.as_bytes()).unwrap().is_some(), "{ok:?}");
    }
}

#[test]
fn a_remembered_star_target_lets_no_other_method_through() {
    let mut scratch = Scratch::new();
    let mut buf = BytesMut::from(
        &b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\nGET * HTTP/1.1\r\nHost: a\r\n\r\n"[..],
    );
    let first = parse_request(&mut buf, &LIMITS, &mut scratch)
        .unwrap()
        .unwrap();
    assert_eq!(first.parts.uri, "*");
    let second = parse_request(&mut buf, &LIMITS, &mut scratch).unwrap_err();
    assert_eq!(second.status().as_u16(), 400, "{second}");
    // A remembered origin-form target is still reused for any method.
    let mut buf = BytesMut::from(
        &b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nPOST /a HTTP/1.1\r\nHost: a\r\n\r\n"[..],
    );
    parse_request(&mut buf, &LIMITS, &mut scratch)
        .unwrap()
        .unwrap();
    let post = parse_request(&mut buf, &LIMITS, &mut scratch)
        .unwrap()
        .unwrap();
    assert_eq!(
        (post.parts.method, post.parts.uri.to_string()),
        (Method::POST, "/a".to_string())
    );
}

// === chunked bodies: braid and hyper read the same, or braid is stricter on purpose ===

/// One chunk of a generated body, and whether it is a case docs/protocols.md lists
/// where braid refuses what hyper reads.
#[derive(Debug, Clone)]
struct Piece {
    wire: Vec<u8>,
    stricter: bool,
}

fn chunk_piece() -> impl Strategy<Value = Piece> {
    (
        prop::collection::vec(any::<u8>(), 1..24),
        0usize..24,
        prop::sample::select(vec![
            ("", false),
            (";a=b", false),
            (" ;a=\"q s\"", false),
            ("\t", false),
            (";a\nb", false),
            (";a\rb", false),
            (";\x01", true),
            (";a=\x7f", true),
        ]),
        prop::sample::select(vec!["\r\n", "\n", "\r"]),
        prop::sample::select(vec!["\r\n", "\n", ""]),
    )
        .prop_map(|(data, zeros, (ext, stricter), size_end, data_end)| {
            let mut wire =
                format!("{}{:x}{ext}{size_end}", "0".repeat(zeros), data.len()).into_bytes();
            wire.extend_from_slice(&data);
            wire.extend_from_slice(data_end.as_bytes());
            Piece { wire, stricter }
        })
}

/// The body's end: the last chunk and its trailer section, as clients send it or not.
fn last_piece() -> impl Strategy<Value = Piece> {
    prop::sample::select(vec![
        (&b"0\r\n\r\n"[..], false),
        (b"0;x=1\r\n\r\n", false),
        (b"0\r\nx-t: 1\r\n\r\n", false),
        (b"0000\r\nx-t: 1\r\nx-u: 2\r\n\r\n", false),
        // A bare LF for the body's end: hyper takes what follows as trailers.
        (b"0\r\n\nGET /next HTTP/1.1\r\nHost: a\r\n\r\n", true),
        (b"0\r\n\n", false),
        (b"0\r\nx-t: 1\n\r\n", false),
        (b"0\r\nx-t: 1\r\n folded\r\n\r\n", false),
        (b"0\n\r\n", false),
        // Sizes past the body's limit (1 MiB here) or past 64 bits.
        (b"fffffffffffffffe\r\n", false),
        (b"1ffffffffffffffff\r\n", false),
    ])
    .prop_map(|(wire, stricter)| Piece {
        wire: wire.to_vec(),
        stricter,
    })
}

/// Hosts: one valid, or the forms RFC 9112 §3.2 says a server answers with 400.
fn host_line() -> impl Strategy<Value = Piece> {
    prop::sample::select(vec![
        ("Host: a\r\n", false),
        ("Host: braid.test:8080\r\n", false),
        ("", true),
        ("Host: a\r\nHost: b\r\n", true),
        ("Host: u@a\r\n", true),
        ("Host: a:port\r\n", true),
        // Obsolete line folding and a bare CR in the head: both refuse.
        ("Host: a\r\nX-A: 1\r\n folded\r\n", false),
        ("Host: a\r\nX-A: 1\r2\r\n", false),
    ])
    .prop_map(|(line, stricter)| Piece {
        wire: line.as_bytes().to_vec(),
        stricter,
    })
}

/// What braid's listener reads of the bytes: the head and the body as the proxy gets
/// them, or `None` for the body when reading it fails; `None` when the head is refused.
fn braid_reads_whole(bytes: &[u8]) -> Option<(RequestHead, BodyAs)> {
    let mut buf = BytesMut::from(bytes);
    let head = parse_request(&mut buf, &LIMITS, &mut Scratch::new()).ok()??;
    let body = match head.framing {
        Framing::Length(n) if (buf.len() as u64) < n => None,
        Framing::Length(n) => Some((buf.split_to(n as usize).to_vec(), vec![])),
        Framing::Chunked => {
            let mut dec = Chunked::with_limit(1 << 20);
            let mut body = Vec::new();
            loop {
                match dec.decode(&mut buf) {
                    Ok(Decoded::Data(d)) => body.extend_from_slice(&d),
                    Ok(Decoded::End) => break Some((body, vec![])),
                    Ok(Decoded::Trailers(t)) => {
                        let t = t
                            .iter()
                            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                            .collect();
                        break Some((body, t));
                    }
                    Ok(Decoded::NeedMore) | Err(_) => break None,
                }
            }
        }
    };
    Some((head, body))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The same generated heads and chunked bodies to both parsers: both refuse, or both
    /// forward the same request (head, body bytes, trailers); braid refuses what hyper
    /// reads only in the cases the docs list.
    #[test]
    fn chunked_requests_are_read_as_hyper_reads_them_or_refused_on_purpose(
        host in host_line(),
        lf_head in any::<bool>(),
        chunks in prop::collection::vec(chunk_piece(), 0..4),
        last in last_piece(),
    ) {
        let nl: &[u8] = if lf_head { b"\n" } else { b"\r\n" };
        let mut wire = b"POST /p HTTP/1.1".to_vec();
        wire.extend_from_slice(nl);
        let host_wire: Vec<u8> = host.wire.iter().copied().filter(|&b| b != b'\r' || !lf_head).collect();
        wire.extend_from_slice(&host_wire);
        wire.extend_from_slice(b"Transfer-Encoding: chunked");
        wire.extend_from_slice(nl);
        wire.extend_from_slice(nl);
        for c in &chunks {
            wire.extend_from_slice(&c.wire);
        }
        wire.extend_from_slice(&last.wire);
        let stricter = host.stricter || last.stricter || chunks.iter().any(|c| c.stricter);
        let ours = braid_reads_whole(&wire);
        let theirs = hyper_reads_whole(&wire);
        let shown = String::from_utf8_lossy(&wire).into_owned();
        let ours_ok = ours.as_ref().and_then(|(h, b)| b.as_ref().map(|b| (h, b)));
        let theirs_ok = theirs.as_ref().and_then(|(h, b)| b.as_ref().map(|b| (h, b)));
        match (ours_ok, theirs_ok) {
            (None, None) => {}
            (Some(_), None) => {
                return Err(TestCaseError::fail(format!("braid read a request hyper refuses: {shown:?}")));
            }
            (None, Some(_)) => prop_assert!(stricter, "braid refused what hyper reads: {:?}", shown),
            (Some((head, body)), Some((hhead, hbody))) => {
                prop_assert_eq!(head.parts.method.as_str(), hhead.0.as_str());
                prop_assert_eq!(head.parts.uri.to_string(), hhead.1.clone());
                let headers: Vec<(String, Vec<u8>)> = head.parts.headers.iter()
                    .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())).collect();
                prop_assert_eq!(&headers, &hhead.3);
                prop_assert_eq!(body, hbody, "{:?}", shown);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The byte reader of `Host` accepts nothing `http::uri::Authority` refuses (less
    /// userinfo, with a port that fits), and reads as it does everything without a
    /// bracket: `Authority` takes brackets anywhere and any bytes between them (`[-]`,
    /// `a[]`), braid only a leading IP literal of an IPv6 address's bytes (hex digits,
    /// colons, dots), as RFC 3986 has it.
    #[test]
    fn a_host_is_valid_exactly_when_authority_reads_it(
        value in prop_oneof![
            "[a-z0-9.-]{0,12}(:[0-9]{0,6})?",
            "\\[[0-9a-f:]{0,10}\\](:[0-9]{0,6})?",
            proptest::collection::vec(prop::sample::select(b"az09.-_~!$&'()*+,;=:@[]%/? \t".to_vec()), 0..12)
                .prop_map(|b| String::from_utf8(b).unwrap()),
        ]
    ) {
        let by_http = value.is_empty()
            || (!value.contains('@')
                && http::uri::Authority::try_from(value.as_bytes()).is_ok_and(|a| {
                    match &a.as_str()[a.host().len()..] {
                        "" | ":" => true,
                        rest => rest[1..].bytes().all(|b| b.is_ascii_digit()) && a.port_u16().is_some(),
                    }
                }));
        let ours = valid_host(value.as_bytes());
        prop_assert!(!ours || by_http, "braid reads {:?} as a host", value);
        if !value.contains(['[', ']']) {
            prop_assert_eq!(ours, by_http, "{:?}", value);
        }
    }
}
