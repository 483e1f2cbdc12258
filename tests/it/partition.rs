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

use crate::common;

use common::cluster::*;
use common::coord_bin;
use common::job;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The test's namespaces and addresses; torn down on drop: a "hub" namespace holding a
/// bridge (address .1) and, for each host, a namespace of its own joined to the bridge by a
/// veth pair (addresses .2, .3, ... in order).
struct Net {
    prefix: String,
    subnet: String,
    hosts: Vec<String>,
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
    fn new(hosts: &[&str]) -> Result<Self, String> {
        let id = std::process::id();
        let net = Net {
            prefix: format!("otp{id}"),
            subnet: format!("10.{}.{}", 200 + (id / 250) % 50, id % 250),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
        };
        let hub = net.ns("hub");
        ip(&["netns", "add", &hub])?;
        ip(&["-n", &hub, "link", "set", "lo", "up"])?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "addr", "add", &format!("{}.1/24", net.subnet), "dev", "br0"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        for w in hosts {
            let ns = net.ns(w);
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            let (inner, outer) = (format!("{}{w}", net.prefix), format!("{}{w}h", net.prefix));
            ip(&["link", "add", &inner, "type", "veth", "peer", "name", &outer])?;
            ip(&["link", "set", &inner, "netns", &ns])?;
            ip(&["link", "set", &outer, "netns", &hub])?;
            ip(&["-n", &hub, "link", "set", &outer, "master", "br0"])?;
            ip(&["-n", &hub, "link", "set", &outer, "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", net.addr(w)), "dev", &inner])?;
            ip(&["-n", &ns, "link", "set", &inner, "up"])?;
        }
        Ok(net)
    }

    /// [`Net::new`], or `None` after printing why the test is skipped (the kernel or the
    /// sandbox forbids network namespaces).
    fn or_skip(test: &str, hosts: &[&str]) -> Option<Self> {
        Self::new(hosts).map_err(|e| common::cannot_run(test, &format!("network namespaces are not available: {e}"))).ok()
    }

    fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The address of `host` ("hub": the bridge's).
    fn addr(&self, host: &str) -> String {
        match self.hosts.iter().position(|h| h == host) {
            Some(i) => format!("{}.{}", self.subnet, i + 2),
            None => format!("{}.1", self.subnet),
        }
    }

    /// `cmd` inside namespace `name`.
    fn exec(&self, name: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(name), program]);
        c
    }

    /// An nftables table `otter` in `host`'s namespace whose output and input chains drop
    /// what `rules` match (chain, match); `None` deletes the table.
    fn nft(&self, host: &str, rules: Option<&[(&str, String)]>) -> Result<(), String> {
        let words = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let steps: Vec<Vec<String>> = match rules {
            Some(rules) => {
                let mut v = vec![
                    words("add table inet otter"),
                    [words("add chain inet otter out"), vec!["{ type filter hook output priority 0; }".into()]].concat(),
                    [words("add chain inet otter inp"), vec!["{ type filter hook input priority 0; }".into()]].concat(),
                ];
                v.extend(rules.iter().map(|(chain, m)| [words(&format!("add rule inet otter {chain} {m}")), vec!["drop".into()]].concat()));
                v
            }
            None => vec![words("delete table inet otter")],
        };
        for args in steps {
            let o = self.exec(host, "nft").args(&args).output().map_err(|e| format!("nft: {e}"))?;
            if !o.status.success() {
                return Err(format!("nft {}: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim()));
            }
        }
        Ok(())
    }

    /// Drops everything `a` and `b` send each other (a rule in `a`'s namespace, as a bad
    /// NIC path or a broken switch port between the two would), nothing else.
    fn cut_between(&self, a: &str, b: &str, on: bool) -> Result<(), String> {
        let b = self.addr(b);
        self.nft(a, on.then(|| [("out", format!("ip daddr {b}")), ("inp", format!("ip saddr {b}"))]).as_ref().map(|r| &r[..]))
    }

    /// Drops everything `host` sends or receives but on its loopback: a node whose link
    /// went silent (a pulled cable, a dead switch port): nothing refused, nothing reset.
    fn isolate(&self, host: &str, on: bool) -> Result<(), String> {
        self.nft(host, on.then(|| [("out", "oifname != lo".to_string()), ("inp", "iifname != lo".to_string())]).as_ref().map(|r| &r[..]))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for n in self.hosts.iter().map(String::as_str).chain(["hub"]) {
            let _ = ip(&["netns", "del", &self.ns(n)]);
        }
    }
}

/// `otter-coord start` inside the hub (listening on the bridge's address, HTTP on `http`
/// port of it if given); returns the process (killed on drop) and its gRPC address.
fn hub_coord(net: &Net, job: &std::path::Path, state: &std::path::Path, http: Option<u16>, dir: &std::path::Path) -> (job::Killed, String) {
    let http = http.map_or("off".to_string(), |p| format!("{}:{p}", net.addr("hub")));
    let mut coord = net
        .exec("hub", coord_bin())
        .args(["start", "--config", job.to_str().unwrap(), "--listen", &format!("{}:0", net.addr("hub")), "--http-listen", &http])
        .args(["--state-dir", state.to_str().unwrap()])
        .env("OTTER_JOIN_TOKEN", TOKEN)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("coord.log")).unwrap())
        .spawn()
        .unwrap();
    let mut first = String::new();
    let mut stdout = BufReader::new(coord.stdout.take().unwrap());
    stdout.read_line(&mut first).unwrap();
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let addr = first.split_whitespace().nth(3).unwrap_or_else(|| panic!("coordinator said {first:?}")).to_string();
    (job::Killed(coord), addr)
}

/// `otter-worker join` with one CPU rank inside `host`'s namespace (TCP between ranks, as
/// across hosts: no shared memory).
fn ns_worker(net: &Net, host: &str, coord: &str, dir: &std::path::Path) -> Worker {
    let log = dir.join(format!("worker-{host}.log"));
    let child = net
        .exec(host, WORKER)
        .args(["join", "--coord", coord, "--node-id", host, "--cpu-ranks", "1", "--advertise-host", &net.addr(host)])
        .env("OTTER_JOIN_TOKEN", TOKEN)
        .env("OTTER_RING_SHM", "0")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(log.with_extension("err")).unwrap())
        .spawn()
        .unwrap();
    Worker { child: job::Killed(child), log }
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
    let Some(net) = Net::or_skip("workers_partitioned_from_each_other_are_named_and_one_is_left_out_until_the_link_is_back", &["w1", "w2"]) else { return };
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
    // The coordinator, in the hub; two workers, each in its own namespace, talking TCP to
    // each other as on two hosts.
    let state = d.path().join("coord");
    let (coord, addr) = hub_coord(&net, &job, &state, None, d.path());
    let workers = [ns_worker(&net, "w1", &addr, d.path()), ns_worker(&net, "w2", &addr, d.path())];
    let before = wait_hub(&net, &addr, "2 ranks training", Duration::from_secs(60), |s| s["summary"]["world"] == 2 && steps_committed(s) >= 5);
    let generation = before["summary"]["generation"].as_u64().unwrap();

    if let Err(e) = net.cut_between("w1", "w2", true) {
        common::cannot_run("workers_partitioned_from_each_other_are_named_and_one_is_left_out_until_the_link_is_back", &format!("nftables is not available: {e}"));
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
    net.cut_between("w1", "w2", false).unwrap();
    wait_hub(&net, &addr, "both nodes training again", Duration::from_secs(60), |s| s["summary"]["world"] == 2 && s["summary"]["excluded"].as_array().is_some_and(Vec::is_empty));
    finished(coord, &state, d.path(), Duration::from_secs(120));
    let log = std::fs::read_to_string(&workers[if out_node == "w1" { 0 } else { 1 }].log).unwrap();
    println!("the left-out node's agent:\n{}", log.lines().filter(|l| !l.starts_with("step")).take(12).collect::<Vec<_>>().join("\n"));
}

/// Waits for the coordinator (inside the hub) to exit; its final status.
fn finished(mut coord: job::Killed, state: &std::path::Path, dir: &std::path::Path, limit: Duration) -> serde_json::Value {
    let t = Instant::now();
    while coord.0.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < limit, "the job did not finish\n{}", logs(dir));
        std::thread::sleep(Duration::from_millis(300));
    }
    let status: serde_json::Value = serde_json::from_slice(&std::fs::read(state.join("status.json")).unwrap()).unwrap();
    assert_exactly_once(&status);
    assert_eq!(status["summary"]["phase"], "Finished", "{}", status["summary"]);
    status
}

/// (step, generation, world) of every committed step in a status.
fn step_generations(s: &serde_json::Value) -> Vec<(u64, u64, u64)> {
    s["steps"].as_array().map_or(vec![], |v| v.iter().map(|x| (x["step"].as_u64().unwrap(), x["generation"].as_u64().unwrap(), x["world"].as_u64().unwrap())).collect())
}

/// A worker whose link goes silent in the middle of a step: every packet it sends or
/// receives is dropped, the coordinator's included. What must hold: the survivors train
/// on in a new generation once `heartbeat_timeout` has passed; when the link is back, the
/// cut-off node's calls for its old generation are refused (counted in
/// `otter_coord_refusals_total`), nothing of that generation is
/// committed after the new one began (no step, no checkpoint: every committed
/// checkpoint's manifest names the generation and world of the step it holds), the node
/// rejoins in a newer generation, and the exactly-once check holds.
#[test]
fn a_worker_cut_off_from_everyone_is_refused_as_stale_when_it_returns_and_rejoins_in_a_new_generation() {
    let _serial = serial();
    let Some(net) = Net::or_skip("a_worker_cut_off_from_everyone_is_refused_as_stale_when_it_returns_and_rejoins_in_a_new_generation", &["w1", "w2", "w3"]) else { return };
    let d = tempfile::tempdir().unwrap();
    let data = synth(d.path(), 400);
    let out = d.path().join("out");
    let job = job_yaml(d.path(), &data, &Job { save_every: 20, max_steps: Some(160), epochs: 8, grad_accum: 1, coord: Some((2, 3)), out: &out });
    edit_yaml(
        &job,
        &[
            ("heartbeat_timeout: 10s", "heartbeat_timeout: 3s"),
            ("comm:\n  timeout: 60s", "comm:\n  timeout: 60s\n  peer_timeout: 3s\n  connect_timeout: 10s"),
            ("  save_every:", "  cpu_threads: 1\n  keep_last: 10\n  save_every:"),
        ],
    );
    let state = d.path().join("coord");
    const HTTP: u16 = 9464; // inside the hub's own namespace
    let (coord, addr) = hub_coord(&net, &job, &state, Some(HTTP), d.path());
    let _workers: Vec<Worker> = ["w1", "w2", "w3"].iter().map(|w| ns_worker(&net, w, &addr, d.path())).collect();
    let before = wait_hub(&net, &addr, "3 ranks training", Duration::from_secs(90), |s| s["summary"]["world"] == 3 && steps_committed(s) >= 5);
    let generation = before["summary"]["generation"].as_u64().unwrap();

    if let Err(e) = net.isolate("w3", true) {
        common::cannot_run("a_worker_cut_off_from_everyone_is_refused_as_stale_when_it_returns_and_rejoins_in_a_new_generation", &format!("nftables is not available: {e}"));
        return;
    }
    let cut = Instant::now();
    let after = wait_hub(&net, &addr, "the two others to train on", Duration::from_secs(60), |s| {
        step_generations(s).iter().filter(|&&(_, g, w)| g > generation && w == 2).count() >= 2
    });
    let took = cut.elapsed();
    println!("w3 cut off: the others committed steps again {:.2} s later (heartbeat timeout 3 s, peer timeout 3 s)", took.as_secs_f64());
    assert!(took < Duration::from_secs(3 + 3 + 5), "took {took:?}\n{}", logs(d.path()));
    assert!(!after["members"].to_string().contains("\"w3\""), "w3 is no member of the new generation: {}", after["members"]);
    let survivors_generation = after["summary"]["generation"].as_u64().unwrap();
    // It stays cut off a while (its rank still waits in its old generation's collective).
    std::thread::sleep(Duration::from_secs(2));

    net.isolate("w3", false).unwrap();
    let healed = Instant::now();
    wait_hub(&net, &addr, "w3 back in a newer generation", Duration::from_secs(90), |s| {
        step_generations(s).iter().any(|&(_, g, w)| g > survivors_generation && w == 3)
    });
    println!("link back: w3 trains again {:.2} s later", healed.elapsed().as_secs_f64());
    let metrics = net.exec("hub", "curl").args(["-sf", &format!("http://{}:{HTTP}/metrics", net.addr("hub"))]).output().unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout).to_string();
    // Its agent's first call after the cut names generation 1 and a node the coordinator
    // dropped: refused (unknown node; a rank's call for generation 1 would be a stale
    // generation), and it joins again.
    let refused = |code: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("otter_coord_refusals_total{{code=\"{code}\"}} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let (stale, unknown) = (refused("stale-generation"), refused("unknown-node"));
    println!("calls refused: {stale} as a stale generation, {unknown} from a dropped node");
    assert!(stale + unknown >= 1.0, "the cut-off node's calls for its old generation were never refused:\n{metrics}\n{}", logs(d.path()));
    let agent = std::fs::read_to_string(d.path().join("worker-w3.log")).unwrap();
    assert!(agent.contains("joining again"), "{agent}");

    let status = finished(coord, &state, d.path(), Duration::from_secs(180));
    let steps = step_generations(&status);
    assert_eq!(steps.len(), 160);
    assert!(steps.windows(2).all(|w| w[0].1 <= w[1].1), "a step of an older generation committed after a newer one: {steps:?}");
    let generations: std::collections::BTreeSet<u64> = steps.iter().map(|s| s.1).collect();
    assert!(generations.len() >= 3, "before the cut, without w3, with w3 back: {generations:?}");
    // Every committed checkpoint was written by the generation (and world) that ran its
    // last step: no shard of a stale generation made it into one.
    let ckpts = ckpt_steps(&out);
    assert!(ckpts.len() >= 5, "{ckpts:?}");
    for n in ckpts {
        let m: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join(format!("checkpoints/step-{n}/manifest.json"))).unwrap()).unwrap();
        let (_, g, w) = steps[n as usize - 1];
        assert_eq!((m["generation"].as_u64(), m["world_size"].as_u64()), (Some(g), Some(w)), "checkpoint step-{n}");
        assert_eq!(m["shards"].as_array().map(Vec::len), Some(w as usize), "checkpoint step-{n}: one shard per rank");
    }
}

/// HA mode with the active coordinator cut off from etcd (and nothing else): its lease
/// can no longer be renewed, so it must stop acting as leader before etcd can have expired
/// the lease (one TTL after its last renewal), the standby is elected and takes the job
/// over, the workers follow it, and the exactly-once check holds at the end.
#[test]
fn a_coordinator_cut_off_from_etcd_stops_acting_and_the_standby_takes_over() {
    let _serial = serial();
    let Some(net) = Net::or_skip("a_coordinator_cut_off_from_etcd_stops_acting_and_the_standby_takes_over", &["etcd", "ca", "cb", "w1", "w2"]) else { return };
    let d = tempfile::tempdir().unwrap();
    let data = synth(d.path(), 400);
    let out = d.path().join("out");
    let job = job_yaml(d.path(), &data, &Job { save_every: 1000, max_steps: Some(150), epochs: 8, grad_accum: 1, coord: Some((2, 2)), out: &out });
    edit_yaml(&job, &[("heartbeat_timeout: 10s", "heartbeat_timeout: 3s"), ("  save_every:", "  cpu_threads: 1\n  save_every:")]);
    let etcd_url = format!("http://{}:2379", net.addr("etcd"));
    let _etcd = job::Killed(
        net.exec("etcd", "etcd")
            .args(["--data-dir", d.path().join("etcd").to_str().unwrap(), "--listen-client-urls", &etcd_url, "--advertise-client-urls", &etcd_url])
            .args(["--listen-peer-urls", &format!("http://{}:2380", net.addr("etcd")), "--initial-advertise-peer-urls", &format!("http://{}:2380", net.addr("etcd"))])
            .args(["--initial-cluster", &format!("default=http://{}:2380", net.addr("etcd"))])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.path().join("etcd.log")).unwrap())
            .spawn()
            .expect("etcd-server (scripts/setup.sh installs it)"),
    );
    let t = Instant::now();
    while !net.exec("hub", "etcdctl").env("ETCDCTL_API", "3").args(["--endpoints", &etcd_url, "endpoint", "health"]).output().is_ok_and(|o| o.status.success()) {
        assert!(t.elapsed() < Duration::from_secs(20), "etcd did not start\n{}", logs(d.path()));
        std::thread::sleep(Duration::from_millis(200));
    }
    let coordinator = |host: &str| {
        let addr = format!("{}:7000", net.addr(host));
        let child = net
            .exec(host, coord_bin())
            .args(["start", "--config", job.to_str().unwrap(), "--listen", &addr, "--etcd", &etcd_url, "--http-listen", "off"])
            .env("OTTER_JOIN_TOKEN", TOKEN)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.path().join(format!("coord-{host}.log"))).unwrap())
            .spawn()
            .unwrap();
        (job::Killed(child), addr)
    };
    let (mut a, addr_a) = coordinator("ca");
    let t = Instant::now();
    while hub_status(&net, &addr_a).is_none() {
        assert!(t.elapsed() < Duration::from_secs(30), "coordinator a was not elected: {:?}\n{}", a.0.try_wait(), logs(d.path()));
        std::thread::sleep(Duration::from_millis(200));
    }
    let (mut b, addr_b) = coordinator("cb");
    let both = format!("{addr_a},{addr_b}");
    let _workers = [ns_worker(&net, "w1", &both, d.path()), ns_worker(&net, "w2", &both, d.path())];
    wait_hub(&net, &addr_a, "2 ranks training", Duration::from_secs(90), |s| s["summary"]["world"] == 2 && steps_committed(s) >= 5);
    assert!(hub_status(&net, &addr_b).is_none(), "the standby does not serve");

    if let Err(e) = net.cut_between("ca", "etcd", true) {
        common::cannot_run("a_coordinator_cut_off_from_etcd_stops_acting_and_the_standby_takes_over", &format!("nftables is not available: {e}"));
        return;
    }
    let cut = Instant::now();
    let code = loop {
        if let Some(c) = a.0.try_wait().unwrap() {
            break c;
        }
        assert!(cut.elapsed() < Duration::from_secs(15), "a still runs 15 s after losing etcd\n{}", logs(d.path()));
        std::thread::sleep(Duration::from_millis(50));
    };
    let stopped = cut.elapsed();
    let log_a = std::fs::read_to_string(d.path().join("coord-ca.log")).unwrap();
    println!("cut from etcd: a stopped {:.2} s later (lease TTL 3 s), exit {code}", stopped.as_secs_f64());
    // Its last renewal was at most a renewal interval (1 s) before the cut, so its lease
    // could live at most 3 s past the cut: it must have stopped by then (+ polling slack).
    assert!(stopped < Duration::from_secs(3) + Duration::from_millis(500), "stopped {stopped:?} after the cut\n{log_a}");
    assert!(log_a.contains("stops acting as leader"), "{log_a}");
    assert_eq!(code.code(), Some(3), "deposed: {log_a}");
    let s = wait_hub(&net, &addr_b, "b to take over and the job to go on", Duration::from_secs(60), |s| steps_committed(s) >= 10 && s["summary"]["world"] == 2);
    println!("b took over and serves; {} steps committed {:.2} s after the cut", steps_committed(&s), cut.elapsed().as_secs_f64());
    let t = Instant::now();
    while b.0.try_wait().unwrap().is_none() {
        assert!(t.elapsed() < Duration::from_secs(180), "the job did not finish on b\n{}", logs(d.path()));
        std::thread::sleep(Duration::from_millis(300));
    }
    let status: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("coord/status.json")).unwrap()).unwrap();
    assert_exactly_once(&status);
    assert_eq!((status["summary"]["phase"].as_str(), steps_committed(&status)), (Some("Finished"), 150));
}
