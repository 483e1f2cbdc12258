//! Caught panics, in words.

/// What a caught panic said (its `&str` or `String` payload; empty otherwise).
pub(crate) fn message(payload: &(dyn std::any::Any + Send)) -> String {
    payload.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| payload.downcast_ref::<String>().cloned()).unwrap_or_default()
}
