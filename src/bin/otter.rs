//! `otter`: the single-machine tool (model info, eval; training and data tools follow).

use anyhow::Result;
use clap::{Parser, Subcommand};
use otter::cmd;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "otter", version, about = "Otter multimodal fine-tuning: single-machine tool")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Total and trainable parameter counts by group, computed from the config alone.
    ModelInfo {
        /// A run YAML, a model directory, a config.json, or a preset (tiny, otter_llama7b).
        #[arg(long)]
        config: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One forward (and backward with --grads) pass on saved inputs.
    Eval {
        /// HF model directory (config.json, safetensors, optional tokenizer.json).
        #[arg(long)]
        model: PathBuf,
        /// safetensors with vision_x, input_ids, attention_mask, optional labels.
        #[arg(long)]
        inputs: PathBuf,
        /// Output safetensors: logits, loss, grad.<name>.
        #[arg(long)]
        out: PathBuf,
        /// Also write the gradient of every trainable parameter.
        #[arg(long)]
        grads: bool,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Frozen-weight and compute precision: f32, or bf16 (CUDA autocast).
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::ModelInfo { config, json } => cmd::model_info::run(&config, json),
        Command::Eval { model, inputs, out, grads, device, dtype } => cmd::eval::run(cmd::eval::EvalArgs {
            model: &model,
            inputs: &inputs,
            out: &out,
            grads,
            device: cmd::parse_device(&device)?,
            dtype: cmd::parse_dtype(&dtype)?,
        }),
    }
}
