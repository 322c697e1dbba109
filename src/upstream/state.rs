//! State that outlives a config snapshot, keyed by route and variant name: retry
//! budgets, variant health, and the semaphores that bound a route's requests and its
//! shadow copies. A reload keeps what it can (an ejected variant stays ejected, a spent
//! budget stays spent) and replaces what its new settings change.
//!
//! The registry is consulted once per snapshot, when the store installs it (`bind`):
//! each route and variant then holds its own handles, so a request takes no lock and
//! hashes no name to find them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;
use tower::retry::budget::TpsBudget;

use super::health::{Outlier, VariantHealth};
use super::retry::RetryPolicy;
use crate::metrics::{Metrics, RetryMetrics};
use crate::route::RouteTable;

/// A route's share of the registry, resolved when its snapshot is installed.
#[derive(Debug, Default)]
pub struct RouteLive {
    /// The retry budget; `None` when the route does not retry.
    pub budget: Option<Arc<TpsBudget>>,
    /// Bounds `max_inflight`.
    pub limit: Option<Arc<Semaphore>>,
    /// Bounds the shadow copies in flight.
    pub shadow_limit: Option<Arc<Semaphore>>,
}

/// A variant's share of the registry, resolved when its snapshot is installed.
#[derive(Debug, Default)]
pub struct VariantLive {
    /// Failure accrual; `None` when the route has no `outlier` block.
    pub health: Option<Arc<VariantHealth>>,
    /// `None` when the route does not retry.
    pub retry_metrics: Option<Arc<RetryMetrics>>,
}

type VariantKey = (Arc<str>, Arc<str>);
/// A budget and the (min/s, ratio bits) it was made with.
type BudgetEntry = ((u32, u64), Arc<TpsBudget>);
/// A semaphore and the permit count it was made with.
type LimitEntry = (usize, Arc<Semaphore>);

#[derive(Debug, Default)]
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
    /// Gives every route and variant of a new snapshot its handles: kept from the
    /// previous snapshot where the names and settings match, made fresh where not.
    pub fn bind(&self, metrics: &Metrics, table: &mut RouteTable) {
        for route in &mut table.routes {
            let retries = route.retry.attempts > 1;
            route.live = RouteLive {
                budget: retries.then(|| self.budget(&route.name, &route.retry)),
                limit: route
                    .max_inflight
                    .map(|n| self.limit(&route.name, "route", n)),
                shadow_limit: route
                    .shadow
                    .map(|sh| self.limit(&route.name, "shadow", sh.max_inflight)),
            };
            for v in &mut route.variants {
                v.live = VariantLive {
                    health: route
                        .outlier
                        .map(|o| self.health(metrics, &route.name, &v.name, o)),
                    retry_metrics: retries
                        .then(|| self.retry_metrics(metrics, &route.name, &v.name)),
                };
            }
        }
    }

    fn budget(&self, route: &Arc<str>, p: &RetryPolicy) -> Arc<TpsBudget> {
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

    fn retry_metrics(
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

    fn health(
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

    /// A semaphore of `permits` for (route, purpose); a reload that changes the count
    /// gets a fresh one (requests holding the old one finish under it).
    fn limit(&self, route: &Arc<str>, purpose: &'static str, permits: usize) -> Arc<Semaphore> {
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
