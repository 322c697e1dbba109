//! Field values as HTTP/1.1 frames them, read from bytes without a string made of
//! them: the length, the token lists, the persistence-only `Connection`.

/// A `Content-Length` value: one or more ASCII digits, read without a string made of
/// them; `None` for anything else, or a number past `u64`.
pub fn content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        let digit = b.wrapping_sub(b'0');
        (digit < 10).then_some(())?;
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// The comma-separated tokens of a header value (`Connection`, `Transfer-Encoding`).
pub fn tokens(value: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// A `Connection` value that says only whether the connection persists.
pub fn only_persistence(value: &[u8]) -> bool {
    value.eq_ignore_ascii_case(b"keep-alive")
        || value.eq_ignore_ascii_case(b"close")
        || tokens(value)
            .all(|t| t.eq_ignore_ascii_case(b"keep-alive") || t.eq_ignore_ascii_case(b"close"))
}
