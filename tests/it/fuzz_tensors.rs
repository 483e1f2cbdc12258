//! Fuzzed safetensors files (issue 19): the two readers of weight and checkpoint files
//! (the mmap'd loader of model weights, `MappedCheckpoint`, and `TensorFile`, which reads
//! exported weights and checkpoint shards) get random bytes and mutations of a valid file
//! (bytes flipped, inserted, deleted, cut, and the 8-byte header length rewritten). None
//! may panic; a header length beyond the file is an error, not an allocation.
//! `OTTER_FUZZ_CASES=N` runs N cases of each kind per reader (default 2000).

use otter::model::weights::MappedCheckpoint;
use otter::tensors::TensorFile;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::path::Path;

fn cases() -> u32 {
    std::env::var("OTTER_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000)
}

fn runner() -> TestRunner {
    TestRunner::new(Config { cases: cases(), failure_persistence: None, ..Config::default() })
}

/// A small valid safetensors file: three tensors of different shapes.
fn valid_file(dir: &Path) -> Vec<u8> {
    let path = dir.join("valid.safetensors");
    let t = |n: i64| tch::Tensor::arange(n, (tch::Kind::Float, tch::Device::Cpu));
    otter::tensors::write(&path, &[("a.weight".into(), t(6).view([2, 3])), ("b".into(), t(4)), ("c.bias".into(), t(1))]).unwrap();
    std::fs::read(path).unwrap()
}

/// Bytes flipped, inserted, deleted or the file cut, at positions drawn from `edits`, or
/// the header length (its first 8 bytes) replaced.
fn mutate(valid: &[u8], edits: &[(u8, usize, u8)], header_len: Option<u64>) -> Vec<u8> {
    let mut v = valid.to_vec();
    for &(op, i, b) in edits {
        let len = v.len();
        match op % 4 {
            0 if len > 0 => v[i % len] ^= b.max(1),
            1 => v.insert(i % (len + 1), b),
            2 if len > 0 => {
                v.remove(i % len);
            }
            3 => v.truncate(i % (len + 1)),
            _ => {}
        }
    }
    if let (Some(h), true) = (header_len, v.len() >= 8) {
        v[..8].copy_from_slice(&h.to_le_bytes());
    }
    v
}

fn read_both(path: &Path) {
    if let Ok(f) = TensorFile::read(path) {
        for t in f.tensors.values() {
            let _ = t.sum(tch::Kind::Float);
        }
    }
    if let Ok(m) = MappedCheckpoint::open(path) {
        let names: Vec<String> = m.names().map(str::to_string).collect();
        for n in names {
            let _ = m.shape(&n);
        }
    }
}

#[test]
fn safetensors_readers_never_panic() {
    let d = tempfile::tempdir().unwrap();
    let valid = valid_file(d.path());
    let path = d.path().join("x.safetensors");
    read_both(&path); // missing file: an error
    runner()
        .run(&prop::collection::vec(any::<u8>(), 0..256), |bytes| {
            std::fs::write(&path, bytes).unwrap();
            read_both(&path);
            Ok(())
        })
        .unwrap();
    let edits = prop::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 0..5);
    let header = prop_oneof![Just(None), any::<u64>().prop_map(Some), (0u64..512).prop_map(Some)];
    runner()
        .run(&(edits, header), |(e, h)| {
            std::fs::write(&path, mutate(&valid, &e, h)).unwrap();
            read_both(&path);
            Ok(())
        })
        .unwrap();
    // A header claiming far more bytes than the file holds is refused, not allocated.
    let mut huge = valid.clone();
    huge[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(&path, &huge).unwrap();
    assert!(TensorFile::read(&path).is_err());
    assert!(MappedCheckpoint::open(&path).is_err());
    std::fs::write(&path, &valid).unwrap();
    assert_eq!(TensorFile::read(&path).unwrap().tensors.len(), 3, "the valid file reads");
}
