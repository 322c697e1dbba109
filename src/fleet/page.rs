//! The experiment page: one self-contained HTML file (no CDN: clusters are often
//! offline) that reads `/experiments` every 2 s and draws it. The same page serves a
//! pod's admin port (its own traffic; the page builds the history while it is open)
//! and the controller (the fleet, with the history the controller keeps and each
//! pod's share).

use http::{HeaderValue, Response, header};

use crate::error::{Body, full};

pub const PAGE: &str = include_str!("page.html");

pub fn response() -> Response<Body> {
    let mut resp = Response::new(full(PAGE));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // The page runs only its own inline script and talks only to its own origin.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'",
        ),
    );
    resp
}
