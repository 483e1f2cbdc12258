//! Collectives across real processes: property tests with 2, 3 and 4 ranks and a rank
//! killed (SIGKILL) in the middle of a large all-reduce, for both transports of the CPU
//! ring (shared memory between same-host ranks, and plain TCP with OTTER_RING_SHM=0).
//!
//! The test binary re-executes itself: `rank_process` (ignored in normal runs) is the body
//! of one rank and only acts when OTTER_COMM_CHILD is set.

use otter::comm::ring::RingGroup;
use otter::comm::{split, Collective};
use otter::data::order::SplitMix64;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const TIMEOUT: Duration = Duration::from_secs(2);

fn data(seed: u64, rank: usize, len: usize) -> Vec<f32> {
    let mut r = SplitMix64::new(seed.wrapping_mul(7919) ^ (rank as u64) << 40 ^ len as u64);
    (0..len).map(|_| (r.below(20_001) as f32 - 10_000.0) / 64.0).collect()
}

/// Sizes every property run covers: empty, tiny, odd, not divisible by the world size,
/// larger than one shared-memory slot, plus random ones from the seed.
fn sizes(seed: u64) -> Vec<usize> {
    let mut v = vec![0, 1, 2, 3, 5, 7, 17, 1000, 65_537, 1_048_577, 2_500_003];
    let mut r = SplitMix64::new(seed);
    v.extend((0..4).map(|_| r.below(300_000) as usize));
    v
}

fn close(x: f32, y: f32) -> bool {
    (x - y).abs() <= 1e-5 * y.abs().max(1.0)
}

fn free_addrs(n: usize) -> Vec<SocketAddr> {
    let ls: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    ls.iter().map(|l| l.local_addr().unwrap()).collect()
}

fn addrs_arg(a: &[SocketAddr]) -> String {
    a.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

fn parse_addrs(s: &str) -> Vec<SocketAddr> {
    s.split(',').map(|a| a.parse().unwrap()).collect()
}

fn connect(rank: usize, addrs: &[SocketAddr]) -> RingGroup {
    let l = TcpListener::bind(addrs[rank]).unwrap();
    RingGroup::connect(rank, addrs, &l, TIMEOUT * 5).unwrap()
}

fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()
}

/// The body of one rank process.
#[test]
#[ignore = "run by the tests below as a child process"]
fn rank_process() {
    let mode = std::env::var("OTTER_COMM_CHILD").expect("rank_process is a child of the tests below (OTTER_COMM_CHILD): run them instead");
    let rank: usize = std::env::var("RANK").unwrap().parse().unwrap();
    let addrs = parse_addrs(&std::env::var("ADDRS").unwrap());
    let seed: u64 = std::env::var("SEED").unwrap().parse().unwrap();
    let world = addrs.len();
    let mut g = connect(rank, &addrs);
    let shm_expected = std::env::var("OTTER_RING_SHM").map_or(true, |v| v != "0");
    assert_eq!(g.uses_shared_memory(), shm_expected, "transport");
    match mode.as_str() {
        "props" => {
            for len in sizes(seed) {
                let inputs: Vec<Vec<f32>> = (0..world).map(|r| data(seed, r, len)).collect();
                let sum: Vec<f32> = (0..len).map(|i| inputs.iter().map(|d| d[i]).sum()).collect();
                // all-reduce (mean) of a bucket list
                let mut a = inputs[rank].clone();
                let mut b = data(seed + 1, rank, 3);
                g.all_reduce_mean(&mut [&mut a[..], &mut b[..]]).unwrap();
                for (i, (x, s)) in a.iter().zip(&sum).enumerate() {
                    assert!(close(*x, s / world as f32), "rank {rank} len {len} all_reduce[{i}] = {x}, want {}", s / world as f32);
                }
                // broadcast from every root
                for root in 0..world {
                    let mut v = inputs[rank].clone();
                    g.broadcast(&mut v, root).unwrap();
                    assert!(v == inputs[root], "rank {rank} len {len}: broadcast from {root}");
                }
                // reduce-scatter, then all-gather of the parts = the full sum
                let (s, n) = split(len, world, rank);
                let mut part = vec![0f32; n];
                g.reduce_scatter_sum(&inputs[rank], &mut part).unwrap();
                for (x, y) in part.iter().zip(&sum[s..s + n]) {
                    assert!(close(*x, *y), "rank {rank} len {len}: reduce_scatter {x} vs {y}");
                }
                let mut all = vec![0f32; len];
                g.all_gather(&part, &mut all).unwrap();
                assert!(all.iter().zip(&sum).all(|(x, y)| close(*x, *y)), "rank {rank} len {len}: all_gather");
            }
            g.barrier().unwrap();
            println!("ok rank {rank}");
        }
        "kill" => {
            // Loop on large all-reduces until the parent kills one rank.
            let mut big = data(seed, rank, 16 << 20);
            println!("ready");
            let mut done = 0u64;
            let err = loop {
                if let Err(e) = g.all_reduce_mean(&mut [&mut big[..]]) {
                    break e;
                }
                done += 1;
                if done == 1 {
                    // Every rank completed one: all are in the loop, the next is under way.
                    println!("reducing");
                }
            };
            println!("error_at_ms {} {err}", now_ms());
            drop(g);
            // Rebuild a smaller group with the survivors and check it works.
            let addrs2 = parse_addrs(&std::env::var("ADDRS2").unwrap());
            let rank2: usize = std::env::var("RANK2").unwrap().parse().unwrap();
            let mut g2 = connect(rank2, &addrs2);
            let len = 1_000_003;
            let mut v = data(seed, rank2, len);
            g2.all_reduce_mean(&mut [&mut v[..]]).unwrap();
            let inputs: Vec<Vec<f32>> = (0..addrs2.len()).map(|r| data(seed, r, len)).collect();
            for i in 0..len {
                let want = inputs.iter().map(|d| d[i]).sum::<f32>() / addrs2.len() as f32;
                assert!(close(v[i], want), "regrouped all-reduce [{i}] {} vs {want}", v[i]);
            }
            println!("regrouped ok");
        }
        other => panic!("unknown mode {other}"),
    }
}

fn spawn_rank(mode: &str, rank: usize, addrs: &[SocketAddr], seed: u64, shm: bool, extra: &[(&str, String)]) -> Child {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", "comm::rank_process", "--ignored", "--nocapture", "--quiet"])
        .env("OTTER_COMM_CHILD", mode)
        .env("RANK", rank.to_string())
        .env("ADDRS", addrs_arg(addrs))
        .env("SEED", seed.to_string())
        .env("OTTER_RING_SHM", if shm { "1" } else { "0" })
        .stdout(Stdio::piped());
    for (k, v) in extra {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

fn property_run(world: usize, shm: bool) {
    let seed = 1000 + world as u64 * 10 + u64::from(shm);
    let addrs = free_addrs(world);
    let kids: Vec<Child> = (0..world).map(|r| spawn_rank("props", r, &addrs, seed, shm, &[])).collect();
    for (r, k) in kids.into_iter().enumerate() {
        let out = k.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains(&format!("ok rank {r}")), "world {world} shm {shm} rank {r}: {text}");
    }
}

#[test]
fn all_reduce_broadcast_reduce_scatter_all_gather_match_naive_with_2_3_4_processes() {
    for world in [2, 3, 4] {
        for shm in [true, false] {
            property_run(world, shm);
        }
    }
}

fn kill_run(shm: bool) {
    let world = 3;
    let victim = 1;
    let addrs = free_addrs(world);
    let addrs2 = free_addrs(world - 1);
    let mut kids: Vec<(usize, Child)> = (0..world)
        .map(|r| {
            let rank2 = if r < victim { r } else { r.saturating_sub(1) };
            let extra = [("ADDRS2", addrs_arg(&addrs2)), ("RANK2", rank2.to_string())];
            (r, spawn_rank("kill", r, &addrs, 7, shm, &extra))
        })
        .collect();
    let mut readers: Vec<_> = kids.iter_mut().map(|(_, k)| BufReader::new(k.stdout.take().unwrap()).lines()).collect();
    // The next line of a child's stdout that is ours (libtest prints its own lines too).
    fn next_line(l: &mut std::io::Lines<BufReader<std::process::ChildStdout>>) -> String {
        l.map(Result::unwrap).find(|s| s.starts_with("ready") || s.starts_with("reducing") || s.starts_with("error_at_ms") || s.starts_with("regrouped")).unwrap_or_default()
    }
    for l in readers.iter_mut() {
        assert_eq!(next_line(l), "ready");
    }
    // Each rank finished its first 64 MB all-reduce and went on to the next: the kill
    // lands inside back-to-back all-reduces.
    for l in readers.iter_mut() {
        assert_eq!(next_line(l), "reducing");
    }
    let killed_at = now_ms();
    kids[victim].1.kill().unwrap();
    let t = Instant::now();
    for (i, (r, k)) in kids.iter_mut().enumerate() {
        if *r == victim {
            k.wait().unwrap();
            continue;
        }
        let line = next_line(&mut readers[i]);
        let at: u128 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        let after = Duration::from_millis(at.saturating_sub(killed_at) as u64);
        println!("shm {shm}: rank {r} got an error {after:?} after the kill: {line}");
        assert!(after <= TIMEOUT, "rank {r} took {after:?} to notice (timeout {TIMEOUT:?})");
        assert_eq!(next_line(&mut readers[i]), "regrouped ok", "rank {r}");
        assert!(k.wait().unwrap().success(), "rank {r}");
    }
    assert!(t.elapsed() < Duration::from_secs(30));
}

#[test]
fn a_rank_killed_mid_all_reduce_fails_the_others_within_the_timeout_and_they_regroup() {
    kill_run(true);
    kill_run(false);
}
