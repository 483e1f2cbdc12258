//! Client side of the coordinator API: connect to the first reachable replica and retry
//! calls across coordinator restarts and failovers.

use crate::coord::rpc::pb;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

pub type Client = pb::coordinator_client::CoordinatorClient<Channel>;

/// Why no connection to a coordinator was made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("OTTER_TLS_CA={path}: {source}")]
    TlsCa { path: String, source: std::io::Error },
    #[error("coordinator address {addr:?}: {source}")]
    Address { addr: String, source: tonic::transport::Error },
    #[error("no coordinator reachable at {addrs} for {patience:?}")]
    Unreachable { addrs: String, patience: Duration },
}

/// TLS towards the coordinator: `OTTER_TLS_CA` names the PEM file of the CA that signed
/// the coordinator's certificate (its presence turns TLS on); `OTTER_TLS_DOMAIN` the name
/// to verify (default: the host part of the address). Environment, so the agent's rank
/// processes inherit it.
fn tls_for(host: &str) -> Result<Option<tonic::transport::ClientTlsConfig>, ConnectError> {
    let Ok(ca) = std::env::var("OTTER_TLS_CA") else { return Ok(None) };
    let pem = std::fs::read(&ca).map_err(|source| ConnectError::TlsCa { path: ca.clone(), source })?;
    let domain = std::env::var("OTTER_TLS_DOMAIN").unwrap_or_else(|_| host.to_string());
    Ok(Some(tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(pem)).domain_name(domain)))
}

/// Connects to the first coordinator address that answers (HA: several replicas, one
/// active), retrying for up to `patience`.
pub async fn connect(addrs: &[String], patience: Duration) -> Result<Client, ConnectError> {
    let until = Instant::now() + patience;
    loop {
        for a in addrs {
            let hostport = a.trim_start_matches("http://").trim_start_matches("https://");
            let host = hostport.rsplit_once(':').map_or(hostport, |(h, _)| h);
            let tls = tls_for(host)?;
            let url = format!("{}://{hostport}", if tls.is_some() { "https" } else { "http" });
            let bad = |source| ConnectError::Address { addr: a.clone(), source };
            let mut ep = tonic::transport::Endpoint::try_from(url.clone())
                .map_err(bad)?
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true);
            if let Some(t) = tls {
                ep = ep.tls_config(t).map_err(|source| ConnectError::Address { addr: a.clone(), source })?;
            }
            if let Ok(ch) = ep.connect().await {
                return Ok(pb::coordinator_client::CoordinatorClient::new(ch));
            }
        }
        if Instant::now() > until {
            return Err(ConnectError::Unreachable { addrs: addrs.join(","), patience });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Calls `f` until it succeeds, reconnecting while the coordinator is unreachable or
/// restarting (UNAVAILABLE / connection errors); refusals, and answers that carry a code
/// (such as a pending rendezvous), are returned.
pub async fn call<T, F, Fut>(client: &mut Client, addrs: &[String], f: F) -> Result<T, tonic::Status>
where
    F: FnMut(Client) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    call_with_patience(client, addrs, DEFAULT_PATIENCE, f).await
}

/// How long [`call`] retries an unreachable coordinator (a restart, a failover).
pub const DEFAULT_PATIENCE: Duration = Duration::from_secs(120);

/// [`call`], retrying an unreachable coordinator for `patience` (a rank's rendezvous waits
/// as long as the job's `join_timeout`: giving up sooner would take its node out of a job
/// that still waits for nodes).
pub async fn call_with_patience<T, F, Fut>(client: &mut Client, addrs: &[String], patience: Duration, mut f: F) -> Result<T, tonic::Status>
where
    F: FnMut(Client) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let until = Instant::now() + patience;
    loop {
        match f(client.clone()).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s)
                if crate::coord::rpc::refusal_code(&s).is_none()
                    && matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled)
                    && Instant::now() < until =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if let Ok(c) = connect(addrs, Duration::from_secs(5)).await {
                    *client = c;
                }
            }
            Err(s) => return Err(s),
        }
    }
}

