//! `otter-coord`: the job coordinator (no libtorch).
//!
//!   otter-coord start --config job.yaml [--listen ADDR] [--state-dir D | --etcd URLS]
//!   otter-coord status --coord ADDR

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "otter-coord", version, about = "Otter training coordinator: rendezvous, ranks, data ledger, recovery")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the coordinator of the job in --config until the job is over.
    Start {
        /// Job YAML: model, data, train, coord (rendezvous), comm.
        #[arg(long)]
        config: PathBuf,
        #[arg(long, default_value = "0.0.0.0:50051")]
        listen: String,
        /// HTTP address for /metrics (Prometheus), /status (HTML), /status.json, /healthz;
        /// `off` to serve none.
        #[arg(long, default_value = "0.0.0.0:9400")]
        http_listen: String,
        /// Embedded state store directory (default: <train.out_dir>/coord). A coordinator
        /// restarted on the same directory resumes the job.
        #[arg(long, conflicts_with = "etcd")]
        state_dir: Option<PathBuf>,
        /// etcd endpoints (comma-separated): state in etcd, one active replica elected.
        #[arg(long, value_delimiter = ',')]
        etcd: Option<Vec<String>>,
        /// File holding the join token (else $OTTER_JOIN_TOKEN, else generated into the
        /// state dir).
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// The coordinator at scale: N simulated nodes join at once (in-process clients, one
    /// connection each, over loopback gRPC), then --steps committed steps (the service's
    /// handlers called in-process) with a checkpoint every --save-every, then a recovery.
    /// Prints one `name=value` line per measure, per store.
    Bench {
        #[arg(long, default_value_t = 256)]
        nodes: usize,
        #[arg(long, default_value_t = 1000)]
        steps: u64,
        /// Stores to run: memory, file, etcd (a local etcd is started).
        #[arg(long, value_delimiter = ',', default_value = "memory,file")]
        store: Vec<otter_core::coord::bench::BenchStore>,
        #[arg(long, default_value_t = 1000)]
        save_every: u64,
    },
    /// Print the job's status as JSON.
    Status {
        #[arg(long, value_delimiter = ',')]
        coord: Vec<String>,
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
}

fn token(file: Option<PathBuf>) -> Result<Option<String>> {
    Ok(match file {
        Some(f) => Some(std::fs::read_to_string(&f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?.trim().to_string()),
        None => std::env::var("OTTER_JOIN_TOKEN").ok(),
    })
}

fn tempfile_dir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("otter-coord-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Start { .. }) { "info" } else { "warn" };
    let otel = otter_core::otel::init("otter-coord", default_level);
    match cli.command {
        Command::Start { config, listen, http_listen, state_dir, etcd, token_file } => {
            let http_listen = (http_listen != "off").then_some(http_listen);
            let r = otter_core::coord::job::start(otter_core::coord::job::StartArgs { config, listen, state_dir, etcd, token: token(token_file)?, http_listen }).await;
            drop(otel); // flush traces: exit skips destructors
            match r {
                Ok(ok) => std::process::exit(if ok { 0 } else { 1 }),
                Err(e) if e.downcast_ref::<otter_core::coord::job::Deposed>().is_some() => {
                    eprintln!("otter-coord: {e}; exiting");
                    std::process::exit(3);
                }
                Err(e) => return Err(e),
            }
        }
        Command::Bench { nodes, steps, store, save_every } => {
            for store in store {
                let dir = tempfile_dir()?;
                let opts = otter_core::coord::bench::BenchOptions { nodes, steps, store, save_every, dir: dir.clone(), join_timeout: std::time::Duration::from_secs(60) };
                let r = otter_core::coord::bench::run(&opts).await;
                let _ = std::fs::remove_dir_all(&dir);
                for line in r?.lines() {
                    println!("{line}");
                }
            }
            Ok(())
        }
        Command::Status { coord, token_file } => {
            let token = token(token_file)?.unwrap_or_default();
            let mut c = otter_core::coord::client::connect(&coord, std::time::Duration::from_secs(5)).await?;
            let r = c.status(otter_core::coord::rpc::with_token(otter_core::coord::rpc::pb::StatusRequest {}, &token)).await?;
            println!("{}", r.into_inner().json);
            Ok(())
        }
    }
}
