//! The etcd state store (`--etcd URL,...`, v3 API) for highly available coordinators.
//!
//! * Election: every replica campaigns on `PREFIX/leader` with a lease (TTL
//!   [`LEASE_TTL`], kept alive in the background); [`EtcdStore::connect`] returns only
//!   once this replica is the leader, so a standby waits there and takes over when the
//!   active one's lease expires (it died or was partitioned).
//! * Fencing: every save is a transaction conditioned on our leader key still existing
//!   at its creation revision; a deposed leader's save fails with
//!   [`StoreError::Fenced`] and it stops, so two coordinators never both write.

use super::store::{StateStore, StoreError, StoreFuture};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp};
use tokio::sync::Mutex;

pub const LEASE_TTL: i64 = 3;

pub struct EtcdStore {
    client: Mutex<Client>,
    state_key: String,
    leader_key: Vec<u8>,
    leader_rev: i64,
    endpoints: String,
}

fn etcd_err(e: etcd_client::Error) -> StoreError {
    StoreError::Etcd(e.to_string())
}

impl EtcdStore {
    /// Connects and blocks until this replica is elected leader of `prefix`.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, StoreError> {
        let opts = ConnectOptions::new().with_connect_timeout(std::time::Duration::from_secs(5));
        let mut client = Client::connect(endpoints, Some(opts)).await.map_err(etcd_err)?;
        let lease = client.lease_grant(LEASE_TTL, None).await.map_err(etcd_err)?.id();
        let (mut keeper, mut responses) = client.lease_keep_alive(lease).await.map_err(etcd_err)?;
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_millis((LEASE_TTL as u64 * 1000) / 3));
            loop {
                every.tick().await;
                if keeper.keep_alive().await.is_err() || responses.message().await.ok().flatten().is_none() {
                    tracing::error!("etcd lease keep-alive failed: this coordinator will be fenced off");
                    return;
                }
            }
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
        })
    }
}

impl StateStore for EtcdStore {
    fn load(&self) -> StoreFuture<'_, Option<Vec<u8>>> {
        Box::pin(async move {
            let r = self.client.lock().await.get(self.state_key.as_str(), None).await.map_err(etcd_err)?;
            Ok(r.kvs().first().map(|kv| kv.value().to_vec()))
        })
    }

    fn save(&self, bytes: Vec<u8>) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let txn = Txn::new()
                .when([Compare::create_revision(self.leader_key.clone(), CompareOp::Equal, self.leader_rev)])
                .and_then([TxnOp::put(self.state_key.as_str(), bytes, None)]);
            let r = self.client.lock().await.txn(txn).await.map_err(etcd_err)?;
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
}
