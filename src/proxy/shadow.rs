//! Shadow traffic: a copy of some requests goes to a shadow variant, fire and forget.
//! The client's response is streamed as usual; a `Tee` keeps a copy of its bytes (up to
//! a limit) for the comparison, which runs on its own task once both answers are in.
//! Nothing the shadow does can delay or change the client's response.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::Value;
use tokio::sync::oneshot;

use super::context::Cx;
use super::forward::{upstream_path, upstream_request};
use super::tee::Copied;
use super::{Proxy, X_BRAID_SHADOW};
use crate::addr::Protocol;
use crate::hash::next_f64;
use crate::metrics::Metrics;
use crate::upstream::{TlsPool, Upstreams, h1};

/// How long a shadow copy may take when its route has no timeout.
const SHADOW_TIMEOUT: Duration = Duration::from_secs(30);

impl Proxy {
    /// Sends a copy of the request to the route's shadow variant, if this request is
    /// picked and a slot is free; returns where to deliver the primary's answer.
    pub(super) fn start_shadow(
        &self,
        cx: &Cx<'_>,
        vi: usize,
    ) -> Option<oneshot::Sender<PrimaryAnswer>> {
        let (r, body) = (&cx.r, &cx.prepared.body);
        let (parts, conn) = (r.parts, r.conn);
        let route = r.route();
        let sh = route.shadow?;
        if sh.variant == vi || next_f64() >= sh.fraction {
            return None;
        }
        let variant = &route.variants[sh.variant];
        let permit = match r.live.shadow_limit.clone()?.try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.metrics
                    .shadow(&route.name, &variant.name, "skipped_saturated", None);
                return None;
            }
        };
        let path = upstream_path(&r.m, variant, &parts.uri).ok()?;
        // The body names the shadow variant's own model, as it would if the shadow
        // were serving it.
        let renamed = r
            .wire
            .renamed(&r.m, r.call.as_deref(), variant, parts, body);
        let sent = renamed.as_ref().map_or(body, |(b, _)| b);
        let protocol = variant.upstream.protocol;
        let full = Full::new(sent.clone());
        let mut req = upstream_request(parts, full, variant, protocol, path, conn).ok()?;
        if let Some((b, header_len)) = &renamed {
            let headers = req.headers_mut();
            headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(b.len()));
            if let Some(n) = header_len {
                headers.insert(crate::executor::oip::HEADER_LENGTH, HeaderValue::from(*n));
            }
        }
        req.headers_mut()
            .insert(X_BRAID_SHADOW.clone(), HeaderValue::from_static("1"));
        let (tx, primary) = oneshot::channel();
        let job = ShadowJob {
            upstreams: self.upstreams.clone(),
            backend: r.live.variants[sh.variant].backend.clone(),
            protocol: variant.upstream.protocol,
            tls: variant.tls.clone(),
            timeout: route.timeout.unwrap_or(SHADOW_TIMEOUT),
            metrics: self.metrics.clone(),
            route: route.name.clone(),
            variant: variant.name.clone(),
        };
        tokio::spawn(async move {
            job.run(req, primary).await;
            drop(permit);
        });
        Some(tx)
    }
}

/// What the shadow compares against.
pub(super) struct PrimaryAnswer {
    pub(super) status: http::StatusCode,
    pub(super) copy: oneshot::Receiver<Copied>,
}

struct ShadowJob {
    upstreams: Upstreams,
    backend: Option<Arc<h1::Backend>>,
    protocol: Protocol,
    tls: Option<TlsPool>,
    timeout: Duration,
    metrics: Arc<Metrics>,
    route: Arc<str>,
    variant: Arc<str>,
}

impl ShadowJob {
    async fn run(self, req: Request<Full<Bytes>>, primary: oneshot::Receiver<PrimaryAnswer>) {
        let send = async {
            let resp = self
                .upstreams
                .send_to(self.backend.as_ref(), self.protocol, self.tls.as_ref(), req)
                .await
                .ok()?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), COMPARE_LIMIT)
                .collect()
                .await
                .ok()?
                .to_bytes();
            Some((status, body))
        };
        let answer = tokio::time::timeout(self.timeout, send)
            .await
            .ok()
            .flatten();
        let (Some((status, body)), Ok(primary)) = (answer, primary.await) else {
            self.metrics
                .shadow(&self.route, &self.variant, "failed", None);
            return;
        };
        if status != primary.status {
            self.metrics
                .shadow(&self.route, &self.variant, "status_mismatch", None);
            return;
        }
        let divergence = match (status.is_success(), primary.copy.await) {
            (true, Ok(copy)) if copy.whole() => divergence(&copy.bytes, &body),
            _ => None,
        };
        self.metrics
            .shadow(&self.route, &self.variant, "status_match", divergence);
    }
}

/// Largest response body kept for comparison, per side.
pub const COMPARE_LIMIT: usize = 8 * 1024 * 1024;

/// The largest absolute difference between the numeric outputs of two inference
/// responses: OIP v2 outputs matched by name, or KServe v1 `predictions`. `None` when
/// there is nothing numeric to compare; infinity when shapes or output sets differ.
pub fn divergence(primary: &[u8], shadow: &[u8]) -> Option<f64> {
    let a: Value = serde_json::from_slice(primary).ok()?;
    let b: Value = serde_json::from_slice(shadow).ok()?;
    if let Some(outputs) = a["outputs"].as_array() {
        let theirs = b["outputs"].as_array()?;
        let mut worst: Option<f64> = None;
        for o in outputs {
            let mine = numbers(&o["data"]);
            if mine.is_empty() {
                continue;
            }
            let Some(other) = theirs.iter().find(|t| t["name"] == o["name"]) else {
                return Some(f64::INFINITY);
            };
            let d = max_abs_diff(&mine, &numbers(&other["data"]));
            worst = Some(worst.map_or(d, |w: f64| w.max(d)));
        }
        return worst;
    }
    let mine = numbers(&a["predictions"]);
    if mine.is_empty() {
        return None;
    }
    Some(max_abs_diff(&mine, &numbers(&b["predictions"])))
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Every number in a JSON value, depth first (objects in key order).
fn numbers(v: &Value) -> Vec<f64> {
    fn walk(v: &Value, out: &mut Vec<f64>) {
        match v {
            Value::Number(n) => out.extend(n.as_f64()),
            Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            Value::Object(map) => map.values().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(v, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divergence_compares_outputs_by_name() {
        let a = br#"{"outputs":[{"name":"label","data":["x"]},{"name":"e","shape":[1,3],"data":[0.5,1.0,2.0]}]}"#;
        let b = br#"{"outputs":[{"name":"e","shape":[1,3],"data":[0.5,1.25,2.0]},{"name":"label","data":["y"]}]}"#;
        assert_eq!(divergence(a, b), Some(0.25));
        assert_eq!(divergence(a, a), Some(0.0));
        let short = br#"{"outputs":[{"name":"e","data":[0.5]}]}"#;
        assert_eq!(divergence(a, short), Some(f64::INFINITY));
        let missing = br#"{"outputs":[{"name":"other","data":[1]}]}"#;
        assert_eq!(divergence(a, missing), Some(f64::INFINITY));
        assert_eq!(
            divergence(br#"{"predictions":[1,2]}"#, br#"{"predictions":[1,2.5]}"#),
            Some(0.5)
        );
        assert_eq!(divergence(b"not json", a), None);
        assert_eq!(
            divergence(br#"{"outputs":[{"name":"label","data":["x"]}]}"#, a),
            None
        );
    }
}
