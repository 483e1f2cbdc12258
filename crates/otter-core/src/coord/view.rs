//! What the status page (`http.rs`) and `otter-coord status --watch` both show, read from
//! the status JSON: human times, the world changes and recoveries on the step axis, the
//! throughput of committed steps, and the terminal view. Pure: the time is the snapshot's
//! own `now`, nothing here reads a clock or does I/O.

use serde_json::Value;
use std::fmt::Write as _;

/// `at` (Unix milliseconds) as UTC ISO 8601 to the second: `2026-11-28T09:20:41Z`.
pub fn iso(at_ms: u64) -> String {
    let secs = at_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01 (non-negative here).
    let z = days as i64 + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// How long before `now` `at` was: `just now`, `12 s ago`, `4 min ago`, `3 h ago`, `2 d ago`.
pub fn ago(now_ms: u64, at_ms: u64) -> String {
    let s = now_ms.saturating_sub(at_ms) / 1000;
    match s {
        0 => "just now".into(),
        1..=119 => format!("{s} s ago"),
        120..=7199 => format!("{} min ago", s / 60),
        7200..=172_799 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    }
}

/// A duration in seconds, short: `850 ms`, `12.4 s`, `3 min 20 s`, `2 h 05 min`.
pub fn duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "?".into();
    }
    let whole = secs.round() as u64;
    if secs < 1.0 {
        format!("{:.0} ms", secs * 1000.0)
    } else if secs < 60.0 {
        format!("{secs:.1} s")
    } else if whole < 3600 {
        format!("{} min {:02} s", whole / 60, whole % 60)
    } else {
        format!("{} h {:02} min", whole / 3600, whole % 3600 / 60)
    }
}

/// Bytes in binary units: `512 B`, `1.5 KiB`, `3.2 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

/// A number for an axis or a table: 4 significant digits, `k`/`M` for large ones,
/// scientific for small ones (learning rates).
pub fn num(v: f64) -> String {
    let a = v.abs();
    if !v.is_finite() {
        "n/a".into()
    } else if a == 0.0 {
        "0".into()
    } else if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a < 1e-2 {
        format!("{v:.1e}")
    } else {
        let s = format!("{v:.*}", (3 - a.log10().floor() as i32).clamp(0, 4) as usize);
        if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s }
    }
}

/// The phase's name (`Running`, `WaitingForNodes`, ...).
pub fn phase(status: &Value) -> String {
    match &status["summary"]["phase"] {
        Value::String(s) => s.clone(),
        Value::Object(o) => o.keys().next().cloned().unwrap_or_default(),
        v => v.to_string(),
    }
}

/// Whether the job is over (the watch stops).
pub fn finished(status: &Value) -> bool {
    matches!(phase(status).as_str(), "Finished" | "Failed")
}

/// The node an event is about (the machine records it with the event), if any.
pub fn event_node(event: &Value) -> Option<&str> {
    event["node"].as_str()
}

/// A recovery: something failed, and the survivors were all assigned ranks again.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovery {
    /// When the failure was noticed (Unix ms).
    pub at: u64,
    /// The generation that recovered.
    pub generation: u64,
    pub cause: String,
    /// Failure noticed to every rank of the new generation assigned.
    pub seconds: f64,
}

const FAILURES: [&str; 4] = ["NodeLost", "RankFailed", "PeerUnreachable", "NodeExcluded"];

/// The recoveries among `events` (the status's newest-first list), oldest first.
pub fn recoveries(status: &Value) -> Vec<Recovery> {
    let events: Vec<&Value> = status["events"].as_array().map(|v| v.iter().rev().collect()).unwrap_or_default();
    let mut out = Vec::new();
    let mut failed: Option<(u64, String)> = None;
    for e in events {
        let (kind, at) = (e["kind"].as_str().unwrap_or(""), e["at"].as_u64().unwrap_or(0));
        if FAILURES.contains(&kind) {
            failed.get_or_insert((at, e["reason"].as_str().unwrap_or("").to_string()));
        } else if kind == "RendezvousComplete" {
            if let Some((t, cause)) = failed.take() {
                out.push(Recovery { at: t, generation: e["generation"].as_u64().unwrap_or(0), cause, seconds: at.saturating_sub(t) as f64 / 1000.0 });
            }
        }
    }
    out
}

/// A point of the step axis where the job changed: a new generation's first committed step.
#[derive(Debug, Clone, PartialEq)]
pub struct Marker {
    pub step: u64,
    /// The world changed (else: a new generation of the same size, after a recovery).
    pub world_changed: bool,
    /// What happened, for the marker's hover text.
    pub title: String,
}

/// The world changes and recoveries on the step axis, with what the events say of them.
pub fn markers(status: &Value) -> Vec<Marker> {
    let steps: Vec<(u64, u64, u64)> = status["steps"]
        .as_array()
        .map(|v| v.iter().filter_map(|s| Some((s["step"].as_u64()?, s["generation"].as_u64()?, s["world"].as_u64()?))).collect())
        .unwrap_or_default();
    let events = status["events"].as_array().cloned().unwrap_or_default();
    let recoveries = recoveries(status);
    let mut out = Vec::new();
    for pair in steps.windows(2) {
        let ((_, g0, w0), (step, g1, w1)) = (pair[0], pair[1]);
        if g1 == g0 {
            continue;
        }
        // Why the generation formed: `generation 3 formed (lost node c): nodes a, b, ...`.
        let why = events
            .iter()
            .find(|e| e["kind"] == "GenerationFormed" && e["generation"].as_u64() == Some(g1))
            .and_then(|e| e["reason"].as_str())
            .map(|r| r.split_once(" formed (").and_then(|(_, x)| x.split_once("):")).map_or(r, |(cause, _)| cause).to_string());
        let mut title = if w1 != w0 { format!("step {step}: world {w0} -> {w1}") } else { format!("step {step}: generation {g1}, world {w1}") };
        if let Some(why) = why {
            let _ = write!(title, " ({why})");
        }
        if let Some(r) = recoveries.iter().find(|r| r.generation == g1) {
            let _ = write!(title, "; recovered in {}", duration(r.seconds));
        }
        out.push(Marker { step, world_changed: w1 != w0, title });
    }
    out
}

/// A per-step series of the committed steps: `(step, value)` where the status has it.
pub fn series(status: &Value, f: impl Fn(&Value) -> Option<f64>) -> Vec<(f64, f64)> {
    status["steps"]
        .as_array()
        .map(|v| v.iter().filter_map(|s| Some((s["step"].as_u64()? as f64, f(s).filter(|x| x.is_finite())?))).collect())
        .unwrap_or_default()
}

/// Samples (or tokens, `what`) per second of each committed step whose time is known.
pub fn per_second(status: &Value, what: &str) -> Vec<(f64, f64)> {
    series(status, |s| {
        let secs = s["seconds"].as_f64().filter(|&t| t > 0.0)?;
        Some(s[what].as_u64().filter(|&n| n > 0)? as f64 / secs)
    })
}

/// Mean of the last `n` values of a series.
pub fn recent_mean(xs: &[(f64, f64)], n: usize) -> Option<f64> {
    let tail = &xs[xs.len().saturating_sub(n)..];
    (!tail.is_empty()).then(|| tail.iter().map(|p| p.1).sum::<f64>() / tail.len() as f64)
}

fn cut(line: &str, width: usize) -> String {
    if line.chars().count() <= width {
        line.to_string()
    } else {
        let mut s: String = line.chars().take(width.saturating_sub(1)).collect();
        s.push('~');
        s
    }
}

/// One screen of `otter-coord status --watch`: `width` columns, every line cut to fit.
pub fn watch_frame(status: &Value, width: usize) -> String {
    let width = width.max(40);
    let s = &status["summary"];
    let now = status["now"].as_u64().unwrap_or(0);
    let steps = s["steps_committed"].as_u64().unwrap_or(0);
    let total = status["total_steps"].as_u64();
    let nodes: Vec<&str> = status["members"].as_array().into_iter().flatten().filter_map(|m| m["node_id"].as_str()).collect();
    let mut lines = vec![
        format!("Otter job: {}   generation {}   world {} (nodes {})   {}", phase(status), s["generation"], s["world"], nodes.join(", "), iso(now)),
    ];
    let pct = total.map_or(0.0, |t| steps as f64 / t.max(1) as f64);
    let bar_w = width.saturating_sub(40).clamp(10, 50);
    let filled = ((pct * bar_w as f64).round() as usize).min(bar_w);
    lines.push(format!(
        "[{}{}] step {steps} of {} ({:.1}%)  ETA {}",
        "#".repeat(filled),
        "-".repeat(bar_w - filled),
        total.map_or("?".into(), |t| t.to_string()),
        100.0 * pct,
        status["eta"].as_str().unwrap_or("unknown")
    ));
    let samples = per_second(status, "samples");
    let tokens = per_second(status, "tokens");
    let lr = status["steps"].as_array().and_then(|v| v.last()).and_then(|x| x["lr"].as_f64());
    lines.push(format!(
        "loss {}   lr {}   samples/s {}   tokens/s {}   goodput {}",
        s["last_loss"].as_f64().map_or("n/a".into(), |l| format!("{l:.4}")),
        lr.map_or("n/a".into(), |l| format!("{l:.2e}")),
        recent_mean(&samples, 10).map_or("n/a".into(), num),
        recent_mean(&tokens, 10).map_or("n/a".into(), num),
        status["goodput"]["ratio"].as_f64().map_or("n/a".into(), |g| format!("{:.1}%", 100.0 * g)),
    ));
    lines.push(format!("recoveries {}   rollbacks {}   checkpoints kept: {}", s["recoveries"], s["rollbacks"], checkpoint_list(status)));
    for (label, key) in [("waiting", "waiting"), ("DEGRADED", "degraded")] {
        if let Some(w) = s[key].as_str() {
            lines.push(format!("{label}: {w}"));
        }
    }
    let ranks: Vec<String> = status["ranks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            format!(
                "{}:{}/{}{}",
                r["rank"],
                r["compute_seconds"].as_f64().map_or("-".into(), |x| format!("{x:.2}")),
                r["data_wait_seconds"].as_f64().map_or("-".into(), |x| format!("{x:.2}")),
                if r["straggler"] == true { " STRAGGLER" } else { "" }
            )
        })
        .collect();
    if !ranks.is_empty() {
        lines.push(format!("ranks (compute/data-wait s): {}", ranks.join("  ")));
    }
    lines.push(String::new());
    lines.push("last events:".into());
    for e in status["events"].as_array().into_iter().flatten().take(8) {
        let at = e["at"].as_u64().unwrap_or(0);
        lines.push(format!(
            "  {} ({:>10})  gen {:<3} {:<18} {}",
            &iso(at)[11..],
            ago(now, at),
            e["generation"],
            e["kind"].as_str().unwrap_or("?"),
            e["reason"].as_str().unwrap_or("")
        ));
    }
    let mut out = String::new();
    for l in lines {
        out.push_str(&cut(&l, width));
        out.push('\n');
    }
    out
}

fn checkpoint_list(status: &Value) -> String {
    let kept: Vec<String> = status["checkpoints"].as_array().into_iter().flatten().map(|v| format!("step-{v}")).collect();
    if kept.is_empty() { "none".into() } else { kept.join(", ") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn times_read_as_utc_iso_and_as_an_age() {
        assert_eq!(iso(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso(1_795_776_804_882), "2026-11-27T10:53:24Z");
        assert_eq!(iso(951_782_400_000), "2000-02-29T00:00:00Z", "a leap day");
        for (now, at, want) in [(5_000, 4_900, "just now"), (20_000, 8_000, "12 s ago"), (600_000, 0, "10 min ago"), (7_200_000, 0, "2 h ago"), (0, 9_000, "just now")] {
            assert_eq!(ago(now, at), want);
        }
        assert_eq!((duration(0.25), duration(2.06), duration(200.0), duration(7_500.0)), ("250 ms".into(), "2.1 s".into(), "3 min 20 s".into(), "2 h 05 min".into()));
        assert_eq!((bytes(512), bytes(1536), bytes(3 << 30)), ("512 B".into(), "1.5 KiB".into(), "3.0 GiB".into()));
        assert_eq!((num(1234.6), num(0.5), num(2.0), num(1e-3), num(123_456.0)), ("1235".into(), "0.5".into(), "2".into(), "1.0e-3".into(), "123.5k".into()));
    }

    #[test]
    fn an_event_names_its_node_where_the_machine_recorded_one() {
        assert_eq!(event_node(&serde_json::json!({"kind": "NodeLost", "node": "c", "reason": "node c lost: watch stream closed"})), Some("c"));
        // Not read from the reason's text: an event without the field names no node.
        assert_eq!(event_node(&serde_json::json!({"kind": "GenerationFormed", "reason": "generation 3 formed (lost node c)"})), None);
    }

    fn job() -> Value {
        json!({
            "summary": {"phase": {"Running": {"generation": 3}}, "generation": 3, "world": 2, "steps_committed": 4, "last_loss": 1.25, "recoveries": 1, "rollbacks": 0},
            "total_steps": 8, "now": 60_000, "eta": "4 s", "checkpoints": [2],
            "members": [{"node_id": "a"}, {"node_id": "b"}],
            "goodput": {"ratio": 0.75},
            "ranks": [{"rank": 0, "compute_seconds": 0.5, "data_wait_seconds": 0.01, "straggler": false}],
            "steps": [
                {"step": 0, "generation": 2, "world": 3, "loss": 2.0, "lr": 1e-3, "seconds": 0.5, "samples": 6, "tokens": 600},
                {"step": 1, "generation": 2, "world": 3, "loss": 1.8, "lr": 1e-3, "seconds": 0.5, "samples": 6, "tokens": 600},
                {"step": 2, "generation": 3, "world": 2, "loss": 1.5, "lr": 1e-3, "seconds": 0.25, "samples": 4, "tokens": 400},
                {"step": 3, "generation": 3, "world": 2, "loss": 1.25, "lr": 9e-4, "seconds": 0.25, "samples": 4, "tokens": 0},
            ],
            "events": [
                {"at": 50_500, "generation": 3, "kind": "RendezvousComplete", "reason": "generation 3: all 2 ranks checked in"},
                {"at": 50_000, "generation": 3, "kind": "GenerationFormed", "reason": "generation 3 formed (lost node c): nodes a, b, world 2; 0 of 2 ranks checked in"},
                {"at": 48_000, "generation": 2, "kind": "NodeLost", "reason": "node c lost: watch stream closed"},
                {"at": 10_000, "generation": 2, "kind": "RendezvousComplete", "reason": "generation 2: all 3 ranks checked in"},
            ],
        })
    }

    #[test]
    fn a_world_change_is_marked_at_the_new_generations_first_step_with_its_cause_and_recovery_time() {
        let s = job();
        assert_eq!(recoveries(&s), [Recovery { at: 48_000, generation: 3, cause: "node c lost: watch stream closed".into(), seconds: 2.5 }]);
        assert_eq!(markers(&s), [Marker { step: 2, world_changed: true, title: "step 2: world 3 -> 2 (lost node c); recovered in 2.5 s".into() }]);
        assert_eq!(per_second(&s, "samples"), [(0.0, 12.0), (1.0, 12.0), (2.0, 16.0), (3.0, 16.0)]);
        assert_eq!(per_second(&s, "tokens").len(), 3, "a step without tokens reported has no tokens/s");
    }

    #[test]
    fn the_watch_frame_shows_progress_rates_and_the_last_events_within_its_width() {
        let f = watch_frame(&job(), 80);
        for want in ["Otter job: Running", "world 2 (nodes a, b)", "step 4 of 8 (50.0%)", "loss 1.2500", "lr 9.00e-4", "goodput 75.0%", "NodeLost", "00:00:48Z (  12 s ago)  gen 2 NodeLost"] {
            assert!(f.contains(want), "{want:?} missing:\n{f}");
        }
        assert!(f.lines().all(|l| l.chars().count() <= 80), "{f}");
        assert!(f.contains(&format!("[{}{}]", "#".repeat(20), "-".repeat(20))), "half the bar filled:\n{f}");
        assert!(!finished(&job()));
    }
}
