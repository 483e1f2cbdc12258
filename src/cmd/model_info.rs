//! `otter model-info`: parameter counts by group, from the config alone.

use crate::model::spec::{count, parameter_specs};
use crate::run_config::ModelSource;
use anyhow::Result;

pub fn run(config: &str, json: bool) -> Result<()> {
    let source = ModelSource::from_arg(config)?;
    let cfg = source.config()?;
    let specs = parameter_specs(&cfg);
    let c = count(&specs);
    if json {
        println!("{}", serde_json::to_string_pretty(&c)?);
        return Ok(());
    }
    println!("model: {source:?} ({} backbone)", cfg.backbone().name());
    println!("{:<26} {:>16} {:>16}", "group", "parameters", "trainable");
    for (g, total, trainable) in &c.groups {
        println!("{:<26} {:>16} {:>16}", g.name(cfg.backbone()), fmt_count(*total), fmt_count(*trainable));
    }
    println!("{:<26} {:>16} {:>16}", "total", fmt_count(c.total), fmt_count(c.trainable));
    println!("trainable: {} of {} ({:.2}%)", fmt_count(c.trainable), fmt_count(c.total), 100.0 * c.trainable as f64 / c.total as f64);
    Ok(())
}

/// 1441011728 -> "1,441,011,728".
pub fn fmt_count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
