//! A gray failure: two workers that both reach the coordinator but not each other. Each
//! process runs in a network namespace of this test's own (veth pairs on a bridge in a
//! "hub" namespace that holds the coordinator); the partition is an nftables rule in one
//! worker's namespace that drops what the two workers send each other, and nothing else.
//!
//! What must hold: the ranks notice the silence within the peer timeout, name each other,
//! the coordinator leaves one of the pair out (the partition rule) and the other trains
//! on; when the link is back and the back-off is over, the left-out node is admitted
//! again; exactly-once throughout. Skipped (with a printed reason) only where the kernel
//! or the sandbox forbids network namespaces or nftables.

mod common;

use common::cluster::*;
use common::coord_bin;
use common::job;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The test's namespaces and addresses; torn down on drop.
struct Net {
    prefix: String,
    subnet: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let o = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim()))
    }
}

impl Net {
    /// hub (bridge, coordinator at .1) + w1 (.2) + w2 (.3).
    fn new() -> Result<Self, String> {
        let id = std::process::id();
        let net = Net { prefix: format!("otp{id}"), subnet: format!("10.{}.{}", 200 + (id / 250) % 50, id % 250) };
        let hub = net.ns("hub");
        ip(&["netns", "add", &hub])?;
        ip(&["-n", &hub, "link", "set", "lo", "up"])?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "addr", "add", &format!("{}.1/24", net.subnet), "dev", "br0"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        for (i, w) in ["w1", "w2"].iter().enumerate() {
            let ns = net.ns(w);
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            let (inner, outer) = (format!("{}{w}", net.prefix), format!("{}{w}h", net.prefix));
            ip(&["link", "add", &inner, "type", "veth", "peer", "name", &outer])?;
            ip(&["link", "set", &inner, "netns", &ns])?;
            ip(&["link", "set", &outer, "netns", &hub])?;
            ip(&["-n", &hub, "link", "set", &outer, "master", "br0"])?;
            ip(&["-n", &hub, "link", "set", &outer, "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}.{}/24", net.subnet, i + 2), "dev", &inner])?;
            ip(&["-n", &ns, "link", "set", &inner, "up"])?;
        }
        Ok(net)
    }

    fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn addr(&self, host: u8) -> String {
        format!("{}.{host}", self.subnet)
    }

    /// `cmd` inside namespace `name`.
    fn exec(&self, name: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(name), program]);
        c
    }

    /// Drops everything w1 and w2 send each other: an nftables rule in w1's namespace (as a
    /// bad NIC path or a broken switch port between the two would), nothing else.
    fn partition(&self, on: bool) -> Result<(), String> {
        let w2 = self.addr(3);
        let steps: Vec<Vec<String>> = if on {
            vec![
                vec!["add".into(), "table".into(), "inet".into(), "otter".into()],
                vec!["add".into(), "chain".into(), "inet".into(), "otter".into(), "out".into(), "{ type filter hook output priority 0; }".into()],
                vec!["add".into(), "chain".into(), "inet".into(), "otter".into(), "inp".into(), "{ type filter hook input priority 0; }".into()],
                vec!["add".into(), "rule".into(), "inet".into(), "otter".into(), "out".into(), "ip".into(), "daddr".into(), w2.clone(), "drop".into()],
                vec!["add".into(), "rule".into(), "inet".into(), "otter".into(), "inp".into(), "ip".into(), "saddr".into(), w2, "drop".into()],
            ]
        } else {
            vec![vec!["delete".into(), "table".into(), "inet".into(), "otter".into()]]
        };
        for args in steps {
            let o = self.exec("w1", "nft").args(&args).output().map_err(|e| format!("nft: {e}"))?;
            if !o.status.success() {
                return Err(format!("nft {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim()));
            }
        }
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for n in ["w1", "w2", "hub"] {
            let _ = ip(&["netns", "del", &self.ns(n)]);
        }
    }
}

/// The job's status, asked from inside the hub.
fn hub_status(net: &Net, addr: &str) -> Option<serde_json::Value> {
    let out = net.exec("hub", coord_bin()).args(["status", "--coord", addr]).env("OTTER_JOIN_TOKEN", TOKEN).output().ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

fn wait_hub(net: &Net, addr: &str, what: &str, limit: Duration, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let t = Instant::now();
    loop {
        if let Some(s) = hub_status(net, addr).filter(|s| pred(s)) {
            return s;
        }
        assert!(t.elapsed() < limit, "timed out waiting for {what}: {:?}", hub_status(net, addr).map(|s| s["summary"].clone()));
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn workers_partitioned_from_each_other_are_named_and_one_is_left_out_until_the_link_is_back() {
    let _serial = serial();
    let net = match Net::new() {
        Ok(n) => n,
        Err(e) => {
            println!("SKIPPED: network namespaces are not available here: {e}");
            return;
        }
    };
    let d = tempfile::tempdir().unwrap();
    let data = synth(d.path(), 400);
    let out = d.path().join("out");
    let job = job_yaml(d.path(), &data, &Job { save_every: 1000, max_steps: Some(200), epochs: 8, grad_accum: 1, coord: Some((1, 2)), out: &out });
    edit_yaml(
        &job,
        &[
            ("heartbeat_timeout: 10s", "heartbeat_timeout: 3s\n  exclusion_backoff: 8s"),
            ("comm:\n  timeout: 60s", "comm:\n  timeout: 60s\n  peer_timeout: 3s\n  connect_timeout: 10s"),
            // The two "hosts" share this machine's cores: one compute thread each.
            ("  save_every:", "  cpu_threads: 1\n  save_every:"),
        ],
    );
    // The coordinator, in the hub.
    let state = d.path().join("coord");
    let mut coord = net
        .exec("hub", coord_bin())
        .args(["start", "--config", job.to_str().unwrap(), "--listen", &format!("{}:0", net.addr(1)), "--http-listen", "off"])
        .args(["--state-dir", state.to_str().unwrap()])
        .env("OTTER_JOIN_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(d.path().join("coord.log")).unwrap())
        .spawn()
        .unwrap();
    let mut first = String::new();
    let mut stdout = BufReader::new(coord.stdout.take().unwrap());
    stdout.read_line(&mut first).unwrap();
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let coord = job::Killed(coord);
    let addr = first.split_whitespace().nth(3).unwrap_or_else(|| panic!("coordinator said {first:?}")).to_string();
    // Two workers, each in its own namespace, talking TCP to each other as on two hosts.
    let worker = |name: &str, host: u8| {
        let log = d.path().join(format!("worker-{name}.log"));
        let child = net
            .exec(name, WORKER)
            .args(["join", "--coord", &addr, "--node-id", name, "--cpu-ranks", "1", "--advertise-host", &net.addr(host)])
            .env("OTTER_JOIN_TOKEN", TOKEN)
            .env("OTTER_RING_SHM", "0")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .unwrap();
        Worker { child: job::Killed(child), log }
    };
    let workers = [worker("w1", 2), worker("w2", 3)];
    let before = wait_hub(&net, &addr, "2 ranks training", Duration::from_secs(60), |s| s["summary"]["world"] == 2 && steps_committed(s) >= 5);
    let generation = before["summary"]["generation"].as_u64().unwrap();

    if let Err(e) = net.partition(true) {
        println!("SKIPPED: nftables is not available here: {e}");
        return;
    }
    let cut = Instant::now();
    let after = wait_hub(&net, &addr, "training to go on without one of the pair", Duration::from_secs(60), |s| {
        s["steps"].as_array().is_some_and(|v| v.iter().filter(|x| x["generation"].as_u64() > Some(generation) && x["world"] == 1).count() >= 2)
    });
    let took = cut.elapsed();
    println!("partitioned: steps committed again {:.2} s later (peer timeout 3 s, heartbeat timeout 3 s)", took.as_secs_f64());
    assert!(took < Duration::from_secs(3 + 3 + 5), "took {took:?}\n{}", logs(d.path()));
    let unreachable = event(&after, "PeerUnreachable").unwrap_or_else(|| panic!("no PeerUnreachable event: {}", after["events"]));
    let reason = unreachable["reason"].as_str().unwrap();
    assert!(reason.contains("nodes w1 and w2 cannot reach each other") || reason.contains("nodes w2 and w1 cannot reach each other"), "{reason}");
    let excluded = event(&after, "NodeExcluded").expect("one node left out");
    println!("{}\n{}", reason, excluded["reason"]);
    let out_node = after["summary"]["excluded"][0][0].as_str().unwrap().to_string();
    assert!(out_node == "w1" || out_node == "w2");
    assert!(after["blame"].as_array().is_some_and(|b| !b.is_empty()), "the blame is recorded: {}", after["blame"]);

    // The link comes back; after its back-off the left-out node is admitted again.
    net.partition(false).unwrap();
    wait_hub(&net, &addr, "both nodes training again", Duration::from_secs(60), |s| s["summary"]["world"] == 2 && s["summary"]["excluded"].as_array().is_some_and(Vec::is_empty));
    let mut coord = coord;
    let t = Instant::now();
    while coord.0.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < Duration::from_secs(120), "the job did not finish\n{}", logs(d.path()));
        std::thread::sleep(Duration::from_millis(300));
    }
    let status: serde_json::Value = serde_json::from_slice(&std::fs::read(state.join("status.json")).unwrap()).unwrap();
    assert_exactly_once(&status);
    assert_eq!(status["summary"]["phase"], "Finished", "{}", status["summary"]);
    let log = std::fs::read_to_string(&workers[if out_node == "w1" { 0 } else { 1 }].log).unwrap();
    println!("the left-out node's agent:\n{}", log.lines().filter(|l| !l.starts_with("step")).take(12).collect::<Vec<_>>().join("\n"));
}
