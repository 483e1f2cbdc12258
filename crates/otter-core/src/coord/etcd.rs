//! The etcd state store (`--etcd URL,...`, v3 API) for highly available coordinators.
//!
//! * Election: every replica campaigns on `PREFIX/leader` with a lease (TTL
//!   [`LEASE_TTL`], kept alive in the background); [`EtcdStore::connect`] returns only
//!   once this replica is the leader, so a standby waits there and takes over when the
//!   active one's lease expires (it died or was partitioned).
//! * Fencing: every save is a transaction conditioned on our leader key still existing
//!   at its creation revision; a deposed leader's save fails with
//!   [`StoreError::Fenced`] and it stops, so two coordinators never both write.
//! * Losing the lease: the keep-alive (every TTL/3) notices a lease that is revoked or
//!   expired (a response with TTL 0, an error, the stream ending) and
//!   [`StateStore::leadership_lost`] resolves: the coordinator stops answering at once,
//!   well within one TTL, instead of acting until its next save is fenced.
//! * Deadlines: every etcd request but the campaign (which waits for leadership by
//!   design) fails after [`ETCD_DEADLINE`].

use super::store::{StateStore, StoreError, StoreFuture};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp};
use std::time::Duration;
use tokio::sync::{watch, Mutex};

pub const LEASE_TTL: i64 = 3;
/// The longest any etcd request (but the campaign) may take.
pub const ETCD_DEADLINE: Duration = Duration::from_secs(5);

/// `f`, failing after [`ETCD_DEADLINE`] with an error naming `what`.
async fn bounded<T>(what: &str, f: impl std::future::Future<Output = Result<T, etcd_client::Error>>) -> Result<T, StoreError> {
    match tokio::time::timeout(ETCD_DEADLINE, f).await {
        Ok(r) => r.map_err(etcd_err),
        Err(_) => Err(StoreError::Etcd(format!("{what}: no answer within {ETCD_DEADLINE:?}"))),
    }
}

pub struct EtcdStore {
    client: Mutex<Client>,
    state_key: String,
    leader_key: Vec<u8>,
    leader_rev: i64,
    endpoints: String,
    /// Set by the keep-alive task when the lease is gone.
    lost: watch::Receiver<Option<String>>,
}

fn etcd_err(e: etcd_client::Error) -> StoreError {
    StoreError::Etcd(e.to_string())
}

impl EtcdStore {
    /// Connects and blocks until this replica is elected leader of `prefix`.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, StoreError> {
        let opts = ConnectOptions::new().with_connect_timeout(ETCD_DEADLINE);
        let mut client = bounded("connecting", Client::connect(endpoints, Some(opts))).await?;
        let lease = bounded("granting a lease", client.lease_grant(LEASE_TTL, None)).await?.id();
        let (mut keeper, mut responses) = bounded("keeping the lease alive", client.lease_keep_alive(lease)).await?;
        let (lost_tx, lost) = watch::channel(None);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis((LEASE_TTL as u64 * 1000) / 3));
            let why = loop {
                every.tick().await;
                if let Err(e) = keeper.keep_alive().await {
                    break format!("etcd lease {lease:x} keep-alive failed: {e}");
                }
                match tokio::time::timeout(ETCD_DEADLINE, responses.message()).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => continue,
                    Ok(Ok(Some(_))) => break format!("etcd lease {lease:x} was revoked or has expired"),
                    Ok(Ok(None)) => break format!("etcd lease {lease:x}: the keep-alive stream ended"),
                    Ok(Err(e)) => break format!("etcd lease {lease:x} keep-alive failed: {e}"),
                    Err(_) => break format!("etcd lease {lease:x}: no keep-alive answer within {ETCD_DEADLINE:?}"),
                }
            };
            tracing::error!("{why}: this coordinator stops acting as leader");
            let _ = lost_tx.send(Some(why));
        });
        let me = format!("{}:{}", std::env::var("HOSTNAME").unwrap_or_default(), std::process::id());
        eprintln!("otter-coord: campaigning for leadership of {prefix} on etcd {}", endpoints.join(","));
        let resp = client.campaign(format!("{prefix}/leader"), me, lease).await.map_err(etcd_err)?;
        let leader = resp.leader().ok_or_else(|| StoreError::Etcd("campaign returned no leader key".into()))?;
        eprintln!("otter-coord: elected leader");
        Ok(Self {
            leader_key: leader.key().to_vec(),
            leader_rev: leader.rev(),
            client: Mutex::new(client),
            state_key: format!("{prefix}/state"),
            endpoints: endpoints.join(","),
            lost,
        })
    }
}

impl StateStore for EtcdStore {
    fn load(&self) -> StoreFuture<'_, Option<Vec<u8>>> {
        Box::pin(async move {
            let r = bounded("reading the state", self.client.lock().await.get(self.state_key.as_str(), None)).await?;
            Ok(r.kvs().first().map(|kv| kv.value().to_vec()))
        })
    }

    fn save(&self, bytes: Vec<u8>) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let txn = Txn::new()
                .when([Compare::create_revision(self.leader_key.clone(), CompareOp::Equal, self.leader_rev)])
                .and_then([TxnOp::put(self.state_key.as_str(), bytes, None)]);
            let r = bounded("saving the state", self.client.lock().await.txn(txn)).await?;
            if r.succeeded() {
                Ok(())
            } else {
                Err(StoreError::Fenced(format!("leader key {} is gone", String::from_utf8_lossy(&self.leader_key))))
            }
        })
    }

    fn describe(&self) -> String {
        format!("etcd {} key {}", self.endpoints, self.state_key)
    }

    fn leadership_lost(&self) -> StoreFuture<'_, String> {
        let mut lost = self.lost.clone();
        Box::pin(async move {
            match lost.wait_for(Option::is_some).await {
                Ok(why) => Ok(why.clone().unwrap_or_default()),
                // The keep-alive task is gone without a word: nothing keeps the lease.
                Err(_) => Ok("the etcd lease keep-alive stopped".to_string()),
            }
        })
    }
}
