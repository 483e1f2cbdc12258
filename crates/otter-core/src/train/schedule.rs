//! Learning-rate schedule: linear warmup then cosine decay to 0, exactly as
//! `transformers.get_cosine_schedule_with_warmup` (num_cycles = 0.5), as a pure function.

/// The learning rate used at optimizer step `step` (0-based) of `total`. Past `total`
/// (a run that needs more steps than it was scheduled for) it stays at 0: the cosine is
/// never evaluated past its end, where it would rise again.
pub fn cosine_with_warmup(base_lr: f64, step: u64, warmup: u64, total: u64) -> f64 {
    let factor = if step < warmup {
        step as f64 / warmup.max(1) as f64
    } else {
        let progress = ((step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64).min(1.0);
        (0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos())).max(0.0)
    };
    base_lr * factor
}

/// Warmup steps for a warmup fraction of the total (upstream: 1%), at least 1 when the
/// fraction is positive.
pub fn warmup_steps(fraction: f64, total: u64) -> u64 {
    if fraction <= 0.0 {
        0
    } else {
        ((fraction * total as f64).ceil() as u64).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_fixture_schedule() {
        // tests/fixtures/train/adamw_cosine.json: lr 1e-3, warmup 2, total 8.
        let want = [0.0, 0.0005, 0.001, 0.0009330127018922195, 0.00075, 0.0005, 0.0002500000000000001, 6.698729810778065e-05];
        for (step, w) in want.iter().enumerate() {
            let got = cosine_with_warmup(1e-3, step as u64, 2, 8);
            assert!((got - w).abs() <= 1e-15, "step {step}: {got} vs {w}");
        }
    }

    #[test]
    fn ends_at_zero_and_stays_there() {
        assert_eq!(cosine_with_warmup(1.0, 10, 0, 10), 0.0);
        // Past the end: half a period further the unclamped cosine is back at half the
        // peak (the LR rose again in an elastic run that needed more steps).
        for step in [11, 13, 15, 17, 19, 25, 50] {
            assert_eq!(cosine_with_warmup(1.0, step, 2, 10), 0.0, "step {step}");
        }
        assert!(cosine_with_warmup(1.0, 9, 2, 10) > 0.0, "the last scheduled step is not there yet");
        assert_eq!(cosine_with_warmup(2.0, 0, 0, 10), 2.0);
        assert_eq!(warmup_steps(0.01, 1000), 10);
        assert_eq!(warmup_steps(0.01, 10), 1);
        assert_eq!(warmup_steps(0.0, 10), 0);
    }
}
