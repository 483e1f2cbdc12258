//! Issue 46: a run is a function of its inputs. The first requirement: each micro-batch's
//! loss and gradients come out the same bits wherever it runs.
//!
//! Measured (2026-12-07, this 2-core machine, libtorch 2.x CPU): with 2, 3 or 4 intra-op
//! threads instead of 1, 7 to 9 of the benchmark model's 115 trainable gradients differ in
//! their last bits (the gated cross-attention's scalar gates, whose gradient is a full
//! reduction split over threads; at 3 threads also `lm_head` and `embed_tokens`), while the
//! loss is the same. So the thread count is an input: a rank's count must be the job's,
//! not what `cpus.rs` derives from how many ranks share its host today (which changes when
//! a rank joins or leaves it). What these tests pin down is the rest: at a given count, the
//! same bits every time.

use otter::model::config::HfOtterConfig;
use otter::model::weights::{LoadOptions, Params};
use otter::model::{causal_lm_loss, Otter};
use otter::train::TensorBatch;
use tch::Tensor;

/// The loss and every trainable gradient of one forward and backward of `batch` with
/// `threads` intra-op threads.
fn loss_and_grads(model: &Otter, batch: &TensorBatch, threads: i32) -> (Tensor, Vec<(String, Tensor)>) {
    tch::set_num_threads(threads);
    let loss = causal_lm_loss(&model.forward(&batch.vision_x, &batch.input_ids, &batch.attention_mask), &batch.labels);
    loss.backward();
    let grads = model
        .trainable()
        .into_iter()
        .map(|(name, p)| {
            let g = p.grad().copy();
            let mut p = p.shallow_clone();
            p.zero_grad();
            (name.to_string(), g)
        })
        .collect();
    (loss.detach(), grads)
}

/// Bit-for-bit equality (NaNs included), naming the first tensor that differs.
fn same_bits(what: &str, a: &Tensor, b: &Tensor) -> Result<(), String> {
    let (x, y) = (a.view_dtype(tch::Kind::Int), b.view_dtype(tch::Kind::Int));
    if a.size() == b.size() && x.equal(&y) {
        Ok(())
    } else {
        let d = (a - b).abs().max().double_value(&[]);
        Err(format!("{what}: differs (max |diff| {d:e})"))
    }
}

#[test]
fn at_a_given_intra_op_thread_count_a_micro_batchs_loss_and_gradients_are_the_same_bits_every_time() {
    // The benchmark model (hidden 1024, 4 layers, CLIP at 224 px): big enough that the
    // GEMMs, reductions and elementwise kernels split their work over threads (the tiny
    // model's tensors are below libtorch's grain size).
    let cfg = HfOtterConfig::from_file(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/configs/compute.json")).unwrap().resolve("compute").unwrap();
    let opts = LoadOptions::default();
    let model = Otter::new(cfg.clone(), Params::random(&cfg, 0, opts), opts);
    tch::manual_seed(7);
    let batch = TensorBatch::random(&cfg, 2, 128, tch::Device::Cpu);
    let before = tch::get_num_threads();
    let mut differ = Vec::new();
    let mut compared = 0;
    for threads in [1, 2] {
        let (loss, grads) = loss_and_grads(&model, &batch, threads);
        let (again, grads_again) = loss_and_grads(&model, &batch, threads);
        differ.extend(same_bits(&format!("{threads} thread(s): loss"), &loss, &again).err());
        for ((name, a), (_, b)) in grads.iter().zip(&grads_again) {
            differ.extend(same_bits(&format!("{threads} thread(s): grad of {name}"), a, b).err());
        }
        compared += grads.len() + 1;
        if threads == 2 {
            // The control: the comparison sees a one-ulp change in one element.
            let (name, g) = &grads[grads.len() / 2];
            let nudged = g.copy();
            let flat = nudged.view([-1]);
            let x = flat.double_value(&[0]) as f32;
            let _ = flat.get(0).fill_(f32::from_bits(x.to_bits() + 1) as f64);
            assert!(same_bits(name, g, &nudged).is_err(), "a one-ulp change in {name} went unseen");
        }
    }
    tch::set_num_threads(before);
    assert!(differ.is_empty(), "{} of {compared} tensors differ between two runs at the same thread count:\n{}", differ.len(), differ.join("\n"));
}
