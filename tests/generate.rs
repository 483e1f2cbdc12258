//! Greedy generation: the KV cache changes nothing but speed, and generated tokens keep
//! attending to the last image (upstream's cached path loses it after the first token).

mod common;

use common::*;
use otter::model::weights::LoadOptions;
use otter::model::Otter;
use otter::tensors::TensorFile;
use tch::Tensor;

fn setup() -> (Otter, Tensor, Vec<i64>) {
    let model = Otter::load_dir(&tiny_model(), LoadOptions::default()).unwrap();
    let f = TensorFile::read(&fixtures().join("parity/incontext.safetensors")).unwrap();
    let vx = f.get("vision_x").unwrap().narrow(0, 0, 1); // (1, 2, 1, 3, 32, 32)
    let ids = Vec::<i64>::try_from(f.get("input_ids").unwrap().get(0)).unwrap();
    let mask = Vec::<i64>::try_from(f.get("attention_mask").unwrap().get(0)).unwrap();
    let n = mask.iter().filter(|&&m| m == 1).count();
    (model, vx, ids[..n - 20].to_vec()) // a prompt ending mid-sample, after both <image>s
}

/// Uncached decoding recomputes the media mask over the whole sequence, so agreement
/// also proves that cached steps keep attending to the last image: with upstream's bug
/// (new tokens' image count taken from the new tokens alone, i.e. 0) this test fails.
#[test]
fn cached_and_uncached_decoding_agree() {
    let (model, vx, prompt) = setup();
    let a = model.generate(&vx, &prompt, 40, true);
    let b = model.generate(&vx, &prompt, 40, false);
    assert_eq!(a.tokens, b.tokens);
    assert!(a.tokens.len() >= 2);
    let worst = a.logits.iter().zip(&b.logits).map(|(x, y)| max_abs_diff(x, y)).fold(0.0, f64::max);
    assert!(worst <= 1e-4, "cached logits differ by {worst}");
    // And the image matters to generated tokens at all.
    let other = vx.copy();
    let _ = other.narrow(1, 1, 1).fill_(0.7);
    let c = model.generate(&other, &prompt, 2, true);
    assert!(max_abs_diff(&a.logits[1], &c.logits[1]) > 1e-5);
}

#[test]
fn otter_generate_command_runs_with_and_without_cache() {
    let img = fixtures().join("images/img1.png");
    let model = tiny_model();
    let args = |extra: &[&str]| {
        let mut v = vec!["generate", "--model", model.to_str().unwrap(), "--image", img.to_str().unwrap(), "--prompt", "What is it?", "--max-new-tokens", "8"];
        v.extend_from_slice(extra);
        v.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |a: Vec<String>| run_otter(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let (ok1, out1, err1) = run(args(&[]));
    let (ok2, out2, err2) = run(args(&["--no-cache"]));
    assert!(ok1 && ok2, "{err1}{err2}");
    assert_eq!(out1, out2);
    let (ok, _, err) = run(args(&["--raw"]));
    assert!(!ok && err.contains("<image>"), "a raw prompt without <image> is refused: {err}");
}
