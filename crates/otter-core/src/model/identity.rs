//! What every rank of a job must share, and a cheap, sound fingerprint of it (issue 42):
//! the frozen weights (every `*.safetensors` file of the model directory: its header and
//! each tensor's bytes), the model's `config.json` and the tokenizer file.
//!
//! Data parallelism over ranks whose frozen weights differ averages the gradients of two
//! different functions: the job fixes one [`ModelIdentity`] at its first generation (see
//! `coord::machine`), records it in every checkpoint manifest, and refuses a node (or a
//! resume) whose identity differs, naming the first file or tensor that does
//! ([`first_difference`]).
//!
//! Cost: each tensor's bytes are hashed with XXH3-64 (several GB/s per core), each file's
//! header with XXH3-128, once per file version: the result is cached by the file's device,
//! inode, size, modification and status-change times (ctime cannot be set by a copy or
//! `touch -d`, so a rewritten file is never taken for the old one). A node's later starts
//! read only the cache and `stat` the files. The cache is `.otter-identity.json` next to
//! the files when the directory is writable, else under `$OTTER_CACHE/identity/` (default
//! `~/.cache/otter`): a read-only model volume works too. The first start reads each file
//! once, which pages in what the ranks load next anyway.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// A 128-bit digest, in hex.
pub type Digest = String;

fn hex128(v: u128) -> Digest {
    format!("{v:032x}")
}

/// One tensor of a weight file: its name and the XXH3-64 of its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorDigest {
    pub name: String,
    pub xxh3: u64,
}

/// One weight file: its name in the model directory, size, the digest of its header
/// (tensor names, dtypes, shapes, offsets, metadata) and of each tensor's data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightFile {
    pub name: String,
    pub bytes: u64,
    pub header: Digest,
    pub tensors: Vec<TensorDigest>,
}

/// The parts of a model's identity, as named by `--accept-model-change`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    Weights,
    Config,
    Tokenizer,
}

impl Part {
    pub const ALL: [Part; 3] = [Part::Weights, Part::Config, Part::Tokenizer];

    pub fn name(self) -> &'static str {
        match self {
            Part::Weights => "weights",
            Part::Config => "config",
            Part::Tokenizer => "tokenizer",
        }
    }
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Part {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Part::ALL.into_iter().find(|p| p.name() == s).ok_or_else(|| format!("{s:?}: expected weights, config or tokenizer"))
    }
}

/// What every rank of a job must share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelIdentity {
    /// XXH3-128 of everything below: equal iff the identities are.
    pub digest: Digest,
    /// `config.json`'s bytes (`preset:NAME` for a built-in preset, whose frozen weights
    /// are drawn from the job's seed).
    pub config: Digest,
    /// The tokenizer file's bytes.
    pub tokenizer: Digest,
    /// The weight files, by name.
    pub weights: Vec<WeightFile>,
}

/// How two identities differ first (in the order weights, config, tokenizer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub part: Part,
    /// The file or tensor, and what about it.
    pub what: String,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.what)
    }
}

impl ModelIdentity {
    /// Assembles an identity (computing its digest).
    pub fn new(config: Digest, tokenizer: Digest, mut weights: Vec<WeightFile>) -> Self {
        weights.sort_by(|a, b| a.name.cmp(&b.name));
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for part in [&config, &tokenizer] {
            h.update(part.as_bytes());
            h.update(b"\0");
        }
        for w in &weights {
            h.update(w.name.as_bytes());
            h.update(&w.bytes.to_le_bytes());
            h.update(w.header.as_bytes());
            for t in &w.tensors {
                h.update(t.name.as_bytes());
                h.update(&t.xxh3.to_le_bytes());
            }
        }
        Self { digest: hex128(h.digest128()), config, tokenizer, weights }
    }

    /// A stand-in identity for simulated nodes (`coord::simnode`, the bench), which load
    /// no model: equal for equal `name`s.
    pub fn synthetic(name: &str) -> Self {
        let d = hex128(xxhash_rust::xxh3::xxh3_128(name.as_bytes()));
        Self::new(d.clone(), d, Vec::new())
    }

    /// The parts in which `other` differs from this identity.
    pub fn parts_differing(&self, other: &ModelIdentity) -> Vec<Part> {
        let mut out = Vec::new();
        if self.weights != other.weights {
            out.push(Part::Weights);
        }
        if self.config != other.config {
            out.push(Part::Config);
        }
        if self.tokenizer != other.tokenizer {
            out.push(Part::Tokenizer);
        }
        out
    }
}

/// The first thing in which `got` differs from `want` (`None`: identical), named for an
/// operator: a missing or extra weight file, a file whose header differs (tensor names,
/// dtypes or shapes), the first tensor whose bytes differ, `config.json`, the tokenizer.
pub fn first_difference(want: &ModelIdentity, got: &ModelIdentity) -> Option<Difference> {
    if want.digest == got.digest {
        return None;
    }
    let weights = |what: String| Some(Difference { part: Part::Weights, what });
    let theirs: BTreeMap<&str, &WeightFile> = got.weights.iter().map(|w| (w.name.as_str(), w)).collect();
    for w in &want.weights {
        let Some(g) = theirs.get(w.name.as_str()) else {
            return weights(format!("weight file {} is missing", w.name));
        };
        if w.header != g.header || w.bytes != g.bytes {
            // Name the first tensor whose name, place or size differs, if the lists show it.
            let first = w.tensors.iter().zip(&g.tensors).find(|(a, b)| a.name != b.name).map(|(a, _)| a.name.clone());
            return weights(match first {
                Some(t) => format!("weight file {}: its header differs (tensors, dtypes or shapes), first at tensor {t}", w.name),
                None => format!("weight file {}: its header differs (tensor dtypes, shapes or metadata; {} vs {} bytes)", w.name, g.bytes, w.bytes),
            });
        }
        if let Some(t) = w.tensors.iter().zip(&g.tensors).find(|(a, b)| a.xxh3 != b.xxh3) {
            return weights(format!("weight file {}: tensor {} differs (its bytes)", w.name, t.0.name));
        }
    }
    let ours: std::collections::BTreeSet<&str> = want.weights.iter().map(|w| w.name.as_str()).collect();
    if let Some(extra) = got.weights.iter().find(|w| !ours.contains(w.name.as_str())) {
        return weights(format!("weight file {} is not the job's", extra.name));
    }
    if want.config != got.config {
        return Some(Difference { part: Part::Config, what: "config.json differs".into() });
    }
    if want.tokenizer != got.tokenizer {
        return Some(Difference { part: Part::Tokenizer, what: "the tokenizer file differs".into() });
    }
    Some(Difference { part: Part::Weights, what: "the identities differ".into() })
}

/// Whether a run may continue from a checkpoint that recorded `recorded` on a model whose
/// identity is `now`: yes if they are equal or differ only in parts the operator named
/// (`accept`; `Ok(Some(note))` says what changed), else an error naming the first file or
/// tensor that differs and the flag that would allow it. `recorded: None` (a manifest from
/// before identities) passes.
pub fn check_change(recorded: Option<&ModelIdentity>, now: &ModelIdentity, accept: &[Part]) -> Result<Option<String>, String> {
    let Some(recorded) = recorded else { return Ok(None) };
    let Some(first) = first_difference(recorded, now) else { return Ok(None) };
    let parts = recorded.parts_differing(now);
    let not_named: Vec<&str> = parts.iter().filter(|p| !accept.contains(p)).map(|p| p.name()).collect();
    if not_named.is_empty() {
        let named: Vec<&str> = parts.iter().map(|p| p.name()).collect();
        return Ok(Some(format!("the model's {} changed since the checkpoint, as allowed ({first})", named.join(", "))));
    }
    Err(format!(
        "the model differs from the one the checkpoint was trained with: {first} (pass --accept-model-change {} to continue anyway)",
        not_named.join(",")
    ))
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a safetensors file: {message}")]
    Format { path: PathBuf, message: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io { path: path.to_path_buf(), source }
}

/// What a cache entry is valid for: a file version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileKey {
    dev: u64,
    ino: u64,
    bytes: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileKey {
    fn of(path: &Path) -> Result<Self, IdentityError> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).map_err(io(path))?;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
            bytes: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })
    }
}

/// The digest of a whole (small) file: `config.json`, the tokenizer.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CachedFile {
    key: FileKey,
    digest: Digest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    weights: Option<WeightFile>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Cache {
    files: BTreeMap<PathBuf, CachedFile>,
}

/// How [`compute`] went: what it read and where it kept its cache.
#[derive(Debug, Clone, Default)]
pub struct ComputeStats {
    /// Bytes hashed (0 when every file was cached).
    pub bytes_read: u64,
    pub files_from_cache: usize,
    pub cache: Option<PathBuf>,
}

/// The cache file for `dir`: next to the files if writable, else in the user's cache.
fn cache_path(dir: &Path) -> PathBuf {
    let local = dir.join(".otter-identity.json");
    let writable = std::fs::OpenOptions::new().append(true).create(true).open(&local).is_ok()
        || std::fs::metadata(&local).is_ok_and(|m| !m.permissions().readonly());
    if writable {
        return local;
    }
    let base = std::env::var_os("OTTER_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("otter")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/otter")))
        .unwrap_or_else(std::env::temp_dir);
    let canon = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    base.join("identity").join(format!("{:016x}.json", xxhash_rust::xxh3::xxh3_64(canon.as_os_str().as_encoded_bytes())))
}

fn load_cache(path: &Path) -> Cache {
    std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

/// Writes the cache (temp file, rename); a cache that cannot be written only costs the
/// next start a read.
fn store_cache(path: &Path, cache: &Cache) {
    let Ok(bytes) = serde_json::to_vec(cache) else { return };
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let ok = path.parent().is_some_and(|p| std::fs::create_dir_all(p).is_ok()) && std::fs::write(&tmp, bytes).is_ok() && std::fs::rename(&tmp, path).is_ok();
    if !ok {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// XXH3-128 of a whole file.
fn digest_file(path: &Path, stats: &mut ComputeStats) -> Result<Digest, IdentityError> {
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        stats.bytes_read += n as u64;
        h.update(&buf[..n]);
    }
    Ok(hex128(h.digest128()))
}

/// A safetensors file's header digest and each tensor's data digest, in one sequential read.
fn digest_weights(path: &Path, name: &str, stats: &mut ComputeStats) -> Result<WeightFile, IdentityError> {
    let bad = |message: String| IdentityError::Format { path: path.to_path_buf(), message };
    let mut f = std::io::BufReader::with_capacity(8 << 20, std::fs::File::open(path).map_err(io(path))?);
    let bytes = std::fs::metadata(path).map_err(io(path))?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| bad(format!("reading the header length: {e}")))?;
    let n = u64::from_le_bytes(len);
    if n > bytes.saturating_sub(8) || n > 100 << 20 {
        return Err(bad(format!("header length {n} exceeds the file ({bytes} bytes)")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| bad(format!("reading the header: {e}")))?;
    let parsed: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    // Tensors in the order of their data.
    let mut tensors: Vec<(u64, u64, &str)> = Vec::new();
    for (k, v) in &parsed {
        if k == "__metadata__" {
            continue;
        }
        let offs = v.get("data_offsets").and_then(|o| o.as_array()).filter(|o| o.len() == 2).ok_or_else(|| bad(format!("tensor {k}: no data_offsets")))?;
        let (Some(a), Some(b)) = (offs[0].as_u64(), offs[1].as_u64()) else { return Err(bad(format!("tensor {k}: bad data_offsets"))) };
        if b < a || 8 + n + b > bytes {
            return Err(bad(format!("tensor {k}: data_offsets [{a}, {b}] outside the file")));
        }
        tensors.push((a, b, k));
    }
    tensors.sort();
    stats.bytes_read += 8 + n;
    let mut pos = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let mut out = Vec::with_capacity(tensors.len());
    for (a, b, k) in tensors {
        if a < pos {
            return Err(bad(format!("tensor {k}: overlaps the previous tensor")));
        }
        std::io::copy(&mut (&mut f).take(a - pos), &mut std::io::sink()).map_err(io(path))?;
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut left = b - a;
        while left > 0 {
            let m = left.min(buf.len() as u64) as usize;
            f.read_exact(&mut buf[..m]).map_err(io(path))?;
            h.update(&buf[..m]);
            left -= m as u64;
        }
        stats.bytes_read += b - pos;
        pos = b;
        out.push(TensorDigest { name: k.to_string(), xxh3: h.digest() });
    }
    Ok(WeightFile { name: name.to_string(), bytes, header: hex128(xxhash_rust::xxh3::xxh3_128(&header)), tensors: out })
}

/// Where the model's parts are: a model directory (its `config.json` and
/// `*.safetensors`), or a built-in preset; and the tokenizer file.
#[derive(Debug, Clone, PartialEq)]
pub enum Source<'a> {
    Dir(&'a Path),
    Preset(&'a str),
}

/// The identity of a model (`source`) and `tokenizer`, using and refreshing the cache.
pub fn compute(source: Source<'_>, tokenizer: &Path) -> Result<(ModelIdentity, ComputeStats), IdentityError> {
    let mut stats = ComputeStats::default();
    let (config, weights) = match source {
        Source::Preset(name) => (hex128(xxhash_rust::xxh3::xxh3_128(format!("preset:{name}").as_bytes())), Vec::new()),
        Source::Dir(dir) => {
            let cache_file = cache_path(dir);
            let mut cache = load_cache(&cache_file);
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(io(dir))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            files.sort();
            let mut weights = Vec::new();
            let mut fresh = Cache::default();
            for p in &files {
                let key = FileKey::of(p)?;
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let w = match cache.files.remove(p).filter(|c| c.key == key).and_then(|c| c.weights) {
                    Some(w) => {
                        stats.files_from_cache += 1;
                        w
                    }
                    None => digest_weights(p, &name, &mut stats)?,
                };
                fresh.files.insert(p.clone(), CachedFile { key, digest: String::new(), weights: Some(w.clone()) });
                weights.push(w);
            }
            let cfg = dir.join("config.json");
            let key = FileKey::of(&cfg)?;
            let config = match cache.files.remove(&cfg).filter(|c| c.key == key) {
                Some(c) => {
                    stats.files_from_cache += 1;
                    c.digest
                }
                None => digest_file(&cfg, &mut stats)?,
            };
            fresh.files.insert(cfg, CachedFile { key, digest: config.clone(), weights: None });
            if stats.bytes_read > 0 || !cache_file.exists() {
                store_cache(&cache_file, &fresh);
            }
            stats.cache = Some(cache_file);
            (config, weights)
        }
    };
    // The tokenizer is small (a few MB): read it each time (it may live anywhere).
    let tokenizer = digest_file(tokenizer, &mut stats)?;
    Ok((ModelIdentity::new(config, tokenizer, weights), stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file with f32 tensors `(name, values)`.
    fn write_st(path: &Path, tensors: &[(&str, Vec<f32>)]) {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, v) in tensors {
            let a = data.len();
            data.extend(v.iter().flat_map(|x| x.to_le_bytes()));
            header.insert(name.to_string(), serde_json::json!({"dtype": "F32", "shape": [v.len()], "data_offsets": [a, data.len()]}));
        }
        let h = serde_json::to_vec(&header).unwrap();
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend(h);
        out.extend(data);
        std::fs::write(path, out).unwrap();
    }

    fn model(dir: &Path, w: f32) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.json"), b"{\"a\": 1}").unwrap();
        std::fs::write(dir.join("tokenizer.json"), b"{\"t\": 1}").unwrap();
        write_st(&dir.join("model-1.safetensors"), &[("vision.a", vec![1.0, 2.0]), ("vision.b", vec![w, 4.0])]);
        write_st(&dir.join("model-2.safetensors"), &[("lang.c", vec![5.0])]);
    }

    fn id(dir: &Path) -> (ModelIdentity, ComputeStats) {
        compute(Source::Dir(dir), &dir.join("tokenizer.json")).unwrap()
    }

    #[test]
    fn one_changed_tensor_is_named_and_identical_copies_agree() {
        let d = tempfile::tempdir().unwrap();
        let (a, b, c) = (d.path().join("a"), d.path().join("b"), d.path().join("c"));
        model(&a, 3.0);
        model(&b, 3.0);
        model(&c, 3.01);
        let (ia, ib, ic) = (id(&a).0, id(&b).0, id(&c).0);
        assert_eq!(ia, ib, "two copies of one model");
        assert_eq!(first_difference(&ia, &ib), None);
        let diff = first_difference(&ia, &ic).unwrap();
        assert_eq!(diff.part, Part::Weights);
        assert_eq!(diff.what, "weight file model-1.safetensors: tensor vision.b differs (its bytes)");
        assert_eq!(ia.parts_differing(&ic), vec![Part::Weights]);
    }

    #[test]
    fn a_resume_is_refused_on_a_changed_model_unless_the_change_is_named() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        model(&a, 3.0);
        model(&b, 3.5);
        let (ia, ib) = (id(&a).0, id(&b).0);
        assert_eq!(check_change(Some(&ia), &ia, &[]), Ok(None));
        assert_eq!(check_change(None, &ib, &[]), Ok(None), "a manifest from before identities");
        let e = check_change(Some(&ia), &ib, &[Part::Config]).unwrap_err();
        assert_eq!(e, "the model differs from the one the checkpoint was trained with: weight file model-1.safetensors: tensor vision.b differs (its bytes) (pass --accept-model-change weights to continue anyway)");
        let note = check_change(Some(&ia), &ib, &[Part::Weights]).unwrap().unwrap();
        assert!(note.contains("weights changed since the checkpoint, as allowed"), "{note}");
    }

    #[test]
    fn config_tokenizer_missing_and_reshaped_files_are_named() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        model(&a, 3.0);
        let want = id(&a).0;
        let differs = |edit: &dyn Fn(&Path)| {
            let _ = std::fs::remove_dir_all(&b);
            model(&b, 3.0);
            edit(&b);
            first_difference(&want, &id(&b).0).map(|d| (d.part, d.what))
        };
        assert_eq!(differs(&|b| std::fs::write(b.join("config.json"), b"{\"a\": 2}").unwrap()), Some((Part::Config, "config.json differs".into())));
        assert_eq!(differs(&|b| std::fs::write(b.join("tokenizer.json"), b"{\"t\": 2}").unwrap()), Some((Part::Tokenizer, "the tokenizer file differs".into())));
        assert_eq!(
            differs(&|b| std::fs::remove_file(b.join("model-2.safetensors")).unwrap()),
            Some((Part::Weights, "weight file model-2.safetensors is missing".into()))
        );
        let (part, what) = differs(&|b| write_st(&b.join("model-2.safetensors"), &[("lang.c", vec![5.0, 6.0])])).unwrap();
        assert_eq!(part, Part::Weights);
        assert!(what.starts_with("weight file model-2.safetensors: its header differs"), "{what}");
    }

    #[test]
    fn a_second_computation_reads_only_the_cache_and_a_rewritten_file_is_read_again() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        model(&a, 3.0);
        let (first, s1) = id(&a);
        assert!(s1.bytes_read > 0);
        let (again, s2) = id(&a);
        assert_eq!(again, first);
        assert_eq!(s2.files_from_cache, 3, "two weight files and config.json from the cache");
        assert_eq!(s2.bytes_read, std::fs::metadata(a.join("tokenizer.json")).unwrap().len(), "only the tokenizer is read");
        // Same size, same mtime (as `cp -p` or `touch -d` would leave it), other bytes: the
        // status-change time still tells.
        let p = a.join("model-1.safetensors");
        let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
        write_st(&p, &[("vision.a", vec![1.0, 2.0]), ("vision.b", vec![3.5, 4.0])]);
        std::fs::File::options().write(true).open(&p).unwrap().set_modified(mtime).unwrap();
        let (changed, s3) = id(&a);
        assert!(s3.bytes_read > s2.bytes_read, "the rewritten file was read again");
        assert_eq!(first_difference(&first, &changed).unwrap().what, "weight file model-1.safetensors: tensor vision.b differs (its bytes)");
    }

    #[test]
    fn a_read_only_model_directory_keeps_its_cache_in_the_users_cache() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        model(&a, 3.0);
        let mut perms = std::fs::metadata(&a).unwrap().permissions();
        perms.set_readonly(true);
        std::fs::set_permissions(&a, perms.clone()).unwrap();
        let local = std::fs::OpenOptions::new().append(true).create(true).open(a.join(".probe")).is_ok();
        let (_, s) = id(&a);
        perms.set_readonly(false);
        std::fs::set_permissions(&a, perms).unwrap();
        if local {
            // Running as root: permissions do not stop writes, so the cache is local.
            assert_eq!(s.cache.unwrap(), a.join(".otter-identity.json"));
        } else {
            assert!(s.cache.unwrap().to_string_lossy().contains("identity/"));
        }
    }

    #[test]
    fn a_truncated_weight_file_is_an_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        model(&a, 3.0);
        let p = a.join("model-2.safetensors");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 2]).unwrap();
        let e = compute(Source::Dir(&a), &a.join("tokenizer.json")).unwrap_err().to_string();
        assert!(e.contains("model-2.safetensors") && e.contains("outside the file"), "{e}");
    }
}
