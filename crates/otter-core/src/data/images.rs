//! Image stores: id -> encoded image bytes, looked up lazily.
//!
//! MIMIC-IT ships images as a JSON object `{id: base64}` (several GB) or, in newer
//! releases, as parquet (index = id, column `base64`). Upstream `json.load`s the whole
//! file, which is where users' host-RAM blow-ups come from. Here opening a store only
//! builds an index (byte range per id for JSON, row group + row for parquet); an image is
//! read and base64-decoded when asked for.

use base64::Engine;
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ImageStoreError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: malformed image file at byte {offset}: {message}")]
    Malformed { path: PathBuf, offset: u64, message: String },
    #[error("{path}: {message}")]
    Parquet { path: PathBuf, message: String },
    #[error("{path}: image id `{id}` not found")]
    Missing { path: PathBuf, id: String },
    #[error("{path}: image `{id}`: bad base64: {message}")]
    Base64 { path: PathBuf, id: String, message: String },
}

/// A lazily read collection of encoded images.
pub trait ImageStore: Send + Sync {
    /// Which ids it holds, and where it lives.
    fn ids(&self) -> &dyn Ids;
    /// Where the images live (for error messages).
    fn path(&self) -> &Path {
        self.ids().path()
    }
    fn contains(&self, id: &str) -> bool {
        self.ids().contains(id)
    }
    fn len(&self) -> usize {
        self.ids().len()
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The raw base64 text of `id`.
    fn base64(&self, id: &str) -> Result<Vec<u8>, ImageStoreError>;
    /// The decoded (PNG/JPEG) bytes of `id`.
    fn get(&self, id: &str) -> Result<Vec<u8>, ImageStoreError> {
        let text = self.base64(id)?;
        decode_base64(&text).map_err(|message| ImageStoreError::Base64 {
            path: self.path().to_path_buf(),
            id: id.to_string(),
            message,
        })
    }
}

/// The ids of a store, as [`ImageStore`] sees them.
pub trait Ids {
    fn path(&self) -> &Path;
    fn contains(&self, id: &str) -> bool;
    fn len(&self) -> usize;
}

/// A store's index: each id and where its base64 text is (a byte range of a JSON file, a
/// row of a Parquet file, the text itself), with the file it is in.
pub struct Index<L> {
    path: PathBuf,
    entries: HashMap<String, L>,
}

impl<L> Index<L> {
    pub fn new(path: &Path, entries: HashMap<String, L>) -> Self {
        Self { path: path.to_path_buf(), entries }
    }

    /// Where `id` is, or the error naming the file and the id.
    pub fn locate(&self, id: &str) -> Result<&L, ImageStoreError> {
        self.entries.get(id).ok_or_else(|| ImageStoreError::Missing { path: self.path.clone(), id: id.to_string() })
    }
}

impl<L> Ids for Index<L> {
    fn path(&self) -> &Path {
        &self.path
    }
    fn contains(&self, id: &str) -> bool {
        self.entries.contains_key(id)
    }
    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Decodes base64 in either the standard or the URL-safe alphabet, padded or not,
/// ignoring ASCII whitespace (as Python's lenient decoders do).
pub fn decode_base64(text: &[u8]) -> Result<Vec<u8>, String> {
    use base64::engine::{general_purpose::GeneralPurpose, DecodePaddingMode, GeneralPurposeConfig};
    const CFG: GeneralPurposeConfig = GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    const STANDARD: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::STANDARD, CFG);
    const URL_SAFE: GeneralPurpose = GeneralPurpose::new(&base64::alphabet::URL_SAFE, CFG);
    let url = memchr::memchr2(b'-', b'_', text).is_some();
    let std = memchr::memchr2(b'+', b'/', text).is_some();
    let ws = memchr::memchr3(b'\n', b'\r', b' ', text).is_some() || memchr::memchr(b'\t', text).is_some();
    if !ws && !(url && std) {
        // The common case: one alphabet, no whitespace: decode in place, no copy.
        let engine = if url { &URL_SAFE } else { &STANDARD };
        return engine.decode(text).map_err(|e| e.to_string());
    }
    let norm: Vec<u8> = text
        .iter()
        .filter(|b| !b.is_ascii_whitespace())
        .map(|&b| match b {
            b'-' => b'+',
            b'_' => b'/',
            b => b,
        })
        .collect();
    STANDARD.decode(&norm).map_err(|e| e.to_string())
}

/// Opens a store by extension: `.json` or `.parquet`.
pub fn open_store(path: &Path) -> Result<Arc<dyn ImageStore>, ImageStoreError> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("parquet") => Ok(Arc::new(ParquetImageStore::open(path)?)),
        _ => Ok(Arc::new(JsonImageStore::open(path)?)),
    }
}

// ---------------------------------------------------------------------------------------
// JSON: one pass builds id -> byte range; lookups pread the range.
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Range {
    offset: u64,
    len: u32,
    /// The JSON string contains escapes and must be unescaped before decoding.
    escaped: bool,
}

pub struct JsonImageStore {
    file: File,
    index: Index<Range>,
}

/// A byte-at-a-time reader over a file, through its own 1 MiB buffer, that tracks the
/// offset.
struct Scanner<R: Read> {
    r: R,
    buf: Vec<u8>,
    pos: usize,
    base: u64,
}

impl<R: Read> Scanner<R> {
    fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    fn fill(&mut self) -> std::io::Result<bool> {
        if self.pos < self.buf.len() {
            return Ok(true);
        }
        self.base += self.buf.len() as u64;
        self.buf.resize(1 << 20, 0);
        let n = self.r.read(&mut self.buf)?;
        self.buf.truncate(n);
        self.pos = 0;
        Ok(n > 0)
    }

    fn next(&mut self) -> std::io::Result<Option<u8>> {
        if !self.fill()? {
            return Ok(None);
        }
        let b = self.buf[self.pos];
        self.pos += 1;
        Ok(Some(b))
    }

    fn next_non_ws(&mut self) -> std::io::Result<Option<u8>> {
        loop {
            match self.next()? {
                Some(b' ' | b'\n' | b'\r' | b'\t') => continue,
                other => return Ok(other),
            }
        }
    }

    /// After an opening quote: scans to the closing quote. Returns (start offset, length,
    /// has escapes); collects the bytes only when `keep`.
    fn string(&mut self, keep: bool, out: &mut Vec<u8>) -> std::io::Result<Option<(u64, u64, bool)>> {
        let start = self.offset();
        let mut escaped = false;
        loop {
            if !self.fill()? {
                return Ok(None);
            }
            let chunk = &self.buf[self.pos..];
            match memchr::memchr2(b'"', b'\\', chunk) {
                Some(i) => {
                    if keep {
                        out.extend_from_slice(&chunk[..i]);
                    }
                    let c = chunk[i];
                    self.pos += i + 1;
                    if c == b'"' {
                        return Ok(Some((start, self.offset() - 1 - start, escaped)));
                    }
                    escaped = true;
                    let Some(e) = self.next()? else { return Ok(None) };
                    if keep {
                        out.push(b'\\');
                        out.push(e);
                    }
                }
                None => {
                    if keep {
                        out.extend_from_slice(chunk);
                    }
                    self.pos = self.buf.len();
                }
            }
        }
    }
}

impl JsonImageStore {
    pub fn open(path: &Path) -> Result<Self, ImageStoreError> {
        let io = |source| ImageStoreError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        let mut s = Scanner { r: file.try_clone().map_err(io)?, buf: vec![], pos: 0, base: 0 };
        let bad = |s: &Scanner<File>, message: &str| ImageStoreError::Malformed {
            path: path.to_path_buf(),
            offset: s.offset(),
            message: message.to_string(),
        };
        let mut index = HashMap::new();
        if s.next_non_ws().map_err(io)? != Some(b'{') {
            return Err(bad(&s, "expected a JSON object `{\"id\": \"base64\", ...}`"));
        }
        let mut key = Vec::new();
        let mut first = true;
        loop {
            let c = s.next_non_ws().map_err(io)?;
            match c {
                Some(b'}') if first => break,
                Some(b'"') => {}
                _ => return Err(bad(&s, "expected an image id string")),
            }
            first = false;
            key.clear();
            s.string(true, &mut key).map_err(io)?.ok_or_else(|| bad(&s, "unterminated id string"))?;
            let id: String = serde_json::from_slice(&[b"\"".as_slice(), &key, b"\""].concat())
                .map_err(|e| bad(&s, &format!("bad id string: {e}")))?;
            if s.next_non_ws().map_err(io)? != Some(b':') {
                return Err(bad(&s, &format!("expected `:` after id `{id}`")));
            }
            if s.next_non_ws().map_err(io)? != Some(b'"') {
                return Err(bad(&s, &format!("value of `{id}` is not a base64 string")));
            }
            let (offset, len, escaped) =
                s.string(false, &mut key).map_err(io)?.ok_or_else(|| bad(&s, &format!("unterminated value of `{id}`")))?;
            let len = u32::try_from(len).map_err(|_| bad(&s, &format!("image `{id}` is larger than 4 GiB")))?;
            index.insert(id, Range { offset, len, escaped });
            match s.next_non_ws().map_err(io)? {
                Some(b',') => continue,
                Some(b'}') => break,
                _ => return Err(bad(&s, "expected `,` or `}` after an image")),
            }
        }
        if s.next_non_ws().map_err(io)?.is_some() {
            return Err(bad(&s, "trailing data after the JSON object"));
        }
        Ok(Self { file, index: Index::new(path, index) })
    }
}

impl ImageStore for JsonImageStore {
    fn ids(&self) -> &dyn Ids {
        &self.index
    }

    fn base64(&self, id: &str) -> Result<Vec<u8>, ImageStoreError> {
        let r = self.index.locate(id)?;
        let mut buf = vec![0u8; r.len as usize];
        self.file
            .read_exact_at(&mut buf, r.offset)
            .map_err(|source| ImageStoreError::Io { path: self.path().to_path_buf(), source })?;
        if r.escaped {
            let quoted = [b"\"".as_slice(), &buf, b"\""].concat();
            let s: String = serde_json::from_slice(&quoted).map_err(|e| ImageStoreError::Base64 {
                path: self.path().to_path_buf(),
                id: id.to_string(),
                message: format!("bad JSON string: {e}"),
            })?;
            buf = s.into_bytes();
        }
        Ok(buf)
    }
}

// ---------------------------------------------------------------------------------------
// Parquet: the id column is read once into id -> (row group, row); lookups read one row
// of the `base64` column of one row group.
// ---------------------------------------------------------------------------------------

pub struct ParquetImageStore {
    meta: parquet::arrow::arrow_reader::ArrowReaderMetadata,
    base64_leaf: usize,
    /// id -> (row group, row).
    index: Index<(usize, usize)>,
}

/// Runs a read of the parquet file `path`, turning a panic of the parquet reader (some
/// corrupt files make it panic instead of erring, found by `tests/fuzz.rs`) into the
/// file's error.
fn parquet_guard<T>(path: &Path, read: impl FnOnce() -> Result<T, ImageStoreError>) -> Result<T, ImageStoreError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(read)).unwrap_or_else(|p| {
        let what = crate::panic::message(&*p);
        Err(ImageStoreError::Parquet { path: path.to_path_buf(), message: format!("malformed parquet file (the reader gave up: {what})") })
    })
}

impl ParquetImageStore {
    pub fn open(path: &Path) -> Result<Self, ImageStoreError> {
        parquet_guard(path, || Self::open_unguarded(path))
    }

    fn open_unguarded(path: &Path) -> Result<Self, ImageStoreError> {
        use arrow_array::{cast::AsArray, Array};
        use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder};
        use parquet::arrow::ProjectionMask;
        let pq = |message: String| ImageStoreError::Parquet { path: path.to_path_buf(), message };
        let file = File::open(path).map_err(|source| ImageStoreError::Io { path: path.to_path_buf(), source })?;
        let meta = ArrowReaderMetadata::load(&file, ArrowReaderOptions::new().with_page_index_policy(parquet::file::metadata::PageIndexPolicy::Optional)).map_err(|e| pq(e.to_string()))?;
        let schema = meta.schema().clone();
        // pandas writes the index as a column and names it in the "pandas" metadata.
        let pandas_index = schema
            .metadata()
            .get("pandas")
            .and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok())
            .and_then(|v| v["index_columns"][0].as_str().map(str::to_string));
        let id_col = pandas_index
            .into_iter()
            .chain(["id".to_string(), "__index_level_0__".to_string()])
            .find(|c| schema.index_of(c).is_ok())
            .ok_or_else(|| pq("no index column (pandas index, `id` or `__index_level_0__`)".into()))?;
        let parquet_schema = meta.metadata().file_metadata().schema_descr_ptr();
        let leaf = |name: &str| {
            (0..parquet_schema.num_columns())
                .find(|&i| parquet_schema.column(i).name() == name)
                .ok_or_else(|| pq(format!("no column `{name}`")))
        };
        let id_leaf = leaf(&id_col)?;
        let base64_leaf = leaf("base64")?;
        let mut index = HashMap::new();
        for rg in 0..meta.metadata().num_row_groups() {
            let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(
                file.try_clone().map_err(|source| ImageStoreError::Io { path: path.to_path_buf(), source })?,
                meta.clone(),
            )
            .with_row_groups(vec![rg])
            .with_projection(ProjectionMask::leaves(&parquet_schema, [id_leaf]))
            .build()
            .map_err(|e| pq(e.to_string()))?;
            let mut row = 0;
            for batch in reader {
                let batch = batch.map_err(|e| pq(e.to_string()))?;
                let col = batch.column(0);
                let ids: Vec<String> = if let Some(a) = col.as_string_opt::<i32>() {
                    (0..a.len()).map(|i| a.value(i).to_string()).collect()
                } else if let Some(a) = col.as_string_opt::<i64>() {
                    (0..a.len()).map(|i| a.value(i).to_string()).collect()
                } else {
                    return Err(pq(format!("index column `{id_col}` is not a string column")));
                };
                for id in ids {
                    index.insert(id, (rg, row));
                    row += 1;
                }
            }
        }
        Ok(Self { meta, base64_leaf, index: Index::new(path, index) })
    }
}

impl ImageStore for ParquetImageStore {
    fn ids(&self) -> &dyn Ids {
        &self.index
    }

    fn base64(&self, id: &str) -> Result<Vec<u8>, ImageStoreError> {
        parquet_guard(self.path(), || self.base64_unguarded(id))
    }
}

impl ParquetImageStore {
    fn base64_unguarded(&self, id: &str) -> Result<Vec<u8>, ImageStoreError> {
        use arrow_array::{cast::AsArray, Array};
        use parquet::arrow::arrow_reader::{ParquetRecordBatchReaderBuilder, RowSelection, RowSelector};
        use parquet::arrow::ProjectionMask;
        let path = self.path();
        let pq = |message: String| ImageStoreError::Parquet { path: path.to_path_buf(), message };
        let &(rg, row) = self.index.locate(id)?;
        // A fresh descriptor per lookup: parquet's reader seeks and reads, and cloned
        // descriptors share one file offset, so concurrent loader threads would race.
        let file = File::open(path).map_err(|source| ImageStoreError::Io { path: path.to_path_buf(), source })?;
        let descr = self.meta.metadata().file_metadata().schema_descr_ptr();
        let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(file, self.meta.clone())
            .with_row_groups(vec![rg])
            .with_projection(ProjectionMask::leaves(&descr, [self.base64_leaf]))
            .with_row_selection(RowSelection::from(vec![RowSelector::skip(row), RowSelector::select(1)]))
            .with_batch_size(1)
            .build()
            .map_err(|e| pq(e.to_string()))?;
        for batch in reader {
            let batch = batch.map_err(|e| pq(e.to_string()))?;
            if batch.num_rows() == 0 {
                continue;
            }
            let col = batch.column(0);
            if col.is_null(0) {
                return Err(ImageStoreError::Base64 { path: path.to_path_buf(), id: id.into(), message: "null".into() });
            }
            let bytes = if let Some(a) = col.as_string_opt::<i32>() {
                a.value(0).as_bytes().to_vec()
            } else if let Some(a) = col.as_string_opt::<i64>() {
                a.value(0).as_bytes().to_vec()
            } else if let Some(a) = col.as_binary_opt::<i32>() {
                a.value(0).to_vec()
            } else {
                return Err(pq("column `base64` is neither string nor binary".into()));
            };
            return Ok(bytes);
        }
        Err(pq(format!("row {row} of row group {rg} (image `{id}`) could not be read")))
    }
}

/// An in-memory store (for tests): id -> base64 text.
pub struct MemImageStore {
    pub images: Index<Vec<u8>>,
}

impl ImageStore for MemImageStore {
    fn ids(&self) -> &dyn Ids {
        &self.images
    }
    fn base64(&self, id: &str) -> Result<Vec<u8>, ImageStoreError> {
        self.images.locate(id).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_decodes_what_it_holds_and_names_the_file_and_id_of_what_it_lacks() {
        let images = HashMap::from([("img1".to_string(), b"aGVsbG8=".to_vec())]);
        let store = MemImageStore { images: Index::new(Path::new("mem.json"), images) };
        assert_eq!((store.len(), store.contains("img1"), store.contains("img2")), (1, true, false));
        assert_eq!(store.get("img1").unwrap(), b"hello");
        let err = store.get("img2").unwrap_err();
        assert!(matches!(&err, ImageStoreError::Missing { id, .. } if id == "img2"));
        assert_eq!(err.to_string(), "mem.json: image id `img2` not found");
    }

    #[test]
    fn both_base64_alphabets_decode_to_the_same_bytes() {
        let bytes: Vec<u8> = (0..=255u8).collect();
        let std = base64::engine::general_purpose::STANDARD.encode(&bytes);
        let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bytes);
        assert_ne!(std, url);
        assert_eq!(decode_base64(std.as_bytes()).unwrap(), bytes);
        assert_eq!(decode_base64(url.as_bytes()).unwrap(), bytes);
        assert!(decode_base64(b"@@@@").is_err());
    }

    #[test]
    fn json_store_indexes_ranges_and_reads_lazily() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("X.json");
        std::fs::write(&p, r#" { "a" : "aGVsbG8=", "b\u0031":"d29y\/bGQ", "c": "" } "#).unwrap();
        let s = JsonImageStore::open(&p).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s.get("a").unwrap(), b"hello");
        assert_eq!(s.base64("b1").unwrap(), b"d29y/bGQ");
        assert!(matches!(s.get("zz"), Err(ImageStoreError::Missing { .. })));
    }

    #[test]
    fn malformed_json_store_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("X.json");
        for bad in [r#"["a"]"#, r#"{"a": 3}"#, r#"{"a": "x" "b": "y"}"#, r#"{"a": "x"#] {
            std::fs::write(&p, bad).unwrap();
            let e = JsonImageStore::open(&p).err().unwrap_or_else(|| panic!("{bad} accepted")).to_string();
            assert!(e.contains("X.json") && e.contains("malformed"), "{e}");
        }
    }
}
