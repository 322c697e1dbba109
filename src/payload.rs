//! The sampled payload log (`routes[].log`): for a share of a route's requests, one
//! record with the request and response bodies (each cut at `max_bytes` and marked so),
//! the variant, how it was chosen, the status and the latency, for offline evaluation
//! of an A/B test. Records go to a JSON-lines file rotated by size, or to an HTTP
//! endpoint as CloudEvents (binary mode, a request and a response event per record, as
//! KServe's logger sends them).
//!
//! Nothing here can hold or fail a request: records are queued without waiting, the
//! queue is bounded in bytes (a full queue drops the record), and the writer runs on
//! its own thread (files) or task (HTTP). What became of each record is counted in
//! `braid_payload_log_records_total`. Request headers are written from an allowlist
//! (`routes[].log.headers`), and a header that may carry credentials never is
//! (`is_credential`), allowed or not. Files are created readable by their owner only.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, Request, Uri};
use http_body_util::Full;
use serde_json::{Value, json};

use crate::addr::Protocol;
use crate::metrics::Metrics;
use crate::upstream::Upstreams;

/// Bytes of records waiting for a writer, over every sink together; more are dropped.
pub const MAX_QUEUED_BYTES: usize = 16 * 1024 * 1024;

/// How long an HTTP sink may take to accept one event.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// `routes[].log`.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Share of the route's requests logged.
    pub fraction: f64,
    /// Each body is cut after this many bytes.
    pub max_bytes: usize,
    pub sink: Sink,
    /// Request headers written into records (lowercase names); no other is.
    pub headers: Vec<http::HeaderName>,
}

/// Where records go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Sink {
    /// JSON lines appended to `path`; past `rotate_bytes` it becomes `path.1` (older
    /// ones shift up to `path.{keep}`, the oldest is deleted).
    File {
        path: PathBuf,
        rotate_bytes: u64,
        keep: u32,
    },
    /// CloudEvents POSTed to an `http://` URL.
    Http(Uri),
}

/// One body as logged.
#[derive(Debug, Clone)]
pub struct Payload {
    /// The first `max_bytes` bytes.
    pub bytes: Bytes,
    /// The body's whole length.
    pub total: u64,
    /// The body ended properly (a response can be cut short by its backend or client).
    pub complete: bool,
    pub content_type: Option<String>,
}

/// One sampled request.
#[derive(Debug)]
pub struct Record {
    pub time: SystemTime,
    pub id: String,
    pub trace_id: Option<String>,
    pub route: Arc<str>,
    pub variant: Arc<str>,
    pub assignment: &'static str,
    pub status: u16,
    pub latency: Duration,
    pub method: String,
    pub path: String,
    /// Request headers, credentials left out.
    pub headers: Vec<(String, String)>,
    pub request: Payload,
    pub response: Payload,
    /// An OpenAI-style answer's generation (time to first token, tokens), as an object.
    pub generation: Option<Value>,
}

/// Header names whose values may carry credentials: never written.
pub fn is_credential(name: &str) -> bool {
    const WORDS: [&str; 14] = [
        "auth",
        "token",
        "secret",
        "passw",
        "credential",
        "session",
        "cookie",
        "key",
        "jwt",
        "assertion",
        "cert",
        "dpop",
        "oidc",
        "signature",
    ];
    let name = name.to_ascii_lowercase();
    WORDS.iter().any(|w| name.contains(w))
}

/// The allowed headers of a request, values as text; credentials never, even allowed.
pub fn loggable_headers(
    headers: &HeaderMap,
    allowed: &[http::HeaderName],
) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(n, _)| allowed.contains(n) && !is_credential(n.as_str()))
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

/// A random 128-bit id in hex, for a record without a trace id.
pub fn new_id() -> String {
    use crate::hash::next_u64;
    format!("{:016x}{:016x}", next_u64(), next_u64())
}

impl Payload {
    fn json(&self) -> Value {
        let truncated = self.total > self.bytes.len() as u64;
        let (body, encoding) = match std::str::from_utf8(&self.bytes) {
            Ok(s) => (s.to_string(), "utf-8"),
            // Cut inside a character: keep the valid part as text.
            Err(e) if truncated && e.error_len().is_none() => {
                let valid = &self.bytes[..e.valid_up_to()];
                (String::from_utf8_lossy(valid).into_owned(), "utf-8")
            }
            Err(_) => (
                base64::engine::general_purpose::STANDARD.encode(&self.bytes),
                "base64",
            ),
        };
        json!({
            "bytes": self.total,
            "truncated": truncated,
            "complete": self.complete,
            "content_type": self.content_type,
            "encoding": encoding,
            "body": body,
        })
    }
}

impl Record {
    /// The record's JSON line (without its newline).
    pub fn line(&self) -> String {
        let headers: serde_json::Map<String, Value> = self
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        json!({
            "time": rfc3339(self.time),
            "id": self.id,
            "trace_id": self.trace_id,
            "route": &*self.route,
            "variant": &*self.variant,
            "assignment": self.assignment,
            "status": self.status,
            "latency_ms": (self.latency.as_secs_f64() * 1e6).round() / 1e3,
            "method": self.method,
            "path": self.path,
            "request": {"headers": headers, "payload": self.request.json()},
            "response": {"payload": self.response.json()},
            "generation": self.generation,
        })
        .to_string()
    }

    fn size(&self) -> usize {
        self.request.bytes.len() + self.response.bytes.len() + 512
    }
}

fn rfc3339(t: SystemTime) -> String {
    crate::access::rfc3339_millis(t.duration_since(UNIX_EPOCH).unwrap_or_default())
}

/// One sink's writer. Cloned handles share it; it ends when the last is dropped.
#[derive(Debug)]
pub struct PayloadLog {
    tx: Sender,
    metrics: Arc<Metrics>,
}

#[derive(Debug)]
enum Sender {
    File(SyncSender<Queued>),
    Http(tokio::sync::mpsc::Sender<Queued>),
}

/// Records one sink may hold queued (each sink's channel; the bytes are bounded too).
const MAX_QUEUED_RECORDS: usize = 4096;

/// Bytes queued over every sink (the bound is shared).
static QUEUED: AtomicUsize = AtomicUsize::new(0);

/// A record in a queue, its bytes counted in `QUEUED` until it is dropped: written,
/// refused, or lost with its channel (a stopped writer gives its bytes back too).
#[derive(Debug)]
struct Queued {
    record: Record,
    size: usize,
}

impl Queued {
    /// Counts the record in, or drops it (naming its route) past the bound.
    fn take(record: Record) -> Result<Queued, Arc<str>> {
        let size = record.size();
        if QUEUED.fetch_add(size, Ordering::Relaxed) + size > MAX_QUEUED_BYTES {
            QUEUED.fetch_sub(size, Ordering::Relaxed);
            return Err(record.route);
        }
        Ok(Queued { record, size })
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        QUEUED.fetch_sub(self.size, Ordering::Relaxed);
    }
}

/// A record has left the queue: written, or refused by its sink.
fn settled(metrics: &Metrics, r: &Record, ok: bool) {
    metrics.payload_log(&r.route, if ok { "written" } else { "failed" });
}

impl PayloadLog {
    /// Starts the sink's writer (a thread for a file, a task for HTTP: call it inside
    /// the runtime). A file is opened on the first record, and again after a failure.
    pub fn start(sink: &Sink, metrics: Arc<Metrics>, upstreams: &Upstreams) -> PayloadLog {
        let tx = match sink {
            Sink::File {
                path,
                rotate_bytes,
                keep,
            } => {
                let (tx, rx) = mpsc::sync_channel::<Queued>(MAX_QUEUED_RECORDS);
                let mut file = FileSink::new(path.clone(), *rotate_bytes, *keep);
                let m = metrics.clone();
                let spawned = std::thread::Builder::new()
                    .name("braid-payload-log".into())
                    .spawn(move || {
                        while let Ok(first) = rx.recv() {
                            let mut batch = vec![first];
                            batch.extend(rx.try_iter());
                            let results = file.write(&batch);
                            for (q, ok) in batch.iter().zip(results) {
                                settled(&m, &q.record, ok);
                            }
                        }
                    });
                if let Err(e) = spawned {
                    tracing::error!("payload log thread: {e}");
                }
                Sender::File(tx)
            }
            Sink::Http(uri) => {
                let (tx, mut rx) = tokio::sync::mpsc::channel::<Queued>(MAX_QUEUED_RECORDS);
                let (m, up, uri) = (metrics.clone(), upstreams.clone(), uri.clone());
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    tracing::error!(
                        "payload log {uri}: started outside the runtime; records are dropped"
                    );
                    return PayloadLog {
                        tx: Sender::Http(tx),
                        metrics,
                    };
                };
                runtime.spawn(async move {
                    while let Some(q) = rx.recv().await {
                        let ok = post_events(&up, &uri, &q.record).await;
                        settled(&m, &q.record, ok);
                    }
                });
                Sender::Http(tx)
            }
        };
        PayloadLog { tx, metrics }
    }

    /// Queues a record; never waits. Over the byte bound the record is dropped.
    pub fn write(&self, record: Record) {
        let queued = match Queued::take(record) {
            Ok(q) => q,
            Err(route) => return self.metrics.payload_log(&route, "dropped"),
        };
        let route = queued.record.route.clone();
        // A refused record is dropped here, and its bytes with it.
        let sent = match &self.tx {
            Sender::File(tx) => tx.try_send(queued).is_ok(),
            Sender::Http(tx) => tx.try_send(queued).is_ok(),
        };
        if !sent {
            self.metrics.payload_log(&route, "dropped");
        }
    }
}

/// A JSON-lines file rotated by size.
struct FileSink {
    path: PathBuf,
    rotate_bytes: u64,
    keep: u32,
    out: Option<(std::io::BufWriter<std::fs::File>, u64)>,
    /// The last error, logged once until a write succeeds again.
    failing: bool,
}

impl FileSink {
    fn new(path: PathBuf, rotate_bytes: u64, keep: u32) -> FileSink {
        FileSink {
            path,
            rotate_bytes,
            keep,
            out: None,
            failing: false,
        }
    }

    /// Writes a batch; per record, whether it reached the file. A line counts once the
    /// writer it went into was flushed without error (before a rotation or at the
    /// batch's end): a failure drops the writer and every line still in its buffer, and
    /// those records count as failed, whichever line's write found the error.
    fn write(&mut self, batch: &[Queued]) -> Vec<bool> {
        let mut written = vec![false; batch.len()];
        // Records whose lines are in the current writer's buffer, not yet flushed.
        let mut buffered = Vec::with_capacity(batch.len());
        for (i, q) in batch.iter().enumerate() {
            let line = q.record.line();
            match self.append(line.as_bytes(), &mut buffered, &mut written) {
                Ok(()) => buffered.push(i),
                Err(e) => {
                    self.fail(&e);
                    buffered.clear();
                }
            }
        }
        // A full disk shows here.
        if let Err(e) = self.flush(&mut buffered, &mut written) {
            self.fail(&e);
        }
        if written.iter().all(|w| *w) && self.failing {
            tracing::info!(path = %self.path.display(), "payload log writes again");
            self.failing = false;
        }
        written
    }

    /// Puts a line in the writer's buffer, opening the file first if need be, and
    /// rotating it first when the line would take it past `rotate_bytes`.
    fn append(
        &mut self,
        line: &[u8],
        buffered: &mut Vec<usize>,
        written: &mut [bool],
    ) -> std::io::Result<()> {
        if self.out.is_none() {
            self.open()?;
        }
        let need = line.len() as u64 + 1;
        if let Some((_, size)) = &self.out
            && *size > 0
            && *size + need > self.rotate_bytes
        {
            self.flush(buffered, written)?;
            self.rotate()?;
            self.open()?;
        }
        let (out, size) = self.out.as_mut().expect("opened above");
        out.write_all(line)?;
        out.write_all(b"\n")?;
        *size += need;
        Ok(())
    }

    /// Flushes the writer: the `buffered` records have then reached the file.
    fn flush(&mut self, buffered: &mut Vec<usize>, written: &mut [bool]) -> std::io::Result<()> {
        if let Some((out, _)) = self.out.as_mut() {
            out.flush()?;
        }
        buffered.drain(..).for_each(|i| written[i] = true);
        Ok(())
    }

    fn open(&mut self) -> std::io::Result<()> {
        let file = crate::access::private_append(&self.path)?;
        let size = file.metadata()?.len();
        self.out = Some((std::io::BufWriter::new(file), size));
        Ok(())
    }

    /// `path` -> `path.1` -> ... -> `path.{keep}`; the oldest is removed.
    fn rotate(&mut self) -> std::io::Result<()> {
        if let Some((mut out, _)) = self.out.take() {
            out.flush()?;
        }
        let numbered = |i: u32| -> PathBuf {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{i}"));
            p.into()
        };
        if self.keep == 0 {
            return remove_if_present(&self.path);
        }
        remove_if_present(&numbered(self.keep))?;
        for i in (1..self.keep).rev() {
            rename_if_present(&numbered(i), &numbered(i + 1))?;
        }
        rename_if_present(&self.path, &numbered(1))
    }

    fn fail(&mut self, e: &std::io::Error) {
        if !self.failing {
            tracing::warn!(path = %self.path.display(), "payload log write failed (records are counted as failed until it works again): {e}");
            self.failing = true;
        }
        // Reopen on the next record: the file may have been removed or the disk freed.
        self.out = None;
    }
}

fn remove_if_present(p: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn rename_if_present(from: &Path, to: &Path) -> std::io::Result<()> {
    match std::fs::rename(from, to) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The record as two CloudEvents (binary content mode): the request, then the
/// response, sharing `ce-id`, as KServe's payload logger sends them. `true` when both
/// were accepted (2xx).
async fn post_events(upstreams: &Upstreams, uri: &Uri, r: &Record) -> bool {
    for (kind, payload) in [("request", &r.request), ("response", &r.response)] {
        let mut req = Request::post(uri.clone())
            .header("ce-specversion", "1.0")
            .header("ce-id", &r.id)
            .header("ce-type", format!("org.kubeflow.serving.inference.{kind}"))
            .header(
                "ce-source",
                format!("/braid/routes/{}/variants/{}", r.route, r.variant),
            )
            .header("ce-time", rfc3339(r.time))
            .header("ce-inferenceservicename", &*r.route)
            .header("ce-endpoint", &*r.variant)
            .header("ce-braidassignment", r.assignment)
            .header("ce-braidstatus", r.status.to_string())
            .header(
                "ce-braidlatencyms",
                format!("{:.3}", r.latency.as_secs_f64() * 1e3),
            )
            .header("ce-braidbytes", payload.total.to_string())
            .header(
                "ce-braidtruncated",
                (payload.total > payload.bytes.len() as u64).to_string(),
            )
            .header(
                http::header::CONTENT_TYPE,
                payload
                    .content_type
                    .as_deref()
                    .unwrap_or("application/json"),
            );
        if let Some(t) = &r.trace_id {
            req = req.header("ce-traceid", t);
        }
        let Ok(req) = req.body(Full::new(payload.bytes.clone())) else {
            return false;
        };
        let sent = tokio::time::timeout(HTTP_TIMEOUT, async {
            let resp = upstreams.send(Protocol::Http1, None, req).await.ok()?;
            let ok = resp.status().is_success();
            // Read the answer to its end so the connection is kept.
            http_body_util::BodyExt::collect(resp.into_body())
                .await
                .ok()?;
            Some(ok)
        })
        .await;
        if sent != Ok(Some(true)) {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(body: &[u8], total: u64) -> Record {
        Record {
            time: UNIX_EPOCH,
            id: "id".into(),
            trace_id: None,
            route: "r".into(),
            variant: "v".into(),
            assignment: "sticky",
            status: 200,
            latency: Duration::from_millis(3),
            method: "POST".into(),
            path: "/v2/models/m/infer".into(),
            headers: vec![("content-type".into(), "application/json".into())],
            request: Payload {
                bytes: Bytes::copy_from_slice(body),
                total,
                complete: true,
                content_type: None,
            },
            response: Payload {
                bytes: Bytes::from_static(b"{}"),
                total: 2,
                complete: true,
                content_type: Some("application/json".into()),
            },
            generation: None,
        }
    }

    #[test]
    fn credentials_are_recognised() {
        for h in [
            "authorization",
            "Proxy-Authorization",
            "cookie",
            "x-api-key",
            "x-auth-token",
            "x-amz-security-token",
            "x-session-id",
            "x-client-secret",
            "x-goog-iap-jwt-assertion",
            "x-forwarded-client-cert",
            "dpop",
            "x-amzn-oidc-data",
        ] {
            assert!(is_credential(h), "{h}");
        }
        for h in [
            "content-type",
            "x-user-id",
            "traceparent",
            "x-braid-variant",
        ] {
            assert!(!is_credential(h), "{h}");
        }
    }

    #[test]
    fn bodies_are_text_base64_or_cut_at_a_character() {
        let j: Value = serde_json::from_str(&record(b"{\"a\":1}", 7).line()).unwrap();
        let p = &j["request"]["payload"];
        assert_eq!(
            (p["body"].as_str(), p["truncated"].as_bool()),
            (Some("{\"a\":1}"), Some(false))
        );
        let j: Value = serde_json::from_str(&record(&[0xff, 0x00, 0x10], 3).line()).unwrap();
        assert_eq!(j["request"]["payload"]["encoding"], "base64");
        assert_eq!(j["request"]["payload"]["body"], "/wAQ");
        // "é" is two bytes; cut after its first.
        let j: Value =
            serde_json::from_str(&record("abé".as_bytes().get(..3).unwrap(), 4).line()).unwrap();
        let p = &j["request"]["payload"];
        assert_eq!(
            (
                p["body"].as_str(),
                p["truncated"].as_bool(),
                p["bytes"].as_u64()
            ),
            (Some("ab"), Some(true), Some(4))
        );
    }

    #[test]
    fn files_rotate_by_size_and_keep_as_many_as_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        let line_len = record(b"x", 1).line().len() as u64 + 1;
        let mut sink = FileSink::new(path.clone(), line_len * 3, 2);
        for _ in 0..20 {
            assert_eq!(sink.write(&batch(1)), [true]);
        }
        let lines = |p: &Path| {
            std::fs::read_to_string(p)
                .map(|s| s.lines().count())
                .unwrap_or(0)
        };
        // Three lines a file: 18 rotated away, the last two in the current file.
        assert_eq!(lines(&path), 2);
        assert_eq!(lines(&dir.path().join("p.jsonl.1")), 3);
        assert_eq!(lines(&dir.path().join("p.jsonl.2")), 3);
        assert!(!dir.path().join("p.jsonl.3").exists());
        // Owner-only, the rotated ones too.
        use std::os::unix::fs::PermissionsExt;
        for p in [path.clone(), dir.path().join("p.jsonl.1")] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", p.display());
        }
    }

    /// `n` queued records of one byte each way.
    fn batch(n: usize) -> Vec<Queued> {
        (0..n)
            .map(|_| Queued::take(record(b"x", 1)).unwrap())
            .collect()
    }

    #[test]
    fn a_full_disk_counts_every_record_failed_wherever_the_buffer_fills() {
        // /dev/full takes nothing: whichever line's write meets the error (the one that
        // fills the buffer, the last one, the final flush), no record counts as written.
        let line_len = record(b"x", 1).line().len() + 1;
        let most = 2 * 8192 / line_len + 3;
        let mut sink = FileSink::new("/dev/full".into(), u64::MAX, 0);
        for n in 1..=most {
            assert_eq!(sink.write(&batch(n)), vec![false; n], "a batch of {n}");
        }
    }

    #[test]
    fn a_batch_across_rotations_counts_every_record_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        let line_len = record(b"x", 1).line().len() as u64 + 1;
        let mut sink = FileSink::new(path.clone(), line_len * 3, 5);
        assert_eq!(sink.write(&batch(10)), [true; 10]);
        let lines: usize = ["p.jsonl", "p.jsonl.1", "p.jsonl.2", "p.jsonl.3"]
            .iter()
            .map(|n| {
                std::fs::read_to_string(dir.path().join(n))
                    .unwrap()
                    .lines()
                    .count()
            })
            .sum();
        assert_eq!(lines, 10);
    }
}
