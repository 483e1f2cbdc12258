//! The model's description without libtorch: the HF `config.json` mirror resolved into
//! [`OtterConfig`] (`config.rs`), and every parameter's name, shape, group and
//! trainability (`spec.rs`). The modules that compute are in the `otter` crate.

pub mod config;
pub mod flops;
pub mod identity;
pub mod spec;

pub use config::OtterConfig;
