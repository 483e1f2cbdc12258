//! MIMIC-IT metadata files and prompt construction (upstream "simple" format).
//!
//! * `XX_instructions.json`: `{"meta": {...}, "data": {id: {instruction, answer,
//!   image_ids, rel_ins_ids}}}`
//! * `XX_train.json`: query id -> in-context example ids (its keys are the training set)
//!
//! A chunk is `<image>User:{instruction} GPT:<answer>{answer}<|endofchunk|>`;
//! instructions are stripped of spaces and newlines, answers stripped with `\r\n` -> `\n`.

use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: malformed at `{field}`: {message}")]
    Malformed { path: PathBuf, field: String, message: String },
}

#[derive(Debug, Clone, Deserialize)]
pub struct Instruction {
    pub instruction: String,
    pub answer: String,
    #[serde(default)]
    pub image_ids: Vec<String>,
    #[serde(default)]
    pub rel_ins_ids: Vec<String>,
}

/// A record as found in the file: kept as raw JSON so one malformed record is a per-sample
/// error (skippable), not a failure of the whole file.
#[derive(Debug, Deserialize)]
struct InstructionsFile {
    #[serde(default)]
    #[allow(dead_code)]
    meta: serde_json::Value,
    data: BTreeMap<String, serde_json::Value>,
}

pub struct Instructions {
    pub path: PathBuf,
    records: HashMap<String, serde_json::Value>,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, MetaError> {
    let file = std::fs::File::open(path).map_err(|source| MetaError::Io { path: path.to_path_buf(), source })?;
    let reader = std::io::BufReader::with_capacity(1 << 20, file);
    let de = &mut serde_json::Deserializer::from_reader(reader);
    serde_path_to_error::deserialize(de).map_err(|e| MetaError::Malformed {
        path: path.to_path_buf(),
        field: e.path().to_string(),
        message: e.inner().to_string(),
    })
}

impl Instructions {
    pub fn open(path: &Path) -> Result<Self, MetaError> {
        let f: InstructionsFile = read_json(path)?;
        Ok(Self { path: path.to_path_buf(), records: f.data.into_iter().collect() })
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.records.contains_key(id)
    }

    pub fn ids(&self) -> impl Iterator<Item = &String> {
        self.records.keys()
    }

    /// The record `id`, or why it cannot be used (missing, malformed).
    pub fn get(&self, id: &str) -> Result<Instruction, String> {
        let raw = self.records.get(id).ok_or_else(|| format!("instruction `{id}` not found"))?;
        serde_path_to_error::deserialize(raw).map_err(|e| format!("record `{id}` malformed at `{}`: {}", e.path(), e.inner()))
    }
}

/// `XX_train.json`: query id -> in-context example ids.
pub fn read_train_config(path: &Path) -> Result<BTreeMap<String, Vec<String>>, MetaError> {
    read_json(path)
}

/// Upstream's instruction clean-up: strip spaces and newlines at both ends.
pub fn clean_instruction(s: &str) -> String {
    s.trim_matches(|c| c == ' ' || c == '\n').to_string()
}

/// Upstream's answer clean-up: strip, and `\r\n` -> `\n`.
pub fn clean_answer(s: &str) -> String {
    s.trim().replace("\r\n", "\n")
}

/// One `User:… GPT:<answer>…<|endofchunk|>` turn.
pub fn turn(ins: &Instruction) -> String {
    format!("User:{} GPT:<answer>{}<|endofchunk|>", clean_instruction(&ins.instruction), clean_answer(&ins.answer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_are_cleaned_like_upstream() {
        let ins = Instruction {
            instruction: "\n What is it? \n".into(),
            answer: "  A cat.\r\nSleeping. ".into(),
            image_ids: vec![],
            rel_ins_ids: vec![],
        };
        assert_eq!(turn(&ins), "User:What is it? GPT:<answer>A cat.\nSleeping.<|endofchunk|>");
    }
}
