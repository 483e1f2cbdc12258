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
    let JoinArgs { coord, node_id, local_ranks, gpus, token, advertise_host, metrics_port } = args;
    let host = advertise_host.or_else(|| route_to(&coord[0])).unwrap_or_else(|| "127.0.0.1".into());
    let mut client = connect(&coord, Duration::from_secs(60)).await?;
    let reply = client
        .join(with_token(pb::JoinRequest { node_id: node_id.clone(), local_ranks }, &token))
        .await
        .map_err(|s| anyhow::anyhow!("join refused by the coordinator: {}", s.message()))?
        .into_inner();
    println!("node {node_id}: joined (generation {}), starting {local_ranks} rank process(es)", reply.generation);
    let dir = std::env::temp_dir().join(format!("otter-worker-{node_id}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let job_file = dir.join("job.yaml");
    std::fs::write(&job_file, &reply.job_yaml)?;
    // Every rank of a job trains on the job's device, so a group is all NCCL or all ring;
    // a node that cannot run it says so instead of joining a group it would break.
    let device = crate::run_config::RunConfig::from_file(&job_file)?.train.map(|t| t.device);
    if let (Some(d @ crate::train::config::DeviceSpec::Cuda(_)), false) = (device, gpus) {
        bail!("node {node_id}: the job trains on {d} (train.device) and this node joined with CPU ranks: start it with --gpus N");
    }
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
    let heart = {
        let (coord, node_id, token) = (coord.clone(), node_id.clone(), token.clone());
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
                        Err(s) if refusal_code(&s) == Some("unknown-node") => {
                            // Dropped while it was away (hung, or cut off for longer than
                            // the heartbeat timeout): register again. Its rank processes
                            // find their state unusable and restart fresh.
                            println!("node {node_id}: the coordinator dropped this node ({}); joining again", s.message());
                            match c.join(with_token(pb::JoinRequest { node_id: node_id.clone(), local_ranks }, &token)).await {
                                Ok(r) => println!("node {node_id}: joined again (generation {})", r.into_inner().generation),
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
        if gpus {
            cmd.env("CUDA_VISIBLE_DEVICES", i.to_string());
            // On an NCCL error or timeout, abort the communicator and let the rank regroup
            // in the same process (PyTorch's default, 3, tears the process down).
            if std::env::var_os("TORCH_NCCL_ASYNC_ERROR_HANDLING").is_none() {
                cmd.env("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2");
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
    while let Some(done) = waits.join_next().await {
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

