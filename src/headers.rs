//! Looking a header up in a small map without hashing its name. `HeaderMap::get` hashes
//! the name it is given (byte by byte for a name that is not a standard one, such as
//! `x-braid-timeout`) before it probes; a request's few headers are compared faster
//! one by one, and most lookups on the request path are for names that are absent.
//! Also the one reading of braid's own timeout header and of a duration's text, for
//! the proxy, the executor and the config alike.

use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};

/// `250ms`, `2s`, `1.5s`, `100us`, `1m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "{s:?} is not a duration: use a number with a unit (us, ms, s, m, h), e.g. \"250ms\""
        )
    };
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(bad)?;
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().map_err(|_| bad())?;
    let scale = match unit {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(value * scale).map_err(|_| bad())
}

/// `x-braid-timeout`: how long a request has left, as the proxy sends it to a backend
/// and a caller may send it to the proxy or the executor.
pub static TIMEOUT: HeaderName = HeaderName::from_static("x-braid-timeout");

/// A caller's timeout is never taken past this (a deadline a year off is no deadline,
/// and `now + d` must not overflow).
pub const LONGEST_CALLER_TIMEOUT: Duration = Duration::from_secs(3600);

/// The request's `x-braid-timeout`, read by the one checked parser (a duration with a
/// unit; `-1`, `inf`, `NaN` or past `u64` seconds are refused) and capped at `cap`.
/// `Ok(None)` without the header; `Err` with the message a 400 carries.
pub fn timeout(map: &HeaderMap, cap: Duration) -> Result<Option<Duration>, String> {
    let Some(v) = get(map, &TIMEOUT) else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .and_then(|s| parse_duration(s.trim()).ok())
        .map(|d| Some(d.min(cap)))
        .ok_or_else(|| format!("{} must be a duration such as \"250ms\"", TIMEOUT.as_str()))
}

/// Maps with at most this many names are searched in order.
const SCAN: usize = 8;

/// The first value of `name`, as `HeaderMap::get` gives it.
pub fn get<'a>(map: &'a HeaderMap, name: &HeaderName) -> Option<&'a HeaderValue> {
    // The names are a plain slice to walk (values may hang off a name in another
    // list); a name found is rare, and then fetched the usual way.
    if map.keys_len() <= SCAN && !map.keys().any(|k| k == name) {
        return None;
    }
    map.get(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header;

    #[test]
    fn gives_what_get_gives_for_small_and_large_maps() {
        let names: Vec<HeaderName> = [
            "host",
            "x-braid-timeout",
            "content-type",
            "x-forwarded-for",
            "accept",
            "x-a",
            "x-b",
            "x-c",
            "x-d",
            "x-e",
        ]
        .iter()
        .map(|n| HeaderName::from_static(n))
        .collect();
        for size in 0..names.len() {
            let mut map = HeaderMap::new();
            for (i, n) in names[..size].iter().enumerate() {
                map.append(n.clone(), HeaderValue::from(i));
                // A second value of the same name: the first is the one given.
                map.append(n.clone(), HeaderValue::from(100 + i));
            }
            for n in names.iter().chain([&header::CONNECTION]) {
                assert_eq!(get(&map, n), map.get(n), "{n} in a map of {size} names");
            }
        }
    }
}
