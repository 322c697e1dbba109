//! The errors a request can end in. Each knows its HTTP status, whether the client may
//! retry (and after how long), and a short label for metrics; every one becomes a JSON
//! body `{"error": "..."}`.
//!
//! Failures below the request path arrive as `SendError` (one call to a backend) or
//! `BatchError` (a coalesced request); each knows whether the request may have reached
//! the backend, and `ProxyError::from_send` / `from_batch` are the one place either
//! becomes a client-facing error.

use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

/// The response body type of every braid server.
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// What a body's `poll_frame` returns.
pub type Polled = std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no config has been loaded yet")]
    NoConfig,
    #[error("no route matches {path}")]
    NoRoute { path: String },
    #[error("no route serves model {model:?}; models: {models}")]
    UnknownModel { model: String, models: String },
    #[error("unknown variant {wanted:?} in {header}; valid variants: {valid}")]
    UnknownVariant {
        header: String,
        wanted: String,
        valid: String,
    },
    #[error("request body is larger than the {limit}-byte limit")]
    BodyTooLarge { limit: usize },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error(
        "ambiguous message framing (Content-Length with Transfer-Encoding, or repeated Content-Length)"
    )]
    Smuggling,
    #[error("backend {backend} is unreachable: {reason}")]
    Connect { backend: String, reason: String },
    #[error("backend {backend} failed: {reason}")]
    Upstream { backend: String, reason: String },
    #[error("backend {backend} did not answer within {after:?}")]
    Timeout { backend: String, after: Duration },
    #[error("variant {variant} is overloaded: its batch queue is full")]
    QueueFull { variant: String },
    #[error(
        "variant {variant}'s batch queue is full and a higher-priority request took this one's place"
    )]
    Preempted { variant: String },
    #[error("backend {backend} sent no first token within {after:?} (ttft_timeout)")]
    NoFirstToken { backend: String, after: Duration },
    #[error("the request's deadline passed before it could be answered")]
    DeadlinePassed,
    #[error(
        "variant {variant} is serving its max_concurrent requests and {}; retry shortly",
        saturated_why(reason)
    )]
    Saturated {
        variant: String,
        /// `shed`, `queue_full` or `queue_timeout`.
        reason: &'static str,
    },
    #[error("braid is at its limit of requests in flight; retry shortly")]
    Overloaded,
    #[error("route {route} is at its limit of requests in flight (max_inflight); retry shortly")]
    RouteBusy { route: String },
    #[error("the request body did not arrive in time: {0}")]
    BodyStalled(String),
    #[error(
        "braid holds its limit of {limit} buffered bytes (--max-buffered-bytes); retry shortly"
    )]
    BufferFull { limit: usize },
    #[error("the request head is too large: {0}")]
    HeadTooLarge(String),
    #[error("the request head did not arrive within {0:?} (--header-read-timeout)")]
    HeadStalled(Duration),
    #[error("transfer coding {0:?} is not supported: send the body as is or as chunked alone")]
    UnsupportedCoding(String),
}

/// What a saturated variant's refusal (its `reason`) means for the request.
fn saturated_why(reason: &str) -> &'static str {
    match reason {
        "shed" => "this request's priority class is sheddable",
        "queue_full" => "its queue for this priority class is full",
        _ => "no place came free within the queue timeout",
    }
}

/// Why one call to a backend produced no response, split by whether the request may
/// have reached it: that decides both the status and whether repeating it is safe.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    /// No connection could be made: nothing reached the backend.
    #[error("{0}")]
    Connect(String),
    /// HTTP/2 REFUSED_STREAM: the backend did not process the request.
    #[error("{0}")]
    Refused(String),
    /// The connection failed after the request may have been sent.
    #[error("{0}")]
    Other(String),
    /// No response headers within the per-try timeout; the backend may be working on it.
    #[error("no response headers within the per-try timeout of {0:?}")]
    Timeout(Duration),
    /// A stream's head came but no first token within the route's `ttft_timeout`.
    #[error("no first token within {0:?}")]
    NoFirstToken(Duration),
}

impl SendError {
    /// Whether the request certainly did not reach the backend, so sending it again
    /// (or elsewhere) is safe whatever the method.
    pub fn never_reached(&self) -> bool {
        matches!(self, SendError::Connect(_) | SendError::Refused(_))
    }
}

/// How a coalesced request ended, when it did not get its rows.
#[derive(Debug, Clone)]
pub enum BatchError {
    /// The queue was full: 429 with Retry-After.
    QueueFull,
    /// Displaced from a full queue by a higher priority class: 503 with Retry-After.
    Preempted,
    /// Its deadline passed before or during execution: 504.
    Expired,
    /// Its own failure, isolated by bisection: the executor's status and body, passed on.
    Backend { status: StatusCode, body: Bytes },
    /// The executor's reply could not be split safely: 502.
    BadReply(String),
    /// The executor could not be reached or gave no reply: 503 with Retry-After (the
    /// batch as a whole was lost, none of its requests is at fault).
    Unreachable(String),
}

impl ProxyError {
    /// A failed call to `backend`: the one mapping for forwarded requests and retries.
    pub fn from_send(backend: &Authority, e: SendError) -> ProxyError {
        let backend = backend.to_string();
        match e {
            SendError::Connect(reason) | SendError::Refused(reason) => {
                ProxyError::Connect { backend, reason }
            }
            SendError::Other(reason) => ProxyError::Upstream { backend, reason },
            SendError::Timeout(after) => ProxyError::Timeout { backend, after },
            SendError::NoFirstToken(after) => ProxyError::NoFirstToken { backend, after },
        }
    }

    /// A coalesced request that got no rows. `Backend` is not an error of braid's: it is
    /// the executor's own answer for this request, passed on as it came.
    pub fn from_batch(
        variant: &str,
        backend: &Authority,
        e: BatchError,
    ) -> Result<Response<Body>, ProxyError> {
        Err(match e {
            BatchError::Backend { status, body } => {
                let mut resp = json_response(status, body);
                // The executor's overload and loading answers are retryable: say so, as
                // its own Retry-After did (the batch's reply keeps no headers).
                if matches!(status.as_u16(), 429 | 503) {
                    resp.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(1));
                }
                return Ok(resp);
            }
            BatchError::QueueFull => ProxyError::QueueFull {
                variant: variant.to_string(),
            },
            BatchError::Expired => ProxyError::DeadlinePassed,
            BatchError::Preempted => ProxyError::Preempted {
                variant: variant.to_string(),
            },
            BatchError::BadReply(reason) => ProxyError::Upstream {
                backend: backend.to_string(),
                reason,
            },
            BatchError::Unreachable(reason) => ProxyError::Connect {
                backend: backend.to_string(),
                reason,
            },
        })
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoConfig
            | ProxyError::Connect { .. }
            | ProxyError::Overloaded
            | ProxyError::BufferFull { .. }
            | ProxyError::Preempted { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::BodyStalled(_) | ProxyError::HeadStalled(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::HeadTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::UnsupportedCoding(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::NoRoute { .. } | ProxyError::UnknownModel { .. } => StatusCode::NOT_FOUND,
            ProxyError::UnknownVariant { .. }
            | ProxyError::BadRequest(_)
            | ProxyError::Smuggling => StatusCode::BAD_REQUEST,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. }
            | ProxyError::NoFirstToken { .. }
            | ProxyError::DeadlinePassed => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::QueueFull { .. } | ProxyError::RouteBusy { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ProxyError::Saturated { reason, .. } => match *reason {
                "queue_timeout" => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::TOO_MANY_REQUESTS,
            },
        }
    }

    /// Seconds after which a retry may succeed, for `Retry-After` on 503s.
    pub fn retry_after(&self) -> Option<u32> {
        matches!(
            self,
            ProxyError::NoConfig
                | ProxyError::Connect { .. }
                | ProxyError::QueueFull { .. }
                | ProxyError::Preempted { .. }
                | ProxyError::Overloaded
                | ProxyError::BufferFull { .. }
                | ProxyError::RouteBusy { .. }
                | ProxyError::Saturated { .. }
        )
        .then_some(1)
    }

    /// Short, closed-set label for metrics of requests that never got a variant.
    pub fn label(&self) -> &'static str {
        match self {
            ProxyError::NoConfig => "no_config",
            ProxyError::NoRoute { .. } | ProxyError::UnknownModel { .. } => "no_route",
            ProxyError::UnknownVariant { .. } => "unknown_variant",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::Smuggling => "smuggling",
            ProxyError::Connect { .. } => "connect",
            ProxyError::Upstream { .. } => "upstream",
            ProxyError::Timeout { .. } => "timeout",
            ProxyError::NoFirstToken { .. } => "ttft_timeout",
            ProxyError::QueueFull { .. } => "queue_full",
            ProxyError::Preempted { .. } => "preempted",
            ProxyError::DeadlinePassed => "deadline",
            ProxyError::Overloaded => "overloaded",
            ProxyError::RouteBusy { .. } => "route_busy",
            ProxyError::Saturated { reason, .. } => reason,
            ProxyError::BodyStalled(_) => "body_stalled",
            ProxyError::BufferFull { .. } => "buffer_full",
            ProxyError::UnsupportedCoding(_) => "unsupported_coding",
            ProxyError::HeadTooLarge(_) => "head_too_large",
            ProxyError::HeadStalled(_) => "head_stalled",
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let mut resp = json_error(self.status(), &self.to_string());
        if let Some(secs) = self.retry_after() {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        // The connection's framing is lost (or its client too slow to keep): close it.
        if matches!(
            self,
            ProxyError::Smuggling
                | ProxyError::BodyStalled(_)
                | ProxyError::UnsupportedCoding(_)
                | ProxyError::HeadTooLarge(_)
                | ProxyError::HeadStalled(_)
        ) {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

/// A JSON error response: `{"error": message}`.
pub fn json_error(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": message }).to_string();
    json_response(status, body)
}

pub fn json_response(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}
