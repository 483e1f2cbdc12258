//! `otter bench ...`: measurements run side by side with a peer by the scripts in
//! `scripts/bench-*.sh`; results go to BENCHMARKS.md. Never used as timed assertions.

use crate::data::DataSource;
use anyhow::{Context, Result};
use std::path::Path;
use std::time::Instant;

/// Builds `samples` samples (prompt, tokenize, base64 + decode + resize + normalize every
/// image) on the calling thread only, after one warm-up pass over the first few, and
/// prints samples/s. Same work as the Python peer in benches/data_pipeline.py.
pub fn data(config: &Path, samples: usize) -> Result<()> {
    let cfg = super::data::load_data_config(config)?;
    let source = DataSource::open(&cfg, None)?;
    let ds = source.datasets.first().context("no dataset")?;
    let n = samples.min(ds.queries.len());
    for q in 0..n.min(4) {
        source.builder.build(0, ds, q)?;
    }
    let start = Instant::now();
    let mut images = 0;
    let mut tokens = 0;
    for q in 0..n {
        let s = source.builder.build(0, ds, q)?;
        images += s.t * s.f;
        tokens += s.input_ids.len();
    }
    let secs = start.elapsed().as_secs_f64();
    // Where the time goes, stage by stage, over the same samples.
    let (mut t_b64, mut t_tf, mut t_tok) = (0.0, 0.0, 0.0);
    let (mut t_jpeg, mut t_png) = (0.0, 0.0);
    let store = ds.images.as_ref().context("dataset has no images")?;
    let mut px = Vec::new();
    for q in 0..n {
        let t = Instant::now();
        let (text, ids) = source.builder.prompt(ds, q)?;
        source.builder.tokenizer.sample_ids(&text)?;
        t_tok += t.elapsed().as_secs_f64();
        for id in ids {
            let t = Instant::now();
            let bytes = store.get(&id)?;
            t_b64 += t.elapsed().as_secs_f64();
            let t = Instant::now();
            let img = crate::data::transform::decode_rgb(&bytes)?;
            if bytes.starts_with(&[0xFF, 0xD8]) { t_jpeg += t.elapsed().as_secs_f64() } else { t_png += t.elapsed().as_secs_f64() }
            let t = Instant::now();
            px.clear();
            crate::data::transform::to_normalized_chw(&img, cfg.image_size, &mut px);
            t_tf += t.elapsed().as_secs_f64();
        }
    }
    eprintln!("breakdown (s): prompt+tokenize {t_tok:.3}, read+base64 {t_b64:.3}, decode jpeg {t_jpeg:.3} png {t_png:.3}, resize+normalize {t_tf:.3}");
    println!(
        "rust samples={n} images={images} tokens={tokens} seconds={secs:.3} samples_per_s={:.2} images_per_s={:.2}",
        n as f64 / secs,
        images as f64 / secs
    );
    Ok(())
}

/// Mean optimizer-step time (forward + backward + clip + AdamW) of an Otter model with
/// random weights built from an HF-style `config.json` or a preset name (`model_config`), on a random
/// batch of `batch` samples x `seq` tokens with one image each, after `warmup` steps.
/// Same model dimensions, batch and sequence as the PyTorch peer (benches/train_step.py).
///
/// With `ckpt_dir`: every timed step is followed by an asynchronous checkpoint of the
/// whole trainable state (weights + AdamW moments, one shard, keep_last 1), as `otter
/// train` saves. Reports `ckpt_blocked_s`, the mean time a save blocked the loop (hand-off
/// plus the next update's wait for staging), and `ckpt_sync_s`, one save of the same
/// state done synchronously (stage, write, fsync), after the timed steps.
///
/// With `world > 1` (`--world N`): `N` local rank processes train data-parallel through the
/// real group code (the CPU ring, gradient buckets, overlapped with backward unless
/// `overlap` is false), each on `cores / N` threads; rank 0 prints, per timed step, the
/// step's compute, its communication (the collectives' running time) and the exposed
/// communication (what the step waited for after backward), then the means.
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    model_config: &Path,
    batch: i64,
    seq: i64,
    steps: usize,
    warmup: usize,
    ckpt_dir: Option<&Path>,
    world: usize,
    overlap: bool,
    optimizer_sharding: bool,
    member: Option<(usize, &str)>,
) -> Result<()> {
    anyhow::ensure!(world >= 1, "--world must be positive");
    anyhow::ensure!(world == 1 || ckpt_dir.is_none(), "--ckpt-dir times one process: leave out --world");
    anyhow::ensure!(!optimizer_sharding || ckpt_dir.is_none(), "--ckpt-dir times the unsharded optimizer's saves: leave out --optimizer-sharding");
    if world > 1 && member.is_none() {
        return spawn_ranks(world, |r, addrs| {
            let mut args: Vec<String> = ["bench", "train-step", "--model-config"].map(String::from).to_vec();
            args.push(model_config.display().to_string());
            for (k, v) in [("--batch", batch.to_string()), ("--seq", seq.to_string()), ("--steps", steps.to_string()), ("--warmup", warmup.to_string())] {
                args.extend([k.to_string(), v]);
            }
            args.extend(["--world".into(), world.to_string(), "--rank".into(), r.to_string(), "--addrs".into(), addrs.to_string()]);
            if !overlap {
                args.push("--no-overlap".into());
            }
            if optimizer_sharding {
                args.push("--optimizer-sharding".into());
            }
            args
        });
    }
    let mut group = match member {
        Some((rank, addrs)) => {
            let addrs: Vec<std::net::SocketAddr> = addrs.split(',').map(|a| a.parse()).collect::<Result<_, _>>()?;
            let listener = std::net::TcpListener::bind(addrs[rank]).with_context(|| format!("rank {rank}: bind {}", addrs[rank]))?;
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            tch::set_num_threads((cores / world).max(1) as i32);
            Some(crate::comm::ring::RingGroup::connect(rank, &addrs, &listener, std::time::Duration::from_secs(60))?)
        }
        None => None,
    };
    use crate::model::config::HfOtterConfig;
    use crate::model::spec::{count, parameter_specs};
    use crate::model::weights::{LoadOptions, Params};
    use crate::model::Otter;
    use crate::train::optim::AdamWConfig;
    use crate::train::{StepConfig, TensorBatch, Trainer};
    // An HF-style config.json, or a preset's name (`otter_llama7b`, `otter_mpt7b`, `tiny`).
    let cfg = match model_config.exists() {
        true => HfOtterConfig::from_file(model_config)?.resolve(&model_config.display().to_string())?,
        false => crate::model::config::OtterConfig::preset(&model_config.display().to_string())?,
    };
    let opts = LoadOptions::default();
    let model = Otter::new(cfg.clone(), Params::random(&cfg, 0, opts), opts);
    let c = count(&parameter_specs(&cfg));
    let step_cfg = StepConfig { lr: 1e-5, warmup_steps: 0, total_steps: 1000, clip: Some(1.0), adamw: AdamWConfig::default() };
    let mut trainer = Trainer::new(model, step_cfg);
    let buckets = crate::train::grad_sync::GradBuckets::new(&trainer.model.trainable(), crate::train::grad_sync::DEFAULT_BUCKET_BYTES);
    let rank = member.map_or(0, |(r, _)| r);
    if optimizer_sharding {
        trainer.shard_optimizer(&buckets, world, rank)?;
    }
    tch::manual_seed(1);
    let b = TensorBatch::random(&cfg, batch, seq, tch::Device::Cpu);
    let mut step = |trainer: &mut Trainer| -> Result<crate::train::StepStats> {
        let sync = group.as_mut().map(|g| crate::train::GradSync { buckets: &buckets, comm: g, overlap, step_micro_batches: world });
        Ok(trainer.step_synced(std::slice::from_ref(&b), sync)?)
    };
    for _ in 0..warmup {
        step(&mut trainer)?;
    }
    if let Some(d) = ckpt_dir {
        let _ = std::fs::remove_dir_all(d);
    }
    let mut saver = crate::ckpt::AsyncSaver::default();
    let t = Instant::now();
    let (mut opt, mut blocked, mut handoff) = (0.0, 0.0, 0.0);
    let (mut compute, mut comm, mut exposed) = (0.0, 0.0, 0.0);
    for i in 0..steps {
        let t_step = Instant::now();
        let s = step(&mut trainer)?;
        opt += s.optimizer.as_secs_f64();
        compute += s.compute.as_secs_f64();
        comm += s.allreduce.as_secs_f64();
        exposed += s.allreduce_exposed.as_secs_f64();
        if world > 1 && rank == 0 {
            println!(
                "step={i} step_s={:.4} compute_s={:.4} comm_s={:.4} exposed_s={:.4}",
                t_step.elapsed().as_secs_f64(),
                s.compute.as_secs_f64(),
                s.allreduce.as_secs_f64(),
                s.allreduce_exposed.as_secs_f64()
            );
        }
        blocked += handoff + s.checkpoint_wait.as_secs_f64();
        if let Some(d) = ckpt_dir {
            let step = trainer.step_count();
            handoff = saver.save(&mut trainer, d, crate::ckpt::Manifest::new(step, 1), 1)?.as_secs_f64();
        }
    }
    let dt = t.elapsed().as_secs_f64() / steps as f64;
    let mut line = format!(
        "rust params={} trainable={} batch={batch} seq={seq} threads={} step_s={dt:.4} opt_s={:.4} optimizer_sharding={optimizer_sharding} optimizer_state_bytes={}",
        c.total,
        c.trainable,
        tch::get_num_threads(),
        opt / steps as f64,
        trainer.optimizer_state_bytes()
    );
    if world > 1 {
        let n = steps as f64;
        line += &format!(
            " world={world} overlap={} buckets={} compute_s={:.4} comm_s={:.4} exposed_s={:.4}",
            overlap && !optimizer_sharding, // sharded steps reduce-scatter after backward
            buckets.num_buckets(),
            compute / n,
            comm / n,
            exposed / n
        );
    }
    if let Some(d) = ckpt_dir {
        // The last save's cost to the loop: one more step's wait.
        blocked += handoff + step(&mut trainer)?.checkpoint_wait.as_secs_f64();
        saver.wait()?;
        let names: Vec<String> = crate::ckpt::partition(&crate::ckpt::param_sizes(&trainer), 1).swap_remove(0);
        let sync_dir = d.join("sync");
        // Like the saves in the loop at steady state: staging buffers already allocated,
        // and (keep_last 1 retired a step per save) a recycled shard file to write over.
        let warm = crate::ckpt::stage(&trainer, &names, 0, 1, None);
        // SAFETY: sync(2) takes no arguments and cannot fail.
        unsafe { libc::sync() };
        let t = Instant::now();
        let info = crate::ckpt::write_shard(&sync_dir, &crate::ckpt::stage(&trainer, &names, 0, 1, Some(warm)))?;
        let sync_s = t.elapsed().as_secs_f64();
        line += &format!(" ckpt_bytes={} ckpt_blocked_s={:.4} ckpt_sync_s={sync_s:.4}", info.bytes, blocked / steps as f64);
        let _ = std::fs::remove_dir_all(d);
    }
    if rank == 0 {
        println!("{line}");
    }
    Ok(())
}

/// Runs `world` local rank processes of this binary (`args(rank, addrs)`: the command
/// line of each, with the ring addresses they share); rank 0's output is shown.
fn spawn_ranks(world: usize, args: impl Fn(usize, &str) -> Vec<String>) -> Result<()> {
    let listeners: Vec<std::net::TcpListener> =
        (0..world).map(|_| std::net::TcpListener::bind("127.0.0.1:0")).collect::<std::io::Result<_>>()?;
    let addrs: Vec<String> = listeners.iter().map(|l| l.local_addr().map(|a| a.to_string())).collect::<std::io::Result<_>>()?;
    drop(listeners); // each rank re-binds its own address
    let (exe, addrs) = (std::env::current_exe()?, addrs.join(","));
    let children: Vec<std::process::Child> = (0..world)
        .map(|r| {
            std::process::Command::new(&exe)
                .args(args(r, &addrs))
                .stdout(if r == 0 { std::process::Stdio::inherit() } else { std::process::Stdio::null() })
                .spawn()
        })
        .collect::<std::io::Result<_>>()?;
    let mut failed = 0;
    for mut c in children {
        if !c.wait()?.success() {
            failed += 1;
        }
    }
    anyhow::ensure!(failed == 0, "{failed} rank(s) failed");
    Ok(())
}

/// `otter bench allreduce`: spawns `world` local rank processes running the CPU ring and
/// prints, per size, `algbw` and `busbw` in GB/s (nccl-tests definitions:
/// algbw = bytes / time, busbw = algbw * 2(n-1)/n).
pub fn allreduce(world: usize, sizes_mb: &[f64], iters: usize, exact: bool) -> Result<()> {
    anyhow::ensure!(world >= 1, "--world must be positive");
    let sizes: Vec<String> = sizes_mb.iter().map(|s| s.to_string()).collect();
    spawn_ranks(world, |r, addrs| {
        let mut args: Vec<String> = ["bench", "allreduce-rank", "--rank"].map(String::from).to_vec();
        args.extend([r.to_string(), "--addrs".into(), addrs.to_string(), "--iters".into(), iters.to_string(), "--size-mb".into(), sizes.join(",")]);
        if exact {
            args.push("--exact".into());
        }
        args
    })
}

/// One rank of `otter bench allreduce`.
pub fn allreduce_rank(rank: usize, addrs: &str, sizes_mb: &[f64], iters: usize, exact: bool) -> Result<()> {
    use crate::comm::ring::RingGroup;
    use crate::comm::Collective;
    use crate::train::exact::ExactSum;
    use crate::train::grad_sync::TensorCollective;
    let addrs: Vec<std::net::SocketAddr> = addrs.split(',').map(|a| a.parse()).collect::<Result<_, _>>()?;
    let listener = std::net::TcpListener::bind(addrs[rank]).with_context(|| format!("rank {rank}: bind {}", addrs[rank]))?;
    let mut g = RingGroup::connect(rank, &addrs, &listener, std::time::Duration::from_secs(30))?;
    let n = Collective::world(&g);
    for &mb in sizes_mb {
        let len = ((mb * 1e6) / 4.0).round() as usize;
        let mut buf = vec![rank as f32; len];
        let data = tch::Tensor::from_slice(&buf);
        // The deterministic reduction of `len` f32: exact limbs, their i64 sum over the
        // ring, the mean rounded back (what a deterministic step does with its gradients).
        let exact_once = |g: &mut RingGroup| -> Result<(), crate::comm::CommError> {
            let mut s = ExactSum::zeros(len as i64, tch::Device::Cpu);
            s.add(&data);
            g.all_reduce_sum_i64_tensors(std::slice::from_mut(s.limbs_mut()))?;
            drop(s.finish(n as f64));
            Ok(())
        };
        let once = |g: &mut RingGroup, buf: &mut [f32]| if exact { exact_once(g) } else { g.all_reduce_mean(&mut [buf]) };
        once(&mut g, &mut buf)?; // warm-up
        g.barrier()?;
        let t = Instant::now();
        for _ in 0..iters {
            once(&mut g, &mut buf)?;
        }
        let secs = t.elapsed().as_secs_f64() / iters as f64;
        let algbw = (len * 4) as f64 / secs / 1e9;
        let busbw = algbw * 2.0 * (n as f64 - 1.0) / n as f64;
        if rank == 0 {
            println!("world={n} size_mb={mb} time_ms={:.2} algbw={algbw:.3} busbw={busbw:.3}", secs * 1e3);
        }
    }
    Ok(())
}

/// `otter nccl-check` (feature `nccl`; scripts/gpu-check.sh): the NCCL backend at world
/// size 1 on CUDA, end to end. Prints one `ok ...` line per stage; any failure is an error.
#[cfg(feature = "nccl")]
pub fn nccl_check() -> Result<()> {
    use crate::comm::nccl::NcclGroup;
    use crate::train::grad_sync::{GradBuckets, TensorCollective};
    use tch::{Device, Kind, Tensor};
    crate::cuda::load().map_err(|e| anyhow::anyhow!(e))?;
    anyhow::ensure!(tch::Cuda::is_available(), "no CUDA device");
    let dev = Device::Cuda(0);
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let t = Instant::now();
    let store = crate::comm::store::GenerationStore::serve(&listener, 1, std::time::Duration::from_secs(30))?;
    let mut g = NcclGroup::new(&store, 0, 1, 0, std::time::Duration::from_secs(30))?;
    println!("ok init (generation 1's store on {}) in {:.2} s", listener.local_addr()?, t.elapsed().as_secs_f64());
    let mut bufs: Vec<Tensor> = [0i64, 1, 1000, 6_553_700].iter().map(|&n| Tensor::arange(n, (Kind::Float, dev)) * 0.5).collect();
    let want: Vec<Tensor> = bufs.iter().map(|b| b.copy()).collect();
    g.all_reduce_mean_tensors(&mut bufs)?;
    tch::Cuda::synchronize(0);
    for (b, w) in bufs.iter().zip(&want) {
        anyhow::ensure!(b.equal(w), "all-reduce (mean) at world 1 changed a buffer of {} elements", b.numel());
    }
    println!("ok all-reduce of {} buckets", bufs.len());
    let a = Tensor::randn([300, 7], (Kind::Float, dev)).set_requires_grad(true);
    let b = Tensor::randn([5], (Kind::Float, dev)).set_requires_grad(true);
    (a.sum(Kind::Float) * 3.0).backward(); // `b` gets no gradient this step
    let buckets = GradBuckets::new(&[("b", &b), ("a", &a)], 1024);
    buckets.all_reduce_mean(&[("a", &a), ("b", &b)], &mut g)?;
    anyhow::ensure!(a.grad().equal(&a.ones_like().g_mul_scalar(3.0)) && b.grad().equal(&b.zeros_like()), "gradient buckets");
    println!("ok gradient buckets ({} buckets; undefined grad synced as zeros)", buckets.num_buckets());
    let mut x = Tensor::arange(10, (Kind::Float, dev));
    g.broadcast_tensor(&mut x, 0)?;
    g.barrier()?;
    println!("ok broadcast, barrier");
    g.abort();
    println!("ok abort");
    let after = g.all_reduce_mean_tensors(&mut bufs);
    println!("after abort, all-reduce: {}", after.map_or_else(|e| format!("error (as expected): {e}"), |_| "no error".into()));
    Ok(())
}

/// `otter bench ckpt`: saves and loads `mb` MB of trainable state (weights + AdamW
/// moments: `params` tensors of each kind) as `world` ranks writing their shards in
/// parallel: a run's first save (fresh staging buffers), its second (new files) and a
/// later one (over the shard files retention recycled), phase by phase (blocked while
/// staging, written, durable), then a load with checksum verification.
/// Prints one line (scripts/bench-ckpt.sh).
pub fn ckpt(mb: f64, params: usize, world: usize, dir: &std::path::Path) -> Result<()> {
    use crate::ckpt;
    use tch::{Kind, Tensor};
    let per = ((mb * 1e6) / (12.0 * params as f64)).ceil() as i64;
    tch::manual_seed(0);
    let names: Vec<String> = (0..params).map(|i| format!("p{i:03}")).collect();
    let tensors: Vec<[Tensor; 3]> = names.iter().map(|_| [0, 1, 2].map(|_| Tensor::randn([per], (Kind::Float, tch::Device::Cpu)))).collect();
    let sizes: Vec<(String, u64)> = names.iter().map(|n| (n.clone(), per as u64 * 4)).collect();
    let part = ckpt::partition(&sizes, world);
    // A rank's share as shallow copies its writer thread can own (a Tensor is Send, not Sync).
    let share = |r: usize| -> Vec<(String, Tensor)> {
        let mut v = Vec::new();
        for n in &part[r] {
            let i = names.iter().position(|x| x == n).expect("name");
            for (k, t) in ["param", "exp_avg", "exp_avg_sq"].iter().zip(&tensors[i]) {
                v.push((format!("{k}.{n}"), t.shallow_clone()));
            }
        }
        v
    };
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    // Each timed save starts with no dirty pages of earlier writes (ours, the peer's, the
    // set-up's) left to flush: the kernel would otherwise throttle this writer for them.
    // SAFETY: sync(2) takes no arguments and cannot fail.
    let settle = || unsafe { libc::sync() };
    // One save of step `step`, as a run does it: every rank, in parallel, stages its share
    // (into the previous save's buffers when given; `blocked`: what staging would block
    // the loop if nothing overlapped it), then writes and checksums it (`written`: the data is where torch.save leaves
    // it) and fsyncs it (`durable`), into `dir/step-N` (over a recycled shard file when
    // retention left one). Per phase, the slowest rank. The step is then marked committed
    // (a placeholder manifest: retention only looks for the file).
    // Per rank: its staged buffers (for the next save) and its shard.
    type Saved = (Vec<(ckpt::Staged, ckpt::ShardInfo)>, f64, f64, f64);
    let save = |step: u64, prev: Option<Vec<ckpt::Staged>>| -> Result<Saved> {
        let step_dir = ckpt::step_dir(dir, step);
        let mut prev: Vec<Option<ckpt::Staged>> = prev.map(|v| v.into_iter().map(Some).collect()).unwrap_or_else(|| (0..world).map(|_| None).collect());
        settle();
        let t = Instant::now();
        let ranks: Vec<((ckpt::Staged, ckpt::ShardInfo), f64, f64)> = std::thread::scope(|s| {
            let hs: Vec<_> = prev
                .iter_mut()
                .enumerate()
                .map(|(r, prev)| {
                    let (items, prev, step_dir) = (share(r), prev.take(), &step_dir);
                    s.spawn(move || {
                        let staged = ckpt::stage_tensors(&items, r, world, prev);
                        let blocked = t.elapsed().as_secs_f64();
                        ckpt::write_shard_timed(step_dir, &staged).map(|(info, written)| ((staged, info), blocked, blocked + written.as_secs_f64()))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("writer")).collect::<Result<_, _>>()
        })?;
        let durable = t.elapsed().as_secs_f64();
        ckpt::write_durable(&step_dir.join(ckpt::MANIFEST), b"{}")?;
        let blocked = ranks.iter().map(|x| x.1).fold(0.0, f64::max);
        let written = ranks.iter().map(|x| x.2).fold(0.0, f64::max);
        Ok((ranks.into_iter().map(|x| x.0).collect(), blocked, written, durable))
    };
    let buffers = |saved: Vec<(ckpt::Staged, ckpt::ShardInfo)>| Some(saved.into_iter().map(|(s, _)| s).collect());
    // 1. A run's first save: fresh staging buffers (allocated and page-faulted now), new files.
    let (saved, _, _, first_save_s) = save(1, None)?;
    // 2. Its second: buffers reused, still new files (retention has retired nothing yet).
    let (saved, _, fresh_written_s, fresh_durable_s) = save(2, buffers(saved))?;
    // 3. Every later save (keep_last 1): retention retired step 1 into the recycle pool,
    //    so the shards overwrite its files in place. What a run pays at each checkpoint.
    ckpt::retain(dir, 1, None)?;
    let (saved, blocked_s, written_s, durable_s) = save(3, buffers(saved))?;
    let step3 = ckpt::step_dir(dir, 3);
    let infos: Vec<ckpt::ShardInfo> = saved.into_iter().map(|(_, info)| info).collect();
    let bytes: u64 = infos.iter().map(|i| i.bytes).sum();
    // Load: read and verify every shard, rebuild the tensors.
    settle();
    let t = Instant::now();
    let mut loaded = 0usize;
    for info in &infos {
        loaded += ckpt::shard_tensors(&step3, info)?.iter().map(|(_, t)| t.numel()).sum::<usize>();
    }
    let load_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(loaded as i64 == per * 3 * params as i64, "loaded {loaded} elements");
    println!(
        "otter world={world} bytes={bytes} first_save_s={first_save_s:.3} fresh_written_s={fresh_written_s:.3} fresh_durable_s={fresh_durable_s:.3} blocked_s={blocked_s:.3} written_s={written_s:.3} durable_s={durable_s:.3} load_s={load_s:.3}"
    );
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

/// Evicts `path` from the page cache (after writing it back): the next read comes from disk.
fn evict(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path)?;
    f.sync_all()?;
    // SAFETY: posix_fadvise on a descriptor we own; DONTNEED only drops clean cached pages.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    anyhow::ensure!(r == 0, "posix_fadvise({}): {r}", path.display());
    Ok(())
}

/// See `otter bench identity`.
pub fn identity(preset: &str, dir: &Path, shards: usize) -> Result<()> {
    use otter_core::model::identity::{compute, Source};
    use std::io::Write;
    let cfg = otter_core::model::OtterConfig::preset(preset)?;
    let specs = otter_core::model::spec::parameter_specs(&cfg);
    std::fs::create_dir_all(dir)?;
    let tokenizer = dir.join("tokenizer.json");
    if !tokenizer.exists() {
        std::fs::write(&tokenizer, format!("{{\"bench\": \"{preset}\"}}"))?;
    }
    std::fs::write(dir.join("config.json"), format!("{{\"preset\": \"{preset}\"}}"))?;
    let shards = shards.max(1);
    let per = specs.len().div_ceil(shards);
    let mut files = Vec::new();
    for (i, part) in specs.chunks(per).enumerate() {
        let path = dir.join(format!("model-{:05}-of-{:05}.safetensors", i + 1, shards));
        let mut header = serde_json::Map::new();
        let mut off = 0u64;
        for s in part {
            let bytes = s.numel() * 2;
            header.insert(s.name.clone(), serde_json::json!({"dtype": "BF16", "shape": s.shape, "data_offsets": [off, off + bytes]}));
            off += bytes;
        }
        let h = serde_json::to_vec(&header)?;
        if std::fs::metadata(&path).ok().map(|m| m.len()) != Some(8 + h.len() as u64 + off) {
            println!("writing {} ({:.2} GB)", path.display(), off as f64 / 1e9);
            let mut w = std::io::BufWriter::with_capacity(64 << 20, std::fs::File::create(&path)?);
            w.write_all(&(h.len() as u64).to_le_bytes())?;
            w.write_all(&h)?;
            let chunk: Vec<u8> = (0..(64u64 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
            let mut left = off;
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                w.write_all(&chunk[..n])?;
                left -= n as u64;
            }
            w.flush()?;
        }
        files.push(path);
    }
    let total: u64 = files.iter().map(|f| std::fs::metadata(f).map_or(0, |m| m.len())).sum();
    let cache = dir.join(".otter-identity.json");
    let run = |label: &str, evict_first: bool, keep_cache: bool| -> Result<f64> {
        if !keep_cache {
            let _ = std::fs::remove_file(&cache);
        }
        if evict_first {
            for f in &files {
                evict(f)?;
            }
        }
        let t = Instant::now();
        let (id, stats) = compute(Source::Dir(dir), &tokenizer)?;
        let secs = t.elapsed().as_secs_f64();
        println!(
            "identity_{label}: {secs:.3} s, {:.2} GB read ({:.2} GB/s), {} files from the cache, digest {}",
            stats.bytes_read as f64 / 1e9,
            stats.bytes_read as f64 / 1e9 / secs.max(1e-9),
            stats.files_from_cache,
            &id.digest[..16]
        );
        Ok(secs)
    };
    let read_only = |label: &str, evict_first: bool| -> Result<()> {
        if evict_first {
            for f in &files {
                evict(f)?;
            }
        }
        let t = Instant::now();
        let mut buf = vec![0u8; 8 << 20];
        for f in &files {
            let mut r = std::fs::File::open(f)?;
            while std::io::Read::read(&mut r, &mut buf)? > 0 {}
        }
        let secs = t.elapsed().as_secs_f64();
        println!("plain_read_{label}: {secs:.3} s ({:.2} GB/s)", total as f64 / 1e9 / secs);
        Ok(())
    };
    println!("model: {preset}, {} tensors in {} files, {:.2} GB", specs.len(), files.len(), total as f64 / 1e9);
    read_only("cold", true)?;
    run("cold", true, false)?;
    read_only("warm", false)?;
    run("warm_no_cache", false, false)?;
    run("cached", false, true)?;
    Ok(())
}
