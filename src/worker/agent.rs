//! `otter-worker join`: the per-node agent. Registers the node, keeps a watch stream and
//! heartbeats open to the coordinator, starts one training process per local rank
//! (`otter-worker rank`, which dies with the agent: PR_SET_PDEATHSIG), and supervises
//! them. A rank process that fails takes the node down (the coordinator sees the watch
//! stream close and re-forms the job without it); one that exits with
//! [`EXIT_RESTART_FRESH`] (its state is of no use to the job any more) is started again.
//! A node the coordinator dropped (it was hung or unreachable for a while) registers again
//! when it hears so. When every rank finishes, the node leaves cleanly.

use super::rank::EXIT_RESTART_FRESH;
use crate::coord::client::{connect, connect_from};
use crate::coord::rpc::{pb, refusal_code, with_token};
use anyhow::{bail, Context, Result};
use std::time::Duration;

pub struct JoinArgs {
    pub coord: Vec<String>,
    pub node_id: String,
    pub local_ranks: u32,
    /// `Some(n)`: ranks are GPUs 0..n (CUDA_VISIBLE_DEVICES per process).
    pub gpus: bool,
    pub token: String,
    pub advertise_host: Option<String>,
    /// Serve the node's merged /metrics here (ranks on the following ports).
    pub metrics_port: Option<u16>,
    /// This node's copy of the job's model, when its path differs from `model.dir`.
    pub model_dir: Option<std::path::PathBuf>,
}

/// The job as this node runs it: `model_dir` (this node's copy of the model) replaces the
/// job's `model.dir`, and a tokenizer the job keeps inside its model directory is taken
/// from the same place in `model_dir`.
fn localize(mut job: crate::run_config::RunConfig, job_file: &std::path::Path, model_dir: Option<&std::path::Path>) -> Result<crate::run_config::RunConfig> {
    let Some(local) = model_dir else { return Ok(job) };
    let local = std::path::absolute(local).with_context(|| local.display().to_string())?;
    if let Ok(crate::run_config::ModelSource::Dir(theirs)) = job.model_source(job_file) {
        if let Some(data) = job.data.as_mut() {
            if let Ok(rest) = data.tokenizer.strip_prefix(&theirs) {
                data.tokenizer = local.join(rest);
            }
        }
    }
    job.model.dir = Some(local);
    job.model.preset = None;
    Ok(job)
}

/// Environment every rank process gets unless the operator set the variable (a value that
/// lets c10d end the process is said at start). On an NCCL error or timeout, abort the
/// communicator and let the rank regroup in the same process (`ASYNC_ERROR_HANDLING=2`;
/// PyTorch's default, 3, tears the process down); no heartbeat monitor, which can end the
/// process of a group's first process group when its watchdog is slow to abort
/// (`ENABLE_MONITORING=0`); no dump-and-exit on a watchdog timeout (`DUMP_ON_TIMEOUT=0`);
/// errors are not propagated through the store to every rank (`PROPAGATE_ERROR=0`): the
/// coordinator decides who regroups (issue 43; docs/gpu-checks.md).
pub const RANK_ENV: [(&str, &str); 4] = [
    ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2"),
    ("TORCH_NCCL_ENABLE_MONITORING", "0"),
    ("TORCH_NCCL_DUMP_ON_TIMEOUT", "0"),
    ("TORCH_NCCL_PROPAGATE_ERROR", "0"),
];

/// The CUDA devices of `n` local ranks, as `CUDA_VISIBLE_DEVICES` values: rank i gets the
/// i-th entry of the operator's `visible` list (its own `CUDA_VISIBLE_DEVICES`), else device
/// i. `present`: the devices CUDA reports to this process (under `visible`). Too few is an
/// error naming both counts.
pub fn gpu_devices(n: u32, visible: Option<&str>, present: usize) -> Result<Vec<String>, String> {
    let list: Vec<String> = match visible.map(str::trim) {
        Some(v) => v.split(',').map(|d| d.trim().to_string()).filter(|d| !d.is_empty()).collect(),
        None => (0..present).map(|i| i.to_string()).collect(),
    };
    let usable = list.len().min(present);
    if (n as usize) > usable {
        let seen = match visible {
            Some(v) => format!("CUDA_VISIBLE_DEVICES={v:?} lists {}, and CUDA reports {present}", list.len()),
            None => format!("CUDA reports {present}"),
        };
        return Err(format!("--gpus {n}: this node has {usable} usable GPU(s) ({seen})"));
    }
    Ok(list.into_iter().take(n as usize).collect())
}

/// The local address this machine uses to reach `coord` (what peers can reach us at).
fn route_to(coord: &str) -> Option<String> {
    let hostport = coord.trim_start_matches("http://").trim_start_matches("https://");
    let addr = std::net::ToSocketAddrs::to_socket_addrs(hostport).ok()?.next()?;
    let s = std::net::UdpSocket::bind(if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).ok()?;
    s.connect(addr).ok()?;
    Some(s.local_addr().ok()?.ip().to_string())
}

/// The node's `/metrics`: every rank's page (fetched from 127.0.0.1:PORT+1+i at scrape
/// time) merged into one, so one scrape target covers the node.
async fn serve_node_metrics(port: u16, local_ranks: u32) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await.with_context(|| format!("--metrics-port {port}"))?;
    let render = move || async move {
        let pages = tokio::task::spawn_blocking(move || {
            (0..local_ranks)
                .filter_map(|i| {
                    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], (u32::from(port) + 1 + i) as u16));
                    crate::metrics::fetch_metrics(addr, Duration::from_secs(2)).ok()
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], crate::metrics::merge_exposition(&pages))
    };
    let router = axum::Router::new().route("/metrics", axum::routing::get(render)).route("/healthz", axum::routing::get(|| async { "ok\n" }));
    tokio::spawn(async move {
        if let Err(e) = crate::metrics::serve(listener, router).await {
            eprintln!("metrics server: {e}");
        }
    });
    Ok(())
}

pub async fn join(args: JoinArgs) -> Result<()> {
    let JoinArgs { coord, node_id, local_ranks, gpus, token, advertise_host, metrics_port, model_dir } = args;
    let host = advertise_host.or_else(|| route_to(&coord[0])).unwrap_or_else(|| "127.0.0.1".into());
    let mut client = connect(&coord, Duration::from_secs(60)).await?;
    // The job first: the node's model identity (frozen weights, config, tokenizer) is
    // computed from it and checked by the coordinator at join.
    let spec = client
        .job_spec(with_token(pb::JobSpecRequest {}, &token))
        .await
        .map_err(|s| anyhow::anyhow!("the coordinator refused the job's spec: {}", s.message()))?
        .into_inner();
    let dir = std::env::temp_dir().join(format!("otter-worker-{node_id}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let job_file = dir.join("job.yaml");
    std::fs::write(&job_file, &spec.job_yaml)?;
    let job = localize(crate::run_config::RunConfig::from_file(&job_file)?, &job_file, model_dir.as_deref())?;
    if model_dir.is_some() {
        std::fs::write(&job_file, serde_yaml_ng::to_string(&job)?)?;
    }
    // Every rank of a job trains on the job's device, so a group is all NCCL or all ring;
    // a node that cannot run it says so instead of joining a group it would break.
    if let (Some(d @ crate::train::config::DeviceSpec::Cuda(_)), false) = (job.train.as_ref().map(|t| t.device), gpus) {
        bail!("node {node_id}: the job trains on {d} (train.device) and this node joined with CPU ranks: start it with --gpus N");
    }
    // Each GPU rank gets one of the GPUs the operator made visible (too few is an error now,
    // not a rank failing later).
    let devices = gpus
        .then(|| gpu_devices(local_ranks, std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref(), crate::cuda::device_count()))
        .transpose()
        .map_err(|e| anyhow::anyhow!("node {node_id}: {e}"))?;
    for (k, want) in RANK_ENV {
        if let Ok(v) = std::env::var(k) {
            if v != want {
                eprintln!("node {node_id}: {k}={v} (the operator's; {want} keeps a rank alive through a peer's failure)");
            }
        }
    }
    let t = std::time::Instant::now();
    let (identity, stats) = job.model_identity(&job_file).with_context(|| format!("node {node_id}: the model's identity"))?;
    println!(
        "node {node_id}: model identity {} ({} MB read in {:.2} s, {} files from the cache{})",
        &identity.digest[..16],
        stats.bytes_read >> 20,
        t.elapsed().as_secs_f64(),
        stats.files_from_cache,
        stats.cache.as_ref().map_or(String::new(), |c| format!(" {}", c.display()))
    );
    let join_req = pb::JoinRequest { node_id: node_id.clone(), local_ranks, identity: Some(crate::coord::rpc::identity_to_pb(&identity)) };
    let reply = client
        .join(with_token(join_req.clone(), &token))
        .await
        .map_err(|s| anyhow::anyhow!("node {node_id}: join refused by the coordinator: {}", s.message()))?
        .into_inner();
    println!("node {node_id}: joined (generation {}), starting {local_ranks} rank process(es)", reply.generation);
    let interval = Duration::from_millis(reply.heartbeat_interval_ms.max(100));

    // Watch stream: held open for the node's lifetime (its closing tells the coordinator
    // this node is gone); reopened if the coordinator restarts.
    let (phase_tx, mut phase_rx) = tokio::sync::watch::channel(String::new());
    let watcher = {
        let (coord, node_id, token) = (coord.clone(), node_id.clone(), token.clone());
        tokio::spawn(async move {
            let mut last = String::new();
            loop {
                if let Ok(mut c) = connect(&coord, Duration::from_secs(5)).await {
                    if let Ok(stream) = c.watch(with_token(pb::WatchRequest { node_id: node_id.clone(), observer: false }, &token)).await {
                        let mut stream = stream.into_inner();
                        while let Ok(Some(u)) = stream.message().await {
                            phase_tx.send_replace(u.phase.clone());
                            let line = format!("generation {} {}", u.generation, u.phase);
                            if line != last {
                                println!("node {node_id}: job {line}{}", if u.message.is_empty() { String::new() } else { format!(": {}", u.message) });
                                last = line;
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    // Set when the coordinator refuses this node's model after it dropped the node (it
    // fixed another identity meanwhile): the node leaves.
    let (refused_tx, mut refused_rx) = tokio::sync::watch::channel(String::new());
    let heart = {
        let (coord, node_id, token, join_req) = (coord.clone(), node_id.clone(), token.clone(), join_req.clone());
        tokio::spawn(async move {
            let mut generation = 0;
            let mut client = None;
            // After a failure, the next replica is tried first (HA: the standby takes over).
            let mut next = 0;
            loop {
                tokio::time::sleep(interval).await;
                if client.is_none() {
                    client = connect_from(&coord, next, Duration::from_secs(1)).await.ok();
                }
                if let Some(c) = client.as_mut() {
                    match c.heartbeat(with_token(pb::HeartbeatRequest { node_id: node_id.clone(), generation }, &token)).await {
                        Ok(r) => generation = r.into_inner().update.map_or(generation, |u| u.generation),
                        Err(s) if refusal_code(&s) == Some("model-mismatch") => {
                            eprintln!("node {node_id}: {}", s.message());
                            let _ = refused_tx.send(s.message().to_string());
                        }
                        Err(s) if refusal_code(&s) == Some("unknown-node") => {
                            // Dropped while it was away (hung, or cut off for longer than
                            // the heartbeat timeout): register again. Its rank processes
                            // find their state unusable and restart fresh.
                            println!("node {node_id}: the coordinator dropped this node ({}); joining again", s.message());
                            match c.join(with_token(join_req.clone(), &token)).await {
                                Ok(r) => println!("node {node_id}: joined again (generation {})", r.into_inner().generation),
                                Err(s) if refusal_code(&s) == Some("model-mismatch") => {
                                    // Refused for good: the ranks' next calls are refused too,
                                    // and the node leaves.
                                    eprintln!("node {node_id}: joining again refused: {}", s.message());
                                    let _ = refused_tx.send(s.message().to_string());
                                }
                                Err(s) => eprintln!("node {node_id}: joining again refused: {}", s.message()),
                            }
                        }
                        Err(_) => {
                            next = c.index() + 1;
                            client = None;
                        }
                    }
                }
            }
        })
    };

    if let Some(port) = metrics_port {
        serve_node_metrics(port, local_ranks).await?;
    }
    let exe = std::env::current_exe()?;
    let spawn_rank = |i: u32| -> Result<tokio::process::Child> {
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args(["rank", "--coord", &coord.join(","), "--node-id", &node_id, "--local-rank", &i.to_string()])
            .arg("--job-file")
            .arg(&job_file)
            .args(["--advertise-host", &host])
            .args(metrics_port.map(|p| format!("--metrics-addr=0.0.0.0:{}", u32::from(p) + 1 + i)))
            .env("OTTER_JOIN_TOKEN", &token)
            .env("OTTER_LOCAL_RANKS", local_ranks.to_string())
            .kill_on_drop(true);
        if let Some(devices) = &devices {
            cmd.env("CUDA_VISIBLE_DEVICES", &devices[i as usize]);
        }
        for (k, v) in RANK_ENV {
            if std::env::var_os(k).is_none() {
                cmd.env(k, v);
            }
        }
        // SAFETY: prctl in the child between fork and exec only sets a process attribute.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        cmd.spawn().with_context(|| format!("starting rank process {i}"))
    };
    // Supervise: a rank process asking to restart fresh is started again; the first one
    // failing otherwise takes the node down (aborting the other wait tasks drops their
    // children, which kills them: kill_on_drop).
    let mut waits = tokio::task::JoinSet::new();
    for i in 0..local_ranks {
        let mut c = spawn_rank(i)?;
        waits.spawn(async move { (i, c.wait().await) });
    }
    let mut failed = None;
    loop {
        let done = tokio::select! {
            d = waits.join_next() => match d {
                Some(d) => d,
                None => break,
            },
            Ok(()) = refused_rx.changed() => {
                failed = Some(format!("refused by the coordinator: {}", *refused_rx.borrow()));
                waits.abort_all();
                break;
            }
        };
        match done {
            Ok((i, Ok(s))) if s.code() == Some(EXIT_RESTART_FRESH) => {
                println!("node {node_id}: rank process {i} restarts fresh");
                match spawn_rank(i) {
                    Ok(mut c) => drop(waits.spawn(async move { (i, c.wait().await) })),
                    Err(e) => failed = Some(format!("{e:#}")),
                }
            }
            Ok((_, Ok(s))) if s.success() => {}
            Ok((i, Ok(s))) => failed = Some(format!("rank process {i} exited with {s}")),
            Ok((i, Err(e))) => failed = Some(format!("rank process {i}: {e}")),
            Err(e) => failed = Some(format!("supervisor task: {e}")),
        }
        if failed.is_some() {
            waits.abort_all();
            break;
        }
    }
    if failed.is_none() {
        // Our ranks are done; the others may still be reporting the last step. Closing the
        // watch stream now would look like a lost node: stay until the job is over.
        let over = phase_rx.wait_for(|p| p == "finished" || p == "failed");
        if tokio::time::timeout(Duration::from_secs(60), over).await.is_err() {
            eprintln!("node {node_id}: ranks finished but the job did not end within 60 s; leaving");
        }
    }
    watcher.abort();
    heart.abort();
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(f) = failed {
        bail!("node {node_id}: {f}; leaving the job (the coordinator re-forms it without this node)");
    }
    println!("node {node_id}: all ranks finished");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::gpu_devices;

    #[test]
    fn local_gpu_ranks_map_onto_the_operators_visible_devices_and_too_few_is_an_error() {
        let ok = |n, v: Option<&str>, present| gpu_devices(n, v, present).unwrap();
        assert_eq!(ok(2, None, 4), ["0", "1"]);
        assert_eq!(ok(2, Some("2,5"), 2), ["2", "5"], "the operator's list, not 0 and 1");
        assert_eq!(ok(1, Some(" 3 , 1"), 2), ["3"]);
        assert_eq!(ok(2, Some("GPU-8f2c,GPU-77aa"), 2), ["GPU-8f2c", "GPU-77aa"], "UUIDs pass through");
        let e = gpu_devices(3, Some("2,5"), 2).unwrap_err();
        assert_eq!(e, "--gpus 3: this node has 2 usable GPU(s) (CUDA_VISIBLE_DEVICES=\"2,5\" lists 2, and CUDA reports 2)");
        let e = gpu_devices(1, None, 0).unwrap_err();
        assert_eq!(e, "--gpus 1: this node has 0 usable GPU(s) (CUDA reports 0)");
        assert!(gpu_devices(2, Some("0,1,2"), 1).is_err(), "listed but not reported (a wrong list)");
    }
}
