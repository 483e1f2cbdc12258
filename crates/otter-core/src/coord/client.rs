//! Client side of the coordinator API: connect to the replica that is serving, and retry
//! calls across coordinator restarts and failovers.
//!
//! What separates "this coordinator is gone" from "the job refused me" (issue 51):
//! * A **refusal** carries a code (`x-otter-refusal`), or is a status only a live
//!   coordinator gives for a request that will never succeed (a wrong token, an invalid
//!   argument). It is returned to the caller at once: it ends what the caller was doing.
//! * Everything else is **transport**: a connection refused or reset, a keep-alive that went
//!   unanswered (a hung coordinator: its kernel still accepts connections, nothing answers
//!   them), a deadline, a replica that is not (or no longer) the active one. The call is
//!   retried against the *other* addresses first, with backoff, for the caller's patience;
//!   only then does it fail, naming the addresses and how long it tried.
//! * A replica counts as serving only once it answered a gRPC health check within
//!   [`PROBE_DEADLINE`]: a standby does not listen, a stopped (SIGSTOP) leader does not
//!   answer, a deposed one answers NOT_SERVING.

use crate::coord::rpc::pb;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// The generated client, connected to one coordinator replica.
pub type Rpc = pb::coordinator_client::CoordinatorClient<Channel>;

/// A connection to the coordinator replica at `addrs[index]`.
#[derive(Clone)]
pub struct Client {
    rpc: Rpc,
    /// The address it is connected to (an index into the list it was made from).
    index: usize,
}

impl Client {
    /// The index (into the address list) of the replica this client talks to.
    pub fn index(&self) -> usize {
        self.index
    }
}

impl std::ops::Deref for Client {
    type Target = Rpc;
    fn deref(&self) -> &Rpc {
        &self.rpc
    }
}

impl std::ops::DerefMut for Client {
    fn deref_mut(&mut self) -> &mut Rpc {
        &mut self.rpc
    }
}

/// Why no connection to a coordinator was made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("OTTER_TLS_CA={path}: {source}")]
    TlsCa { path: String, source: std::io::Error },
    #[error("coordinator address {addr:?}: {source}")]
    Address { addr: String, source: tonic::transport::Error },
    #[error("no coordinator answered at {addrs} for {:.1} s ({attempts} attempts; last: {last})", tried.as_secs_f64())]
    Unreachable { addrs: String, tried: Duration, attempts: u32, last: String },
}

/// How long a replica has to answer the health check before the next address is tried.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(1);
/// TCP connect timeout per address.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 keep-alive: a connection whose peer answers no PING within
/// `KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT` is closed and every call on it fails (a hung
/// coordinator is noticed in seconds, whatever the call).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest any unary call may take (a long-polling rendezvous answers within 10 s).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

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

/// A channel to `addr` that has answered a health check for the coordinator service.
async fn connect_one(addr: &str) -> Result<Rpc, Result<String, ConnectError>> {
    let hostport = addr.trim_start_matches("http://").trim_start_matches("https://");
    let host = hostport.rsplit_once(':').map_or(hostport, |(h, _)| h);
    let tls = tls_for(host).map_err(Err)?;
    let url = format!("{}://{hostport}", if tls.is_some() { "https" } else { "http" });
    let bad = |source| Err(ConnectError::Address { addr: addr.to_string(), source });
    let mut ep = tonic::transport::Endpoint::try_from(url)
        .map_err(bad)?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    if let Some(t) = tls {
        ep = ep.tls_config(t).map_err(|source| Err(ConnectError::Address { addr: addr.to_string(), source }))?;
    }
    let ch = ep.connect().await.map_err(|e| Ok(format!("{addr}: {}", source_chain(&e))))?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let service = <pb::coordinator_server::CoordinatorServer<crate::coord::server::Service> as tonic::server::NamedService>::NAME;
    let mut probe = tonic::Request::new(tonic_health::pb::HealthCheckRequest { service: service.into() });
    probe.set_timeout(PROBE_DEADLINE);
    match tokio::time::timeout(PROBE_DEADLINE, health.check(probe)).await {
        Ok(Ok(r)) if r.get_ref().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 => Ok(Rpc::new(ch)),
        Ok(Ok(_)) => Err(Ok(format!("{addr}: not serving (a replica that is not the active one)"))),
        Ok(Err(s)) => Err(Ok(format!("{addr}: health check: {}", s.message()))),
        Err(_) => Err(Ok(format!("{addr}: no answer to a health check within {PROBE_DEADLINE:?} (hung?)"))),
    }
}

/// An error and its sources, on one line (tonic's transport errors say little alone).
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s += &format!(": {m}");
        }
        cur = c.source();
    }
    s
}

/// Connects to the first coordinator address that is serving (HA: several replicas, one
/// active), trying them in order and then again with backoff, for up to `patience`.
pub async fn connect(addrs: &[String], patience: Duration) -> Result<Client, ConnectError> {
    connect_from(addrs, 0, patience).await
}

/// [`connect`], trying `addrs[first]` first and the others after it in turn (after a
/// failure, the caller starts from the next address: the one that failed is tried last).
pub async fn connect_from(addrs: &[String], first: usize, patience: Duration) -> Result<Client, ConnectError> {
    let t0 = Instant::now();
    let mut attempts = 0;
    let mut backoff = Duration::from_millis(100);
    let mut last = String::from("no address given");
    loop {
        for k in 0..addrs.len() {
            let index = (first + k) % addrs.len();
            attempts += 1;
            match connect_one(&addrs[index]).await {
                Ok(rpc) => return Ok(Client { rpc, index }),
                Err(Err(fatal)) => return Err(fatal),
                Err(Ok(why)) => last = why,
            }
        }
        let tried = t0.elapsed();
        if tried >= patience {
            return Err(ConnectError::Unreachable { addrs: addrs.join(","), tried, attempts, last });
        }
        tokio::time::sleep(backoff.min(patience - tried)).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Whether a failed call's status is the coordinator's answer to the request (a refusal:
/// return it to the caller) rather than a sign that the coordinator is gone (retry,
/// elsewhere first). Only a coordinator that is up and read the request sends a refusal
/// code, an authentication failure, an invalid argument or an unimplemented method.
pub fn is_refusal(s: &tonic::Status) -> bool {
    use tonic::Code::*;
    crate::coord::rpc::refusal_code(s).is_some() || matches!(s.code(), Unauthenticated | PermissionDenied | InvalidArgument | Unimplemented | FailedPrecondition | ResourceExhausted | OutOfRange | AlreadyExists | NotFound)
}

/// Calls `f` until it succeeds or is refused, reconnecting (another replica first) while the
/// coordinator is unreachable, restarting or failing over, for [`DEFAULT_PATIENCE`].
pub async fn call<T, F, Fut>(client: &mut Client, addrs: &[String], f: F) -> Result<T, tonic::Status>
where
    F: FnMut(Rpc) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    call_with_patience(client, addrs, DEFAULT_PATIENCE, f).await
}

/// How long [`call`] retries an unreachable coordinator (a restart, a failover).
pub const DEFAULT_PATIENCE: Duration = Duration::from_secs(120);

/// [`call`], retrying an unreachable coordinator for `patience` (counted from the first
/// failure). A refusal is returned at once; a coordinator unreachable for longer than
/// `patience` gives UNAVAILABLE with a message naming every address and how long they
/// were tried.
pub async fn call_with_patience<T, F, Fut>(client: &mut Client, addrs: &[String], patience: Duration, mut f: F) -> Result<T, tonic::Status>
where
    F: FnMut(Rpc) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut since: Option<Instant> = None;
    loop {
        let s = match f(client.rpc.clone()).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if is_refusal(&s) => return Err(s),
            Err(s) => s,
        };
        let t0 = *since.get_or_insert_with(Instant::now);
        let left = patience.saturating_sub(t0.elapsed());
        let failed = format!("{}: {}", addrs.get(client.index).map_or("?", String::as_str), s.message());
        if left.is_zero() {
            return Err(gave_up(addrs, t0.elapsed(), &failed));
        }
        // The replica that failed is tried last.
        match connect_from(addrs, client.index + 1, left).await {
            Ok(c) => *client = c,
            Err(ConnectError::Unreachable { tried, attempts, last, .. }) => {
                return Err(gave_up(addrs, t0.elapsed().max(tried), &format!("{failed}; then {attempts} connection attempts, last: {last}")));
            }
            Err(e) => return Err(tonic::Status::unavailable(e.to_string())),
        }
    }
}

fn gave_up(addrs: &[String], tried: Duration, last: &str) -> tonic::Status {
    tonic::Status::unavailable(format!("no coordinator answered at {} for {:.1} s (last: {last})", addrs.join(","), tried.as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_a_live_coordinator_says_about_the_request_is_a_refusal() {
        use tonic::{Code, Status};
        let coded = crate::coord::rpc::coded(Status::unavailable("rendezvous pending"), "rendezvous-pending");
        let cases = [
            (coded, true),
            (Status::failed_precondition("stale generation"), true),
            (Status::unauthenticated("wrong token"), true),
            (Status::invalid_argument("bad"), true),
            // The coordinator is gone, restarting, deposed, hung, or the connection broke.
            (Status::unavailable("tcp connect error"), false),
            (Status::new(Code::Internal, "h2 protocol error: connection reset"), false),
            (Status::unknown("transport error"), false),
            (Status::cancelled("operation was canceled"), false),
            (Status::deadline_exceeded("timeout expired"), false),
        ];
        for (s, refusal) in cases {
            assert_eq!(is_refusal(&s), refusal, "{s:?}");
        }
    }

    #[tokio::test]
    async fn an_unreachable_address_is_named_with_the_time_it_was_tried() {
        // A port nobody listens on.
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
        let e = match connect(&[addr.clone()], Duration::from_millis(600)).await {
            Err(e) => e,
            Ok(_) => panic!("connected to a closed port"),
        };
        let m = e.to_string();
        assert!(m.contains(&addr) && m.contains(" s (") && m.contains("attempts"), "{m}");
        assert!(matches!(e, ConnectError::Unreachable { attempts, .. } if attempts >= 2), "it retried: {m}");
    }

    #[tokio::test]
    async fn a_listener_that_never_answers_is_not_taken_for_a_coordinator() {
        // A bound, listening socket whose owner never reads: a SIGSTOPped coordinator looks
        // like this (its kernel completes the TCP handshake).
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let t = Instant::now();
        let e = match connect(&[addr.clone()], Duration::from_millis(100)).await {
            Err(e) => e.to_string(),
            Ok(_) => panic!("a silent listener passed the health check"),
        };
        assert!(e.contains("health check") || e.contains("hung"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5), "the probe is bounded: {:?}", t.elapsed());
        drop(l);
    }
}
