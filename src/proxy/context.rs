//! What one request carries through the path, as values: the route it found and how
//! its variant was assigned (`Routed`), its body read and deadline known (`Prepared`),
//! both together (`Cx`, what serving takes), and one variant's answer (`Served`).

use std::sync::Arc;

use bytes::Bytes;
use http::Response;
use tokio::time::Instant;
use tower::retry::budget::TpsBudget;

use super::wire::Wire;
use crate::error::{Body, ProxyError};
use crate::route::experiment::Weights;
use crate::route::live::RouteLive;
use crate::route::{Match, Route, Variant, assign};
use crate::server::ConnInfo;
use crate::trace::RequestTrace;

/// A request with its route found and its variant assigned, from the one snapshot
/// loaded for it.
pub(super) struct Routed<'a> {
    pub m: Match<'a>,
    /// The route's live handles (budgets, health, batchers, metric handles).
    pub live: &'a RouteLive,
    pub wire: Wire,
    pub parts: &'a http::request::Parts,
    pub conn: &'a ConnInfo,
    /// When braid began answering it.
    pub start: Instant,
    /// How the variant was chosen (before any fallback), for the access log.
    pub how: assign::Assignment,
    /// The variant chosen, before an ejection or a failure sent the request elsewhere.
    pub assigned: usize,
    /// Sent elsewhere before the assigned variant was tried (it was ejected).
    pub rerouted: bool,
    /// The weights it was assigned under, on a route with an experiment.
    pub weights: Option<Arc<Weights>>,
    /// braid's span in the request's trace, when tracing is on.
    pub trace: Option<RequestTrace>,
    /// What an OpenAI-style call's body names (its model, where, and its user).
    pub call: Option<Box<crate::openai::Call>>,
}

impl Routed<'_> {
    #[inline]
    pub fn route(&self) -> &Route {
        self.m.route
    }

    /// An OpenAI-style call that asks for a stream.
    #[inline]
    pub fn streams(&self) -> bool {
        self.call.as_ref().is_some_and(|c| c.stream)
    }
}

/// A request's body, read whole, and its deadline.
pub(super) struct Prepared {
    pub body: Bytes,
    /// The earliest of the route timeout and the deadline header.
    pub deadline: Option<Instant>,
    /// The deadline came from the client's header (504 "deadline passed").
    pub by_header: bool,
    /// The route's retry budget, already credited with this request's one deposit
    /// (however many variants end up serving it); `None` without retries.
    pub budget: Option<Arc<TpsBudget>>,
}

impl Prepared {
    /// What a request gets when its deadline passes: the caller's (504 "deadline
    /// passed") or the route's timeout at this variant's backend.
    pub fn deadline_error(&self, route: &Route, variant: &Variant) -> ProxyError {
        if self.by_header {
            ProxyError::DeadlinePassed
        } else {
            ProxyError::Timeout {
                backend: variant.upstream.authority.to_string(),
                after: route.timeout.unwrap_or_default(),
            }
        }
    }
}

/// What serving a request takes: its route and assignment, its body and deadline.
#[derive(Clone, Copy)]
pub(super) struct Cx<'a> {
    pub r: &'a Routed<'a>,
    pub prepared: &'a Prepared,
}

/// One variant's answer, and whether sending the request elsewhere is safe.
pub(super) struct Served {
    pub result: Result<Response<Body>, ProxyError>,
    /// The request certainly was not processed, or the route says repeating is harmless.
    pub repeatable: bool,
    /// A stream that failed before its first token (its head may say 200).
    pub before_first_token: bool,
}

impl Served {
    /// An error that must not be sent anywhere else (a bad request, a deadline).
    pub fn error(e: ProxyError) -> Served {
        Served {
            result: Err(e),
            repeatable: false,
            before_first_token: false,
        }
    }

    pub fn failed(&self) -> bool {
        if self.before_first_token {
            return true;
        }
        match &self.result {
            Ok(r) => r.status().is_server_error(),
            Err(e) => e.status().is_server_error(),
        }
    }
}
