//! The one place the config in force lives: an `ArcSwap` of the current snapshot, plus
//! the record of the last rejected reload. Requests call `load()` once and keep the
//! `Arc` to the end, so a swap never changes a request midway.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use arc_swap::ArcSwapOption;

use super::{ConfigError, Snapshot};
use crate::metrics::Metrics;
use crate::upstream::state::RouteState;

/// Why the last reload was refused; shown on `/config` until a later one succeeds.
#[derive(Debug, Clone)]
pub struct Rejection {
    pub source: String,
    pub at: SystemTime,
    pub errors: Vec<ConfigError>,
    pub digest: Option<u64>,
}

#[derive(Debug)]
pub struct Store {
    /// `None` until the first good config: `/readyz` stays 503 meanwhile.
    current: ArcSwapOption<Snapshot>,
    /// Written only by reloads; readers are `/config` and the file source.
    rejected: Mutex<Option<Rejection>>,
    generation: AtomicU64,
    metrics: Arc<Metrics>,
    /// The generation in force, for tasks that hold state derived from the config.
    changes: tokio::sync::watch::Sender<u64>,
    /// Budgets, variant health and limits, kept across reloads and bound into each
    /// snapshot as it is installed.
    state: RouteState,
}

impl Store {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Store {
            current: ArcSwapOption::empty(),
            rejected: Mutex::new(None),
            generation: AtomicU64::new(0),
            metrics,
            changes: tokio::sync::watch::Sender::new(0),
            state: RouteState::default(),
        }
    }

    /// The snapshot in force, if any config has been accepted yet.
    pub fn load(&self) -> Option<Arc<Snapshot>> {
        self.current.load_full()
    }

    /// Validates `text` and, if it is good, swaps it in whole. A rejected document
    /// leaves the current snapshot serving; the rejection is logged, counted and kept.
    pub fn apply(
        &self,
        text: &str,
        source: &str,
        kind: &'static str,
    ) -> Result<u64, Vec<ConfigError>> {
        match super::load(text, source) {
            Ok(mut snap) => {
                // Reloads are serialised by their single source task; fetch_add keeps
                // generations unique even if two sources ever race.
                let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
                snap.generation = generation;
                self.state.bind(&self.metrics, &mut snap.routes);
                for w in &snap.warnings {
                    tracing::warn!(source, "{w}");
                }
                self.current.store(Some(Arc::new(snap)));
                self.changes.send_replace(generation);
                *self.rejected.lock().unwrap_or_else(|e| e.into_inner()) = None;
                self.metrics.config_reloaded(kind, true, generation);
                tracing::info!(source, generation, "config accepted");
                Ok(generation)
            }
            Err(errors) => {
                self.reject(
                    source,
                    kind,
                    errors.clone(),
                    Some(super::digest(text.as_bytes())),
                );
                Err(errors)
            }
        }
    }

    /// Records a reload that failed before or during validation (unreadable file too).
    pub fn reject(
        &self,
        source: &str,
        kind: &'static str,
        errors: Vec<ConfigError>,
        digest: Option<u64>,
    ) {
        for e in &errors {
            tracing::error!(
                source,
                "config rejected, last good config keeps serving: {e}"
            );
        }
        self.metrics
            .config_reloaded(kind, false, self.generation.load(Ordering::SeqCst));
        *self.rejected.lock().unwrap_or_else(|e| e.into_inner()) = Some(Rejection {
            source: source.to_string(),
            at: SystemTime::now(),
            errors,
            digest,
        });
    }

    /// Notified after each accepted config.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub fn last_rejection(&self) -> Option<Rejection> {
        self.rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
