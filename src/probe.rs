//! Readiness of the local executor: braid is ready only when the model server in its
//! pod is, so a pod never receives traffic it would answer with 503s. The probe asks
//! the executor named by the config in force for `GET /v2/health/ready` (the Open
//! Inference Protocol's readiness endpoint) every interval and publishes the answer.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::Full;
use tokio::sync::watch;

use crate::config::Store;
use crate::upstream::Upstreams;

/// `None`: ready (or no executor configured); `Some(why)`: not ready.
pub type ExecutorState = Option<String>;

pub async fn run(
    store: Arc<Store>,
    upstreams: Upstreams,
    every: Duration,
    state: watch::Sender<ExecutorState>,
) {
    loop {
        let verdict = match store.load().and_then(|a| a.snapshot.executor.clone()) {
            None => None,
            Some(exec) => {
                let uri = Uri::builder()
                    .scheme(exec.scheme.clone())
                    .authority(exec.authority.clone())
                    .path_and_query("/v2/health/ready")
                    .build()
                    .expect("scheme, authority and path are valid");
                let mut req = Request::new(Full::new(Bytes::new()));
                *req.uri_mut() = uri;
                match tokio::time::timeout(
                    every.max(Duration::from_secs(1)),
                    upstreams.send(exec.protocol, None, req),
                )
                .await
                {
                    Ok(Ok(r)) if r.status().is_success() => None,
                    Ok(Ok(r)) => Some(format!(
                        "executor {} is not ready ({})",
                        exec.authority,
                        r.status()
                    )),
                    Ok(Err(e)) => {
                        Some(format!("executor {} is unreachable: {e:?}", exec.authority))
                    }
                    Err(_) => Some(format!(
                        "executor {} did not answer its readiness check",
                        exec.authority
                    )),
                }
            }
        };
        state.send_if_modified(|s| {
            let changed = *s != verdict;
            *s = verdict;
            changed
        });
        tokio::time::sleep(every).await;
    }
}
