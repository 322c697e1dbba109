//! The admin port: `/metrics`, `/healthz`, `/readyz`, `/config`, `/experiments` (and
//! `POST /experiments/{route}/reset`). It runs on its own listener so that probes and
//! scrapes keep answering while the data port is busy. It answers reads to anyone who
//! can reach it and changes state only for loopback callers (inside the pod).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::server::RequestBody;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

use crate::config::Store;
use crate::error::{Body, full, json_error, json_response};
use crate::metrics::{self, Metrics};
use crate::probe::ExecutorState;
use crate::server::{ConnInfo, Handler};

pub struct Admin {
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    /// Set the moment a drain begins: readiness turns 503 at once.
    pub draining: Arc<AtomicBool>,
    /// Why the local executor is not ready, if it is not.
    pub executor: watch::Receiver<ExecutorState>,
}

impl Handler for Admin {
    async fn call(&self, req: Request<RequestBody>, conn: &ConnInfo) -> Response<Body> {
        let path = req.uri().path();
        // Read-only for everyone (Prometheus scrapes from other pods); state changes
        // only from inside the pod, as Linkerd's admin does.
        let reads = req.method() == Method::GET || req.method() == Method::HEAD;
        if !reads && !conn.peer.ip().to_canonical().is_loopback() {
            return json_error(
                StatusCode::FORBIDDEN,
                "admin endpoints change state only for callers inside the pod (loopback); \
                 run `braid experiments --reset` there",
            );
        }
        if let Some(route) = path
            .strip_prefix("/experiments/")
            .and_then(|p| p.strip_suffix("/reset"))
        {
            if req.method() != Method::POST {
                return json_error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "reset an experiment with POST",
                );
            }
            return self.reset(route);
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "admin endpoints accept GET only (and POST /experiments/{route}/reset)",
            );
        }
        match path {
            "/experiments" => self.experiments(),
            "/experiments/page" => crate::fleet::page::response(),
            "/metrics" => self.metrics(&req),
            "/healthz" => json_response(StatusCode::OK, json!({"status": "ok"}).to_string()),
            "/readyz" => self.readyz(),
            "/config" => self.config(),
            other => json_error(StatusCode::NOT_FOUND, &format!("no admin endpoint {other}")),
        }
    }
}

impl Admin {
    fn metrics(&self, req: &Request<RequestBody>) -> Response<Body> {
        let accept = req
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok());
        let (body, content_type) = metrics::exposition(self.metrics.encode(), accept);
        let mut resp = Response::new(full(body));
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        resp
    }

    /// Every route with two variants or more: its weights, counts, latencies, split
    /// health, ramps and guardrails.
    fn experiments(&self) -> Response<Body> {
        let active = self.store.load();
        let routes: Vec<serde_json::Value> = active
            .iter()
            .flat_map(|a| {
                a.snapshot
                    .routes
                    .routes
                    .iter()
                    .zip(&a.live)
                    .filter_map(|(route, live)| Some(live.experiment.as_ref()?.report(route)))
            })
            .collect();
        json_response(
            StatusCode::OK,
            serde_json::to_string_pretty(&json!({ "routes": routes })).unwrap_or_default(),
        )
    }

    /// Releases a route's tripped guardrails and starts its experiment afresh.
    fn reset(&self, route: &str) -> Response<Body> {
        let active = self.store.load();
        let found = active.as_ref().and_then(|a| {
            a.live
                .iter()
                .filter_map(|l| l.experiment.as_ref())
                .find(|e| &**e.route() == route)
        });
        match found {
            Some(e) => {
                e.reset();
                json_response(
                    StatusCode::OK,
                    json!({"route": route, "reset": true}).to_string(),
                )
            }
            None => json_error(
                StatusCode::NOT_FOUND,
                &format!(
                    "no experiment on route {route:?} (routes with two variants or more have one)"
                ),
            ),
        }
    }

    fn readyz(&self) -> Response<Body> {
        let draining = self.draining.load(Ordering::SeqCst);
        let loaded = self.store.load().is_some();
        let executor = self.executor.borrow().clone();
        let (status, reason) = match (loaded, draining, executor) {
            (_, true, _) => (StatusCode::SERVICE_UNAVAILABLE, "draining".to_string()),
            (false, _, _) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "no config loaded yet".to_string(),
            ),
            (true, false, Some(why)) => (StatusCode::SERVICE_UNAVAILABLE, why),
            (true, false, None) => (StatusCode::OK, "ready".to_string()),
        };
        let mut resp = json_response(status, json!({"status": reason}).to_string());
        if status != StatusCode::OK {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }

    fn config(&self) -> Response<Body> {
        let snap = self.store.load();
        let rejected = self.store.last_rejection().map(|r| {
            json!({
                "source": r.source,
                "at_unix": unix(r.at),
                "errors": r.errors.iter().map(|e| json!({"path": e.path, "message": e.message})).collect::<Vec<_>>(),
            })
        });
        let body = match snap.as_deref().map(|a| &a.snapshot) {
            Some(s) => json!({
                "generation": s.generation,
                "source": s.source,
                "loaded_at_unix": unix(s.loaded_at),
                "digest": format!("{:016x}", s.digest),
                "warnings": s.warnings,
                "config": s.document,
                "last_rejected": rejected,
            }),
            None => json!({
                "generation": 0,
                "config": null,
                "last_rejected": rejected,
            }),
        };
        json_response(
            StatusCode::OK,
            serde_json::to_string_pretty(&body).unwrap_or_default(),
        )
    }
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
