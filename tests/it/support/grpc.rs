//! gRPC over raw HTTP/2 (the `h2` crate), to see every frame: a backend that echoes
//! and tells what it saw, and a client that sends messages one at a time and reads
//! the answer's headers, messages, trailers or stream reset.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Request, Response};
use tokio::net::{TcpListener, TcpStream};

pub const INFER: &str = "/inference.GRPCInferenceService/ModelInfer";

/// A gRPC message with its 5-byte prefix (braid's own framing).
pub use braid::grpc::frame;

/// A message whose field 1 (the model name of ModelInfer/ModelReady/ModelMetadata) is
/// `model`, followed by `rest` as sent.
pub fn named(model: &str, rest: &[u8]) -> Vec<u8> {
    let mut m = vec![0x0a, model.len() as u8];
    m.extend_from_slice(model.as_bytes());
    m.extend_from_slice(rest);
    m
}

/// Field 1 of a message (as `named` writes it).
pub fn name_of(msg: &[u8]) -> String {
    assert_eq!(msg[0], 0x0a, "field 1 first: {msg:?}");
    String::from_utf8(msg[2..2 + msg[1] as usize].to_vec()).unwrap()
}

/// What one call's request looked like at the backend.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub headers: HeaderMap,
}

/// An h2c gRPC backend. Every call is answered at once with headers (`x-backend` its
/// name), then each chunk of the request body is echoed back as it arrives, then the
/// trailers `grpc-status: 0` and `x-trailer: done`. A request with `x-test-reset`
/// gets its stream reset (INTERNAL_ERROR); `x-test-delay-ms: N` waits before answering.
pub struct GrpcBackend {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GrpcBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GrpcBackend {
    pub async fn start(name: &'static str) -> GrpcBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(tcp).await else {
                        return;
                    };
                    while let Some(Ok((req, respond))) = conn.accept().await {
                        record.lock().unwrap().push(Seen {
                            path: req.uri().path().to_string(),
                            headers: req.headers().clone(),
                        });
                        tokio::spawn(answer(name, req, respond));
                    }
                });
            }
        });
        GrpcBackend { addr, seen, task }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.seen.lock().unwrap().clear();
    }
}

async fn answer(
    name: &'static str,
    req: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    let (parts, mut body) = req.into_parts();
    if parts.headers.contains_key("x-test-reset") {
        respond.send_reset(h2::Reason::INTERNAL_ERROR);
        return;
    }
    if let Some(ms) = parts
        .headers
        .get("x-test-delay-ms")
        .and_then(|v| v.to_str().ok()?.parse().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let resp = Response::builder()
        .header("content-type", "application/grpc")
        .header("x-backend", name)
        .body(())
        .unwrap();
    let Ok(mut send) = respond.send_response(resp, false) else {
        return;
    };
    while let Some(Ok(chunk)) = body.data().await {
        let _ = body.flow_control().release_capacity(chunk.len());
        if send.send_data(chunk, false).is_err() {
            return;
        }
    }
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    trailers.insert("x-trailer", "done".parse().unwrap());
    let _ = send.send_trailers(trailers);
}

/// One call through an h2c connection: messages are sent as the caller decides.
pub struct Call {
    send: h2::SendStream<Bytes>,
    response: Option<h2::client::ResponseFuture>,
    body: Option<h2::RecvStream>,
    pub headers: HeaderMap,
    _conn: tokio::task::JoinHandle<()>,
}

impl Call {
    /// Opens `path` on `addr` with these metadata (content-type application/grpc and
    /// `te: trailers` added).
    pub async fn open(addr: SocketAddr, path: &str, metadata: &[(&str, &str)]) -> Call {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (client, conn) = h2::client::handshake(tcp).await.unwrap();
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut client = client.ready().await.unwrap();
        let mut req = Request::post(format!("http://{addr}{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        for (k, v) in metadata {
            req = req.header(*k, *v);
        }
        let (response, send) = client.send_request(req.body(()).unwrap(), false).unwrap();
        Call {
            send,
            response: Some(response),
            body: None,
            headers: HeaderMap::new(),
            _conn: conn,
        }
    }

    pub fn send(&mut self, data: Bytes, end: bool) {
        self.send.send_data(data, end).unwrap();
    }

    /// The answer's headers: `Err` with the reset reason when the stream was reset.
    pub async fn headers(&mut self) -> Result<&HeaderMap, h2::Error> {
        if let Some(r) = self.response.take() {
            let resp = r.await?;
            let (parts, body) = resp.into_parts();
            self.headers = parts.headers;
            self.body = Some(body);
        }
        Ok(&self.headers)
    }

    /// The next chunk of the answer's body, `None` at its end.
    pub async fn next(&mut self) -> Option<Bytes> {
        self.headers().await.ok()?;
        let body = self.body.as_mut()?;
        let chunk = body.data().await?.ok()?;
        let _ = body.flow_control().release_capacity(chunk.len());
        Some(chunk)
    }

    /// The rest of the body, then the trailers (empty for a Trailers-Only answer).
    pub async fn finish(&mut self) -> (Bytes, HeaderMap) {
        let mut out = BytesMut::new();
        while let Some(c) = self.next().await {
            out.extend_from_slice(&c);
        }
        let trailers = match self.body.as_mut() {
            Some(b) => b.trailers().await.ok().flatten().unwrap_or_default(),
            None => HeaderMap::new(),
        };
        (out.freeze(), trailers)
    }
}

/// A unary call: one message, the whole answer. The status is `grpc-status` from the
/// trailers, or from the headers of a Trailers-Only answer.
pub async fn unary(addr: SocketAddr, path: &str, metadata: &[(&str, &str)], body: Bytes) -> Unary {
    let mut call = Call::open(addr, path, metadata).await;
    call.send(body, true);
    let headers = call.headers().await.expect("answer headers").clone();
    let (body, trailers) = call.finish().await;
    Unary {
        headers,
        body,
        trailers,
    }
}

pub struct Unary {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: HeaderMap,
}

impl Unary {
    fn get(&self, name: &str) -> Option<&str> {
        self.trailers
            .get(name)
            .or_else(|| self.headers.get(name))
            .and_then(|v| v.to_str().ok())
    }

    pub fn status(&self) -> u8 {
        self.get("grpc-status")
            .expect("a grpc-status")
            .parse()
            .unwrap()
    }

    pub fn message(&self) -> String {
        self.get("grpc-message").unwrap_or_default().to_string()
    }

    pub fn variant(&self) -> &str {
        self.headers
            .get("x-braid-variant")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    /// The one message of the answer, without its prefix.
    pub fn reply(&self) -> &[u8] {
        assert!(self.body.len() >= 5, "no message in {:?}", self.body);
        &self.body[5..]
    }
}

/// A ModelInferRequest for `model` with one BYTES input `text` of these rows, in raw
/// contents (what tritonclient sends) or typed contents.
pub fn texts_request(model: &str, id: &str, texts: &[&str], raw: bool) -> Bytes {
    use braid::grpc::pb::{InferTensorContents, ModelInferRequest, model_infer_request};
    use prost::Message;
    let contents = InferTensorContents {
        bytes_contents: texts.iter().map(|t| Bytes::from(t.to_string())).collect(),
        ..Default::default()
    };
    let mut raw_contents = Vec::new();
    for t in texts {
        raw_contents.extend_from_slice(&(t.len() as u32).to_le_bytes());
        raw_contents.extend_from_slice(t.as_bytes());
    }
    let req = ModelInferRequest {
        model_name: model.into(),
        id: id.into(),
        inputs: vec![model_infer_request::InferInputTensor {
            name: "text".into(),
            datatype: "BYTES".into(),
            shape: vec![texts.len() as i64],
            contents: (!raw).then_some(contents),
            ..Default::default()
        }],
        raw_input_contents: if raw {
            vec![raw_contents.into()]
        } else {
            vec![]
        },
        ..Default::default()
    };
    frame(&req.encode_to_vec())
}

/// An answer's message, decoded.
pub fn decoded<M: prost::Message + Default>(r: &Unary) -> M {
    M::decode(r.reply()).expect("a well-formed message")
}

/// An output of a ModelInferResponse as FP32 values, with its shape.
pub fn fp32_output(r: &braid::grpc::pb::ModelInferResponse, name: &str) -> (Vec<i64>, Vec<f32>) {
    let i = r
        .outputs
        .iter()
        .position(|o| o.name == name)
        .unwrap_or_else(|| panic!("no output {name} in {r:?}"));
    assert_eq!(r.outputs[i].datatype, "FP32");
    let values = r.raw_output_contents[i]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (r.outputs[i].shape.clone(), values)
}

/// An output of a REST (JSON) inference reply as FP32 values, flattened.
pub fn json_fp32_output(reply: &serde_json::Value, name: &str) -> Vec<f32> {
    let output = reply["outputs"]
        .as_array()
        .and_then(|o| o.iter().find(|o| o["name"] == name))
        .unwrap_or_else(|| panic!("no output {name} in {reply}"));
    output["data"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|v| match v.as_array() {
            Some(row) => row.iter().map(|x| x.as_f64().unwrap() as f32).collect(),
            None => vec![v.as_f64().unwrap() as f32],
        })
        .collect()
}
