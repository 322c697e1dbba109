//! State that outlives a config snapshot, keyed by route and variant name: retry
//! budgets, variant health, and the semaphores that bound a route's requests and its
//! shadow copies. A reload keeps what it can (an ejected variant stays ejected, a spent
//! budget stays spent) and replaces what its new settings change.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;
use tower::retry::budget::TpsBudget;

use super::health::{Outlier, VariantHealth};
use super::retry::RetryPolicy;
use crate::metrics::{Metrics, RetryMetrics};

type VariantKey = (Arc<str>, Arc<str>);
/// A budget and the (min/s, ratio bits) it was made with.
type BudgetEntry = ((u32, u64), Arc<TpsBudget>);
/// A semaphore and the permit count it was made with.
type LimitEntry = (usize, Arc<Semaphore>);

#[derive(Default)]
pub struct RouteState {
    /// Per route: the budget and the (min/s, ratio) it was made with.
    budgets: Mutex<HashMap<Arc<str>, BudgetEntry>>,
    retry_metrics: Mutex<HashMap<VariantKey, Arc<RetryMetrics>>>,
    health: Mutex<HashMap<VariantKey, Arc<VariantHealth>>>,
    /// Per route and purpose: a semaphore and the permit count it was made with.
    limits: Mutex<HashMap<(Arc<str>, &'static str), LimitEntry>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RouteState {
    pub fn budget(&self, route: &Arc<str>, p: &RetryPolicy) -> Arc<TpsBudget> {
        let settings = (p.min_retries_per_second, p.budget_ratio.to_bits());
        let mut map = lock(&self.budgets);
        match map.get(route) {
            Some((s, b)) if *s == settings => b.clone(),
            _ => {
                let b = Arc::new(p.budget());
                map.insert(route.clone(), (settings, b.clone()));
                b
            }
        }
    }

    pub fn retry_metrics(
        &self,
        metrics: &Metrics,
        route: &Arc<str>,
        variant: &Arc<str>,
    ) -> Arc<RetryMetrics> {
        lock(&self.retry_metrics)
            .entry((route.clone(), variant.clone()))
            .or_insert_with(|| Arc::new(metrics.retry(route, variant)))
            .clone()
    }

    pub fn health(
        &self,
        metrics: &Metrics,
        route: &Arc<str>,
        variant: &Arc<str>,
        settings: Outlier,
    ) -> Arc<VariantHealth> {
        let h = lock(&self.health)
            .entry((route.clone(), variant.clone()))
            .or_insert_with(|| {
                Arc::new(VariantHealth::new(settings, metrics.health(route, variant)))
            })
            .clone();
        h.configure(settings);
        h
    }

    /// The health of a variant if it has any record (no entry: never failed).
    pub fn known_health(&self, route: &Arc<str>, variant: &Arc<str>) -> Option<Arc<VariantHealth>> {
        lock(&self.health)
            .get(&(route.clone(), variant.clone()))
            .cloned()
    }

    /// A semaphore of `permits` for (route, purpose); a reload that changes the count
    /// gets a fresh one (requests holding the old one finish under it).
    pub fn limit(&self, route: &Arc<str>, purpose: &'static str, permits: usize) -> Arc<Semaphore> {
        let mut map = lock(&self.limits);
        match map.get(&(route.clone(), purpose)) {
            Some((n, s)) if *n == permits => s.clone(),
            _ => {
                let s = Arc::new(Semaphore::new(permits));
                map.insert((route.clone(), purpose), (permits, s.clone()));
                s
            }
        }
    }
}
