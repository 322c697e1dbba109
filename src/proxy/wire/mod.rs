//! The seam between how a caller speaks and the request path: everything that differs
//! by wire is asked of `Wire` here, and each method matches it once. The request path
//! (`proxy/mod.rs`, `forward`, `shadow`, `batched`) asks these methods and never
//! branches on the wire itself.
//!
//! | wire | finding the route (`find`, `find_in_body`) | rewrite | batched | safe to repeat | errors |
//! |---|---|---|---|---|---|
//! | `Rest` | by path (`GET /v1/models` answered) | path, v2 `model_name` | v2 and v1 inference | GET, HEAD, OPTIONS | `{"error": ...}` |
//! | `OpenAi` | the body's `model` | the body's `model` | `/v1/embeddings` | always (before its head, or a stream's first token) | OpenAI's error object |
//! | `GrpcModel` | the message's model | field 1 | ModelInfer | ModelMetadata, ModelReady | gRPC status |
//! | `GrpcModelStream` | the first message's model | each message's field 1 | never | never | gRPC status |
//! | `GrpcStream` | by path | none | never | never | gRPC status |
//!
//! A fourth wire is a new file here and one arm in each method below.

mod grpc;
mod openai;
mod rest;

pub(super) use grpc::{count_status, streamed};

use bytes::{Bytes, BytesMut};
use http::uri::PathAndQuery;
use http::{Method, Response};

use super::Proxy;
use crate::addr::Protocol;
use crate::batch::codec::Item;
use crate::config::Active;
use crate::error::{Body, BoxError, ProxyError};
use crate::openai::Call;
use crate::route::{Match, Route, Variant};
use crate::server;

/// How the caller speaks, which decides how the route is found, how the body is read
/// and how errors are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Wire {
    /// HTTP: REST inference or any other request; errors as JSON.
    Rest,
    /// An OpenAI-style call whose JSON body names its model (chat, completions,
    /// responses, embeddings, rerank): routed by that model; errors in OpenAI's shape.
    OpenAi,
    /// A unary call of the inference service that names its model (ModelInfer,
    /// ModelMetadata, ModelReady): read whole, routed by the model in its message.
    GrpcModel,
    /// Triton's ModelStreamInfer: routed by the model its first message names (one
    /// variant for the whole stream), then streamed both ways.
    GrpcModelStream,
    /// Any other gRPC call: routed by path prefix, streamed both ways.
    GrpcStream,
}

/// A request body, read already (to find a route by what it names), not yet, or read
/// up to a stream's first message.
pub(super) enum Pending<B> {
    Unread(B),
    Read(Bytes),
    Started { head: BytesMut, rest: Body },
}

/// The route a request found, its body as far as finding it read, and what an
/// OpenAI-style call's body names (boxed: most requests have none, and the request's
/// future stays small).
pub(super) struct Found<'a, B> {
    pub m: Match<'a>,
    pub body: Pending<B>,
    pub call: Option<Box<Call>>,
}

impl<'a, B> Found<'a, B> {
    fn new(m: Match<'a>, body: Pending<B>) -> Found<'a, B> {
        Found {
            m,
            body,
            call: None,
        }
    }
}

/// A route found from the head, or the body to read for it.
pub(super) enum Finding<'a, B> {
    Now(Result<Found<'a, B>, Unfound>),
    InBody(B),
}

/// A request that found no route: answered by the wire itself, or refused.
pub(super) enum Unfound {
    Answer(Box<Response<Body>>),
    Refused(ProxyError),
}

impl Wire {
    pub(super) fn of(parts: &http::request::Parts) -> Wire {
        if !crate::grpc::is_grpc(&parts.headers) {
            if crate::openai::names_model_in_body(&parts.method, parts.uri.path()) {
                return Wire::OpenAi;
            }
            return Wire::Rest;
        }
        match parts.uri.path().strip_prefix(crate::grpc::SERVICE_PREFIX) {
            Some("ModelInfer" | "ModelMetadata" | "ModelReady") => Wire::GrpcModel,
            Some("ModelStreamInfer") => Wire::GrpcModelStream,
            _ => Wire::GrpcStream,
        }
    }

    /// The request's route where its head decides it (a path); a wire whose body
    /// names the route gives the body back, for `find_in_body`. (Sync: most requests
    /// find their route with no future of their own.)
    #[inline]
    pub(super) fn find<'a, B>(
        self,
        active: &'a Active,
        parts: &http::request::Parts,
        body: B,
    ) -> Finding<'a, B> {
        match self {
            Wire::Rest => Finding::Now(rest::find(active, parts, body)),
            Wire::GrpcStream => {
                Finding::Now(rest::by_path(active, parts, body).map_err(Unfound::Refused))
            }
            Wire::OpenAi | Wire::GrpcModel | Wire::GrpcModelStream => Finding::InBody(body),
        }
    }

    /// The route a request's body names: read (as far as that needs) and found.
    pub(super) async fn find_in_body<'a, B>(
        self,
        proxy: &Proxy,
        active: &'a Active,
        parts: &http::request::Parts,
        body: B,
        held: &mut server::Reservation,
    ) -> Result<Found<'a, B>, Unfound>
    where
        B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        // A call read whole: its route (and so its timeout) is not known until it is.
        let whole = async |body: B, held: &mut server::Reservation| {
            let rules = proxy.body_rules(None, held);
            server::read_body(&parts.headers, body, rules).await
        };
        let found = match self {
            Wire::OpenAi => match whole(body, held).await {
                Ok(bytes) => openai::find(active, parts, bytes),
                Err(e) => Err(e),
            },
            Wire::GrpcModel => match whole(body, held).await {
                Ok(bytes) => grpc::find_model(active, parts, bytes),
                Err(e) => Err(e),
            },
            Wire::GrpcModelStream => grpc::find_stream(proxy, active, parts, body).await,
            Wire::Rest | Wire::GrpcStream => rest::by_path(active, parts, body),
        };
        found.map_err(Unfound::Refused)
    }

    /// The body as `variant` gets it, where the wire names the model in it: the new
    /// body, and a binary v2 body's new JSON header length; `None` to send it as it came.
    #[inline]
    pub(super) fn renamed(
        self,
        m: &Match<'_>,
        call: Option<&Call>,
        variant: &Variant,
        parts: &http::request::Parts,
        body: &Bytes,
    ) -> Option<(Bytes, Option<usize>)> {
        match self {
            Wire::Rest => rest::model_renamed(m, variant, parts, body),
            Wire::OpenAi => openai::model_renamed(call, variant, body),
            Wire::GrpcModel => grpc::model_renamed(m, variant, body).map(|b| (b, None)),
            Wire::GrpcModelStream | Wire::GrpcStream => None,
        }
    }

    /// Whether a call may wait in the variant's batch, and the executor path its batch
    /// goes to (`path`: the request's, rewritten); `Err` is a 400.
    #[inline]
    pub(super) fn queueable(
        self,
        route: &Route,
        variant: &Variant,
        parts: &http::request::Parts,
        body: &Bytes,
        path: &PathAndQuery,
    ) -> Result<Option<(Item, PathAndQuery)>, String> {
        match self {
            Wire::Rest => {
                rest::queueable(parts, body).map(|item| item.map(|item| (item, path.clone())))
            }
            Wire::OpenAi => openai::queueable(parts, variant, body),
            Wire::GrpcModel => grpc::queueable(route, variant, parts, body),
            Wire::GrpcModelStream | Wire::GrpcStream => Ok(None),
        }
    }

    /// Whether repeating the call is harmless whatever happened to the first try.
    #[inline]
    pub(super) fn safe_to_repeat(self, parts: &http::request::Parts) -> bool {
        let reads = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
        match self {
            Wire::Rest | Wire::GrpcModelStream | Wire::GrpcStream => reads,
            // ModelMetadata and ModelReady only read, as GET does.
            Wire::GrpcModel => reads || !parts.uri.path().ends_with("/ModelInfer"),
            // It changes nothing at the backend, and its client has seen nothing before
            // the answer's head (a stream's, before its first token: `CommitPoint`).
            Wire::OpenAi => true,
        }
    }

    /// braid's own error, in the wire's shape.
    #[inline]
    pub(super) fn error(self, e: ProxyError) -> Response<Body> {
        match self {
            Wire::Rest => e.into_response(),
            Wire::OpenAi => crate::openai::error_response(&e),
            Wire::GrpcModel | Wire::GrpcModelStream | Wire::GrpcStream => {
                crate::grpc::error_response(&e)
            }
        }
    }

    /// A gRPC call: spans and access lines name its method, its status is counted.
    #[inline]
    pub(super) fn grpc(self) -> bool {
        match self {
            Wire::Rest | Wire::OpenAi => false,
            Wire::GrpcModel | Wire::GrpcModelStream | Wire::GrpcStream => true,
        }
    }

    /// Streamed both ways as it arrives: never read whole, never retried or shadowed.
    #[inline]
    pub(super) fn streamed(self) -> bool {
        match self {
            Wire::Rest | Wire::OpenAi | Wire::GrpcModel => false,
            Wire::GrpcModelStream | Wire::GrpcStream => true,
        }
    }

    /// Copied to the route's shadow variant, when it has one.
    #[inline]
    pub(super) fn shadowed(self) -> bool {
        match self {
            Wire::Rest | Wire::OpenAi => true,
            Wire::GrpcModel | Wire::GrpcModelStream | Wire::GrpcStream => false,
        }
    }

    /// A successful answer is a generation: measured to its end (TTFT, tokens).
    #[inline]
    pub(super) fn generates(self) -> bool {
        match self {
            Wire::OpenAi => true,
            Wire::Rest | Wire::GrpcModel | Wire::GrpcModelStream | Wire::GrpcStream => false,
        }
    }

    /// How the call leaves for a backend of `protocol`: gRPC over HTTP/2 always.
    #[inline]
    pub(super) fn protocol(self, protocol: Protocol) -> Protocol {
        match self {
            Wire::Rest | Wire::OpenAi => protocol,
            Wire::GrpcModel | Wire::GrpcModelStream | Wire::GrpcStream => {
                grpc::over_http2(protocol)
            }
        }
    }
}
