//! Text side of a sample: HF `tokenizer.json` via the `tokenizers` crate, Otter's
//! special tokens, `[<s>] + ids + [</s>]`, and label masking.
//!
//! LLaMA's tokenizer has `<s>` and `</s>`; MPT's (GPT-NeoX's) has neither, only
//! `<|endoftext|>`, which is then both (upstream Otter-MPT: `[<|endoftext|>] + ids +
//! [<|endoftext|>]`, every `<|endoftext|>` but the first labelled), and no pad token:
//! `<PAD>` is added with Otter's other tokens, as upstream does.

use std::path::{Path, PathBuf};
use tokenizers::{AddedToken, Tokenizer};

/// Otter's added tokens, in upstream's order (`<PAD>` last, as the pad token).
pub const ADDED_TOKENS: [&str; 4] = ["<|endofchunk|>", "<image>", "<answer>", "<PAD>"];

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: cannot load tokenizer: {message}")]
    Load { path: PathBuf, message: String },
    #[error("{path}: token `{token}` has id {id}, outside the model's vocabulary of {vocab}")]
    OutOfVocab { path: PathBuf, token: String, id: u32, vocab: usize },
    #[error("{path}: token `{token}` is not in the vocabulary")]
    Unknown { path: PathBuf, token: String },
    #[error("tokenizer: {0}")]
    Encode(String),
}

/// Ids of the tokens sample building depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    pub bos: i64,
    pub eos: i64,
    pub pad: i64,
    pub end_of_chunk: i64,
    pub answer: i64,
    pub media: i64,
}

pub struct TextTokenizer {
    tok: Tokenizer,
    pub ids: SpecialIds,
}

impl TextTokenizer {
    /// Loads `tokenizer.json`, adds Otter's special tokens when missing (in upstream's
    /// order), and checks every special id against `vocab_size` (the model's embedding
    /// rows) when given.
    pub fn from_file(path: &Path, vocab_size: Option<usize>) -> Result<Self, TokenizerError> {
        let mut tok = Tokenizer::from_file(path)
            .map_err(|e| TokenizerError::Load { path: path.to_path_buf(), message: e.to_string() })?;
        let missing: Vec<AddedToken> = ADDED_TOKENS
            .iter()
            .filter(|t| tok.token_to_id(t).is_none())
            .map(|t| AddedToken::from(t.to_string(), true))
            .collect();
        if !missing.is_empty() {
            tok.add_special_tokens(&missing);
        }
        let id = |t: &str| {
            tok.token_to_id(t).ok_or_else(|| TokenizerError::Unknown { path: path.to_path_buf(), token: t.to_string() })
        };
        // Begin/end of sequence: LLaMA's `<s>`/`</s>`, else GPT-NeoX's `<|endoftext|>`.
        let or_endoftext = |t: &'static str| if tok.token_to_id(t).is_some() { t } else if tok.token_to_id("<|endoftext|>").is_some() { "<|endoftext|>" } else { t };
        let mut check = Vec::new();
        for t in [or_endoftext("<s>"), or_endoftext("</s>"), "<PAD>", "<|endofchunk|>", "<answer>", "<image>"] {
            check.push((t, id(t)?));
        }
        if let Some(v) = vocab_size {
            for (t, i) in &check {
                if *i as usize >= v {
                    return Err(TokenizerError::OutOfVocab { path: path.to_path_buf(), token: t.to_string(), id: *i, vocab: v });
                }
            }
        }
        let g = |k: usize| check[k].1 as i64;
        let ids = SpecialIds { bos: g(0), eos: g(1), pad: g(2), end_of_chunk: g(3), answer: g(4), media: g(5) };
        Ok(Self { tok, ids })
    }

    /// Token ids of `text` without special tokens added around it.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, TokenizerError> {
        let enc = self.tok.encode(text, false).map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// Text of `ids` (special tokens kept, so `<|endofchunk|>` stays visible).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.tok.decode(ids, false).map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// `[<s>] + encode(prompt) + [</s>]` and its labels.
    pub fn sample_ids(&self, prompt: &str) -> Result<(Vec<i64>, Vec<i64>), TokenizerError> {
        let mut ids = Vec::with_capacity(prompt.len() / 2 + 2);
        ids.push(self.ids.bos);
        ids.extend(self.encode(prompt)?);
        ids.push(self.ids.eos);
        let labels = labels(&ids, &self.ids);
        Ok((ids, labels))
    }
}

/// -100 everywhere except the tokens after each `<answer>` up to and including the next
/// `<|endofchunk|>`, and every `</s>`; position 0 is always -100.
pub fn labels(ids: &[i64], sp: &SpecialIds) -> Vec<i64> {
    let mut labels = vec![-100i64; ids.len()];
    let mut in_answer = false;
    for (i, &t) in ids.iter().enumerate() {
        if in_answer {
            labels[i] = t;
            if t == sp.end_of_chunk {
                in_answer = false;
            }
        } else if t == sp.answer {
            in_answer = true;
        }
        if t == sp.eos {
            labels[i] = t;
        }
    }
    if let Some(l) = labels.first_mut() {
        *l = -100;
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MPT's tokenizer (the fixture's, GPT-NeoX conventions): `<|endoftext|>` = 0 opens
    /// and closes a sample, `<PAD>` = 303 pads; the labels keep every `<|endoftext|>` but
    /// the first, as in the fixtures' sequences.
    #[test]
    fn an_mpt_tokenizer_wraps_samples_in_endoftext() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/mpt/tiny_otter/tokenizer.json");
        let tok = TextTokenizer::from_file(&path, Some(320)).unwrap();
        assert_eq!(tok.ids, SpecialIds { bos: 0, eos: 0, pad: 303, end_of_chunk: 300, answer: 302, media: 301 });
        let (ids, labels) = tok.sample_ids("<image>User: hi GPT:<answer>ok<|endofchunk|>").unwrap();
        assert_eq!((ids[0], ids[1], *ids.last().unwrap()), (0, 301, 0));
        assert_eq!((labels[0], *labels.last().unwrap()), (-100, 0), "the closing <|endoftext|> is a target, the opening one not");
        let answer = ids.iter().position(|&t| t == 302).unwrap();
        assert!(labels[..=answer].iter().all(|&l| l == -100));
        assert!(labels[answer + 1..].iter().all(|&l| l != -100), "the answer through <|endofchunk|> and the end are targets");
    }

    #[test]
    fn labels_cover_answers_through_end_of_chunk_and_eos() {
        let sp = SpecialIds { bos: 0, eos: 1, pad: 9, end_of_chunk: 8, answer: 7, media: 6 };
        let ids = [0, 6, 20, 21, 7, 30, 31, 8, 6, 22, 7, 32, 8, 1];
        let want = [-100, -100, -100, -100, -100, 30, 31, 8, -100, -100, -100, 32, 8, 1];
        assert_eq!(labels(&ids, &sp), want);
    }
}
