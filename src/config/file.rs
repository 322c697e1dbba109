//! The file config source, correct for a ConfigMap mounted as a volume.
//!
//! The kubelet updates such a volume by writing a new timestamped directory and
//! atomically renaming the `..data` symlink over the old one; the file name we were
//! given is a symlink through `..data`. So we watch the *directory*, re-open the path on
//! every change (the OS resolves the links afresh), wait until events have been quiet
//! for the debounce interval, and skip content whose digest we have already seen. A
//! slow poll backs up inotify, which some volume types do not deliver.
//!
//! The fleet's verdicts (`verdict.rs`) are read from the file beside it,
//! `braid-verdicts.json`, when there is one: a mounted ConfigMap's second key. The
//! kubelet updates a volume at its own pace (a minute or more), so fleet mode wants
//! the ConfigMap source for verdicts within seconds.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::{ConfigError, Store};

const KIND: &str = "file";

#[derive(Debug, Clone)]
pub struct FileSource {
    pub path: PathBuf,
    /// Quiet time after the last change event before the file is read.
    pub debounce: Duration,
    /// Re-read this often even without events.
    pub poll: Duration,
}

impl FileSource {
    fn source(&self) -> String {
        format!("file:{}", self.path.display())
    }

    /// Loads the first config; the proxy refuses to start without one.
    pub fn load_initial(&self, store: &Store) -> Result<u64, Vec<ConfigError>> {
        let (text, verdicts) = read(&self.path)?;
        apply(store, &self.source(), &text, verdicts.as_deref())
    }

    /// Watches for changes until the returned future is dropped. The OS watch is
    /// registered here, before the future first runs, so a change made once braid has
    /// announced itself is never left to the slow poll.
    pub fn watch(self, store: Arc<Store>) -> impl std::future::Future<Output = ()> + Send {
        let (tx, rx) = mpsc::channel::<()>(1);
        let watcher = match self.start_watcher(tx) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(path = %self.path.display(), "cannot watch config directory ({e}); polling every {:?}", self.poll);
                None
            }
        };
        let seen = store.load().map(|a| a.snapshot.digest);
        self.follow(store, rx, watcher, seen)
    }

    async fn follow(
        self,
        store: Arc<Store>,
        mut rx: mpsc::Receiver<()>,
        // Lives as long as the future; dropping it stops the OS watch.
        _watcher: Option<notify::RecommendedWatcher>,
        mut seen: Option<u64>,
    ) {
        let mut last_error: Option<String> = None;
        loop {
            tokio::select! {
                _ = rx.recv() => {}
                _ = tokio::time::sleep(self.poll) => {}
            }
            // Debounce: a writer (or the kubelet) may still be mid-update.
            while let Ok(Some(())) = tokio::time::timeout(self.debounce, rx.recv()).await {}
            let path = self.path.clone();
            let read = tokio::task::spawn_blocking(move || read(&path))
                .await
                .unwrap_or_else(|e| Err(vec![io_error(format!("reader task failed: {e}"))]));
            match read {
                Ok((text, verdicts)) => {
                    last_error = None;
                    let digest = super::digest_with(&text, verdicts.as_deref());
                    if seen == Some(digest) {
                        continue;
                    }
                    seen = Some(digest);
                    let _ = apply(&store, &self.source(), &text, verdicts.as_deref());
                }
                Err(errors) => {
                    // Report an unreadable file once, not on every poll.
                    let msg = errors[0].message.clone();
                    if last_error.as_ref() != Some(&msg) {
                        store.reject(&self.source(), KIND, errors, None);
                        last_error = Some(msg);
                    }
                    seen = None;
                }
            }
        }
    }

    fn start_watcher(&self, tx: mpsc::Sender<()>) -> notify::Result<notify::RecommendedWatcher> {
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                if res.as_ref().is_ok_and(|e| !e.kind.is_access()) {
                    // A full channel already holds a wake-up; that is all we need.
                    let _ = tx.try_send(());
                }
            })?;
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        Ok(watcher)
    }
}

/// The document, and the verdicts file beside it if there is one.
fn read(path: &Path) -> Result<(String, Option<String>), Vec<ConfigError>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| vec![io_error(format!("cannot read {}: {e}", path.display()))])?;
    let beside = path.with_file_name(super::verdict::DEFAULT_KEY);
    Ok((text, std::fs::read_to_string(beside).ok()))
}

fn apply(
    store: &Store,
    source: &str,
    text: &str,
    verdicts: Option<&str>,
) -> Result<u64, Vec<ConfigError>> {
    let verdicts = verdicts.map(|v| (super::verdict::DEFAULT_KEY, v));
    store.apply_with(text, verdicts, source, KIND)
}

fn io_error(message: String) -> ConfigError {
    ConfigError {
        path: "(file)".into(),
        message,
    }
}
