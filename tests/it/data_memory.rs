//! Opening a >= 1 GB images file and sampling from it keeps peak RSS under 10% of the
//! file's size (upstream `json.load`s it whole). In a process of its own (nextest's way;
//! scripts/test.sh's cargo-test fallback runs one test at a time) so that nothing else
//! shares the RSS being measured; the file is written by another process
//! (`otter data synth`) so no freed heap of ours can hide growth, the peak counter is
//! reset (`/proc/self/clear_refs` = 5) once libtorch is loaded, and the peak is taken
//! relative to the resident size at that point.

use crate::common;

use otter::data::images::open_store;
use otter::data::order::SplitMix64;
use otter::data::transform::preprocess;

fn status_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("{field} in /proc/self/status"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn sampling_from_a_1gb_image_json_keeps_peak_rss_under_10_percent() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, _, err) = common::run_otter(&[
        "data", "synth", "--out", dir.path().to_str().unwrap(), "--samples", "3000", "--image-px", "512", "--seed", "1",
    ]);
    assert!(ok, "{err}");
    let images = dir.path().join("SYN.json");
    let size = std::fs::metadata(&images).unwrap().len();
    assert!(size >= 1_000_000_000, "synthetic file is only {size} bytes");

    std::fs::write("/proc/self/clear_refs", "5").expect("reset peak RSS");
    let base_kb = status_kb("VmRSS:");

    let store = open_store(&images).unwrap();
    assert_eq!(store.len(), 3000);
    let mut rng = SplitMix64::new(7);
    let mut px = Vec::new();
    for _ in 0..300 {
        let i = rng.below(3000) as usize;
        let bytes = store.get(&format!("SYN_IMG_{i:08}")).unwrap();
        px.clear();
        preprocess(&bytes, 224, &mut px).unwrap();
    }
    let peak_kb = status_kb("VmHWM:");
    let grown = (peak_kb.saturating_sub(base_kb)) * 1024;
    println!(
        "images file {:.2} GB; RSS before opening {:.1} MB; peak while indexing + sampling 300 images {:.1} MB (+{:.1} MB = {:.2}% of the file)",
        size as f64 / 1e9,
        base_kb as f64 / 1024.0,
        peak_kb as f64 / 1024.0,
        grown as f64 / 1048576.0,
        100.0 * grown as f64 / size as f64
    );
    assert!(grown < size / 10, "peak RSS grew by {grown} bytes for a {size}-byte file");
}
