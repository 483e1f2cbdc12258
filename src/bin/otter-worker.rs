//! `otter-worker`: the per-node agent of a distributed job.
//!
//!   otter-worker join --coord ADDR[,ADDR] [--cpu-ranks N | --gpus N] [--node-id ID]

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "otter-worker", version, about = "Otter training worker: one node of a distributed job")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join the job at --coord and run one training process per local rank.
    Join {
        /// Coordinator address(es), comma-separated (HA replicas: the active one answers).
        #[arg(long, value_delimiter = ',', required = true)]
        coord: Vec<String>,
        /// One rank per GPU, GPUs 0..N.
        #[arg(long, conflicts_with = "cpu_ranks")]
        gpus: Option<u32>,
        /// CPU ranks on this node.
        #[arg(long)]
        cpu_ranks: Option<u32>,
        /// Stable node name (default: the host name).
        #[arg(long)]
        node_id: Option<String>,
        /// Address peers reach this node's ranks at (default: the local address on the
        /// route to the coordinator).
        #[arg(long)]
        advertise_host: Option<String>,
        /// File holding the join token (else $OTTER_JOIN_TOKEN).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Serve Prometheus /metrics on this port: the node's ranks merged into one page
        /// (one scrape target per node); rank i also serves its own on PORT + 1 + i.
        #[arg(long)]
        metrics_port: Option<u16>,
        /// Where this node keeps the job's model, when its path differs from the job's
        /// `model.dir` (a tokenizer inside the job's model directory is taken from here too).
        /// The coordinator checks that its identity is the job's either way.
        #[arg(long)]
        model_dir: Option<PathBuf>,
    },
    /// One training process (started by `join`).
    #[command(hide = true)]
    Rank {
        #[arg(long, value_delimiter = ',')]
        coord: Vec<String>,
        #[arg(long)]
        node_id: String,
        #[arg(long)]
        local_rank: u32,
        #[arg(long)]
        job_file: PathBuf,
        #[arg(long)]
        advertise_host: String,
        #[arg(long)]
        metrics_addr: Option<String>,
    },
}

fn token(file: Option<PathBuf>) -> Result<String> {
    match file {
        Some(f) => Ok(std::fs::read_to_string(&f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?.trim().to_string()),
        None => std::env::var("OTTER_JOIN_TOKEN").map_err(|_| anyhow::anyhow!("no join token: pass --token-file or set OTTER_JOIN_TOKEN")),
    }
}

fn main() -> Result<()> {
    otter::model::nn::bound_kernel_caches();
    otter::heap::bound_thread_caches();
    let _otel = otter::otel::init("otter-worker", "warn");
    match Cli::parse().command {
        Command::Join { coord, gpus, cpu_ranks, node_id, advertise_host, token_file, metrics_port, model_dir } => {
            let node_id = node_id.or_else(|| std::env::var("HOSTNAME").ok()).unwrap_or_else(|| "node".into());
            let args = otter::worker::agent::JoinArgs {
                coord,
                node_id,
                local_ranks: gpus.or(cpu_ranks).unwrap_or(1),
                gpus: gpus.is_some(),
                token: token(token_file)?,
                advertise_host,
                metrics_port,
                model_dir,
            };
            tokio::runtime::Runtime::new()?.block_on(otter::worker::agent::join(args))
        }
        Command::Rank { coord, node_id, local_rank, job_file, advertise_host, metrics_addr } => {
            let r = otter::worker::rank::run(otter::worker::rank::RankArgs {
                metrics_addr,
                coord,
                node_id,
                local_rank,
                job_file,
                token: std::env::var("OTTER_JOIN_TOKEN").unwrap_or_default(),
                advertise_host,
                // End-to-end tests kill or freeze a rank in the middle of a checkpoint write.
                fault_ckpt_stall: std::env::var("OTTER_FAULT_CKPT_STALL").ok().and_then(|v| v.parse().ok()),
                emulate_nccl: std::env::var("OTTER_TEST_EMULATE_NCCL").is_ok_and(|v| v == "1"),
                fault_abort_at_step: std::env::var("OTTER_FAULT_ABORT_AT_STEP").ok().and_then(|v| v.parse().ok()),
            });
            match r {
                Err(e) if e.downcast_ref::<otter::worker::rank::RestartFresh>().is_some() => {
                    eprintln!("{e:#}");
                    std::process::exit(otter::worker::rank::EXIT_RESTART_FRESH);
                }
                r => r,
            }
        }
    }
}
