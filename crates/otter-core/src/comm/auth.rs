//! Proof of membership on the data plane. A ring connection opens with a mutual
//! challenge-response keyed by the group's key, which only the job's processes can derive
//! (from the join token and the generation), so a party that can reach a rank's port but
//! does not hold the token cannot take a rank's place in a collective, and an exchange
//! recorded in one generation (or one connection) is worth nothing in another.
//!
//! ```text
//! connector -> acceptor  hello     = magic | tag | rank | world | nonce_c    (48 bytes)
//! acceptor  -> connector challenge = nonce_a | HMAC(key, "accept"  | hello | nonce_a)
//! connector -> acceptor  response  =           HMAC(key, "connect" | hello | nonce_a)
//! ```
//! The key: `HMAC-SHA256(token, "otter data plane v1" | tag)`. Both nonces are fresh random
//! bytes, so neither side's proof can be replayed to the other or in another connection;
//! the labels keep one side's MAC from serving as the other's. MACs are compared in
//! constant time (the `hmac` crate's `verify_slice`).

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

type HmacSha256 = Hmac<Sha256>;

/// The first 32 bytes of a hello: `(magic, tag, rank, world)`, little-endian u64s.
pub type HelloFields = [u64; 4];
const NONCE: usize = 16;
const MAC: usize = 32;
pub const HELLO_LEN: usize = 32 + NONCE;

/// One generation's data-plane key.
#[derive(Clone)]
pub struct GroupKey([u8; 32]);

impl std::fmt::Debug for GroupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupKey(..)")
    }
}

impl GroupKey {
    /// The key of group incarnation `tag` (the generation) of the job whose processes hold
    /// `secret` (the join token).
    pub fn derive(secret: &[u8], tag: u64) -> Self {
        let mut m = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
        m.update(b"otter data plane v1\0");
        m.update(&tag.to_le_bytes());
        Self(m.finalize().into_bytes().into())
    }

    fn mac(&self, label: &[u8], hello: &[u8], nonce: &[u8]) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        m.update(label);
        m.update(hello);
        m.update(nonce);
        m
    }
}

/// Fresh random bytes from the kernel.
fn nonce() -> std::io::Result<[u8; NONCE]> {
    let mut n = [0u8; NONCE];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut n)?;
    Ok(n)
}

/// A random u64 from the kernel (shared-memory segment names and nonces).
pub fn random_u64() -> std::io::Result<u64> {
    let n = nonce()?;
    Ok(u64::from_le_bytes(n[..8].try_into().expect("8 bytes")))
}

fn hello_bytes(fields: HelloFields, nonce: &[u8; NONCE]) -> [u8; HELLO_LEN] {
    let mut h = [0u8; HELLO_LEN];
    for (i, v) in fields.iter().enumerate() {
        h[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    h[32..].copy_from_slice(nonce);
    h
}

/// The connecting side: introduces itself as `fields`, checks that the acceptor holds the
/// group's key, and proves that it does. `s` carries its own timeouts.
pub fn connect(s: &mut TcpStream, key: &GroupKey, fields: HelloFields) -> std::io::Result<()> {
    let hello = hello_bytes(fields, &nonce()?);
    s.write_all(&hello)?;
    let mut challenge = [0u8; NONCE + MAC];
    s.read_exact(&mut challenge)?;
    let (nonce_a, proof) = challenge.split_at(NONCE);
    if key.mac(b"accept", &hello, nonce_a).verify_slice(proof).is_err() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "the peer did not prove membership of this group (another job, or another generation)",
        ));
    }
    s.write_all(&key.mac(b"connect", &hello, nonce_a).finalize().into_bytes())
}

/// Why an incoming connection was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Its hello names another incarnation, rank or world, or is not ours at all (a stale
    /// peer of an earlier generation, a foreign protocol).
    Foreign,
    /// It named the expected rank but could not prove it holds the group's key.
    Unauthenticated,
    /// It did not complete its part in time (a port scanner, a liveness probe, a peer that
    /// gave up on this connection).
    Silent,
    /// Too many connections were being checked at once.
    Busy,
}

impl Rejected {
    pub const ALL: [Rejected; 4] = [Rejected::Foreign, Rejected::Unauthenticated, Rejected::Silent, Rejected::Busy];

    /// The `reason` label of `otter_comm_rejected_connections_total`.
    pub fn label(self) -> &'static str {
        match self {
            Rejected::Foreign => "foreign",
            Rejected::Unauthenticated => "unauthenticated",
            Rejected::Silent => "silent",
            Rejected::Busy => "busy",
        }
    }
}

static REJECTED: [AtomicU64; 4] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

/// Counts a dropped connection (per process: a rank's listener outlives its groups).
pub fn count(r: Rejected) {
    REJECTED[r as usize].fetch_add(1, Ordering::Relaxed);
}

/// Connections this process's acceptors dropped so far, by reason.
pub fn rejected_connections() -> [(Rejected, u64); 4] {
    Rejected::ALL.map(|r| (r, REJECTED[r as usize].load(Ordering::Relaxed)))
}

/// The accepting side: the connection must introduce itself as `want`, with the group's
/// key, before `deadline`.
pub fn accept(s: &mut TcpStream, key: &GroupKey, want: HelloFields, deadline: Instant) -> Result<(), Rejected> {
    let until_deadline = |s: &TcpStream| {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Rejected::Silent);
        }
        s.set_read_timeout(Some(left)).and_then(|_| s.set_write_timeout(Some(left))).map_err(|_| Rejected::Silent)
    };
    until_deadline(s)?;
    let mut hello = [0u8; HELLO_LEN];
    s.read_exact(&mut hello).map_err(|_| Rejected::Silent)?;
    if hello[..32] != hello_bytes(want, &[0; NONCE])[..32] {
        return Err(Rejected::Foreign);
    }
    let nonce_a = nonce().map_err(|_| Rejected::Silent)?;
    let mut challenge = [0u8; NONCE + MAC];
    challenge[..NONCE].copy_from_slice(&nonce_a);
    challenge[NONCE..].copy_from_slice(&key.mac(b"accept", &hello, &nonce_a).finalize().into_bytes());
    until_deadline(s)?;
    s.write_all(&challenge).map_err(|_| Rejected::Silent)?;
    let mut response = [0u8; MAC];
    until_deadline(s)?;
    s.read_exact(&mut response).map_err(|_| Rejected::Silent)?;
    key.mac(b"connect", &hello, &nonce_a).verify_slice(&response).map_err(|_| Rejected::Unauthenticated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::time::Duration;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (a, _) = l.accept().unwrap();
        for s in [&a, &c] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        (c, a)
    }

    fn run(connector_key: &GroupKey, acceptor_key: &GroupKey, fields: HelloFields, want: HelloFields) -> (std::io::Result<()>, Result<(), Rejected>) {
        let (mut c, mut a) = pair();
        let k = acceptor_key.clone();
        let acceptor = std::thread::spawn(move || {
            let r = accept(&mut a, &k, want, Instant::now() + Duration::from_secs(5));
            drop(a);
            r
        });
        let connected = connect(&mut c, connector_key, fields);
        drop(c);
        (connected, acceptor.join().unwrap())
    }

    #[test]
    fn members_of_the_same_generation_prove_it_to_each_other() {
        let key = GroupKey::derive(b"token", 7);
        let (c, a) = run(&key, &key, [1, 7, 0, 2], [1, 7, 0, 2]);
        assert!(c.is_ok() && a.is_ok(), "{c:?} {a:?}");
    }

    #[test]
    fn without_the_token_or_in_another_generation_the_keys_differ_and_both_sides_refuse() {
        let key = GroupKey::derive(b"token", 7);
        for wrong in [GroupKey::derive(b"guess", 7), GroupKey::derive(b"token", 6)] {
            // The connector without the key: the acceptor refuses it ...
            let (c, a) = run(&wrong, &key, [1, 7, 0, 2], [1, 7, 0, 2]);
            assert_eq!(c.unwrap_err().kind(), std::io::ErrorKind::PermissionDenied, "it cannot verify the acceptor either");
            assert_eq!(a, Err(Rejected::Silent), "the connector gave up after the acceptor's proof failed to verify");
            // ... and an acceptor without it is found out by the connector.
            let (c, _) = run(&key, &wrong, [1, 7, 0, 2], [1, 7, 0, 2]);
            assert_eq!(c.unwrap_err().kind(), std::io::ErrorKind::PermissionDenied);
        }
    }

    #[test]
    fn a_hello_for_another_rank_or_incarnation_is_foreign() {
        let key = GroupKey::derive(b"token", 7);
        for fields in [[1, 6, 0, 2], [1, 7, 1, 2], [1, 7, 0, 3], [2, 7, 0, 2]] {
            let (_, a) = run(&key, &key, fields, [1, 7, 0, 2]);
            assert_eq!(a, Err(Rejected::Foreign), "{fields:?}");
        }
    }

    /// An eavesdropper who recorded a whole exchange cannot answer a new challenge with it.
    #[test]
    fn a_replayed_response_is_refused() {
        let key = GroupKey::derive(b"token", 7);
        let fields = [1, 7, 0, 2];
        // A recorded exchange: its hello and its response.
        let (mut c, mut a) = pair();
        let k = key.clone();
        let recorder = std::thread::spawn(move || {
            let mut hello = [0u8; HELLO_LEN];
            a.read_exact(&mut hello).unwrap();
            let n = [9u8; NONCE];
            let mut ch = n.to_vec();
            ch.extend_from_slice(&k.mac(b"accept", &hello, &n).finalize().into_bytes());
            a.write_all(&ch).unwrap();
            let mut response = [0u8; MAC];
            a.read_exact(&mut response).unwrap();
            (hello, response)
        });
        connect(&mut c, &key, fields).unwrap();
        let (hello, response) = recorder.join().unwrap();
        // Replayed to a real acceptor: the challenge is new, the old response is worthless.
        let (mut c, mut a) = pair();
        let acceptor = std::thread::spawn(move || accept(&mut a, &key, fields, Instant::now() + Duration::from_secs(5)));
        c.write_all(&hello).unwrap();
        let mut challenge = [0u8; NONCE + MAC];
        c.read_exact(&mut challenge).unwrap();
        c.write_all(&response).unwrap();
        assert_eq!(acceptor.join().unwrap(), Err(Rejected::Unauthenticated));
    }

    #[test]
    fn a_silent_connection_is_dropped_at_the_deadline() {
        let key = GroupKey::derive(b"token", 7);
        let (_c, mut a) = pair();
        let t = Instant::now();
        assert_eq!(accept(&mut a, &key, [1, 7, 0, 2], Instant::now() + Duration::from_millis(300)), Err(Rejected::Silent));
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    }
}
