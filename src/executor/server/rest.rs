//! The executor's Open Inference Protocol v2 REST endpoints (and KServe v1 predict).

use super::*;

impl Executor {
    /// Runs one request's texts through the model's queue, mapping failures to statuses.
    pub(super) async fn run(
        &self,
        slot: &Slot,
        texts: Vec<String>,
    ) -> Result<crate::executor::model::Outputs, Response<Body>> {
        self.execute(slot, texts)
            .await
            .map_err(|(status, msg)| match status {
                StatusCode::SERVICE_UNAVAILABLE => unavailable(&msg),
                _ => json_error(status, &msg),
            })
    }

    pub(super) async fn infer_v2(&self, slot: &Slot, req: Request<RequestBody>) -> Response<Body> {
        let header_len = match oip::header_len(req.headers()) {
            Ok(n) => n,
            Err(e) => return json_error(StatusCode::BAD_REQUEST, &e.0),
        };
        let (parts, body) = req.into_parts();
        let body = match server::read_body(&parts.headers, body, self.body_rules()).await {
            Ok(b) => b,
            Err(e) => return e.into_response(),
        };
        self.infer_v2_body(slot, &body, header_len).await
    }

    /// A v2 inference body (JSON, or a JSON header and binary data) -> the REST answer.
    pub(super) async fn infer_v2_body(
        &self,
        slot: &Slot,
        body: &[u8],
        header_len: Option<usize>,
    ) -> Response<Body> {
        let mut decoded = match oip::decode(body, header_len) {
            Ok(d) => d,
            Err(e) => return json_error(StatusCode::BAD_REQUEST, &e.0),
        };
        let texts = std::mem::take(&mut decoded.texts);
        let out = match self.run(slot, texts).await {
            Ok(o) => o,
            Err(resp) => return resp,
        };
        match oip::encode(&slot.spec.name, &decoded, &out) {
            Err(e) => json_error(StatusCode::BAD_REQUEST, &e.0),
            Ok(enc) => {
                let mut resp = Response::new(full(enc.body));
                oip::set_body_type(resp.headers_mut(), enc.header_len);
                resp.extensions_mut().insert(Phases(out.embedding.phases));
                resp
            }
        }
    }

    /// KServe v1: `{"instances": ["text", ...]}` (or `[{"text": ...}]`) ->
    /// `{"predictions": [{"embedding": [...], "label": ..., "scores": {...}}]}`.
    pub(super) async fn predict_v1(
        &self,
        slot: &Slot,
        req: Request<RequestBody>,
    ) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let body = match server::read_body(&parts.headers, body, self.body_rules()).await {
            Ok(b) => b,
            Err(e) => return e.into_response(),
        };
        let v: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    &format!("request is not valid JSON: {e}"),
                );
            }
        };
        let Some(instances) = v.get("instances").and_then(Value::as_array) else {
            return json_error(
                StatusCode::BAD_REQUEST,
                "request needs an \"instances\" list",
            );
        };
        if instances.is_empty() {
            return json_error(
                StatusCode::BAD_REQUEST,
                "empty batch: \"instances\" is empty",
            );
        }
        let mut texts = Vec::with_capacity(instances.len());
        for (i, inst) in instances.iter().enumerate() {
            match inst
                .as_str()
                .or_else(|| inst.get("text").and_then(Value::as_str))
            {
                Some(t) => texts.push(t.to_string()),
                None => {
                    return json_error(
                        StatusCode::BAD_REQUEST,
                        &format!("instances[{i}] must be a string or {{\"text\": string}}"),
                    );
                }
            }
        }
        let out = match self.run(slot, texts).await {
            Ok(o) => o,
            Err(resp) => return resp,
        };
        let predictions: Vec<Value> = (0..out.embedding.rows)
            .map(|r| {
                let mut p = json!({"embedding": oip::f32s_json(out.embedding.row(r))});
                if let (Some(labels), Some(scores)) = (&out.label, &out.scores) {
                    let names = &slot.spec.labels;
                    let row = &scores[r * names.len()..(r + 1) * names.len()];
                    p["label"] = json!(labels[r]);
                    p["scores"] = Value::Object(
                        names
                            .iter()
                            .cloned()
                            .zip(row.iter().map(|s| oip::f32_json(*s)))
                            .collect(),
                    );
                }
                p
            })
            .collect();
        let mut resp = json_response(
            StatusCode::OK,
            json!({"predictions": predictions}).to_string(),
        );
        resp.extensions_mut().insert(Phases(out.embedding.phases));
        resp
    }
}
