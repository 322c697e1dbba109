//! A fake executor for unit tests of the batcher and the request path: it speaks
//! KServe v1 (echoes each instance back as its prediction), records every call, and
//! can be held at a gate so tests decide when a batch finishes. Runs on tokio's
//! paused clock: nothing here sleeps on the wall clock.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use super::batcher::{ExecFuture, Execute};
use super::codec::Payload;
use crate::addr::Upstream;

#[derive(Default)]
pub struct FakeExecutor {
    /// (path, rows) of every call, in the order they arrived.
    pub calls: Mutex<Vec<(String, usize)>>,
    /// When set, each call waits for a permit before answering.
    pub gate: Option<Arc<Semaphore>>,
    /// When set, each call takes this long plus the second figure per row (on the
    /// paused clock), like a model on one accelerator.
    pub cost: Option<(Duration, Duration)>,
}

impl FakeExecutor {
    pub fn gated() -> (Arc<FakeExecutor>, Arc<Semaphore>) {
        let gate = Arc::new(Semaphore::new(0));
        let fake = FakeExecutor {
            gate: Some(gate.clone()),
            ..Default::default()
        };
        (Arc::new(fake), gate)
    }

    pub fn costing(fixed: Duration, per_row: Duration) -> Arc<FakeExecutor> {
        Arc::new(FakeExecutor {
            cost: Some((fixed, per_row)),
            ..Default::default()
        })
    }

    /// Rows per call, in arrival order.
    pub fn batches(&self) -> Vec<usize> {
        self.calls.lock().unwrap().iter().map(|c| c.1).collect()
    }

    /// Lets other tasks run until `n` calls have arrived. On the paused clock each
    /// step moves time by a millisecond, so a batch waiting out `max_delay` is sent.
    pub async fn wait_calls(&self, n: usize) {
        for _ in 0..10_000 {
            if self.calls.lock().unwrap().len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("the executor never got {n} calls: {:?}", self.batches());
    }

    pub fn paths(&self) -> Vec<String> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.0.clone())
            .collect()
    }
}

impl Execute for FakeExecutor {
    /// 500 for any path naming a `broken` model; 400 when any instance is `"bad"`;
    /// otherwise every instance back as its prediction.
    fn execute<'a>(
        &'a self,
        _: &'a Upstream,
        path: &'a str,
        body: Payload,
        _: &'a [crate::trace::SpanContext],
    ) -> ExecFuture<'a> {
        Box::pin(async move {
            let v: Value = serde_json::from_slice(&body.body).expect("the batcher sends JSON");
            let instances = v["instances"].as_array().cloned().unwrap_or_default();
            self.calls
                .lock()
                .unwrap()
                .push((path.to_string(), instances.len()));
            if let Some(gate) = &self.gate {
                gate.acquire().await.expect("gate open").forget();
            }
            if let Some((fixed, per_row)) = self.cost {
                tokio::time::sleep(fixed + per_row * instances.len() as u32).await;
            }
            let reply = |status, v: Value| Ok((status, Payload::json(v.to_string())));
            if path.contains("broken") {
                return reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"error": "broken"}),
                );
            }
            if instances.iter().any(|i| i == "bad") {
                return reply(StatusCode::BAD_REQUEST, json!({"error": "bad instance"}));
            }
            reply(StatusCode::OK, json!({ "predictions": instances }))
        })
    }
}
