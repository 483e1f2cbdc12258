//! `otter-coord`: the job coordinator (no libtorch).
//!
//!   otter-coord start --config job.yaml [--listen ADDR] [--state-dir D | --etcd URLS]
//!   otter-coord status --coord ADDR [--watch]

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
        /// Allow these parts of the model to differ from what the job (its saved state, or
        /// the newest checkpoint's manifest) recorded: weights, config, tokenizer
        /// (comma-separated). Without it, nodes whose model differs are refused.
        #[arg(long, value_delimiter = ',')]
        accept_model_change: Vec<otter_core::model::identity::Part>,
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
    /// Print the job's status as JSON; with --watch, a terminal view of the job redrawn
    /// every second until it ends (or Ctrl-C).
    Status {
        #[arg(long, value_delimiter = ',')]
        coord: Vec<String>,
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Progress, loss, learning rate, throughput, goodput, world and the last events,
        /// refreshed every second.
        #[arg(long)]
        watch: bool,
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

fn main() -> Result<()> {
    // No per-thread caches of freed chunks in glibc's malloc (see `heap::COORDINATOR_TUNABLE`):
    // glibc reads it at start, so the first thing the program does is run itself again with it.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if let Some(e) = otter_core::heap::reexec_with_tunable(otter_core::heap::COORDINATOR_TUNABLE) {
        eprintln!("otter-coord: could not restart itself with GLIBC_TUNABLES={}: {e}; going on with glibc's defaults", otter_core::heap::COORDINATOR_TUNABLE);
    }
    // One malloc arena for the whole process, set before any thread exists: the
    // coordinator allocates little but from many short-lived threads (tokio's blocking pool
    // saves the state), and glibc's default of up to 8 arenas per core each kept their own
    // free memory, so its RSS crept up by ~1% per 1k steps (issue 50: 0.13% with one).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter, before any other thread runs.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    // And the heap's free pages go back to the system after a save, at most once a second.
    otter_core::coord::persist::release_heap_after_saves();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run())
}

async fn run() -> Result<()> {
    let cli = Cli::parse();
    let default_level = if matches!(cli.command, Command::Start { .. }) { "info" } else { "warn" };
    let otel = otter_core::otel::init("otter-coord", default_level);
    match cli.command {
        Command::Start { config, listen, http_listen, state_dir, etcd, token_file, accept_model_change } => {
            let http_listen = (http_listen != "off").then_some(http_listen);
            let r = otter_core::coord::job::start(otter_core::coord::job::StartArgs { config, listen, state_dir, etcd, token: token(token_file)?, http_listen, accept_model_change }).await;
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
        Command::Status { coord, token_file, watch: true } => {
            let token = token(token_file)?.unwrap_or_default();
            std::process::exit(watch(&coord, &token).await?);
        }
        Command::Status { coord, token_file, watch: false } => {
            let token = token(token_file)?.unwrap_or_default();
            let mut c = otter_core::coord::client::connect(&coord, std::time::Duration::from_secs(5)).await?;
            let r = c.status(otter_core::coord::rpc::with_token(otter_core::coord::rpc::pb::StatusRequest {}, &token)).await?;
            println!("{}", r.into_inner().json);
            Ok(())
        }
    }
}

/// The terminal's width in columns (stdout's), else `$COLUMNS`, else 100.
fn terminal_width() -> usize {
    let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct we pass; a non-terminal
    // stdout makes it fail, which leaves the zeros.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_col > 0 {
        return ws.ws_col as usize;
    }
    std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok()).unwrap_or(100)
}

/// `status --watch`: redraws [`otter_core::coord::view::watch_frame`] every second (clear
/// screen, cursor home; plain ANSI, no terminal library). Ends with the job (the final
/// state stays on the screen: exit 0 if it finished, 1 if it failed), on Ctrl-C (0), or
/// when the coordinator cannot be reached for 5 refreshes in a row (1).
async fn watch(coord: &[String], token: &str) -> Result<i32> {
    use otter_core::coord::{client, rpc, view};
    use std::io::Write;
    const REFRESH: std::time::Duration = std::time::Duration::from_secs(1);
    let mut c = client::connect(coord, std::time::Duration::from_secs(5)).await?;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut tick = tokio::time::interval(REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = std::io::stdout();
    let mut failures = 0;
    let _ = write!(out, "\x1b[?25l"); // no cursor blinking over the view
    let code = loop {
        let fetched = tokio::select! {
            _ = &mut ctrl_c => break 0,
            r = async {
                tick.tick().await;
                c.status(rpc::with_token(rpc::pb::StatusRequest {}, token)).await
            } => r,
        };
        match fetched.map_err(|e| e.message().to_string()).and_then(|r| serde_json::from_str::<serde_json::Value>(&r.into_inner().json).map_err(|e| e.to_string())) {
            Ok(status) => {
                failures = 0;
                let _ = write!(out, "\x1b[H\x1b[2J{}", view::watch_frame(&status, terminal_width()));
                let _ = out.flush();
                if view::finished(&status) {
                    let _ = writeln!(out, "\nthe job is over: {}", view::phase(&status));
                    break if view::phase(&status) == "Finished" { 0 } else { 1 };
                }
            }
            Err(e) => {
                failures += 1;
                let _ = writeln!(out, "\x1b[2K{}: {e} ({failures} refreshes in a row)", coord.join(","));
                if failures >= 5 {
                    break 1;
                }
            }
        }
    };
    let _ = writeln!(out, "\x1b[?25h");
    let _ = out.flush();
    Ok(code)
}
