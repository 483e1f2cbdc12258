//! `otter`: the single-machine tool (model info, eval, data tools; training follows).

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
    /// The memory one data-parallel rank needs for a job (weights, gradients, optimizer
    /// state, buckets, activations), from the config alone, and whether it fits a device.
    Plan {
        /// The job's run YAML.
        #[arg(long)]
        config: PathBuf,
        /// A preset (otter_llama7b, tiny) or model directory instead of the job's `model`.
        #[arg(long)]
        model: Option<String>,
        /// Data-parallel ranks.
        #[arg(long, default_value_t = 1)]
        world: u64,
        /// Device memory in GB (1e9 bytes): says whether the job fits and the largest
        /// micro-batch that does.
        #[arg(long)]
        gpu_mem: Option<f64>,
        /// Media items (images) per sample.
        #[arg(long, default_value_t = 1)]
        media_per_sample: u64,
        #[arg(long)]
        json: bool,
    },
    /// One forward (and backward with --grads) pass on saved inputs.
    Eval {
        /// HF model directory (config.json, safetensors, optional tokenizer.json).
        #[arg(long)]
        model: PathBuf,
        /// A committed checkpoint step (DIR/step-N): its trained weights replace the
        /// model's (a warning names any difference from the model it was trained with).
        #[arg(long)]
        ckpt: Option<PathBuf>,
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
    /// Train on one fixed batch (sanity check); writes losses, lrs and final weights.
    Overfit {
        #[arg(long)]
        model: PathBuf,
        /// safetensors with vision_x, input_ids, attention_mask, labels.
        #[arg(long)]
        batch: PathBuf,
        #[arg(long)]
        steps: u64,
        #[arg(long)]
        lr: f64,
        #[arg(long, default_value_t = 0)]
        warmup_steps: u64,
        #[arg(long, default_value_t = 0.1)]
        weight_decay: f64,
        /// Global-norm clip (0 disables).
        #[arg(long, default_value_t = 1.0)]
        clip: f64,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// The full single-process training run of a run config (model, data, train).
    Train {
        #[arg(long)]
        config: PathBuf,
        /// Continue from the run directory's latest saved state.
        #[arg(long)]
        resume: bool,
        /// Save and stop once this many optimizer steps are done.
        #[arg(long)]
        stop_after: Option<u64>,
        /// With --resume: resume from this committed step instead of the newest one.
        #[arg(long, requires = "resume")]
        resume_step: Option<u64>,
        /// With --resume: allow these parts of the model to differ from what the
        /// checkpoint recorded (weights, config, tokenizer; comma-separated).
        #[arg(long, requires = "resume", value_delimiter = ',')]
        accept_model_change: Vec<otter_core::model::identity::Part>,
    },
    /// Export a committed checkpoint step: trainable weights under upstream names, or a
    /// full Hugging Face model directory.
    Export {
        /// A committed checkpoint step directory (DIR/step-N).
        #[arg(long)]
        ckpt: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// final-weights | hf
        #[arg(long, default_value = "final-weights")]
        format: String,
    },
    /// Greedy decoding with a KV cache from images and a prompt, until <|endofchunk|>.
    Generate {
        /// HF model directory with tokenizer.json.
        #[arg(long)]
        model: PathBuf,
        /// Image files (PNG/JPEG), in the order of their <image> tokens.
        #[arg(long = "image", required = true)]
        images: Vec<PathBuf>,
        #[arg(long)]
        prompt: String,
        /// Use --prompt verbatim instead of upstream's `<image>User:{prompt} GPT:<answer>`.
        #[arg(long)]
        raw: bool,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Re-run the whole sequence for each token instead of using the KV cache.
        #[arg(long)]
        no_cache: bool,
        #[arg(long, default_value = "cpu")]
        device: String,
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// MIMIC-IT data tools.
    #[command(subcommand)]
    Data(DataCommand),
    /// NCCL backend, world size 1, end to end on the first GPU: init through a TCPStore,
    /// all-reduce of a bucket list, gradient buckets, broadcast, barrier, abort.
    #[cfg(feature = "nccl")]
    #[command(hide = true)]
    NcclCheck,
    /// Benchmarks (run side by side with their peers by scripts/bench-*.sh).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// The cost of a node's model identity (issue 42) on a preset's file sizes: writes the
    /// preset's weights (bf16, in --shards files) under --dir once, then times a cold
    /// computation (files evicted from the page cache), a warm one without the identity
    /// cache, a plain read of the same files, and a start that finds the cache.
    Identity {
        #[arg(long, default_value = "otter_llama7b")]
        preset: String,
        #[arg(long, default_value = "out/bench-identity")]
        dir: PathBuf,
        #[arg(long, default_value_t = 4)]
        shards: usize,
    },
    /// Checkpoint save/load of `--mb` MB of trainable state as `--world` ranks.
    Ckpt {
        #[arg(long, default_value_t = 600.0)]
        mb: f64,
        #[arg(long, default_value_t = 64)]
        params: usize,
        #[arg(long, default_value_t = 2)]
        world: usize,
        #[arg(long, default_value = "out/bench-ckpt")]
        dir: PathBuf,
    },
    /// CPU ring all-reduce bandwidth with N local rank processes (algbw/busbw in GB/s).
    Allreduce {
        #[arg(long, default_value_t = 2)]
        world: usize,
        /// Sizes in MB (1e6 bytes), comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
        size_mb: Vec<f64>,
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// The deterministic reduction (`comm.deterministic`): the f32 data turned into
        /// exact i64 limbs, summed over the ring, rounded back; bandwidths are of the f32
        /// data, so they compare with the plain all-reduce's.
        #[arg(long)]
        exact: bool,
    },
    /// One rank of `bench allreduce` (spawned by it).
    #[command(hide = true)]
    AllreduceRank {
        #[arg(long)]
        rank: usize,
        #[arg(long)]
        addrs: String,
        #[arg(long, value_delimiter = ',')]
        size_mb: Vec<f64>,
        #[arg(long)]
        iters: usize,
        #[arg(long)]
        exact: bool,
    },
    /// Mean training-step time of a random-weight model of the given config.json.
    TrainStep {
        /// HF-style Otter config.json (model dimensions), or a preset name (otter_llama7b, otter_mpt7b, tiny).
        #[arg(long)]
        model_config: PathBuf,
        #[arg(long, default_value_t = 2)]
        batch: i64,
        #[arg(long, default_value_t = 64)]
        seq: i64,
        #[arg(long, default_value_t = 5)]
        steps: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Also save a checkpoint after every timed step (asynchronously, keep_last 1) into
        /// this directory, and report what each save blocked the loop against one save
        /// done synchronously.
        #[arg(long)]
        ckpt_dir: Option<PathBuf>,
        /// Data-parallel ranks (local processes through the CPU ring); each prints its
        /// compute, communication and exposed communication per step.
        #[arg(long, default_value_t = 1)]
        world: usize,
        /// With --world: all-reduce after backward instead of overlapped with it.
        #[arg(long)]
        no_overlap: bool,
        /// Shard AdamW's moments over the ranks (ZeRO-1, `train.optimizer_sharding`);
        /// every rank prints the optimizer state bytes it holds.
        #[arg(long)]
        optimizer_sharding: bool,
        /// One rank of a --world run (spawned by it).
        #[arg(long, hide = true, requires = "addrs")]
        rank: Option<usize>,
        #[arg(long, hide = true)]
        addrs: Option<String>,
    },
    /// Per-sample data pipeline throughput on one thread.
    Data {
        /// A run YAML with a `data:` section (first dataset is used).
        #[arg(long)]
        config: PathBuf,
        #[arg(long, default_value_t = 300)]
        samples: usize,
    },
}

#[derive(Subcommand)]
enum DataCommand {
    /// Write a synthetic dataset in the MIMIC-IT layout.
    Synth {
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        samples: usize,
        /// json (id -> base64 object) or parquet (index id, column base64).
        #[arg(long, default_value = "json")]
        images_format: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Side of the (noise) images in pixels.
        #[arg(long, default_value_t = 64)]
        image_px: usize,
        /// Also write OUT/data.yaml using this tokenizer.json.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
    },
    /// Check a run config's datasets: counts, missing images, bad base64, token lengths.
    Validate {
        /// A run YAML with a `data:` section.
        #[arg(long)]
        config: PathBuf,
    },
    /// Write the samples of one dataset as tensors (<id>.input_ids, .labels, .vision_x).
    Dump {
        #[arg(long)]
        instructions: PathBuf,
        #[arg(long)]
        images: PathBuf,
        #[arg(long)]
        train_config: PathBuf,
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long, default_value_t = 224)]
        image_size: usize,
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> Result<()> {
    otter::model::nn::bound_kernel_caches();
    otter::heap::bound_thread_caches();
    let _otel = otter::otel::init("otter", "info");
    match Cli::parse().command {
        Command::ModelInfo { config, json } => cmd::model_info::run(&config, json),
        Command::Plan { config, model, world, gpu_mem, media_per_sample, json } => cmd::plan::run(cmd::plan::PlanArgs {
            config: &config,
            model: model.as_deref(),
            world,
            gpu_mem_gb: gpu_mem,
            media_per_sample,
            json,
        }),
        Command::Eval { model, ckpt, inputs, out, grads, device, dtype } => cmd::eval::run(cmd::eval::EvalArgs {
            model: &model,
            ckpt: ckpt.as_deref(),
            inputs: &inputs,
            out: &out,
            grads,
            device: cmd::parse_device(&device)?,
            dtype: cmd::parse_dtype(&dtype)?,
        }),
        Command::Overfit { model, batch, steps, lr, warmup_steps, weight_decay, clip, out, device, dtype } => {
            cmd::overfit::run(cmd::overfit::OverfitArgs {
                model: &model,
                batch: &batch,
                steps,
                lr,
                warmup_steps,
                weight_decay,
                clip,
                out: &out,
                device: cmd::parse_device(&device)?,
                dtype: cmd::parse_dtype(&dtype)?,
            })
        }
        Command::Train { config, resume, stop_after, resume_step, accept_model_change } => {
            otter::train::run::run(otter::train::run::TrainArgs { config: &config, resume, stop_after, resume_step, accept_model_change })
        }
        Command::Export { ckpt, out, format } => cmd::export::run(&ckpt, &out, &format),
        Command::Generate { model, images, prompt, raw, max_new_tokens, no_cache, device, dtype } => {
            cmd::generate::run(cmd::generate::GenerateArgs {
                model: &model,
                images: &images,
                prompt: &prompt,
                raw,
                max_new_tokens,
                no_cache,
                device: cmd::parse_device(&device)?,
                dtype: cmd::parse_dtype(&dtype)?,
            })
        }
        #[cfg(feature = "nccl")]
        Command::NcclCheck => cmd::bench::nccl_check(),
        Command::Bench(BenchCommand::Ckpt { mb, params, world, dir }) => cmd::bench::ckpt(mb, params, world, &dir),
        Command::Bench(BenchCommand::Identity { preset, dir, shards }) => cmd::bench::identity(&preset, &dir, shards),
        Command::Bench(BenchCommand::Data { config, samples }) => cmd::bench::data(&config, samples),
        Command::Bench(BenchCommand::Allreduce { world, size_mb, iters, exact }) => cmd::bench::allreduce(world, &size_mb, iters, exact),
        Command::Bench(BenchCommand::AllreduceRank { rank, addrs, size_mb, iters, exact }) => {
            cmd::bench::allreduce_rank(rank, &addrs, &size_mb, iters, exact)
        }
        Command::Bench(BenchCommand::TrainStep { model_config, batch, seq, steps, warmup, ckpt_dir, world, no_overlap, optimizer_sharding, rank, addrs }) => {
            let member = rank.zip(addrs.as_deref());
            cmd::bench::train_step(&model_config, batch, seq, steps, warmup, ckpt_dir.as_deref(), world, !no_overlap, optimizer_sharding, member)
        }
        Command::Data(d) => match d {
            DataCommand::Synth { out, samples, images_format, seed, image_px, tokenizer } => {
                cmd::data::run_synth(&out, samples, &images_format, seed, image_px, tokenizer.as_deref())
            }
            DataCommand::Validate { config } => cmd::data::run_validate(&config),
            DataCommand::Dump { instructions, images, train_config, tokenizer, image_size, out } => {
                cmd::data::run_dump(cmd::data::DumpArgs {
                    instructions: &instructions,
                    images: &images,
                    train_config: &train_config,
                    tokenizer: &tokenizer,
                    image_size,
                    out: &out,
                })
            }
        },
    }
}
