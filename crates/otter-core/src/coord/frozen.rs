//! [`Frozen`]: a part of the coordinator's state that changes once a generation (its
//! members, its ranks' check-ins, its voters), shared by the state and the copies the
//! flusher saves, and turned into JSON once.
//!
//! At a thousand nodes these parts are about half of the saved state's JSON, and each
//! holds a thousand strings. Every save copies the state under the lock and encodes the
//! copy off it (`persist.rs`), a few times a step: without sharing, each save allocated and
//! freed these thousands of strings and encoded the same half-megabyte again. With it, a
//! copy is a reference count, and a save writes the JSON cached at the first save after the
//! part last changed. A change goes through [`Frozen::get_mut`] (or a new value), which
//! copies the part if a save still holds it and drops the cached JSON.
//!
//! The state's format is JSON (serde_json) only: the cached text is emitted as a
//! [`RawValue`], which serde_json's writers and `to_value` understand. The saved form is
//! exactly the inner value's, so states saved before this type existed load unchanged.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use std::sync::{Arc, OnceLock};

pub struct Frozen<T>(Arc<Inner<T>>);

struct Inner<T> {
    value: T,
    /// The value's JSON, once a save has encoded it.
    json: OnceLock<Box<RawValue>>,
}

impl<T: Clone> Clone for Inner<T> {
    fn clone(&self) -> Self {
        // Only `get_mut` copies, to change the value: the JSON would be stale.
        Inner { value: self.value.clone(), json: OnceLock::new() }
    }
}

impl<T> Frozen<T> {
    pub fn new(value: T) -> Self {
        Frozen(Arc::new(Inner { value, json: OnceLock::new() }))
    }

    /// The value, to change: copied first if a save still holds it; its cached JSON is
    /// dropped.
    pub fn get_mut(&mut self) -> &mut T
    where
        T: Clone,
    {
        let inner = Arc::make_mut(&mut self.0);
        inner.json = OnceLock::new();
        &mut inner.value
    }

    /// Whether this value's JSON is cached (for tests).
    #[cfg(test)]
    fn is_cached(&self) -> bool {
        self.0.json.get().is_some()
    }
}

impl<T> std::ops::Deref for Frozen<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0.value
    }
}

impl<T> Clone for Frozen<T> {
    fn clone(&self) -> Self {
        Frozen(Arc::clone(&self.0))
    }
}

impl<T: Default> Default for Frozen<T> {
    fn default() -> Self {
        Frozen::new(T::default())
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Frozen<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.value.fmt(f)
    }
}

impl<T: PartialEq> PartialEq for Frozen<T> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.value == other.0.value
    }
}

impl<T: Eq> Eq for Frozen<T> {}

impl<T: Serialize> Serialize for Frozen<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if let Some(raw) = self.0.json.get() {
            return raw.serialize(s);
        }
        match serde_json::value::to_raw_value(&self.0.value) {
            Ok(raw) => self.0.json.get_or_init(|| raw).serialize(s),
            Err(_) => self.0.value.serialize(s),
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Frozen<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize(d).map(Frozen::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct State {
        members: Frozen<Vec<String>>,
        step: u64,
    }

    #[test]
    fn it_saves_as_its_value_does_and_loads_what_the_plain_value_saved() {
        let plain = serde_json::json!({"members": ["a", "b\"c"], "step": 3});
        let s: State = serde_json::from_value(plain.clone()).unwrap();
        assert_eq!(*s.members, vec!["a".to_string(), "b\"c".to_string()]);
        assert_eq!(serde_json::to_value(&s).unwrap(), plain, "to_value");
        assert_eq!(serde_json::to_string(&s).unwrap(), plain.to_string(), "the first encoding");
        assert!(s.members.is_cached());
        assert_eq!(serde_json::to_string(&s).unwrap(), plain.to_string(), "from the cache");
        let pretty: serde_json::Value = serde_json::from_slice(&serde_json::to_vec_pretty(&s).unwrap()).unwrap();
        assert_eq!(pretty, plain, "pretty");
    }

    #[test]
    fn a_copy_shares_the_value_and_a_change_copies_it_and_is_saved() {
        let mut s = State { members: Frozen::new(vec!["a".into()]), step: 0 };
        serde_json::to_string(&s).unwrap();
        let saved = s.members.clone();
        assert!(std::ptr::eq(&*saved, &*s.members), "a copy is the same value");
        s.members.get_mut().push("b".into());
        assert_eq!((saved.len(), s.members.len()), (1, 2), "the copy a save holds does not change");
        assert!(saved.is_cached() && !s.members.is_cached(), "the changed value's cached JSON is gone");
        assert_eq!(serde_json::to_string(&s).unwrap(), r#"{"members":["a","b"],"step":0}"#);
        // Unshared: changed in place, and its cache dropped all the same.
        let before: *const Vec<String> = &*s.members;
        s.members.get_mut().push("c".into());
        assert!(std::ptr::eq(before, &*s.members));
        assert_eq!(serde_json::to_string(&s).unwrap(), r#"{"members":["a","b","c"],"step":0}"#);
    }
}
