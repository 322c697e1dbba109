//! Backend addresses: where a variant's requests go and which HTTP version they speak.
//! Every layer names backends, so the type lives at the bottom.

use http::uri::{Authority, Scheme};

/// Where to send requests: scheme + authority, and which HTTP version to speak.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Upstream {
    pub scheme: Scheme,
    pub authority: Authority,
    pub protocol: Protocol,
}

/// `http://` speaks HTTP/1.1 with keep-alive; `h2c://` speaks HTTP/2 with prior
/// knowledge; `https://` speaks TLS, with HTTP/2 or HTTP/1.1 chosen by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    H2c,
    Tls,
}

/// A URL as braid shows it (on `/config`, in errors and logs): userinfo and the query,
/// where credentials ride (`user:pass@`, `?api_key=`), replaced by `<redacted>`.
/// Anything without `://` is not a URL and is shown as it is.
pub fn redacted(text: &str) -> std::borrow::Cow<'_, str> {
    let Some(scheme_end) = text.find("://").map(|i| i + 3) else {
        return text.into();
    };
    let rest = &text[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let userinfo = rest[..authority_end].rfind('@');
    let query = rest.find('?');
    if userinfo.is_none() && query.is_none() {
        return text.into();
    }
    let mut out = String::with_capacity(text.len());
    out.push_str(&text[..scheme_end]);
    let host_from = match userinfo {
        Some(at) => {
            out.push_str("<redacted>@");
            at + 1
        }
        None => 0,
    };
    let upto = query.unwrap_or(rest.len());
    out.push_str(&rest[host_from.min(upto)..upto]);
    if query.is_some() {
        out.push_str("?<redacted>");
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::redacted;

    #[test]
    fn credentials_in_a_url_are_not_shown() {
        for (url, shown) in [
            ("http://user:pass@host:80", "http://<redacted>@host:80"),
            (
                "http://host/p?api_key=s3cret&x=1",
                "http://host/p?<redacted>",
            ),
            ("https://a:b@h/p?k=v", "https://<redacted>@h/p?<redacted>"),
            ("http://h/a@b", "http://h/a@b"),
            ("http://host:8080", "http://host:8080"),
            ("local", "local"),
            ("a?b://c@d", "a?b://<redacted>@d"),
            ("/var/log/payload.jsonl", "/var/log/payload.jsonl"),
        ] {
            assert_eq!(redacted(url), shown, "{url}");
        }
    }
}
