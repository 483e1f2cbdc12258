//! The Rust Otter computes what upstream's PyTorch Otter computes.
//!
//! Reference: tests/fixtures/parity/*.safetensors (upstream forward + backward, f32 CPU).
//! Tolerances (fixtures README): logits max|diff| <= 1e-4, loss |diff| <= 1e-5,
//! each grad max|diff| <= 1e-4 * max(1, max|grad|).

use crate::common;

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
        .args(["--ignored", "--exact", "parity::write_to_a_frozen_weight", "--nocapture"])
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

/// The same checks on the MPT backbone (tests/fixtures/mpt/, upstream's `MPTForCausalLM`
/// under Otter; tolerances from its README: the same as above).
mod mpt {
    use super::*;

    fn load() -> Otter {
        Otter::load_dir(&tiny_mpt_model(), LoadOptions::default()).expect("tiny MPT fixture loads")
    }

    /// Max |diff| of logits, loss and the worst gradient relative to its tolerance.
    fn check(case: &str, logits: &Tensor, loss: &Tensor, grads: &BTreeMap<String, Tensor>) -> (f64, f64, f64) {
        let want = TensorFile::read(&mpt_fixtures().join(format!("parity/{case}.safetensors"))).unwrap();
        let dl = max_abs_diff(logits, want.get("logits").unwrap());
        assert!(dl <= 1e-4, "{case}: logits differ by {dl}");
        let dloss = max_abs_diff(&loss.reshape([1]), want.get("loss").unwrap());
        assert!(dloss <= 1e-5, "{case}: loss differs by {dloss}");
        let expected: Vec<_> = want.tensors.keys().filter(|k| k.starts_with("grad.")).collect();
        assert_eq!(expected.len(), 48, "{case}: the fixture's trainable gradients");
        assert_eq!(expected.len(), grads.len(), "{case}: number of trainable grads");
        let mut worst = 0f64;
        for name in expected {
            let w = want.get(name).unwrap();
            let g = grads.get(name.as_str()).unwrap_or_else(|| panic!("{case}: no {name}"));
            let d = max_abs_diff(g, w);
            let tol = 1e-4 * max_abs(w).max(1.0);
            assert!(d <= tol, "{case}: {name} differs by {d} (tolerance {tol})");
            worst = worst.max(d / tol);
        }
        (dl, dloss, worst)
    }

    fn in_process(case: &str) {
        let model = load();
        let inputs = TensorFile::read(&mpt_fixtures().join(format!("parity/{case}.safetensors"))).unwrap();
        let out = evaluate(&model, &inputs, true).unwrap();
        let grads: BTreeMap<_, _> = out.grads.into_iter().collect();
        let (dl, dloss, g) = check(case, &out.logits, out.loss.as_ref().unwrap(), &grads);
        println!("mpt {case}: logits max|diff| {dl:.2e} (<= 1e-4), loss |diff| {dloss:.2e} (<= 1e-5), worst grad at {:.1}% of its tolerance", 100.0 * g);
    }

    #[test]
    fn in_context_batch_matches_upstream_mpt_in_process() {
        in_process("incontext");
    }

    #[test]
    fn text_before_first_image_batch_matches_upstream_mpt_in_process() {
        in_process("pretext");
    }

    #[test]
    fn otter_eval_command_matches_upstream_mpt() {
        let dir = tempfile::tempdir().unwrap();
        for case in ["incontext", "pretext"] {
            let out = dir.path().join(format!("{case}.safetensors"));
            let inputs = mpt_fixtures().join(format!("parity/{case}.safetensors"));
            let (ok, _, err) = run_otter(&[
                "eval", "--model", tiny_mpt_model().to_str().unwrap(), "--inputs", inputs.to_str().unwrap(), "--out", out.to_str().unwrap(), "--grads",
            ]);
            assert!(ok, "otter eval failed: {err}");
            let got = TensorFile::read(&out).unwrap();
            let grads: BTreeMap<_, _> =
                got.tensors.iter().filter(|(k, _)| k.starts_with("grad.")).map(|(k, v)| (k.clone(), v.shallow_clone())).collect();
            check(case, got.get("logits").unwrap(), got.get("loss").unwrap(), &grads);
        }
    }

    /// Upstream's rule for MPT (fixture `trainable.json`): perceiver, gated cross-attention
    /// and `wte`; no lm_head; the MPT blocks, `norm_f` and CLIP frozen. `wte`'s gradient sums
    /// its two uses: rows of ids no sample contains get gradient through the output
    /// projection alone.
    #[test]
    fn trainable_set_is_upstreams_for_mpt_and_wte_trains_through_both_uses() {
        #[derive(serde::Deserialize)]
        struct Trainable {
            total_params: u64,
            trainable_params: u64,
            trainable: BTreeMap<String, Vec<i64>>,
        }
        let want: Trainable = serde_json::from_str(&std::fs::read_to_string(tiny_mpt_model().join("trainable.json")).unwrap()).unwrap();
        let model = load();
        let c = otter::model::spec::count(&otter::model::spec::parameter_specs(&model.cfg));
        assert_eq!((c.total, c.trainable), (want.total_params, want.trainable_params));
        let inputs = TensorFile::read(&mpt_fixtures().join("parity/incontext.safetensors")).unwrap();
        evaluate(&model, &inputs, true).unwrap();
        for (name, t) in model.params.tensors() {
            let trainable = want.trainable.get(name);
            assert_eq!(t.requires_grad(), trainable.is_some(), "{name}: requires_grad");
            if let Some(shape) = trainable {
                assert_eq!(&t.size(), shape, "{name}");
                assert!(t.grad().defined(), "{name}: trainable but got no gradient");
            } else {
                assert!(!t.grad().defined(), "{name}: frozen but has a gradient");
            }
        }
        assert_eq!(model.params.trainable().len(), want.trainable.len());
        assert!(!model.params.tensors().keys().any(|k| k.contains("lm_head") || k.contains("wpe")));
        let wte = model.params.get("lang_encoder.transformer.wte.weight").grad();
        let unused_rows = wte.narrow(0, 304, 16); // ids past the tokenizer: output projection only
        assert!(max_abs(&unused_rows) > 0.0, "the tied wte gets the output projection's gradient");
    }

    #[test]
    fn mpt_frozen_weights_are_read_from_the_memory_map_without_a_copy() {
        let model = load();
        let frozen: u64 = model.params.tensors().values().filter(|t| !t.requires_grad()).map(|t| (t.numel() * 4) as u64).sum();
        assert!(frozen > 0);
        assert_eq!(model.params.mapped_bytes(), frozen, "every frozen f32 weight views the mmap");
    }

    /// Upstream's sharded layout (`model-0000K-of-0000N.safetensors` + index, no `.bin`)
    /// loads strictly and computes what the single file does.
    #[test]
    fn a_sharded_mpt_checkpoint_with_an_index_loads_like_a_single_file() {
        let dir = tempfile::tempdir().unwrap();
        let full = TensorFile::read(&tiny_mpt_model().join("model.safetensors")).unwrap();
        let mut weight_map = serde_json::Map::new();
        let mut shards: [Vec<(String, Tensor)>; 3] = Default::default();
        for (i, (name, t)) in full.tensors.iter().enumerate() {
            let file = format!("model-{:05}-of-00003.safetensors", i % 3 + 1);
            weight_map.insert(name.clone(), file.into());
            shards[i % 3].push((name.clone(), t.shallow_clone()));
        }
        for (i, s) in shards.iter().enumerate() {
            Tensor::write_safetensors(s, dir.path().join(format!("model-{:05}-of-00003.safetensors", i + 1))).unwrap();
        }
        let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
        std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
        for f in ["config.json", "tokenizer.json"] {
            std::fs::copy(tiny_mpt_model().join(f), dir.path().join(f)).unwrap();
        }
        let sharded = Otter::load_dir(dir.path(), LoadOptions::default()).unwrap();
        assert_eq!(sharded.params.mapped_bytes(), load().params.mapped_bytes());
        let inputs = TensorFile::read(&mpt_fixtures().join("parity/incontext.safetensors")).unwrap();
        let x = evaluate(&sharded, &inputs, false).unwrap().logits;
        let y = evaluate(&load(), &inputs, false).unwrap().logits;
        assert_eq!(max_abs_diff(&x, &y), 0.0);
    }

    /// Strict loading names every disagreeing key: an `lm_head` (MPT ties it) is unexpected,
    /// a missing block weight is missing.
    #[test]
    fn strict_loading_names_an_untied_head_and_a_missing_block_weight() {
        let dir = tempfile::tempdir().unwrap();
        let full = TensorFile::read(&tiny_mpt_model().join("model.safetensors")).unwrap();
        let gone = "lang_encoder.transformer.blocks.2.decoder_layer.attn.Wqkv.weight";
        let mut t: Vec<(String, Tensor)> = full.tensors.iter().filter(|(n, _)| n.as_str() != gone).map(|(n, v)| (n.clone(), v.shallow_clone())).collect();
        t.push(("lang_encoder.lm_head.weight".into(), full.get("lang_encoder.transformer.wte.weight").unwrap().copy()));
        Tensor::write_safetensors(&t, dir.path().join("model.safetensors")).unwrap();
        std::fs::copy(tiny_mpt_model().join("config.json"), dir.path().join("config.json")).unwrap();
        let err = Otter::load_dir(dir.path(), LoadOptions::default()).err().expect("must fail").to_string();
        assert!(err.contains(&format!("missing key: {gone}")), "{err}");
        assert!(err.contains("unexpected key: lang_encoder.lm_head.weight"), "{err}");
    }

    /// MPT options the fixtures do not cover are refused when the model loads, naming the
    /// option (the full list is a unit test of the config).
    #[test]
    fn an_unimplemented_mpt_option_is_refused_at_load_by_name() {
        for (key, value, field) in [
            ("clip_qkv", serde_json::json!(6.0), "text_config.attn_config.clip_qkv"),
            ("qk_ln", serde_json::json!(true), "text_config.attn_config.qk_ln"),
            ("attn_type", serde_json::json!("multiquery_attention"), "text_config.attn_config.attn_type"),
            ("alibi", serde_json::json!(false), "text_config.attn_config.alibi"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(tiny_mpt_model().join("config.json")).unwrap()).unwrap();
            cfg["text_config"]["attn_config"][key] = value;
            std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
            std::fs::copy(tiny_mpt_model().join("model.safetensors"), dir.path().join("model.safetensors")).unwrap();
            let err = Otter::load_dir(dir.path(), LoadOptions::default()).err().expect("must be refused").to_string();
            assert!(err.contains(field), "{key}: {err}");
            let (ok, _, err) = run_otter(&["model-info", "--config", dir.path().to_str().unwrap()]);
            assert!(!ok && err.contains(field), "{key}: {err}");
        }
    }

    #[test]
    fn a_sequence_longer_than_max_seq_len_is_refused_by_name() {
        let model = load();
        let inputs = TensorFile::read(&mpt_fixtures().join("parity/pretext.safetensors")).unwrap();
        let ids = inputs.get("input_ids").unwrap().repeat([1, 6]); // 294 > max_seq_len 256
        let mask = ids.ones_like();
        let err = model.check_inputs(inputs.get("vision_x").unwrap(), &ids, &mask).unwrap_err().to_string();
        assert!(err.contains("input_ids") && err.contains("max_seq_len 256"), "{err}");
    }
}
