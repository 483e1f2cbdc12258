//! Where the coordinator keeps its state (the serialized [`super::Machine`] plus the
//! shell's few fields): behind [`StateStore`], with an in-memory store for tests, an
//! embedded file store (`--state-dir`, the default) and etcd (`--etcd`, see `etcd.rs`).
//!
//! The file store writes a whole snapshot per change: temp file, fsync, rename, fsync of
//! the directory, so a crash leaves either the old or the new state, never a torn one.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("etcd: {0}")]
    Etcd(String),
    #[error("lost leadership: another coordinator is active ({0})")]
    Fenced(String),
    #[error("{location}: unreadable state: {message}")]
    Unreadable { location: String, message: String },
}

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

pub trait StateStore: Send + Sync {
    /// The last saved state, if any.
    fn load(&self) -> StoreFuture<'_, Option<Vec<u8>>>;
    /// Replaces the saved state; returns once it is durable.
    fn save(&self, bytes: Vec<u8>) -> StoreFuture<'_, ()>;
    /// Human-readable location, for logs.
    fn describe(&self) -> String;
    /// Resolves, with the reason, once this replica has lost the right to act for the job
    /// (its etcd lease was revoked or expired): it must stop answering at once. Stores
    /// without leadership never resolve it.
    fn leadership_lost(&self) -> StoreFuture<'_, String> {
        Box::pin(std::future::pending())
    }
    /// Whether this replica may act for the job now, judged on the local clock alone: an
    /// error once the time up to which its leadership is known to hold has passed (an etcd
    /// lease unrenewed for its TTL). Checked before every event, so a replica that was
    /// stopped (SIGSTOP, a long pause) and resumes refuses everything at once, before any
    /// of its tasks could act on a state another replica has taken over. Stores without
    /// leadership always may.
    fn may_act(&self) -> Result<(), String> {
        Ok(())
    }
}

#[derive(Default)]
pub struct MemStore(std::sync::Mutex<Option<Vec<u8>>>);

impl StateStore for MemStore {
    fn load(&self) -> StoreFuture<'_, Option<Vec<u8>>> {
        let v = self.0.lock().expect("not poisoned").clone();
        Box::pin(async move { Ok(v) })
    }

    fn save(&self, bytes: Vec<u8>) -> StoreFuture<'_, ()> {
        *self.0.lock().expect("not poisoned") = Some(bytes);
        Box::pin(async { Ok(()) })
    }

    fn describe(&self) -> String {
        "memory".into()
    }
}

/// The embedded store: `DIR/state.json`.
#[derive(Clone)]
pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io { path: dir.display().to_string(), source })?;
        Ok(Self { dir })
    }

    fn path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// Temp file, fsync, rename, fsync of the directory; a failed write (a full disk)
    /// removes its temp file and leaves the previous state in place.
    fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let tmp = self.dir.join("state.json.tmp");
        let written = std::fs::File::create(&tmp).and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all())).and_then(|()| std::fs::rename(&tmp, self.path()));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::File::open(&self.dir)?.sync_all()
    }
}

impl StateStore for FileStore {
    fn load(&self) -> StoreFuture<'_, Option<Vec<u8>>> {
        let path = self.path();
        Box::pin(async move {
            match std::fs::read(&path) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(StoreError::Io { path: path.display().to_string(), source }),
            }
        })
    }

    fn save(&self, bytes: Vec<u8>) -> StoreFuture<'_, ()> {
        // The fsyncs run off the async runtime: they must not stall its threads.
        let me = self.clone();
        Box::pin(async move {
            let path = me.path().display().to_string();
            tokio::task::spawn_blocking(move || me.write(&bytes))
                .await
                .map_err(|e| StoreError::Io { path: path.clone(), source: std::io::Error::other(e.to_string()) })?
                .map_err(|source| StoreError::Io { path, source })
        })
    }

    fn describe(&self) -> String {
        self.path().display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_store_round_trips_and_survives_reopen() {
        let d = tempfile::tempdir().unwrap();
        let s = FileStore::open(d.path()).unwrap();
        assert_eq!(s.load().await.unwrap(), None);
        s.save(b"one".to_vec()).await.unwrap();
        s.save(b"two".to_vec()).await.unwrap();
        let again = FileStore::open(d.path()).unwrap();
        assert_eq!(again.load().await.unwrap().as_deref(), Some(&b"two"[..]));
        assert!(!d.path().join("state.json.tmp").exists());
    }
}
