//! The executor's gRPC service, `inference.GRPCInferenceService`: each unary call
//! answered by the REST code, its answer in gRPC's form.

use super::*;

impl Executor {
    /// One call of `inference.GRPCInferenceService`: read whole (every method braid
    /// serves is unary), answered by the REST code, the answer in gRPC's form.
    pub(super) async fn grpc(&self, req: Request<RequestBody>) -> Response<Body> {
        use grpc::Code;
        let Some(method) = req.uri().path().strip_prefix(grpc::SERVICE_PREFIX) else {
            let msg = format!("no service at {}", req.uri().path());
            return grpc::status_response(Code::Unimplemented, &msg);
        };
        let method = method.to_string();
        let (parts, body) = req.into_parts();
        let body = match server::read_body(&parts.headers, body, self.body_rules()).await {
            Ok(b) => b,
            Err(e) => return grpc::error_response(&e),
        };
        let msg = match grpc::unary_message(&body) {
            Ok(m) => m,
            Err(e) => return grpc::status_response(Code::InvalidArgument, &e),
        };
        fn decode<M: prost::Message + Default>(msg: &[u8]) -> Result<M, (Code, String)> {
            M::decode(msg).map_err(|e| (Code::InvalidArgument, format!("malformed message: {e}")))
        }
        let slot = |name: &str| {
            self.slot(name)
                .ok_or_else(|| (Code::NotFound, self.unknown_model_message(name)))
        };
        let answer = async {
            Ok(match method.as_str() {
                "ServerLive" => grpc::unary_ok(&pb::ServerLiveResponse { live: true }),
                "ServerReady" => grpc::unary_ok(&pb::ServerReadyResponse {
                    ready: self.ready(),
                }),
                "ServerMetadata" => grpc::unary_ok(&pb::ServerMetadataResponse {
                    name: "braid".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    extensions: vec!["binary_tensor_data".into()],
                }),
                "ModelReady" => {
                    let req: pb::ModelReadyRequest = decode(msg)?;
                    let ready = slot(&req.name)?.loaded();
                    grpc::unary_ok(&pb::ModelReadyResponse { ready })
                }
                "ModelMetadata" => {
                    let req: pb::ModelMetadataRequest = decode(msg)?;
                    let meta = self.metadata(slot(&req.name)?);
                    grpc::unary_ok(&grpc::oip::model_metadata(&meta))
                }
                "ModelInfer" => {
                    let req: pb::ModelInferRequest = decode(msg)?;
                    let slot = slot(&req.model_name).inspect_err(|_| {
                        // Counted without the name: label values never come from requests.
                        self.metrics.request("", 404);
                    })?;
                    let (resp, status) = self.infer_grpc(slot, &req).await;
                    self.metrics.request(&req.model_name, status.as_u16());
                    resp
                }
                other => {
                    let e = format!("braid's executor does not serve {other}");
                    return Err((Code::Unimplemented, e));
                }
            })
        };
        answer
            .await
            .unwrap_or_else(|(code, message)| grpc::status_response(code, &message))
    }

    /// ModelInfer: the request in its REST form through `infer_v2_body`, the REST
    /// answer back as a ModelInferResponse or a status; with the HTTP status it stands
    /// for (for the metrics).
    pub(super) async fn infer_grpc(
        &self,
        slot: &Slot,
        req: &pb::ModelInferRequest,
    ) -> (Response<Body>, StatusCode) {
        use http_body_util::BodyExt;
        let internal = |e: &str| {
            let r = grpc::status_response(grpc::Code::Internal, e);
            (r, StatusCode::INTERNAL_SERVER_ERROR)
        };
        let (body, header_len) = match grpc::oip::rest_request(req) {
            Ok(b) => b,
            Err(e) => {
                let r = grpc::status_response(grpc::Code::InvalidArgument, &e);
                return (r, StatusCode::BAD_REQUEST);
            }
        };
        let resp = self.infer_v2_body(slot, &body, Some(header_len)).await;
        let status = resp.status();
        let reply_len = match oip::header_len(resp.headers()) {
            Ok(n) => n,
            Err(e) => return internal(&e.0),
        };
        let bytes = match resp.into_body().collect().await {
            Ok(c) => c.to_bytes(),
            Err(e) => return internal(&e.to_string()),
        };
        if !status.is_success() {
            let (code, message) = grpc::oip::rest_error(status.as_u16(), &bytes);
            return (grpc::status_response(code, &message), status);
        }
        match grpc::oip::grpc_response(&bytes, reply_len) {
            Ok(mut r) => {
                r.id.clone_from(&req.id);
                (grpc::unary_ok(&r), status)
            }
            Err(e) => internal(&e),
        }
    }
}
