//! A read-side guard for HTTP/1 request smuggling forms that hyper tolerates.
//!
//! hyper answers a request carrying both `Transfer-Encoding` and `Content-Length` by
//! dropping the length and closing afterwards (allowed by RFC 9112 §6.1), and accepts
//! repeated identical `Content-Length` lines. A proxy in front of other HTTP stacks
//! should refuse both outright, so this wrapper watches the bytes hyper reads, spots
//! those header combinations inside one message head, and flags the connection; the
//! server then answers 400 and closes. Only header bytes are looked at: a body with a
//! known length is skipped, and a chunked body is followed by its chunk sizes (its
//! data skipped, its trailers passed over), so body bytes that look like headers never
//! raise a false alarm. HTTP/2 connections (the prior-knowledge preface) are not
//! scanned at all. It also replays what braid's HTTP/1.1 loop read of a connection
//! before it found the HTTP/2 preface, so hyper sees the preface itself.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the sniffer learned about a connection; shared with the request handler.
#[derive(Debug, Default)]
pub struct ConnFlags {
    /// A message head had both framing headers, or two Content-Length lines.
    pub smuggling: AtomicBool,
    /// The connection opened with the HTTP/2 preface.
    pub h2: AtomicBool,
    /// A message head asked for a transfer coding other than a lone `chunked`
    /// (`gzip, chunked`, `identity`, two Transfer-Encoding lines): braid would not
    /// apply it, so the request is refused (501) rather than decoded as something else.
    pub unsupported_coding: AtomicBool,
}

/// Enough of a line to recognise the header name and read a Content-Length value.
const LINE_KEEP: usize = 48;

/// What the next line of the connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// A request line or header line.
    Head,
    /// A chunk-size line (or the line ending the chunk before it).
    ChunkSize,
    /// A trailer line, after the last chunk, until a blank line.
    Trailers,
}

#[derive(Debug)]
struct Scan {
    line: [u8; LINE_KEEP],
    line_len: usize,
    first_line: bool,
    te: bool,
    cl_count: u8,
    cl_value: Option<u64>,
    /// Body bytes still to pass unscanned (a Content-Length body, or chunk data).
    skip: u64,
    part: Part,
    done: bool,
}

pub struct Sniffer<S> {
    inner: S,
    /// Bytes read from `inner` already (by braid's HTTP/1.1 loop, which found the
    /// HTTP/2 preface in them), read again first.
    replay: bytes::Bytes,
    scan: Scan,
    flags: Arc<ConnFlags>,
}

impl<S> Sniffer<S> {
    pub fn new(inner: S, flags: Arc<ConnFlags>) -> Self {
        Self::replaying(bytes::Bytes::new(), inner, flags)
    }

    /// A stream whose first bytes, `replay`, were read from it already.
    pub fn replaying(replay: bytes::Bytes, inner: S, flags: Arc<ConnFlags>) -> Self {
        Sniffer {
            inner,
            replay,
            scan: Scan {
                line: [0; LINE_KEEP],
                line_len: 0,
                first_line: true,
                te: false,
                cl_count: 0,
                cl_value: None,
                skip: 0,
                part: Part::Head,
                done: false,
            },
            flags,
        }
    }
}

impl Scan {
    /// Appends to the current line what still fits in `line`.
    fn keep(&mut self, part: &[u8]) {
        let n = part.len().min(LINE_KEEP - self.line_len);
        self.line[self.line_len..self.line_len + n].copy_from_slice(&part[..n]);
        self.line_len += n;
    }

    fn feed(&mut self, mut bytes: &[u8], flags: &ConnFlags) {
        while !bytes.is_empty() && !self.done {
            if self.skip > 0 {
                let n = (self.skip as usize).min(bytes.len());
                self.skip -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            // Jump to the end of the line. A line wholly in this read is looked at where
            // it lies; one split across reads is kept (its first LINE_KEEP bytes).
            let Some(nl) = memchr::memchr(b'\n', bytes) else {
                self.keep(bytes);
                return;
            };
            let kept = self.line_len > 0;
            if kept {
                self.keep(&bytes[..nl]);
            }
            let mut line = if kept {
                &self.line[..self.line_len]
            } else {
                &bytes[..nl]
            };
            bytes = &bytes[nl + 1..];
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            if self.part != Part::Head {
                let (part, skip, done) = chunked_line(self.part, line);
                (self.part, self.skip, self.done) = (part, skip, done);
                self.line_len = 0;
                continue;
            }
            if self.first_line {
                self.first_line = false;
                if line == b"PRI * HTTP/2.0" {
                    flags.h2.store(true, Ordering::Relaxed);
                    self.done = true;
                }
            } else if line.is_empty() {
                // The end of a head: its body follows.
                if let (Some(len), false, 1) = (self.cl_value, self.te, self.cl_count) {
                    self.skip = len;
                }
                if self.te {
                    self.part = Part::ChunkSize;
                }
                self.te = false;
                self.cl_count = 0;
                self.cl_value = None;
            } else if matches!(line[0], b't' | b'T')
                && starts_with_ignore_case(line, b"transfer-encoding:")
            {
                let value = line[18..].trim_ascii();
                if self.te || !value.eq_ignore_ascii_case(b"chunked") {
                    flags.unsupported_coding.store(true, Ordering::Relaxed);
                    self.done = true;
                }
                self.te = true;
            } else if matches!(line[0], b'c' | b'C')
                && starts_with_ignore_case(line, b"content-length:")
            {
                self.cl_count = self.cl_count.saturating_add(1);
                self.cl_value = std::str::from_utf8(&line[15..])
                    .ok()
                    .and_then(|v| v.trim().parse().ok());
            }
            if (self.te && self.cl_count > 0) || self.cl_count > 1 {
                flags.smuggling.store(true, Ordering::Relaxed);
                self.done = true;
            }
            self.line_len = 0;
        }
    }
}

/// One line of a chunked body: a chunk size (its data then skipped), the blank line
/// after a chunk's data, or a trailer; returns the next part, the bytes to skip and
/// whether to stop. A size that does not parse ends the scan: hyper refuses the
/// message itself.
fn chunked_line(part: Part, line: &[u8]) -> (Part, u64, bool) {
    match part {
        Part::ChunkSize if line.is_empty() => (part, 0, false), // the CRLF after data
        Part::ChunkSize => {
            let digits = line
                .split(|&b| b == b';' || b == b' ' || b == b'\t')
                .next()
                .unwrap_or_default();
            let size = std::str::from_utf8(digits)
                .ok()
                .filter(|d| !d.is_empty() && d.len() <= 16)
                .and_then(|d| u64::from_str_radix(d, 16).ok());
            match size {
                Some(0) => (Part::Trailers, 0, false),
                Some(n) => (part, n, false),
                None => (part, 0, true),
            }
        }
        Part::Trailers if line.is_empty() => (Part::Head, 0, false),
        Part::Trailers | Part::Head => (part, 0, false),
    }
}

fn starts_with_ignore_case(line: &[u8], prefix: &[u8]) -> bool {
    line.len() >= prefix.len() && line[..prefix.len()].eq_ignore_ascii_case(prefix)
}

// === impl AsyncRead / AsyncWrite: pass through, scanning what is read ===

impl<S: AsyncRead + Unpin> AsyncRead for Sniffer<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = if this.replay.is_empty() {
            Pin::new(&mut this.inner).poll_read(cx, buf)
        } else {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay.split_to(n));
            Poll::Ready(Ok(()))
        };
        if res.is_ready() && !this.scan.done {
            this.scan.feed(&buf.filled()[before..], &this.flags);
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Sniffer<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codings(head: &str) -> bool {
        let flags = ConnFlags::default();
        let mut s = Sniffer::new((), Arc::new(ConnFlags::default())).scan;
        s.feed(head.as_bytes(), &flags);
        flags.unsupported_coding.load(Ordering::Relaxed)
    }

    #[test]
    fn only_a_lone_chunked_coding_is_accepted() {
        let head = |te: &str| format!("POST / HTTP/1.1\r\nHost: x\r\n{te}\r\n\r\n");
        assert!(!codings(&head("Transfer-Encoding: chunked")));
        assert!(!codings(&head("transfer-encoding:   CHUNKED  ")));
        assert!(!codings("GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        for bad in [
            "Transfer-Encoding: gzip, chunked",
            "Transfer-Encoding: gzip",
            "Transfer-Encoding: identity",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
            "Transfer-Encoding: chunked, chunked",
        ] {
            assert!(codings(&head(bad)), "{bad}");
        }
    }

    fn scan(chunks: &[&[u8]]) -> (bool, bool) {
        let flags = ConnFlags::default();
        let mut s = Sniffer::new((), Arc::new(ConnFlags::default())).scan;
        for c in chunks {
            s.feed(c, &flags);
        }
        (
            flags.smuggling.load(Ordering::Relaxed),
            flags.h2.load(Ordering::Relaxed),
        )
    }

    #[test]
    fn flags_cl_and_te_in_one_head_even_split_across_reads() {
        let req = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(scan(&[req]), (true, false));
        let (a, b) = req.split_at(33);
        assert_eq!(scan(&[a, b]), (true, false));
    }

    #[test]
    fn long_lines_and_every_split_point_are_handled() {
        let req = format!(
            "POST / HTTP/1.1\r\nUser-Agent: {}\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhello",
            "x".repeat(200)
        );
        let req = req.as_bytes();
        for cut in 0..req.len() {
            let (a, b) = req.split_at(cut);
            assert_eq!(scan(&[a, b]), (true, false), "split at {cut}");
        }
    }

    #[test]
    fn flags_duplicate_content_length() {
        let req = b"POST / HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(scan(&[req]), (true, false));
    }

    #[test]
    fn a_body_that_looks_like_headers_is_skipped() {
        let body = b"\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n";
        let head = format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len());
        let next = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(scan(&[head.as_bytes(), body, next]), (false, false));
    }

    #[test]
    fn keep_alive_requests_are_judged_one_head_at_a_time() {
        let two = b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(scan(&[two]), (false, false));
    }

    #[test]
    fn a_chunked_body_that_looks_like_headers_is_not_scanned() {
        let data = "content-length: 1\r\ntransfer-encoding: chunked\r\n";
        let req = format!(
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{:x};ext=1\r\n{data}\r\n0\r\nx-trailer: 1\r\ncontent-length: 9\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
            data.len()
        );
        let req = req.as_bytes();
        for cut in 0..req.len() {
            let (a, b) = req.split_at(cut);
            assert_eq!(scan(&[a, b]), (false, false), "split at {cut}");
        }
        // The next head on the connection is still judged.
        let next = b"POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\nx";
        let mut two = req.to_vec();
        two.extend_from_slice(next);
        assert_eq!(scan(&[&two]), (true, false));
    }

    #[test]
    fn h2_preface_stops_scanning() {
        assert_eq!(scan(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]), (false, true));
    }
}
