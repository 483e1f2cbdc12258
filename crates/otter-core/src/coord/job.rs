//! `otter-coord start`: load and validate the job YAML, size the data, open the state
//! store, serve until the job is over.

use super::machine::{Machine, Phase};
use super::server::Coordinator;
use super::store::{FileStore, StateStore};
use crate::run_config::RunConfig;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct StartArgs {
    pub config: PathBuf,
    pub listen: String,
    pub state_dir: Option<PathBuf>,
    pub etcd: Option<Vec<String>>,
    pub token: Option<String>,
    /// `/metrics`, `/status`, `/status.json`, `/healthz`; `None`: not served.
    pub http_listen: Option<String>,
    /// Parts of the model the operator allows to differ from the job's recorded identity.
    pub accept_model_change: Vec<crate::model::identity::Part>,
}

/// The job's join token: given (flag/env), else the one saved in the state dir, else a new
/// random one saved there (0600) for workers started on this machine.
pub fn resolve_token(given: Option<String>, state_dir: &Path) -> Result<String> {
    if let Some(t) = given.filter(|t| !t.is_empty()) {
        return Ok(t);
    }
    let path = state_dir.join("join-token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        return Ok(t.trim().to_string());
    }
    let mut seed = [0u8; 16];
    std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed)).context("reading /dev/urandom")?;
    let token: String = seed.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::create_dir_all(state_dir)?;
    std::fs::write(&path, &token).with_context(|| path.display().to_string())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    eprintln!("otter-coord: generated a join token in {}", path.display());
    Ok(token)
}

/// Loads the job: the validated config, its shippable YAML text, and a fresh machine.
pub fn load_job(config: &Path) -> Result<(RunConfig, String, Machine, Duration)> {
    let cfg = RunConfig::from_file(config)?;
    let origin = config.display();
    let coord = cfg.coord.as_ref().with_context(|| format!("{origin}: field `coord`: a distributed job needs a `coord:` section"))?;
    let train = cfg.train.as_ref().with_context(|| format!("{origin}: field `train`: missing"))?;
    let data = cfg.data.as_ref().with_context(|| format!("{origin}: field `data`: missing"))?;
    if let crate::train::config::DeviceSpec::Cuda(n @ 1..) = train.device {
        anyhow::bail!(
            "{origin}: field `train.device`: cuda:{n}: in a distributed job each rank sees the one GPU its agent gives it \
             (CUDA_VISIBLE_DEVICES): write `cuda`"
        );
    }
    // The data's size, from its instructions and train-config files alone: the coordinator
    // needs neither the images nor the model mounted.
    let epoch_batches = crate::data::epoch_batches(data, train.epochs).with_context(|| format!("{origin}: reading the data's metadata"))?;
    let machine = Machine::new(coord.machine_config(train, data.batch_size as u64), epoch_batches).map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
    let yaml = serde_yaml_ng::to_string(&cfg)?;
    Ok((cfg.clone(), yaml, machine, coord.heartbeat_interval))
}

/// The fresh machine, restored from the newest committed checkpoint of a distributed run
/// in `ckpt_dir` if there is one (used only when the state store is empty: a store that
/// holds the job wins). A checkpoint of a single-process run is not a job's state.
fn restore_from_checkpoints(mut machine: Machine, ckpt_dir: &Path) -> Result<Machine> {
    let Some(steps) = crate::ckpt::latest_committed(ckpt_dir) else { return Ok(machine) };
    let dir = crate::ckpt::step_dir(ckpt_dir, steps);
    let m = crate::ckpt::read_manifest(&dir)?;
    let manifest = dir.join(crate::ckpt::MANIFEST);
    let Some(ledger) = m.data.get("ledger") else {
        eprintln!("otter-coord: {} is not a distributed job's checkpoint (no ledger); starting fresh", manifest.display());
        return Ok(machine);
    };
    let ledger: super::ledger::Ledger =
        serde_json::from_value(ledger.clone()).with_context(|| format!("{}: field `data.ledger`", manifest.display()))?;
    machine
        .restore_from_checkpoint(super::server::wall_now(), ledger, steps, &crate::ckpt::committed_steps(ckpt_dir), m.identity.clone())
        .map_err(|e| anyhow::anyhow!("{}: {e}", manifest.display()))?;
    eprintln!("otter-coord: job state from checkpoint {} ({steps} steps), unless the state store holds a newer one", dir.display());
    Ok(machine)
}

/// Another coordinator replica took over (its save was fenced off): this one stopped
/// serving without acting further. `otter-coord` exits with status 3.
#[derive(Debug, thiserror::Error)]
#[error("lost leadership: another coordinator is active ({0})")]
pub struct Deposed(pub String);

/// A line on stdout; a closed stdout (the launcher went away) must not stop the job.
fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|_| out.flush());
}

pub async fn start(args: StartArgs) -> Result<bool> {
    let (cfg, yaml, machine, hb) = load_job(&args.config)?;
    let train = cfg.train.as_ref().expect("validated");
    let state_dir = args.state_dir.clone().unwrap_or_else(|| train.out_dir.join("coord"));
    let token = resolve_token(args.token.clone(), &state_dir)?;
    let store: Box<dyn StateStore> = match &args.etcd {
        Some(urls) => Box::new(super::etcd::EtcdStore::connect(urls, "otter").await?),
        None => Box::new(FileStore::open(&state_dir)?),
    };
    let where_ = store.describe();
    let ckpt_dir = train.out_dir.join("checkpoints");
    let machine = restore_from_checkpoints(machine, &ckpt_dir)?;
    let coord = Coordinator::open(machine, store, yaml, hb).await?;
    if !args.accept_model_change.is_empty() {
        coord.accept_model_change(&args.accept_model_change).await?;
    }
    coord.set_checkpoints(super::server::CheckpointSink {
        dir: ckpt_dir,
        keep_last: train.keep_last,
        warmup_ratio: train.warmup_ratio,
        template: crate::ckpt::Manifest {
            format_version: crate::ckpt::FORMAT_VERSION,
            step: 0,
            epoch: 0,
            world_size: 0,
            partition: Vec::new(),
            shards: Vec::new(),
            lr: train.lr,
            warmup_steps: 0,
            total_steps: 0,
            model_seed: train.seed,
            data_seed: cfg.data.as_ref().map_or(0, |d| d.seed),
            data: serde_json::Value::Null,
            config: serde_json::to_value(&cfg)?,
            frozen: Vec::new(),
            identity: None,
            generation: None,
        },
        history: Some(state_dir.join("history.jsonl")),
    });
    let addr = tokio::net::lookup_host(&args.listen).await.ok().and_then(|mut a| a.next()).with_context(|| format!("--listen {}: not an address", args.listen))?;
    let listener = super::server::bind_listener(addr).with_context(|| format!("--listen {}", args.listen))?;
    let coord_cfg = cfg.coord.as_ref().expect("validated");
    let tls = match (&coord_cfg.tls_cert, &coord_cfg.tls_key) {
        (Some(c), Some(k)) => {
            let base = args.config.parent().unwrap_or(Path::new("."));
            let read = |p: &PathBuf| std::fs::read(base.join(p)).with_context(|| format!("coord.tls: {}", base.join(p).display()));
            Some(tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(read(c)?, read(k)?)))
        }
        _ => None,
    };
    say(&format!(
        "otter-coord listening on {} ({}; state: {where_})",
        listener.local_addr()?,
        if tls.is_some() { "TLS" } else { "plaintext" }
    ));
    let samples_per_batch = cfg.data.as_ref().map_or(1, |d| d.batch_size as u64);
    coord.set_telemetry(coord_cfg.straggler_config(), samples_per_batch);
    if let Some(addr) = &args.http_listen {
        let http = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--http-listen {addr}"))?;
        say(&format!("otter-coord http on {} (/metrics, /status, /status.json, /healthz)", http.local_addr()?));
        let router = super::http::router(coord.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(http, router).await {
                eprintln!("otter-coord: http server: {e}");
            }
        });
    }
    let over = {
        let coord = coord.clone();
        async move {
            loop {
                if coord.phase().await.is_over() {
                    // Let workers read their last replies before the server goes away:
                    // until every agent has seen the end and left, at most 2 s.
                    let t = tokio::time::Instant::now();
                    while coord.agents_watching() > 0 && t.elapsed() < Duration::from_secs(2) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let shutdown = async move {
        tokio::select! {
            _ = over => {}
            _ = tokio::signal::ctrl_c() => eprintln!("otter-coord: interrupted; state is saved, restart to resume"),
        }
    };
    // Deposed (a save was fenced: another replica is active) or the etcd lease could have
    // expired (unrenewed for its TTL, e.g. cut off from etcd): stop acting at once. No
    // graceful drain: waiting replies and open watch streams would hold the server up
    // (their callers retry against the replica that takes over), and nothing this replica
    // decides any more may be acted on.
    let deposition = async {
        tokio::select! {
            why = coord.deposed() => why,
            why = coord.leadership_lost() => why,
        }
    };
    tokio::select! {
        served = super::server::serve_tls(coord.clone(), token, listener, tls, shutdown) => served?,
        why = deposition => return Err(Deposed(why).into()),
    }
    if let Err(e) = coord.flush().await {
        eprintln!("otter-coord: the final state was not saved: {e}");
    }
    let status = coord.status_json().await;
    let _ = std::fs::create_dir_all(&state_dir);
    if let Err(e) = std::fs::write(state_dir.join("status.json"), serde_json::to_vec_pretty(&status)?) {
        eprintln!("otter-coord: could not write {}: {e}", state_dir.join("status.json").display());
    }
    let s = &status["summary"];
    let phase = coord.phase().await;
    let exactly_once = match &status["exactly_once"] {
        v if v.get("Ok").is_some() => "ok (every committed batch exactly once, committed batches a prefix of the data stream)".to_string(),
        v => format!("FAILED: {v}"),
    };
    say(&format!(
        "job {phase}: {} steps, {} batches committed, {} left as the final tail, {} recoveries, final loss {}; exactly-once check: {exactly_once}",
        s["steps_committed"],
        s["batches_committed"],
        s["dropped_tail"].as_u64().unwrap_or(0),
        s["recoveries"],
        s["last_loss"].as_f64().map_or("n/a".into(), |l| format!("{l:.4}")),
    ));
    Ok(matches!(phase, Phase::Finished))
}
