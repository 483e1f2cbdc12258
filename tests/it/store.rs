//! A generation's bootstrap store (libtorch's c10d::TCPStore, the one an NCCL group forms
//! through): rank 0 serves it on its collective listener; ranks of that generation join
//! and share keys under the generation's prefix; a rank of an older generation is
//! refused; a rank of a newer one waits until rank 0 serves it.

use otter::comm::store::GenerationStore;
use otter::comm::CommError;
use std::net::TcpListener;
use std::time::{Duration, Instant};

#[test]
fn ranks_of_the_served_generation_join_and_share_its_keys() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let server = GenerationStore::serve(&l, 5, Duration::from_secs(10)).unwrap();
    let client = GenerationStore::join(addr, 1, 5, Duration::from_secs(10)).unwrap();
    client.set("unique-id", b"from rank 1").unwrap();
    assert_eq!(server.get("unique-id").unwrap(), b"from rank 1");
    let big = vec![7u8; 4000];
    server.set("big", &big).unwrap();
    assert_eq!(client.get("big").unwrap(), big, "values longer than the first read buffer");
    assert_eq!((server.prefix(), client.generation()), ("g5/".to_string(), 5));
}

#[test]
fn a_rank_of_an_older_generation_is_refused() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let _server = GenerationStore::serve(&l, 5, Duration::from_secs(10)).unwrap();
    let t = Instant::now();
    let e = GenerationStore::join(addr, 2, 4, Duration::from_secs(10)).err().expect("a generation-4 rank may not join generation 5");
    assert!(matches!(e, CommError::StaleGeneration { rank: 2, mine: 4, current: 5 }), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5), "refused at once, not after the timeout");
    assert_eq!(e.to_string(), "rank 2: generation 4 is stale: the group's store serves generation 5");
}

#[test]
fn a_rank_of_a_newer_generation_waits_until_rank_0_serves_it() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let old = GenerationStore::serve(&l, 5, Duration::from_secs(10)).unwrap();
    // Nobody serves generation 6 yet: a short wait fails, naming rank 0.
    let e = GenerationStore::join(addr, 1, 6, Duration::from_millis(500)).err().expect("not served yet");
    assert!(matches!(&e, CommError::Timeout { peer: Some((0, a)), .. } if *a == addr.to_string()), "{e}");
    // Rank 0 leaves generation 5 and serves 6 on the same listener: the waiting rank joins.
    let (saw, seen) = std::sync::mpsc::channel();
    let joining = std::thread::spawn(move || {
        GenerationStore::join_watching(addr, 1, 6, Duration::from_secs(20), |served| {
            let _ = saw.send(served);
        })
    });
    // The joiner found generation 5 served and waits.
    assert_eq!(seen.recv_timeout(Duration::from_secs(20)).expect("the joiner reached the store"), Some(5));
    drop(old);
    let server = GenerationStore::serve(&l, 6, Duration::from_secs(10)).unwrap();
    let client = joining.join().unwrap().expect("generation 6 joins once it is served");
    server.set("k", b"v6").unwrap();
    assert_eq!(client.get("k").unwrap(), b"v6");
}
