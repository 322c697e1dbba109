//! The access log: one JSON line per sampled request, handed to a writer thread
//! through a bounded queue. A slow or failing destination never holds a request:
//! a full queue drops the line, a failed write is counted, and both show in
//! `braid_access_log_lines_total`. Lines are built by the proxy, at the edge.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{self, SyncSender, TrySendError};

use crate::metrics::Metrics;

/// Lines waiting for the writer; more are dropped.
const QUEUE: usize = 8192;

/// Where the access log goes: `-` is standard error, anything else a file appended to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Stderr,
    File(PathBuf),
}

impl std::str::FromStr for Destination {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(if s == "-" {
            Destination::Stderr
        } else {
            Destination::File(PathBuf::from(s))
        })
    }
}

#[derive(Debug)]
pub struct AccessLog {
    tx: SyncSender<String>,
    metrics: Arc<Metrics>,
}

/// Opens a log file for appending, creating it readable and writable by its owner
/// only (0600): logs carry request data. An existing file keeps its mode.
pub fn private_append(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

impl AccessLog {
    /// Opens the destination now (a file that cannot be opened is an error at start,
    /// not a silent loss later) and starts the writer thread, which ends when the log
    /// is dropped.
    pub fn open(dest: &Destination, metrics: Arc<Metrics>) -> Result<AccessLog, String> {
        let out: Box<dyn Write + Send> = match dest {
            Destination::Stderr => Box::new(std::io::stderr()),
            Destination::File(path) => Box::new(
                private_append(path).map_err(|e| format!("access log {}: {e}", path.display()))?,
            ),
        };
        let (tx, rx) = mpsc::sync_channel::<String>(QUEUE);
        let m = metrics.clone();
        std::thread::Builder::new()
            .name("braid-access-log".into())
            .spawn(move || {
                let mut out = std::io::BufWriter::new(out);
                while let Ok(first) = rx.recv() {
                    // Write what has queued, then flush once: a burst costs one write.
                    let mut lines = vec![first];
                    lines.extend(rx.try_iter());
                    let mut written = 0;
                    for line in &lines {
                        if out
                            .write_all(line.as_bytes())
                            .and_then(|_| out.write_all(b"\n"))
                            .is_ok()
                        {
                            written += 1;
                        }
                    }
                    let flushed = out.flush().is_ok();
                    let ok = if flushed { written } else { 0 };
                    m.access_log_lines("written", ok as u64);
                    m.access_log_lines("failed", (lines.len() - ok) as u64);
                }
            })
            .map_err(|e| format!("access log thread: {e}"))?;
        Ok(AccessLog { tx, metrics })
    }

    /// Queues one line (without its newline); never blocks.
    pub fn write(&self, line: String) {
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.metrics.access_log_lines("dropped", 1);
            }
        }
    }
}

/// `2026-11-30T20:10:54.505Z` for a time since the Unix epoch (UTC, milliseconds).
pub fn rfc3339_millis(since_epoch: std::time::Duration) -> String {
    let secs = since_epoch.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since_epoch.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn times_are_rfc3339_in_utc() {
        assert_eq!(rfc3339_millis(Duration::ZERO), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(Duration::from_millis(1_796_069_454_505)),
            "2026-11-30T20:10:54.505Z"
        );
        assert_eq!(
            rfc3339_millis(Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn lines_reach_the_file_and_a_bad_path_fails_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let metrics = Arc::new(Metrics::new());
        let log = AccessLog::open(&Destination::File(path.clone()), metrics.clone()).unwrap();
        log.write("{\"a\":1}".into());
        log.write("{\"a\":2}".into());
        drop(log);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&path).unwrap().lines().count() < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "lines never written"
            );
            std::thread::yield_now();
        }
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"a\":1}\n{\"a\":2}\n"
        );
        let missing = Destination::File(dir.path().join("no/such/dir/log"));
        assert!(
            AccessLog::open(&missing, metrics)
                .unwrap_err()
                .contains("no/such/dir")
        );
    }
}
