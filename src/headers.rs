//! Looking a header up in a small map without hashing its name. `HeaderMap::get` hashes
//! the name it is given (byte by byte for a name that is not a standard one, such as
//! `x-braid-deadline`) before it probes; a request's few headers are compared faster
//! one by one, and most lookups on the request path are for names that are absent.

use http::header::{HeaderMap, HeaderName, HeaderValue};

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
            "x-braid-deadline",
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
