//! The header names a parser has read before, by their place in the head: a peer sends
//! the same names in the same order request after request, so the name at a place whose
//! bytes match last time's is cloned rather than parsed again (lower-cased, matched
//! against the standard names, and for others copied into an allocation of its own).

use http::header::{HeaderName, InvalidHeaderName};

/// Places remembered; lines beyond are parsed every time.
const PLACES: usize = 32;
/// Names longer than this are parsed every time (and not kept).
const LONGEST: usize = 64;

#[derive(Default)]
pub struct Names {
    /// For each place: the bytes last read there, as sent, and their name.
    places: Vec<(Box<[u8]>, HeaderName)>,
}

impl Names {
    /// The name for `raw`, read at line `place` of a head.
    pub fn name(&mut self, place: usize, raw: &[u8]) -> Result<HeaderName, InvalidHeaderName> {
        if let Some((seen, name)) = self.places.get(place)
            && **seen == *raw
        {
            return Ok(name.clone());
        }
        let name = HeaderName::from_bytes(raw)?;
        if place < PLACES && raw.len() <= LONGEST {
            let entry = (Box::from(raw), name.clone());
            let len = self.places.len();
            match self.places.get_mut(place) {
                Some(slot) => *slot = entry,
                // Places are read in order, so the next is at most one past the end.
                None if place == len => self.places.push(entry),
                None => {}
            }
        }
        Ok(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header;

    #[test]
    fn a_name_is_what_parsing_gives_whether_remembered_or_not() {
        let mut names = Names::default();
        let heads: [&[&[u8]]; 4] = [
            &[b"Host", b"Content-Length", b"X-Request-Id"],
            &[b"Host", b"Content-Length", b"X-Request-Id"],
            // The same names in other cases and places, and a new one.
            &[b"host", b"x-request-id", b"CONTENT-LENGTH", b"X-Other"],
            &[b"Host", b"Content-Length", b"X-Request-Id"],
        ];
        for head in heads {
            for (place, raw) in head.iter().enumerate() {
                let got = names.name(place, raw).unwrap();
                assert_eq!(got, HeaderName::from_bytes(raw).unwrap());
            }
        }
        assert_eq!(names.name(0, b"HOST").unwrap(), header::HOST);
    }

    #[test]
    fn invalid_names_are_refused_every_time_and_never_kept() {
        let mut names = Names::default();
        assert!(names.name(0, b"bad name").is_err());
        assert!(names.name(0, b"bad name").is_err());
        assert_eq!(names.name(0, b"accept").unwrap(), header::ACCEPT);
        // A place far past the end is parsed, not kept.
        assert_eq!(names.name(20, b"accept").unwrap(), header::ACCEPT);
        assert_eq!(names.places.len(), 1);
        let long = vec![b'x'; LONGEST + 1];
        assert!(names.name(1, &long).is_ok());
        assert_eq!(names.places.len(), 1);
    }
}
