//! Pooled keep-alive clients to backends: one speaking HTTP/1.1, one speaking HTTP/2
//! with prior knowledge (`h2c://` backends). Connections are reused across requests
//! and across config reloads, since the pool is keyed by authority, not by snapshot.

pub mod health;
pub mod probe;
pub mod retry;
pub mod state;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::schema::Protocol;

type Pool = Client<HttpConnector, Full<Bytes>>;

#[derive(Clone, Debug)]
pub struct Upstreams {
    h1: Pool,
    h2: Pool,
}

/// Why a backend call failed, split the way the status code and retries need it.
#[derive(Debug, thiserror::Error)]
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
}

impl Upstreams {
    pub fn new(connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let h1 = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector.clone());
        let h2 = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_only(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .build(connector);
        Upstreams { h1, h2 }
    }

    pub async fn send(
        &self,
        protocol: Protocol,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, SendError> {
        let pool = match protocol {
            Protocol::Http1 => &self.h1,
            Protocol::H2c => &self.h2,
        };
        pool.request(req).await.map_err(|e| {
            let reason = error_chain(&e);
            if e.is_connect() {
                SendError::Connect(reason)
            } else if refused_stream(&e) {
                SendError::Refused(reason)
            } else {
                SendError::Other(reason)
            }
        })
    }
}

/// Whether an h2 REFUSED_STREAM is somewhere in the error's chain.
fn refused_stream(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(h2) = err.downcast_ref::<h2::Error>()
            && h2.reason() == Some(h2::Reason::REFUSED_STREAM)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// "a: b: c" from an error and its sources: hyper's top-level messages are vague.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
