//! The memory plan (`otter plan`) against what a training step really holds on the CPU:
//! the peak resident memory of a step over the memory before it (weights, gradients and
//! optimizer state already allocated by a first step) is the step's activations and
//! transients, which the plan estimates. RSS is per process, and no other test may allocate
//! beside it: nextest runs every test in a process of its own, and scripts/test.sh's
//! cargo-test fallback runs them one at a time.

use otter::model::checkpoint::ActivationCheckpointing;
use otter::model::config::{HfOtterConfig, OtterConfig};
use otter::model::weights::{LoadOptions, Params};
use otter::model::Otter;
use otter::train::optim::AdamWConfig;
use otter::train::plan::{plan, PlanInput};
use otter::train::{StepConfig, TensorBatch, Trainer};

fn status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("{field} in /proc/self/status"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Peak RSS over one training step above the RSS before it, in bytes.
fn measured_step_peak(cfg: &OtterConfig, mode: ActivationCheckpointing, b: i64, l: i64) -> u64 {
    let opts = LoadOptions::default();
    let mut model = Otter::new(cfg.clone(), Params::random(cfg, 0, opts), opts);
    model.set_activation_checkpointing(mode);
    let step_cfg = StepConfig { lr: 1e-5, warmup_steps: 0, total_steps: 100, clip: Some(1.0), adamw: AdamWConfig::default() };
    let mut trainer = Trainer::new(model, step_cfg);
    tch::manual_seed(1);
    let batch = TensorBatch::random(cfg, b, l, tch::Device::Cpu);
    trainer.step(std::slice::from_ref(&batch)); // gradients and AdamW state now exist
    trainer.step(std::slice::from_ref(&batch)); // and the allocator has seen a step
    // What the earlier steps freed goes back to the OS, so the step's own allocations
    // show up as resident pages again.
    otter_core::heap::release_free_memory();
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
    let before = status_kb("VmRSS:");
    trainer.step(std::slice::from_ref(&batch));
    let peak = status_kb("VmHWM:");
    (peak.saturating_sub(before)) * 1024
}

fn input(cfg: &OtterConfig, mode: ActivationCheckpointing, b: u64, l: u64) -> PlanInput {
    PlanInput {
        model: cfg.clone(),
        bf16: false,
        fused_attention: false,
        micro_batch: b,
        seq_len: l,
        media_per_sample: 1,
        frames: 1,
        world: 1,
        optimizer_sharding: false,
        checkpointing: mode,
        bucket_bytes: 25 << 20,
        overlap: true,
        device_bytes: None,
    }
}

#[test]
fn the_plans_activation_estimate_is_within_a_third_of_the_measured_step_peak() {
    // Freed memory goes back to the system at once, so the peak of resident memory is
    // the peak of live bytes (the allocator would otherwise keep freed spans mapped).
    otter_core::heap::return_freed_memory_at_once();
    let compute = HfOtterConfig::from_file(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/configs/compute.json")).unwrap().resolve("compute").unwrap();
    let tiny = OtterConfig::tiny();
    let mut report = Vec::new();
    for (name, cfg, b, l) in [("tiny", &tiny, 8u64, 512u64), ("compute", &compute, 2, 256)] {
        let mut peaks = Vec::new();
        for mode in [ActivationCheckpointing::None, ActivationCheckpointing::DecoderLayers] {
            let measured = measured_step_peak(cfg, mode, b as i64, l as i64);
            // What `otter plan` reports for this job, against what the step really held.
            let estimate = plan(&input(cfg, mode, b, l)).activations;
            let ratio = estimate as f64 / measured as f64;
            report.push(format!("{name} {mode} b{b} x {l}: plan {:.1} MB, measured {:.1} MB, ratio {ratio:.2}", estimate as f64 / 1e6, measured as f64 / 1e6));
            peaks.push((measured, estimate));
        }
        // Checkpointing lowers both the measured peak and the estimate.
        assert!(peaks[1].0 < peaks[0].0 && peaks[1].1 < peaks[0].1, "{name}: {peaks:?}");
    }
    println!("{}", report.join("\n"));
    for line in &report {
        let ratio: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!((0.67..=1.5).contains(&ratio), "estimate off by more than a third:\n{}", report.join("\n"));
    }
}
