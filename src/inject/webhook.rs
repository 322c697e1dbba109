//! `braid webhook`: a mutating admission webhook answering AdmissionReview v1 with a
//! JSONPatch built by the same code as `braid inject`.
//!
//! Never in the way: a review of anything but a Pod CREATE, a pod in `kube-system` or
//! in the webhook's own namespace, or a pod that cannot be patched is admitted
//! unchanged (the last with a warning). Only a body that is not an AdmissionReview at
//! all gets a 400.

use crate::server::RequestBody;
use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};

use super::{Options, Outcome, inject_template, json_patch};
use crate::error::{Body, json_error, json_response};
use crate::server::{self, ConnInfo, Handler};

/// Largest AdmissionReview accepted. etcd stores objects of at most 1.5 MiB, and a
/// review carries the object (plus, on UPDATE, the old one): 3 MiB covers every real
/// review, and bounds what one connection can make the webhook hold.
pub const MAX_REVIEW_BYTES: usize = 3 * 1024 * 1024;

/// Reviews read and answered at once. A review takes milliseconds; the cap bounds
/// memory (each holds its body and its parsed JSON, a few times the body), so under
/// any number of callers the webhook stays within its 128Mi limit.
pub const MAX_CONCURRENT_REVIEWS: usize = 4;

/// How long a review waits for a slot before it is answered 429 (well inside the
/// API server's `timeoutSeconds`).
const SLOT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct WebhookOptions {
    pub inject: Options,
    /// Pods in these namespaces are never injected (`kube-system`, braid's own).
    pub skip_namespaces: Vec<String>,
}

pub struct Webhook {
    pub opts: WebhookOptions,
    /// `MAX_CONCURRENT_REVIEWS` permits; one held while a review is read and answered.
    slots: tokio::sync::Semaphore,
}

impl Webhook {
    pub fn new(opts: WebhookOptions) -> Webhook {
        Webhook {
            opts,
            slots: tokio::sync::Semaphore::new(MAX_CONCURRENT_REVIEWS),
        }
    }
}

impl Handler for Webhook {
    async fn call(&self, req: Request<RequestBody>, _conn: &ConnInfo) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz") => json_response(StatusCode::OK, "{\"ok\":true}"),
            (&Method::POST, "/mutate") => {
                // Taken before the body is read, so waiting reviews hold no bytes.
                let Ok(Ok(_slot)) = tokio::time::timeout(SLOT_WAIT, self.slots.acquire()).await
                else {
                    let mut busy = json_error(
                        StatusCode::TOO_MANY_REQUESTS,
                        "the webhook is answering its limit of reviews at once; retry shortly",
                    );
                    busy.headers_mut()
                        .insert(http::header::RETRY_AFTER, http::HeaderValue::from(1));
                    return busy;
                };
                let (parts, body) = req.into_parts();
                let rules = server::BodyRules::limit(MAX_REVIEW_BYTES);
                let body: Bytes = match server::read_body(&parts.headers, body, rules).await {
                    Ok(b) => b,
                    Err(e) => return e.into_response(),
                };
                match review(&body, &self.opts) {
                    Ok(v) => json_response(StatusCode::OK, v.to_string()),
                    Err(msg) => json_error(StatusCode::BAD_REQUEST, &msg),
                }
            }
            (_, "/mutate") => json_error(StatusCode::METHOD_NOT_ALLOWED, "POST an AdmissionReview"),
            _ => json_error(
                StatusCode::NOT_FOUND,
                "no such endpoint: POST /mutate, GET /healthz",
            ),
        }
    }
}

/// Answers one AdmissionReview; `Err` only for a body that is not one.
pub fn review(body: &[u8], opts: &WebhookOptions) -> Result<Value, String> {
    let review: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    if review["apiVersion"] != "admission.k8s.io/v1" || review["kind"] != "AdmissionReview" {
        return Err("expected an admission.k8s.io/v1 AdmissionReview".into());
    }
    let request = &review["request"];
    let Some(uid) = request["uid"].as_str() else {
        return Err("request.uid is missing".into());
    };
    let mut response = json!({"uid": uid, "allowed": true});
    let answer = |response: Value| json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response});
    let is_pod_create = request["kind"]["kind"] == "Pod"
        && request["operation"] == "CREATE"
        && request["subResource"].is_null();
    let namespace = request["namespace"]
        .as_str()
        .or_else(|| request["object"]["metadata"]["namespace"].as_str())
        .unwrap_or_default();
    if !is_pod_create || opts.skip_namespaces.iter().any(|n| n == namespace) {
        return Ok(answer(response));
    }
    let Some(pod) = request["object"].as_object() else {
        response["warnings"] = json!(["braid: no pod in the review; admitted unchanged"]);
        return Ok(answer(response));
    };
    let before = Value::Object(pod.clone());
    let mut after = before.clone();
    let labels = &before["metadata"]["labels"];
    let workload = labels["app.kubernetes.io/name"]
        .as_str()
        .or_else(|| labels["app"].as_str())
        .unwrap_or("braid")
        .to_string();
    let default_cm = if workload == "braid" {
        "braid".to_string()
    } else {
        format!("{workload}-braid")
    };
    // The injector is written not to panic on odd pods; if it ever does, the pod is
    // still admitted, unchanged.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        inject_template(&mut after, &default_cm, &opts.inject)
    }));
    match outcome {
        Ok(Outcome::Injected { warnings }) => {
            let patch = json_patch(&before, &after);
            let encoded = base64::engine::general_purpose::STANDARD
                .encode(serde_json::to_vec(&patch).expect("JSON serializes"));
            response["patchType"] = json!("JSONPatch");
            response["patch"] = json!(encoded);
            if !warnings.is_empty() {
                response["warnings"] = json!(
                    warnings
                        .iter()
                        .map(|w| format!("braid: {w}"))
                        .collect::<Vec<_>>()
                );
            }
        }
        Ok(Outcome::AlreadyInjected | Outcome::OptedOut) => {}
        Err(_) => {
            response["warnings"] =
                json!(["braid: this pod could not be patched; admitted without the sidecar"]);
        }
    }
    Ok(answer(response))
}

/// A started webhook server.
pub struct RunningWebhook {
    pub addr: std::net::SocketAddr,
    phase: tokio::sync::watch::Sender<server::Phase>,
    task: tokio::task::JoinHandle<()>,
    cert_watch: tokio::task::JoinHandle<()>,
}

impl RunningWebhook {
    /// Stops accepting, lets in-flight reviews finish.
    pub async fn stop(self) {
        let _ = self.phase.send(server::Phase::Closing);
        let _ = self.task.await;
        self.cert_watch.abort();
    }
}

/// Serves `/mutate` over TLS on `listener`; the certificate is re-read when it changes.
pub fn start(
    listener: tokio::net::TcpListener,
    opts: WebhookOptions,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<RunningWebhook, String> {
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let reloading = server::tls::ReloadingCert::load(cert, key)?;
    let cfg = server::tls::server_config(reloading.clone())?;
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg));
    let cert_watch = reloading.watch(std::time::Duration::from_secs(10));
    let (phase, rx) = tokio::sync::watch::channel(server::Phase::Serving);
    let task = tokio::spawn(server::serve_tls(
        listener,
        server::Limits::default(),
        Some(acceptor),
        std::sync::Arc::new(Webhook::new(opts)),
        rx,
    ));
    Ok(RunningWebhook {
        addr,
        phase,
        task,
        cert_watch,
    })
}
