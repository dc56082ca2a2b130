//! JetStream's refusals, told apart by their error codes (ANCHORS.md: async-nats 0.51
//! maps only some codes to kinds, so read the code from the error's source).

use async_nats::jetstream;

/// 10071: wrong last sequence; 10164: a conflicting write in flight on an R3 stream
/// (async-nats reports the latter as `Other`). Either way the expectation lost.
pub fn is_conflict_code(code: Option<u64>) -> bool {
    matches!(code, Some(10071) | Some(10164))
}

/// JetStream's "no room" refusals: 10023 insufficient resources (the server's
/// `max_file_store`), 10047 storage resources exceeded, 10028 memory resources
/// exceeded, 10077 the stream's `max_bytes`/`max_msgs` reached (discard new).
pub fn is_full_code(code: Option<u64>) -> bool {
    matches!(code, Some(10023) | Some(10028) | Some(10047) | Some(10077))
}

/// The server's own words about a refused publish.
pub fn publish_error_description(e: &jetstream::context::PublishError) -> String {
    use std::error::Error as _;
    e.source()
        .and_then(|s| s.downcast_ref::<jetstream::Error>())
        .map(|j| j.to_string())
        .unwrap_or_default()
}

/// The JetStream error code of a refused publish, if the server gave one.
pub fn publish_error_code(e: &jetstream::context::PublishError) -> Option<u64> {
    use std::error::Error as _;
    let src = e.source()?;
    src.downcast_ref::<jetstream::Error>()
        .map(|j| j.error_code().0)
}

/// Whether a refused publish lost its expected-sequence check.
pub fn is_conflict(e: &jetstream::context::PublishError) -> bool {
    e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence
        || is_conflict_code(publish_error_code(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_classified() {
        assert!(is_conflict_code(Some(10071)) && is_conflict_code(Some(10164)));
        assert!(!is_conflict_code(Some(10077)) && !is_conflict_code(None));
        for c in [10023, 10028, 10047, 10077] {
            assert!(is_full_code(Some(c)));
        }
        assert!(!is_full_code(Some(10071)) && !is_full_code(None));
    }
}
