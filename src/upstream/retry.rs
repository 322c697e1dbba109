//! Retries for forwarded requests, as a tower stack built per request:
//!
//! ```text
//! Retry<Policy>  ->  PerTry (the head under per_try_timeout, then a stream's commit point)  ->  Call
//! ```
//!
//! The policy knows what is safe to repeat. A request that never reached the backend
//! (connect failure, HTTP/2 REFUSED_STREAM) or that the backend explicitly refused (503,
//! 429) may always be repeated. One that may have been processed (a reset or timeout
//! after it was sent, or another configured status) is repeated only on a route marked
//! `idempotent: true`. Every repeat also needs a token from the route's budget (Linkerd's
//! model: a ratio of recent requests plus a floor per second, over a 10 s window), a
//! body small enough to have been kept for replay, and time left before the deadline.
//!
//! A try may be judged past its head before the policy sees it (`Judge`): an
//! OpenAI-style stream is a success only at its first token, so one that breaks, sends
//! an error first or gives no token in time is a failed try like any other, under the
//! same attempts, budget, counters and deadline. This is the one retry loop.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode, header};
use http_body_util::BodyExt;
use http_body_util::Full;
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};
use tower::{Service, ServiceExt};

use super::health::VariantHealth;
use super::{SendError, TlsPool, Upstreams, h1};
use crate::addr::Protocol;
use crate::error::Body;
use crate::metrics::RetryMetrics;

/// Header carrying a request's remaining time budget, e.g. `x-braid-timeout: 250ms`.
pub use crate::headers::TIMEOUT as DEADLINE_HEADER;

/// A route's retry settings, compiled from its `retry` block (defaults: one attempt).
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub idempotent: bool,
    pub on_status: Vec<u16>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub retry_after_cap: Duration,
    pub max_body_bytes: usize,
    pub budget_ratio: f64,
    pub min_retries_per_second: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 1,
            per_try_timeout: None,
            idempotent: false,
            on_status: vec![503],
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            retry_after_cap: Duration::from_secs(1),
            max_body_bytes: 64 * 1024,
            budget_ratio: 0.2,
            min_retries_per_second: 10,
        }
    }
}

impl RetryPolicy {
    /// The budget this policy asks for (one per route, kept across reloads while the
    /// settings stay the same).
    pub fn budget(&self) -> TpsBudget {
        TpsBudget::new(
            BUDGET_WINDOW,
            self.min_retries_per_second,
            self.budget_ratio as f32,
        )
    }
}

/// How long a deposit counts toward the budget (Linkerd's default).
pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// Everything one request's retries share.
#[derive(Clone)]
pub struct Attempts {
    pub policy: Arc<RetryPolicy>,
    /// `None` when the route makes one attempt only.
    pub budget: Option<Arc<TpsBudget>>,
    pub metrics: Option<Arc<RetryMetrics>>,
    pub health: Option<Arc<VariantHealth>>,
    /// When the whole request must be answered (route timeout, deadline header).
    pub deadline: Option<Instant>,
    /// GET, HEAD, OPTIONS: safe to repeat whatever happened.
    pub safe_method: bool,
    pub body_len: usize,
    /// Retries used so far.
    pub retried: u32,
}

type Req = Request<Full<Bytes>>;

/// A try's answer, its body boxed (so a judge may give back what it read).
pub type Answer = http::Response<Body>;

/// Marks an answer that failed before its commit point but is whole (a stream whose
/// first event was an error): a failed try, and if the last, the request's answer.
#[derive(Clone, Copy, Debug)]
pub struct Uncommitted;

/// Judges a try's answer past its head, before the policy sees it; `tried` is when the
/// try began. An `Err`, or an answer marked `Uncommitted`, is a failed try.
pub trait Judge: Send + Sync {
    fn judge(&self, answer: Answer, tried: Instant) -> TryFuture;
}

impl tower::retry::Policy<Req, Answer, SendError> for Attempts {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        req: &mut Req,
        result: &mut Result<Answer, SendError>,
    ) -> Option<Self::Future> {
        let uncommitted = matches!(result, Ok(r) if r.extensions().get::<Uncommitted>().is_some());
        let failed = match result {
            Ok(r) => uncommitted || r.status().is_server_error(),
            Err(_) => true,
        };
        if let Some(h) = &self.health {
            h.record(!failed, Instant::now());
        }
        let (retryable, retry_after) = match result {
            // Whole, but failed before the client could see anything of it.
            Ok(_) if uncommitted => (false, None),
            Ok(r) if !self.policy.on_status.contains(&r.status().as_u16()) => return None,
            Ok(r) => {
                // The backend answered: it refused the work (503/429) or it may have done it.
                let refused = matches!(
                    r.status(),
                    StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
                );
                (refused, retry_after(r))
            }
            Err(e) => (e.never_reached(), None),
        };
        if self.retried + 1 >= self.policy.attempts {
            return None;
        }
        let (Some(budget), Some(metrics)) = (&self.budget, &self.metrics) else {
            return None;
        };
        if !(retryable || self.safe_method || self.policy.idempotent) {
            metrics.outcome("not_idempotent");
            return None;
        }
        if self.body_len > self.policy.max_body_bytes {
            metrics.outcome("body_too_large");
            return None;
        }
        let delay = match retry_after {
            Some(d) if d > self.policy.retry_after_cap => {
                metrics.outcome("retry_after_too_long");
                return None;
            }
            Some(d) => d,
            None => backoff(&self.policy, self.retried),
        };
        let now = Instant::now();
        if self.deadline.is_some_and(|d| now + delay >= d) {
            metrics.outcome("deadline");
            return None;
        }
        if !budget.withdraw() {
            metrics.outcome("budget_exhausted");
            return None;
        }
        self.retried += 1;
        metrics.outcome("retried");
        if let Some(d) = self.deadline {
            set_deadline_header(req, d.saturating_duration_since(now + delay));
        }
        Some(tokio::time::sleep(delay))
    }

    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        // With nothing to retry and no health to record, the policy need not see results.
        if self.policy.attempts <= 1 && self.health.is_none() {
            return None;
        }
        // Bodies are buffered whole before forwarding, so a copy costs a refcount.
        let mut out = Request::new(req.body().clone());
        *out.method_mut() = req.method().clone();
        *out.uri_mut() = req.uri().clone();
        *out.version_mut() = req.version();
        *out.headers_mut() = req.headers().clone();
        Some(out)
    }
}

/// Exponential backoff with full jitter: uniform in [0, min(max, base x 2^n)].
pub fn backoff(p: &RetryPolicy, retried: u32) -> Duration {
    let ceiling = p
        .backoff_base
        .saturating_mul(1u32 << retried.min(16))
        .min(p.backoff_max);
    ceiling.mul_f64(crate::hash::next_f64())
}

/// A 429/503's `Retry-After` in seconds (HTTP dates are not honoured: treated as absent).
fn retry_after(r: &Answer) -> Option<Duration> {
    let v = r.headers().get(header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// `x-braid-timeout`'s value for `left`: whole milliseconds.
pub fn deadline_value(left: Duration) -> HeaderValue {
    let mut text = itoa::Buffer::new().format(left.as_millis()).to_string();
    text.push_str("ms");
    HeaderValue::try_from(text).expect("digits and letters are a valid header value")
}

/// Tells the backend how long it has left: `x-braid-timeout` in milliseconds, and
/// `grpc-timeout` as well for a gRPC call.
pub fn set_deadline_header<T>(req: &mut http::Request<T>, left: Duration) {
    req.headers_mut()
        .insert(DEADLINE_HEADER.clone(), deadline_value(left));
    if crate::grpc::is_grpc(req.headers()) {
        let v = crate::grpc::format_timeout(left);
        req.headers_mut()
            .insert(crate::grpc::GRPC_TIMEOUT.clone(), v);
    }
}

/// Watches each try of a call (tracing's CLIENT spans): `begin` runs before try number
/// `resend` (0: the first) and may change its headers; what it returns is told how the
/// try ended: the status, or `None` when no answer came (failed, timed out, dropped).
pub trait TryHook: Send + Sync {
    fn begin(&self, resend: u32, headers: &mut http::HeaderMap) -> TryEnd;
}

/// Told how one try ended; told `None` if dropped first (a per-try timeout).
pub struct TryEnd(Option<Box<dyn FnOnce(Option<StatusCode>) + Send>>);

impl TryEnd {
    pub fn new(f: impl FnOnce(Option<StatusCode>) + Send + 'static) -> TryEnd {
        TryEnd(Some(Box::new(f)))
    }

    pub fn end(mut self, status: Option<StatusCode>) {
        if let Some(f) = self.0.take() {
            f(status);
        }
    }

    /// Ends the try with what the send gave: its status, or no answer.
    pub fn sent<B>(self, sent: &Result<http::Response<B>, SendError>) {
        self.end(sent.as_ref().ok().map(|r| r.status()));
    }
}

impl Drop for TryEnd {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f(None);
        }
    }
}

/// The innermost service: one call through the pooled client.
#[derive(Clone)]
pub struct Call {
    pub upstreams: Upstreams,
    /// The variant's HTTP/1.1 pool, bound with the snapshot.
    pub backend: Option<Arc<h1::Backend>>,
    pub protocol: Protocol,
    pub tls: Option<TlsPool>,
    /// Watches every try, with the count of tries so far shared by the clones.
    pub hook: Option<(Arc<dyn TryHook>, Arc<std::sync::atomic::AtomicU32>)>,
}

type CallFuture = Pin<Box<dyn Future<Output = Result<Answer, SendError>> + Send>>;

impl Service<Req> for Call {
    type Response = Answer;
    type Error = SendError;
    type Future = CallFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Req) -> CallFuture {
        let call = self.clone();
        let watch = call.hook.as_ref().map(|(hook, tries)| {
            let resend = tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            hook.begin(resend, req.headers_mut())
        });
        Box::pin(async move {
            let sent = call
                .upstreams
                .send_to(call.backend.as_ref(), call.protocol, call.tls.as_ref(), req)
                .await;
            if let Some(w) = watch {
                w.sent(&sent);
            }
            sent.map(|r| r.map(|b| b.map_err(Into::into).boxed()))
        })
    }
}

/// One attempt: its head under the per-try timeout, then its judge, when the call has
/// one (a stream's first token, which the per-try timeout does not bound).
#[derive(Clone)]
pub struct PerTry {
    inner: Call,
    timeout: Option<Duration>,
    judge: Option<Arc<dyn Judge>>,
}

pub type TryFuture = Pin<Box<dyn Future<Output = Result<Answer, SendError>> + Send>>;

impl Service<Req> for PerTry {
    type Response = Answer;
    type Error = SendError;
    type Future = TryFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> TryFuture {
        let (timeout, judge) = (self.timeout, self.judge.clone());
        // The clock is read only for a try that is judged.
        let tried = judge.as_ref().map(|_| Instant::now());
        let call = self.inner.call(req);
        Box::pin(async move {
            let head = match timeout {
                Some(t) => tokio::time::timeout(t, call)
                    .await
                    .map_err(|_| SendError::Timeout(t))?,
                None => call.await,
            };
            match judge.zip(tried) {
                Some((judge, tried)) => judge.judge(head?, tried).await,
                None => head,
            }
        })
    }
}

/// Sends `req` with the route's retry policy, each try judged by `judge`; every repeat
/// withdraws from the budget (the caller deposits once per client request, however
/// many variants serve it).
pub async fn send(
    call: Call,
    attempts: Attempts,
    judge: Option<Arc<dyn Judge>>,
    req: Req,
) -> Result<Answer, SendError> {
    let per_try = PerTry {
        inner: call,
        timeout: attempts.policy.per_try_timeout,
        judge,
    };
    tower::retry::Retry::new(attempts, per_try)
        .oneshot(req)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_full_jitter() {
        let p = RetryPolicy::default();
        for n in 0..10 {
            let ceiling = (p.backoff_base * (1 << n)).min(p.backoff_max);
            for _ in 0..50 {
                assert!(backoff(&p, n) <= ceiling);
            }
        }
        let spread: Vec<Duration> = (0..50).map(|_| backoff(&p, 5)).collect();
        assert!(spread.iter().any(|d| *d < p.backoff_max / 2), "jittered");
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_allows_the_ratio_plus_the_floor_per_window() {
        let p = RetryPolicy {
            budget_ratio: 0.2,
            min_retries_per_second: 1,
            ..RetryPolicy::default()
        };
        let budget = p.budget();
        for _ in 0..100 {
            budget.deposit();
        }
        let mut allowed = 0;
        while budget.withdraw() {
            allowed += 1;
            assert!(allowed < 1000, "budget never ran out");
        }
        // 20% of 100 requests, plus the floor of 1/s over the 10 s window.
        assert!((20..=31).contains(&allowed), "{allowed}");
        // Deposits age out of the window: with no traffic, only the floor comes back.
        tokio::time::advance(BUDGET_WINDOW * 2).await;
        let mut after = 0;
        while budget.withdraw() {
            after += 1;
            assert!(after < 1000);
        }
        assert!(after <= 11, "{after}");
    }
}
