//! Greedy generation: the KV cache changes nothing but speed, and generated tokens keep
//! attending to the last image (upstream's cached path loses it after the first token).

use crate::common;

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

/// The same on the MPT backbone: ALiBi positions continue across the cache (a cached
/// step's bias is computed over every cached key, relative to the new query).
mod mpt {
    use super::*;
    use tch::Kind;

    fn setup() -> (Otter, Tensor, Vec<i64>) {
        let model = Otter::load_dir(&tiny_mpt_model(), LoadOptions::default()).unwrap();
        let f = TensorFile::read(&mpt_fixtures().join("parity/incontext.safetensors")).unwrap();
        let vx = f.get("vision_x").unwrap().narrow(0, 0, 1);
        let ids = Vec::<i64>::try_from(f.get("input_ids").unwrap().get(0)).unwrap();
        let mask = Vec::<i64>::try_from(f.get("attention_mask").unwrap().get(0)).unwrap();
        let n = mask.iter().filter(|&&m| m == 1).count();
        (model, vx, ids[..n - 20].to_vec())
    }

    #[test]
    fn mpt_cached_and_uncached_decoding_agree() {
        let (model, vx, prompt) = setup();
        let a = model.generate(&vx, &prompt, 40, true);
        let b = model.generate(&vx, &prompt, 40, false);
        assert_eq!(a.tokens, b.tokens);
        assert!(a.tokens.len() >= 2, "{:?}", a.tokens);
        let worst = a.logits.iter().zip(&b.logits).map(|(x, y)| max_abs_diff(x, y)).fold(0.0, f64::max);
        assert!(worst <= 1e-4, "cached logits differ by {worst}");
        println!("mpt: {} tokens, cached vs uncached logits max|diff| {worst:.2e}", a.tokens.len());
    }

    /// A prompt fed as two chunks through the cache (the second: several queries after 30
    /// cached keys) gives the logits of one forward over the whole prompt; with the
    /// second chunk's positions restarted at 0 instead, it would not.
    #[test]
    fn mpt_a_prompt_in_two_cached_chunks_equals_one_forward() {
        let (model, vx, prompt) = setup();
        tch::no_grad(|| {
            let media = model.encode_media(&vx);
            let ids = Tensor::from_slice(&prompt).view([1, -1]);
            let n = ids.size()[1];
            let text_time = ids.eq(model.cfg.tokens.media).cumsum(-1, Kind::Int64);
            let full = model.decode(&media, &ids, &ids.ones_like(), &text_time, &mut Vec::new(), false);
            let k = 30;
            let mut caches = Vec::new();
            let first = model.decode(&media, &ids.narrow(1, 0, k), &Tensor::ones([1, k], (Kind::Int64, tch::Device::Cpu)), &text_time.narrow(1, 0, k), &mut caches, true);
            let second = model.decode(&media, &ids.narrow(1, k, n - k), &ids.ones_like(), &text_time.narrow(1, k, n - k), &mut caches, true);
            assert_eq!(caches[0].len(), n);
            let d = max_abs_diff(&Tensor::cat(&[first, second], 1), &full);
            assert!(d <= 1e-5, "chunked cached logits differ by {d}");
            // Control: the second chunk on its own (positions from 0) differs.
            let alone = model.decode(&media, &ids.narrow(1, k, n - k), &ids.narrow(1, k, n - k).ones_like(), &text_time.narrow(1, k, n - k), &mut Vec::new(), false);
            assert!(max_abs_diff(&alone, &full.narrow(1, k, n - k)) > 1e-3);
        });
    }

    #[test]
    fn otter_generate_command_runs_the_mpt_model_with_and_without_cache() {
        let img = fixtures().join("images/img1.png");
        let model = tiny_mpt_model();
        let run = |extra: &[&str]| {
            let mut v = vec!["generate", "--model", model.to_str().unwrap(), "--image", img.to_str().unwrap(), "--prompt", "What is it?", "--max-new-tokens", "8"];
            v.extend_from_slice(extra);
            run_otter(&v)
        };
        let (ok1, out1, err1) = run(&[]);
        let (ok2, out2, err2) = run(&["--no-cache"]);
        assert!(ok1 && ok2, "{err1}{err2}");
        assert_eq!(out1, out2);
    }
}
