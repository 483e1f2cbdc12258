//! The integration tests of the `otter` crate, one binary: each file is a module named as
//! the test binary it used to be (`distributed::...`, `failures::...`), so a filter such as
//! `cargo nextest run -E 'test(/^distributed::/)'` or `cargo test --test it distributed::`
//! picks one out. One binary links libtorch once instead of 21 times (issue 44). The GPU
//! checks (`tests/gpu.rs`) stay a binary of their own: `scripts/build-gpu-bins.sh` builds
//! and carries only that one.

#[path = "../common/mod.rs"]
mod common;

mod checkpointing;
mod ckpt;
mod comm;
mod configs;
mod data;
mod data_memory;
mod determinism;
mod disk_full;
mod distributed;
mod failures;
mod fuzz_tensors;
mod generate;
mod grad_sync;
mod model_loading;
mod otel;
mod parity;
mod partition;
mod plan;
mod prometheus;
mod status_page;
mod store;
mod train;
