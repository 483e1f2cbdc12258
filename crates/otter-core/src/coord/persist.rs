//! The coordinator's group commit: a change bumps the state version and marks it dirty;
//! one flusher saves the newest snapshot through the [`StateStore`](super::store::StateStore);
//! a reply that depends on a change waits (with the state lock released) until a save holds
//! its version (contract 4). A fenced save (another replica took over) deposes this
//! coordinator: nothing is saved any more and its server stops.

use super::server::{Coordinator, Persisted};
use super::store::StoreError;
use std::time::Duration;

/// Why a change could not be made durable (a handler answers UNAVAILABLE: the caller
/// retries, against this coordinator or the one that took over).
#[derive(Debug, Clone, thiserror::Error)]
pub enum PersistError {
    #[error("coordinator shutting down")]
    ShuttingDown,
    #[error("coordinator could not persist its state: {0}")]
    Failed(String),
}

/// What the flusher has made durable: the newest state version saved, and the newest
/// version whose save failed (with why).
#[derive(Debug, Clone, Default)]
pub(super) struct Durable {
    pub(super) saved: u64,
    pub(super) failed: Option<(u64, String)>,
}

impl Coordinator {
    /// Saves the newest state whenever it is dirty; ends with the coordinator.
    pub(super) async fn flusher(c: std::sync::Weak<Self>) {
        use std::sync::atomic::Ordering;
        loop {
            let Some(dirty) = c.upgrade().map(|c| async move { c.dirty.notified().await }) else { return };
            // A stored permit (notify_one before we waited) makes this return at once.
            if tokio::time::timeout(Duration::from_secs(1), dirty).await.is_err() {
                continue; // re-check that the coordinator still exists
            }
            let Some(c) = c.upgrade() else { return };
            let (bytes, version) = {
                let s = c.state.lock().await;
                (serde_json::to_vec(&*s).expect("state serializes"), c.version.load(Ordering::SeqCst))
            };
            match c.store.save(bytes).await {
                Ok(()) => c.durable.send_modify(|d| d.saved = d.saved.max(version)),
                Err(StoreError::Fenced(e)) => {
                    // Another replica is active: acting on anything now could fork the job.
                    // Nothing is saved any more, every waiting reply fails, and whoever
                    // runs this coordinator stops serving (see `deposed`).
                    c.durable.send_modify(|d| d.failed = Some((u64::MAX, format!("deposed: {e}"))));
                    c.deposed.send_replace(Some(e));
                    return;
                }
                Err(e) => c.durable.send_modify(|d| d.failed = Some((version, e.to_string()))),
            }
        }
    }

    /// Resolves (with why) once another replica has taken over: this coordinator must stop
    /// serving at once.
    pub async fn deposed(&self) -> String {
        let mut rx = self.deposed.subscribe();
        let why = match rx.wait_for(Option::is_some).await {
            Ok(why) => why.clone(),
            Err(_) => None,
        };
        match why {
            Some(why) => why,
            None => std::future::pending().await,
        }
    }

    /// Waits until a save includes state version `v`.
    pub(super) async fn durable(&self, v: u64) -> Result<(), PersistError> {
        let mut rx = self.durable.subscribe();
        let d = rx
            .wait_for(|d| d.saved >= v || d.failed.as_ref().is_some_and(|(f, _)| *f >= v))
            .await
            .map_err(|_| PersistError::ShuttingDown)?
            .clone();
        if d.saved >= v {
            return Ok(());
        }
        let why = d.failed.map(|(_, e)| e).unwrap_or_default();
        Err(PersistError::Failed(why))
    }

    pub(super) async fn persist(&self, s: &Persisted) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(s).expect("state serializes");
        self.store.save(bytes).await
    }

    /// Waits until the state as it is now is saved (before the process exits).
    pub async fn flush(&self) -> Result<(), PersistError> {
        // A manifest being written finishes first (up to a minute: it is a few fsyncs), so
        // a checkpoint whose shards are all durable is not lost to the exit.
        let t = std::time::Instant::now();
        while self.manifest_in_flight.load(std::sync::atomic::Ordering::SeqCst) && t.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.durable(self.current_version()).await
    }

    /// The version of the state as it is now (for replies that only read it).
    pub(super) fn current_version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::SeqCst)
    }
}
