//! `otter generate`: greedy decoding from images and a prompt.

use crate::data::tokenize::TextTokenizer;
use crate::data::transform::preprocess;
use crate::model::weights::LoadOptions;
use crate::model::Otter;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

pub struct GenerateArgs<'a> {
    pub model: &'a Path,
    pub images: &'a [PathBuf],
    pub prompt: &'a str,
    /// Use the prompt as given (it must contain one `<image>` per image); otherwise it is
    /// wrapped in upstream's format: `<image>...User:{prompt} GPT:<answer>`.
    pub raw: bool,
    pub max_new_tokens: usize,
    pub no_cache: bool,
    pub device: Device,
    pub dtype: Kind,
}

pub fn run(a: GenerateArgs) -> Result<()> {
    super::check_device(a.device)?;
    let model = Otter::load_dir(a.model, LoadOptions { device: a.device, frozen_kind: a.dtype })?;
    let tok_path = a.model.join("tokenizer.json");
    let tok = TextTokenizer::from_file(&tok_path, Some(model.cfg.text.vocab_size()))?;
    if a.images.is_empty() {
        bail!("--image: give at least one image");
    }
    let text = if a.raw {
        a.prompt.to_string()
    } else {
        format!("{}User:{} GPT:<answer>", "<image>".repeat(a.images.len()), a.prompt.trim())
    };
    let mut ids = vec![tok.ids.bos];
    ids.extend(tok.encode(&text)?);
    let n_media = ids.iter().filter(|&&t| t == tok.ids.media).count();
    if n_media != a.images.len() {
        bail!("the prompt has {n_media} <image> tokens for {} --image files", a.images.len());
    }
    let s = model.cfg.vision.image_size;
    let mut pixels = Vec::new();
    for p in a.images {
        let bytes = std::fs::read(p).with_context(|| p.display().to_string())?;
        preprocess(&bytes, s, &mut pixels).with_context(|| p.display().to_string())?;
    }
    let vx = Tensor::from_slice(&pixels).reshape([1, a.images.len() as i64, 1, 3, s as i64, s as i64]);
    let out = model.generate(&vx, &ids, a.max_new_tokens, !a.no_cache);
    let toks: Vec<u32> = out.tokens.iter().map(|&t| t as u32).collect();
    println!("{}", tok.decode(&toks)?);
    Ok(())
}
