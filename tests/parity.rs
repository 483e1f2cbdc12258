//! The Rust Otter computes what upstream's PyTorch Otter computes.
//!
//! Reference: tests/fixtures/parity/*.safetensors (upstream forward + backward, f32 CPU).
//! Tolerances (fixtures README): logits max|diff| <= 1e-4, loss |diff| <= 1e-5,
//! each grad max|diff| <= 1e-4 * max(1, max|grad|).

mod common;

use common::*;
use otter::cmd::eval::evaluate;
use otter::model::weights::LoadOptions;
use otter::model::Otter;
use otter::tensors::TensorFile;
use std::collections::BTreeMap;
use tch::Tensor;

fn load_tiny() -> Otter {
    Otter::load_dir(&tiny_model(), LoadOptions::default()).expect("tiny fixture loads")
}

/// Checks logits, loss and every trainable gradient in `got` against the fixture.
fn assert_matches_fixture(case: &str, logits: &Tensor, loss: &Tensor, grads: &BTreeMap<String, Tensor>) {
    let want = TensorFile::read(&fixtures().join(format!("parity/{case}.safetensors"))).unwrap();
    let d = max_abs_diff(logits, want.get("logits").unwrap());
    assert!(d <= 1e-4, "{case}: logits differ by {d}");
    let d = max_abs_diff(&loss.reshape([1]), want.get("loss").unwrap());
    assert!(d <= 1e-5, "{case}: loss differs by {d}");
    let expected: Vec<_> = want.tensors.keys().filter(|k| k.starts_with("grad.")).collect();
    assert_eq!(expected.len(), grads.len(), "{case}: number of trainable grads");
    for name in expected {
        let w = want.get(name).unwrap();
        let g = grads.get(name.as_str()).unwrap_or_else(|| panic!("{case}: no {name}"));
        let d = max_abs_diff(g, w);
        let tol = 1e-4 * max_abs(w).max(1.0);
        assert!(d <= tol, "{case}: {name} differs by {d} (tolerance {tol})");
    }
}

fn check_in_process(case: &str) {
    let model = load_tiny();
    let inputs = TensorFile::read(&fixtures().join(format!("parity/{case}.safetensors"))).unwrap();
    let out = evaluate(&model, &inputs, true).unwrap();
    let grads: BTreeMap<_, _> = out.grads.into_iter().collect();
    assert_matches_fixture(case, &out.logits, out.loss.as_ref().unwrap(), &grads);
}

#[test]
fn in_context_batch_matches_upstream_in_process() {
    check_in_process("incontext");
}

#[test]
fn text_before_first_image_batch_matches_upstream_in_process() {
    check_in_process("pretext");
}

#[test]
fn otter_eval_command_matches_upstream() {
    let dir = tempfile::tempdir().unwrap();
    for case in ["incontext", "pretext"] {
        let out = dir.path().join(format!("{case}.safetensors"));
        let inputs = fixtures().join(format!("parity/{case}.safetensors"));
        let (ok, _, err) = run_otter(&[
            "eval",
            "--model",
            tiny_model().to_str().unwrap(),
            "--inputs",
            inputs.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--grads",
        ]);
        assert!(ok, "otter eval failed: {err}");
        let got = TensorFile::read(&out).unwrap();
        let grads: BTreeMap<_, _> = got
            .tensors
            .iter()
            .filter(|(k, _)| k.starts_with("grad."))
            .map(|(k, v)| (k.clone(), v.shallow_clone()))
            .collect();
        assert_matches_fixture(case, got.get("logits").unwrap(), got.get("loss").unwrap(), &grads);
    }
}

#[test]
fn frozen_parameters_get_no_gradient_and_trainable_set_is_upstreams() {
    let model = load_tiny();
    let inputs = TensorFile::read(&fixtures().join("parity/incontext.safetensors")).unwrap();
    evaluate(&model, &inputs, true).unwrap();
    let mut trainable = 0;
    for (name, t) in model.params.tensors() {
        let is_trainable = name.starts_with("perceiver.")
            || name.contains("gated_cross_attn_layer")
            || name.ends_with("embed_tokens.weight")
            || name.ends_with("lm_head.weight");
        assert_eq!(t.requires_grad(), is_trainable, "{name}: requires_grad");
        if is_trainable {
            trainable += 1;
            assert!(t.grad().defined(), "{name}: trainable but got no gradient");
        } else {
            assert!(!t.grad().defined(), "{name}: frozen but has a gradient");
        }
    }
    assert_eq!(trainable, 49);
}

#[test]
fn text_before_the_first_image_does_not_see_any_image() {
    // pretext: each sample has text before its first <image>; those positions must not
    // change when the image changes, and later positions must.
    let model = load_tiny();
    let inputs = TensorFile::read(&fixtures().join("parity/pretext.safetensors")).unwrap();
    let ids = inputs.get("input_ids").unwrap();
    let mask = inputs.get("attention_mask").unwrap();
    let vx = inputs.get("vision_x").unwrap();
    let a = tch::no_grad(|| model.forward(vx, ids, mask));
    let b = tch::no_grad(|| model.forward(&(vx * -1.0 + 0.5), ids, mask));
    let first_image = Vec::<i64>::try_from(ids.get(0).eq(model.cfg.tokens.media).to_kind(tch::Kind::Int64).argmax(0, false).reshape([1]))
        .unwrap()[0];
    assert!(first_image > 0, "fixture has text before the first image");
    let before = max_abs_diff(&a.get(0).narrow(0, 0, first_image), &b.get(0).narrow(0, 0, first_image));
    let after = max_abs_diff(&a.get(0).narrow(0, first_image, 1), &b.get(0).narrow(0, first_image, 1));
    assert_eq!(before, 0.0, "text before the first <image> changed with the image");
    assert!(after > 1e-6, "the <image> token must attend its image");
}

#[test]
fn frozen_weights_are_read_from_the_memory_map_without_a_copy() {
    let model = load_tiny();
    let frozen: u64 = model
        .params
        .tensors()
        .iter()
        .filter(|(_, t)| !t.requires_grad())
        .map(|(_, t)| (t.numel() * 4) as u64)
        .sum();
    assert!(frozen > 0);
    assert_eq!(model.params.mapped_bytes(), frozen, "every frozen f32 weight views the mmap");
}

const FROZEN: &str = "lang_encoder.model.layers.2.decoder_layer.self_attn.q_proj.weight";

#[test]
fn a_frozen_weight_taken_out_of_the_model_outlives_it() {
    let kept = {
        let model = load_tiny();
        model.params.get(FROZEN)
    }; // the model, its maps' other holders and the loader are gone
    let want = TensorFile::read(&tiny_model().join("model.safetensors")).unwrap();
    assert_eq!(max_abs_diff(&kept, want.get(FROZEN).unwrap()), 0.0, "the map lives as long as a tensor over it");
}

/// The body of the child process of the next test.
#[test]
#[ignore = "run by a_write_to_a_frozen_weight_faults_at_once as a child process"]
fn write_to_a_frozen_weight() {
    assert!(std::env::var_os("OTTER_PARITY_CHILD").is_some(), "a child of a_write_to_a_frozen_weight_faults_at_once: run that instead");
    let model = load_tiny();
    let mut w = model.params.get(FROZEN);
    let _ = w.f_add_scalar_(1.0);
    println!("the write went through");
}

#[test]
fn a_write_to_a_frozen_weight_faults_at_once() {
    use std::os::unix::process::ExitStatusExt;
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "write_to_a_frozen_weight", "--nocapture"])
        .env("OTTER_PARITY_CHILD", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("the write went through"), "{stdout}");
    assert_eq!(out.status.signal(), Some(libc::SIGSEGV), "an in-place write to a read-only mapped weight must fault: {:?}", out.status);
}

#[test]
fn sharded_checkpoint_with_index_loads_like_a_single_file() {
    let dir = tempfile::tempdir().unwrap();
    let full = TensorFile::read(&tiny_model().join("model.safetensors")).unwrap();
    let (mut a, mut b) = (vec![], vec![]);
    let mut weight_map = serde_json::Map::new();
    for (i, (name, t)) in full.tensors.iter().enumerate() {
        let file = if i % 2 == 0 { "model-00001-of-00002.safetensors" } else { "model-00002-of-00002.safetensors" };
        weight_map.insert(name.clone(), file.into());
        if i % 2 == 0 { &mut a } else { &mut b }.push((name.clone(), t.shallow_clone()));
    }
    Tensor::write_safetensors(&a, dir.path().join("model-00001-of-00002.safetensors")).unwrap();
    Tensor::write_safetensors(&b, dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": weight_map}).to_string(),
    )
    .unwrap();
    std::fs::copy(tiny_model().join("config.json"), dir.path().join("config.json")).unwrap();
    let sharded = Otter::load_dir(dir.path(), LoadOptions::default()).unwrap();
    let single = load_tiny();
    let inputs = TensorFile::read(&fixtures().join("parity/incontext.safetensors")).unwrap();
    let x = evaluate(&sharded, &inputs, false).unwrap().logits;
    let y = evaluate(&single, &inputs, false).unwrap().logits;
    assert_eq!(max_abs_diff(&x, &y), 0.0);
}
