//! Shadow traffic: a copy of some requests goes to a shadow variant, fire and forget.
//! The client's response is streamed as usual; a `Tee` keeps a copy of its bytes (up to
//! a limit) for the comparison, which runs on its own task once both answers are in.
//! Nothing the shadow does can delay or change the client's response.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use serde_json::Value;
use tokio::sync::oneshot;

use super::forward::{upstream_path, upstream_request};
use super::{Proxy, Routed, X_BRAID_SHADOW};
use crate::addr::Protocol;
use crate::error::{Body, BoxError};
use crate::hash::next_f64;
use crate::metrics::Metrics;
use crate::server::ConnInfo;
use crate::upstream::{TlsPool, Upstreams, h1};

/// How long a shadow copy may take when its route has no timeout.
const SHADOW_TIMEOUT: Duration = Duration::from_secs(30);

impl Proxy {
    /// Sends a copy of the request to the route's shadow variant, if this request is
    /// picked and a slot is free; returns where to deliver the primary's answer.
    pub(super) fn start_shadow(
        &self,
        r: &Routed<'_>,
        vi: usize,
        parts: &http::request::Parts,
        body: &Bytes,
        conn: &ConnInfo,
    ) -> Option<oneshot::Sender<PrimaryAnswer>> {
        let route = r.m.route;
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
        let body = Full::new(body.clone());
        let protocol = variant.upstream.protocol;
        let mut req = upstream_request(parts, body, variant, protocol, path, conn).ok()?;
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
    pub(super) copy: oneshot::Receiver<Option<Bytes>>,
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
            (true, Ok(Some(copy))) => divergence(&copy, &body),
            _ => None,
        };
        self.metrics
            .shadow(&self.route, &self.variant, "status_match", divergence);
    }
}

/// Largest response body kept for comparison, per side.
pub const COMPARE_LIMIT: usize = 8 * 1024 * 1024;

/// Passes a body through unchanged and, when it ends, sends a copy of its bytes (or
/// `None` if it failed, was cut short, or outgrew the limit).
pub struct Tee {
    inner: Body,
    copy: Option<BytesMut>,
    done: Option<oneshot::Sender<Option<Bytes>>>,
}

impl Tee {
    pub fn new(inner: Body) -> (Tee, oneshot::Receiver<Option<Bytes>>) {
        let (tx, rx) = oneshot::channel();
        let tee = Tee {
            inner,
            copy: Some(BytesMut::new()),
            done: Some(tx),
        };
        (tee, rx)
    }

    fn finish(&mut self, ok: bool) {
        if let Some(tx) = self.done.take() {
            let copy = self.copy.take().filter(|_| ok).map(BytesMut::freeze);
            let _ = tx.send(copy);
        }
    }
}

impl HttpBody for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let over = self
                        .copy
                        .as_ref()
                        .is_some_and(|c| c.len() + data.len() > COMPARE_LIMIT);
                    if over {
                        self.copy = None;
                    } else if let Some(c) = self.copy.as_mut() {
                        c.extend_from_slice(data);
                    }
                }
                if self.inner.is_end_stream() {
                    self.finish(true);
                }
            }
            Poll::Ready(None) => self.finish(true),
            Poll::Ready(Some(Err(_))) => self.finish(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        // Dropped before the end: the client left, or the server gave up on the stream.
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}

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
    use crate::error::full;
    use http_body_util::BodyExt;

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

    #[tokio::test]
    async fn tee_passes_the_body_through_and_keeps_a_copy() {
        let (tee, copy) = Tee::new(full("hello world"));
        let got = tee.collect().await.unwrap().to_bytes();
        assert_eq!(got, "hello world");
        assert_eq!(copy.await.unwrap().unwrap(), "hello world");
        // Dropped before its end (the client left): no copy.
        let (tee, copy) = Tee::new(Never.boxed());
        drop(tee);
        assert_eq!(copy.await.unwrap(), None);
    }

    /// A body that never ends.
    struct Never;

    impl HttpBody for Never {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Pending
        }
    }
}
