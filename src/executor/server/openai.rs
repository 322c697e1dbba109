//! The executor's OpenAI endpoints: embeddings on an encoder, completions and chat
//! completions on a language model; errors in OpenAI's shape.

use super::*;

impl Executor {
    /// OpenAI's `POST /v1/embeddings` on an encoder: errors in OpenAI's shape.
    pub(super) async fn embeddings(&self, req: Request<RequestBody>) -> Response<Body> {
        use crate::openai::error;
        let (parts, body) = req.into_parts();
        let rules = self.body_rules();
        let body = match server::read_body(&parts.headers, body, rules).await {
            Ok(b) => b,
            Err(e) => return error(e.status(), &e.to_string(), None, e.label()),
        };
        let call = match crate::executor::openai::parse(&body) {
            Ok(c) => c,
            Err((msg, field)) => {
                return error(StatusCode::BAD_REQUEST, &msg, Some(field), "bad_request");
            }
        };
        let slot = match self.openai_slot(&call.model) {
            Ok(s) => s,
            Err(resp) => return *resp,
        };
        let dim = slot.encoder().map(|h| h.model.dim());
        if let (Some(want), Some(dim)) = (call.dimensions, dim)
            && want != dim
        {
            let msg = format!(
                "model {} gives {dim} dimensions; it cannot shorten its embeddings to {want}",
                call.model
            );
            self.metrics.request(&slot.spec.name, 400);
            return error(
                StatusCode::BAD_REQUEST,
                &msg,
                Some("dimensions"),
                "bad_request",
            );
        }
        let texts = call.texts.clone();
        let resp = match self.execute(slot, texts).await {
            Ok(out) => json_response(
                StatusCode::OK,
                crate::executor::openai::reply(&call, &out).to_string(),
            ),
            Err((status, msg)) => {
                let mut r = error(status, &msg, None, "model_error");
                if status == StatusCode::SERVICE_UNAVAILABLE {
                    r.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                }
                r
            }
        };
        self.metrics
            .request(&slot.spec.name, resp.status().as_u16());
        resp
    }

    /// `POST /v1/completions` and `/v1/chat/completions`: errors in OpenAI's shape.
    pub(super) async fn generate(&self, req: Request<RequestBody>, kind: Kind) -> Response<Body> {
        use crate::openai::error;
        let trace = self
            .tracer
            .as_ref()
            .map(|t| t.begin(req.headers()))
            .filter(|t| t.context.sampled);
        let started = tokio::time::Instant::now();
        let (call, headers) =
            match crate::executor::generate::read_call(req, kind, self.body_rules()).await {
                Ok(c) => c,
                Err(resp) => return resp,
            };
        let slot = match self.openai_slot(&call.model) {
            Ok(s) => s,
            Err(resp) => return *resp,
        };
        let name = slot.spec.name.clone();
        let resp = match slot.state.get() {
            None => {
                let msg = format!("model {name} is still loading");
                let mut r = error(StatusCode::SERVICE_UNAVAILABLE, &msg, None, "loading");
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                r
            }
            Some(Err(e)) => {
                let msg = format!("model {name} failed to load: {e}");
                error(StatusCode::SERVICE_UNAVAILABLE, &msg, None, "load_failed")
            }
            Some(Ok(Served::Encoder(_))) => error(
                StatusCode::BAD_REQUEST,
                &format!("model {name} is an encoder: it serves /v1/embeddings, not generation"),
                Some("model"),
                "wrong_model_kind",
            ),
            Some(Ok(Served::Llm(engine))) => {
                let named = (name.as_str(), slot.spec.default_temperature);
                crate::executor::generate::generate(engine, named, call, &headers, &self.llm).await
            }
        };
        self.metrics.request(&name, resp.status().as_u16());
        if let (Some(tracer), Some(t)) = (&self.tracer, trace) {
            let route = match kind {
                Kind::Chat => "/v1/chat/completions",
                Kind::Completion => "/v1/completions",
            };
            record_spans(tracer, &t, (&name, route), &resp, started.elapsed());
        }
        resp
    }

    /// The slot an OpenAI call's `model` names, or its 404 in OpenAI's shape (counted
    /// without the name: label values never come from requests).
    pub(super) fn openai_slot(&self, model: &str) -> Result<&Slot, Box<Response<Body>>> {
        self.slot(model).ok_or_else(|| {
            self.metrics.request("", 404);
            let msg = self.unknown_model_message(model);
            Box::new(crate::openai::error(
                StatusCode::NOT_FOUND,
                &msg,
                Some("model"),
                "model_not_found",
            ))
        })
    }

    pub(super) fn unknown_model(&self, name: &str) -> Response<Body> {
        json_error(StatusCode::NOT_FOUND, &self.unknown_model_message(name))
    }

    pub(super) fn unknown_model_message(&self, name: &str) -> String {
        let names: Vec<&str> = self.slots.iter().map(|s| s.spec.name.as_str()).collect();
        format!("unknown model {name:?}; serving: {}", names.join(", "))
    }
}
