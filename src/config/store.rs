//! The one place the config in force lives: an `ArcSwap` of the current snapshot with
//! its live state bound beside it (`Active`), plus the record of the last rejected
//! reload. Requests call `load()` once and keep the `Arc` to the end, so a swap never
//! changes a request midway. Installing a snapshot is the one place live state is
//! bound to config (`route::live::Registry::bind`).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use arc_swap::ArcSwapOption;

use super::{ConfigError, Snapshot};
use crate::batch::batcher::Execute;
use crate::metrics::Metrics;
use crate::route::live::{Registry, RouteLive};
use crate::upstream::Upstreams;

/// A snapshot in force and the live handles bound to it, published together.
#[derive(Debug)]
pub struct Active {
    pub snapshot: Snapshot,
    /// Indexed like `snapshot.routes.routes`.
    pub live: Vec<RouteLive>,
}

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
    current: ArcSwapOption<Active>,
    /// Written only by reloads; readers are `/config` and the file source.
    rejected: Mutex<Option<Rejection>>,
    generation: AtomicU64,
    metrics: Arc<Metrics>,
    /// Budgets, variant health, limits and batchers, kept across reloads and bound to
    /// each snapshot as it is installed.
    registry: Registry,
}

impl Store {
    /// `executor` is how batchers reach the model server (braid's HTTP client in
    /// production, a fake in unit tests).
    pub fn new(metrics: Arc<Metrics>, executor: Arc<dyn Execute>, upstreams: Upstreams) -> Self {
        let registry = Registry::new(metrics.clone(), executor, upstreams);
        Store {
            registry,
            current: ArcSwapOption::empty(),
            rejected: Mutex::new(None),
            generation: AtomicU64::new(0),
            metrics,
        }
    }

    /// The snapshot in force, if any config has been accepted yet.
    pub fn load(&self) -> Option<Arc<Active>> {
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
        self.apply_with(text, None, source, kind)
    }

    /// `apply`, with the fleet's verdicts (the key's name and its text) read alongside.
    pub fn apply_with(
        &self,
        text: &str,
        verdicts: Option<(&str, &str)>,
        source: &str,
        kind: &'static str,
    ) -> Result<u64, Vec<ConfigError>> {
        match super::load_with(text, verdicts, source) {
            Ok(mut snapshot) => {
                // Reloads are serialised by their single source task; fetch_add keeps
                // generations unique even if two sources ever race.
                let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
                snapshot.generation = generation;
                for w in &snapshot.warnings {
                    tracing::warn!(source, "{w}");
                }
                let live = self.registry.bind(&snapshot.routes);
                self.current
                    .store(Some(Arc::new(Active { snapshot, live })));
                // The previous snapshot's pools, unless requests still hold it.
                self.registry.release_unbound();
                *crate::sync::lock(&self.rejected) = None;
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
        *crate::sync::lock(&self.rejected) = Some(Rejection {
            source: source.to_string(),
            at: SystemTime::now(),
            errors,
            digest,
        });
    }

    /// How many batcher tasks are bound (a removed route's are let go on reload).
    pub fn batchers(&self) -> usize {
        self.registry.batchers()
    }

    pub fn last_rejection(&self) -> Option<Rejection> {
        crate::sync::lock(&self.rejected).clone()
    }
}
