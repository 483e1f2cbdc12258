//! The coordinator's HTTP side (`--http-listen`): `/metrics` (Prometheus), `/status` (a
//! self-contained HTML page: no scripts, styles or images from anywhere else),
//! `/status.json` (`?since=STEP&limit=N` pages its step list), `/healthz`. Both status
//! endpoints serve a snapshot at most [`STATUS_MAX_AGE`] old, so polling them costs the
//! job one status build per interval, not one per request.

use super::server::Coordinator;
use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

/// How old a status snapshot the HTTP endpoints may serve.
pub const STATUS_MAX_AGE: Duration = Duration::from_millis(500);

pub fn router(coord: Arc<Coordinator>) -> axum::Router {
    let (m, s, j) = (coord.clone(), coord.clone(), coord);
    axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let c = m.clone();
                async move { ([(CONTENT_TYPE, "text/plain; version=0.0.4")], c.metrics.encode()) }
            }),
        )
        .route(
            "/status",
            get(move || {
                let c = s.clone();
                async move {
                    let status = c.status_snapshot(STATUS_MAX_AGE).await;
                    let ranks = rank_rows(&c);
                    ([(CONTENT_TYPE, "text/html; charset=utf-8")], render_status(&status, &ranks, &c.eta(&status)))
                }
            }),
        )
        .route(
            "/status.json",
            get(move |uri: axum::http::Uri| {
                let c = j.clone();
                async move {
                    let status = c.status_snapshot(STATUS_MAX_AGE).await;
                    match StepsPage::parse(uri.query()) {
                        Ok(page) => axum::Json(page.apply(&status)).into_response(),
                        Err(e) => (axum::http::StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
                    }
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
}

/// `?since=STEP&limit=N` of a `/status.json` request: the committed steps from `STEP` on,
/// at most `N` of them (every one kept, by default).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepsPage {
    pub since: Option<u64>,
    pub limit: Option<usize>,
}

impl StepsPage {
    /// Parses a query string; an unknown key or a value that is not a number is an error
    /// naming it.
    pub fn parse(query: Option<&str>) -> Result<Self, String> {
        let mut page = Self::default();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let bad = || format!("query parameter `{k}`: `{v}` is not a non-negative integer");
            match k {
                "since" => page.since = Some(v.parse().map_err(|_| bad())?),
                "limit" => page.limit = Some(v.parse().map_err(|_| bad())?),
                _ => return Err(format!("unknown query parameter `{k}` (since, limit)")),
            }
        }
        Ok(page)
    }

    /// `status` with its `steps` cut to this page, and `steps_page` saying what was cut:
    /// `next` is the `since` of the following page, if there is one.
    pub fn apply(&self, status: &serde_json::Value) -> serde_json::Value {
        let mut out = status.clone();
        if *self == Self::default() {
            return out;
        }
        let all = status["steps"].as_array().cloned().unwrap_or_default();
        let from: Vec<serde_json::Value> = all.into_iter().filter(|s| s["step"].as_u64() >= self.since.or(Some(0))).collect();
        let limit = self.limit.unwrap_or(usize::MAX);
        let next = from.get(limit).and_then(|s| s["step"].as_u64());
        out["steps"] = serde_json::Value::Array(from.into_iter().take(limit).collect());
        out["steps_page"] = serde_json::json!({"since": self.since, "limit": self.limit, "next": next});
        out
    }
}

/// (rank, last compute seconds, flagged as straggler).
fn rank_rows(c: &Coordinator) -> Vec<(usize, Option<f64>, bool)> {
    let t = c.telemetry.lock().expect("not poisoned");
    let flagged = t.stragglers.flagged();
    t.stragglers.last.iter().enumerate().map(|(r, s)| (r, *s, flagged.get(r).copied().unwrap_or(false))).collect()
}

pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// The loss curve as an inline SVG polyline (at most ~600 points).
/// The loss curve; `worlds`: (step, world) of each committed step, where a change of world
/// (a node lost or joined) is drawn as a dashed line labelled with the new world.
fn loss_svg(losses: &[(u64, f64)], worlds: &[(u64, u64)]) -> String {
    let pts: Vec<(u64, f64)> = losses.iter().copied().filter(|(_, l)| l.is_finite()).collect();
    if pts.len() < 2 {
        return "<p>(not enough committed steps for a curve yet)</p>".into();
    }
    let stride = pts.len().div_ceil(600);
    let pts: Vec<(u64, f64)> = pts.iter().step_by(stride).copied().collect();
    let (w, h, pad) = (640.0, 200.0, 30.0);
    let (x0, x1) = (pts[0].0 as f64, pts[pts.len() - 1].0 as f64);
    let lo = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = pts.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let span = if hi > lo { hi - lo } else { 1.0 };
    let mut poly = String::new();
    for (s, l) in &pts {
        let x = pad + (*s as f64 - x0) / (x1 - x0).max(1.0) * (w - 2.0 * pad);
        let y = h - pad - (l - lo) / span * (h - 2.0 * pad);
        let _ = write!(poly, "{x:.1},{y:.1} ");
    }
    let mut changes = String::new();
    for pair in worlds.windows(2) {
        let ((_, before), (s, world)) = (pair[0], pair[1]);
        if world != before && (x0..=x1).contains(&(s as f64)) {
            let x = pad + (s as f64 - x0) / (x1 - x0).max(1.0) * (w - 2.0 * pad);
            let _ = write!(
                changes,
                "<line class=\"world-change\" x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{pad}\" y2=\"{}\" stroke=\"#d62728\" stroke-dasharray=\"4 3\"/>\
                 <text x=\"{:.1}\" y=\"{}\" font-size=\"10\" fill=\"#d62728\">world {world}</text>",
                h - pad,
                x + 2.0,
                pad + 10.0
            );
        }
    }
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" role=\"img\" aria-label=\"loss curve\">\
         <rect width=\"100%\" height=\"100%\" fill=\"#fafafa\" stroke=\"#ccc\"/>\
         <polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"{poly}\"/>{changes}\
         <text x=\"4\" y=\"{pad}\" font-size=\"11\">{hi:.4}</text><text x=\"4\" y=\"{}\" font-size=\"11\">{lo:.4}</text>\
         <text x=\"{pad}\" y=\"{}\" font-size=\"11\">step {x0}</text><text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"end\">step {x1}</text></svg>",
        h - pad,
        h - 8.0,
        w - pad,
        h - 8.0
    )
}

/// The status page from the status JSON, per-rank step times and the ETA text.
pub fn render_status(status: &serde_json::Value, ranks: &[(usize, Option<f64>, bool)], eta: &str) -> String {
    let sum = &status["summary"];
    let phase = match &sum["phase"] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Object(o) => o.keys().next().cloned().unwrap_or_default(),
        v => v.to_string(),
    };
    let steps = sum["steps_committed"].as_u64().unwrap_or(0);
    let total = status["total_steps"].as_u64();
    let pct = total.map_or(0.0, |t| 100.0 * steps as f64 / t.max(1) as f64);
    let mut h = String::new();
    h.push_str(
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"5\">\
         <title>Otter job status</title><style>body{font-family:sans-serif;margin:1.5em;max-width:60em}\
         table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}\
         .bar{background:#eee;width:30em;height:1em}.bar div{background:#2ca02c;height:1em}.warn{color:#b00}</style></head><body>",
    );
    let _ = write!(
        h,
        "<h1>Otter job: {}</h1><p>generation <b>{}</b>, {} nodes, world size <b>{}</b>; recoveries {}, rollbacks {}</p>",
        escape(&phase),
        sum["generation"],
        sum["nodes"],
        sum["world"],
        sum["recoveries"],
        sum["rollbacks"]
    );
    // What needs an operator's attention, first.
    let mut alerts: Vec<String> = Vec::new();
    if let Some(w) = sum["waiting"].as_str() {
        alerts.push(format!("Waiting for nodes: {}", escape(w)));
    }
    if let Some(d) = sum["degraded"].as_str() {
        alerts.push(format!("DEGRADED: {}", escape(d)));
    } else if sum["failed_saves"].as_u64().unwrap_or(0) > 0 {
        alerts.push(format!("{} checkpoint save(s) in a row failed", sum["failed_saves"]));
    }
    for x in sum["excluded"].as_array().into_iter().flatten() {
        alerts.push(format!("Node {} is left out (it and another node could not reach each other) until {} (UTC ms)", escape(x[0].as_str().unwrap_or("?")), x[1]));
    }
    if sum["failed_generations"].as_u64().unwrap_or(0) > 0 {
        alerts.push(format!("{} generation(s) in a row failed without committing a step", sum["failed_generations"]));
    }
    for (n, why) in status["unreadable_checkpoints"].as_array().into_iter().flatten().filter_map(|x| Some((x[0].as_u64()?, x[1].as_str()?))) {
        alerts.push(format!("Checkpoint step-{n} was unreadable and is no longer offered: {}", escape(why)));
    }
    for a in &alerts {
        let _ = write!(h, "<p class=\"warn\">{a}</p>");
    }
    if let Some(f) = sum["final_weights"].as_str() {
        let _ = write!(h, "<p>Final weights: {}</p>", escape(f));
    }
    let _ = write!(
        h,
        "<h2>Progress</h2><div class=\"bar\"><div style=\"width:{pct:.1}%\"></div></div><p>{steps} of {} steps committed ({pct:.1}%), \
         {} batches committed, {} pending; ETA {}; last loss {}</p>",
        total.map_or("?".into(), |t| t.to_string()),
        sum["batches_committed"],
        sum["batches_pending"],
        escape(eta),
        sum["last_loss"].as_f64().map_or("n/a".into(), |l| format!("{l:.4}"))
    );
    let losses: Vec<(u64, f64)> = status["steps"]
        .as_array()
        .map(|v| v.iter().filter_map(|s| Some((s["step"].as_u64()?, s["loss"].as_f64()?))).collect())
        .unwrap_or_default();
    let worlds: Vec<(u64, u64)> = status["steps"]
        .as_array()
        .map(|v| v.iter().filter_map(|s| Some((s["step"].as_u64()?, s["world"].as_u64()?))).collect())
        .unwrap_or_default();
    let _ = write!(h, "<h2>Loss</h2>{}", loss_svg(&losses, &worlds));
    h.push_str("<h2>Members</h2><table><tr><th>node</th><th>local ranks</th><th>first rank</th></tr>");
    for m in status["members"].as_array().into_iter().flatten() {
        let _ = write!(h, "<tr><td>{}</td><td>{}</td><td>{}</td></tr>", escape(m["node_id"].as_str().unwrap_or("?")), m["local_ranks"], m["first_rank"]);
    }
    h.push_str("</table><h2>Per-rank compute time (last step)</h2><table><tr><th>rank</th><th>seconds</th><th>straggler</th></tr>");
    for (r, secs, flagged) in ranks {
        let _ = write!(
            h,
            "<tr><td>{r}</td><td>{}</td><td{}>{}</td></tr>",
            secs.map_or("-".into(), |s| format!("{s:.3}")),
            if *flagged { " class=\"warn\"" } else { "" },
            if *flagged { "yes" } else { "no" }
        );
    }
    let ckpts: Vec<String> = status["checkpoints"].as_array().into_iter().flatten().map(|v| format!("step-{v}")).collect();
    let _ = write!(
        h,
        "</table><h2>Checkpoints</h2><p>{}; saves failed in a row: {}</p>",
        if ckpts.is_empty() { "none committed yet".into() } else { format!("kept: {}, the newest is the one to resume from", escape(&ckpts.join(", "))) },
        sum["failed_saves"].as_u64().unwrap_or(0)
    );
    h.push_str("<h2>Recent events</h2><table><tr><th>time (UTC ms)</th><th>generation</th><th>event</th><th>reason</th></tr>");
    for e in status["events"].as_array().into_iter().flatten().take(50) {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            e["at"],
            e["generation"],
            escape(e["kind"].as_str().unwrap_or("?")),
            escape(e["reason"].as_str().unwrap_or(""))
        );
    }
    h.push_str("</table></body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_page_is_self_contained_and_escapes_what_workers_send() {
        let status = serde_json::json!({
            "summary": {"phase": {"Running": {"generation": 2}}, "generation": 2, "nodes": 2, "world": 2, "steps_committed": 3,
                        "batches_committed": 6, "batches_pending": 10, "recoveries": 1, "rollbacks": 0, "last_loss": 1.5},
            "total_steps": 12,
            "members": [{"node_id": "<script>alert(1)</script>", "local_ranks": 1, "first_rank": 0}],
            "steps": [{"step": 0, "loss": 2.0, "world": 3}, {"step": 1, "loss": 1.8, "world": 3}, {"step": 2, "loss": 1.5, "world": 2}],
            "checkpoints": [2],
            "events": [{"at": 5, "generation": 2, "kind": "NodeLost", "reason": "node b lost: <watch closed>"}],
        });
        let page = render_status(&status, &[(0, Some(0.25), false), (1, Some(0.9), true)], "12 s");
        assert!(!page.contains("<script"), "no scripts, and worker-supplied text is escaped");
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        for (at, _) in page.match_indices("://") {
            let url = &page[page[..at].rfind(|c: char| !c.is_ascii_alphabetic()).map_or(0, |i| i + 1)..];
            assert!(url.starts_with("http://www.w3.org/2000/svg\""), "no external assets: {}", &url[..40.min(url.len())]);
        }
        assert!(!page.contains("src=") && !page.contains("<link"), "no external assets");
        assert!(page.contains("<polyline") && page.contains("3 of 12 steps committed (25.0%)"));
        assert_eq!(page.matches("class=\"world-change\"").count(), 1, "the world changed once, at step 2");
        assert!(page.contains(">world 2</text>"));
        assert!(page.contains("Running") && page.contains("step-2") && page.contains("ETA 12 s"));
        assert!(page.contains("<td class=\"warn\">yes</td>"), "the straggler is marked");
        assert!(page.contains("node b lost: &lt;watch closed&gt;"));
        assert!(!page.contains("class=\"warn\">DEGRADED"), "a healthy job raises no alert");
    }

    #[test]
    fn the_step_list_pages_by_since_and_limit() {
        let steps: Vec<serde_json::Value> = (0..10).map(|s| serde_json::json!({"step": s, "loss": 1.0})).collect();
        let status = serde_json::json!({"summary": {}, "steps": steps});
        let page = StepsPage::parse(Some("since=4&limit=3")).unwrap();
        let out = page.apply(&status);
        let got: Vec<u64> = out["steps"].as_array().unwrap().iter().map(|s| s["step"].as_u64().unwrap()).collect();
        assert_eq!(got, [4, 5, 6]);
        assert_eq!(out["steps_page"]["next"], 7);
        let last = StepsPage::parse(Some("since=7")).unwrap().apply(&status);
        assert_eq!((last["steps"].as_array().unwrap().len(), &last["steps_page"]["next"]), (3, &serde_json::Value::Null));
        assert_eq!(StepsPage::parse(None).unwrap().apply(&status), status, "no query: everything");
        assert_eq!(StepsPage::parse(Some("since=x")).unwrap_err(), "query parameter `since`: `x` is not a non-negative integer");
        assert!(StepsPage::parse(Some("step=1")).unwrap_err().contains("unknown query parameter `step`"));
    }

    #[test]
    fn what_needs_attention_is_shown_first() {
        let status = serde_json::json!({
            "summary": {"phase": "WaitingForNodes", "generation": 3, "nodes": 1, "world": 0, "steps_committed": 40,
                        "waiting": "lost node b; 1 nodes available, below min_nodes 2", "failed_saves": 3,
                        "degraded": "3 checkpoint saves in a row failed (last: <ENOSPC>)", "excluded": [["c", 1234]],
                        "failed_generations": 2},
            "unreadable_checkpoints": [[20, "step-20/shard-00000: checksum mismatch"]],
            "checkpoints": [10],
        });
        let page = render_status(&status, &[], "unknown");
        for want in [
            "Waiting for nodes: lost node b",
            "DEGRADED: 3 checkpoint saves in a row failed (last: &lt;ENOSPC&gt;)",
            "Node c is left out",
            "2 generation(s) in a row failed",
            "Checkpoint step-20 was unreadable",
            "saves failed in a row: 3",
        ] {
            assert!(page.contains(want), "{want:?} missing");
        }
        assert!(page.find("DEGRADED").unwrap() < page.find("<h2>Progress").unwrap(), "alerts come before the progress");
    }
}
