//! The coordinator's HTTP side (`--http-listen`): `/metrics` (Prometheus), `/status` (a
//! self-contained HTML page: no scripts, styles or images from anywhere else; charts are
//! inline SVG with axes, gridlines and hover titles on the world-change markers),
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
                    ([(CONTENT_TYPE, "text/html; charset=utf-8")], render_status(&status))
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

/// About `n` round tick values covering `lo..=hi` (steps of 1, 2 or 5 x 10^k; at least
/// `min_step`).
fn ticks(lo: f64, hi: f64, n: usize, min_step: f64) -> Vec<f64> {
    let raw = ((hi - lo) / n.max(1) as f64).max(min_step).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * mag).find(|s| *s >= raw * 0.999).unwrap_or(10.0 * mag).max(min_step);
    let mut out = Vec::new();
    let mut v = (lo / step).ceil() * step;
    while v <= hi + step * 1e-9 && out.len() < 50 {
        out.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
        v += step;
    }
    out
}

/// A chart of `pts` (step, value) over committed steps: axes with tick labels, gridlines,
/// and `markers` (new generations) as dashed vertical lines whose `<title>` says what
/// happened. Inline SVG sized by its viewBox, so it shrinks with a narrow window.
fn chart_svg(label: &str, color: &str, pts: &[(f64, f64)], markers: &[super::view::Marker]) -> String {
    use super::view::num;
    if pts.len() < 2 {
        return format!("<p>(not enough committed steps for a {} chart yet)</p>", escape(label));
    }
    let pts: Vec<(f64, f64)> = pts.iter().step_by(pts.len().div_ceil(600)).copied().collect();
    let (w, h, left, right, top, bottom) = (640.0, 230.0, 66.0, 16.0, 14.0, 42.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let x0 = pts[0].0;
    let x1 = pts[pts.len() - 1].0.max(x0 + 1.0);
    let mut lo = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let mut hi = pts.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    if hi - lo < 1e-12 * hi.abs().max(1e-30) {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        (lo, hi) = (lo - pad, hi + pad);
    }
    let yt = ticks(lo, hi, 4, 0.0);
    // The axis spans whole ticks where that adds little.
    let step = if yt.len() > 1 { yt[1] - yt[0] } else { hi - lo };
    let (lo, hi) = (lo.min((lo / step).floor() * step), hi.max((hi / step).ceil() * step));
    let px = |x: f64| left + (x - x0) / (x1 - x0) * pw;
    let py = |y: f64| top + ph - (y - lo) / (hi - lo) * ph;
    let mut svg = format!(
        "<svg class=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"{l} over committed steps\">\
         <rect x=\"{left}\" y=\"{top}\" width=\"{pw}\" height=\"{ph}\" fill=\"#fcfcfc\"/>",
        l = escape(label)
    );
    let mut grid = String::from("<g class=\"grid\" stroke=\"#e3e3e3\" stroke-width=\"1\">");
    let mut yaxis = format!("<g class=\"axis y\" font-size=\"13\" text-anchor=\"end\"><line x1=\"{left}\" x2=\"{left}\" y1=\"{top}\" y2=\"{}\" stroke=\"#555\"/>", top + ph);
    for v in ticks(lo, hi, 4, 0.0) {
        let y = py(v);
        let _ = write!(grid, "<line x1=\"{left}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>", left + pw);
        let _ = write!(yaxis, "<line x1=\"{}\" x2=\"{left}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#555\"/><text x=\"{}\" y=\"{:.1}\">{}</text>", left - 4.0, left - 6.0, y + 4.0, num(v));
    }
    let mut xaxis = format!("<g class=\"axis x\" font-size=\"13\" text-anchor=\"middle\"><line x1=\"{left}\" x2=\"{}\" y1=\"{b}\" y2=\"{b}\" stroke=\"#555\"/>", left + pw, b = top + ph);
    for v in ticks(x0, x1, 6, 1.0) {
        let x = px(v);
        let _ = write!(grid, "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{top}\" y2=\"{}\"/>", top + ph);
        let _ = write!(xaxis, "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{b}\" y2=\"{}\" stroke=\"#555\"/><text x=\"{x:.1}\" y=\"{}\">{v}</text>", top + ph + 4.0, top + ph + 18.0, b = top + ph);
    }
    let _ = write!(xaxis, "<text x=\"{}\" y=\"{}\" font-size=\"13\">step</text></g>", left + pw / 2.0, h - 4.0);
    yaxis.push_str("</g>");
    grid.push_str("</g>");
    svg.push_str(&grid);
    svg.push_str(&xaxis);
    svg.push_str(&yaxis);
    let _ = write!(svg, "<text class=\"axis-title\" x=\"{}\" y=\"{}\" font-size=\"13\">{}</text>", left + 6.0, top + 14.0, escape(label));
    let mut poly = String::new();
    for &(x, y) in &pts {
        let _ = write!(poly, "{:.1},{:.1} ", px(x), py(y));
    }
    // Strokes keep their width when the chart is scaled down (a phone).
    let _ = write!(svg, "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" vector-effect=\"non-scaling-stroke\" points=\"{poly}\"/>");
    for m in markers.iter().filter(|m| (x0..=x1).contains(&(m.step as f64))) {
        let x = px(m.step as f64);
        let (class, stroke) = if m.world_changed { ("world-change", "#d62728") } else { ("recovery", "#ff7f0e") };
        // A wide transparent line under the dashed one makes the hover target usable.
        let _ = write!(
            svg,
            "<g class=\"marker {class}\"><title>{t}</title><line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{top}\" y2=\"{b}\" stroke=\"transparent\" stroke-width=\"10\"/>\
             <line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{top}\" y2=\"{b}\" stroke=\"{stroke}\" stroke-width=\"1.5\" vector-effect=\"non-scaling-stroke\" stroke-dasharray=\"4 3\"/></g>",
            t = escape(&m.title),
            b = top + ph
        );
    }
    svg.push_str("</svg>");
    svg
}

fn td(h: &mut String, cells: &[String]) {
    h.push_str("<tr>");
    for c in cells {
        let _ = write!(h, "<td>{c}</td>");
    }
    h.push_str("</tr>");
}

/// A row of a table that stacks on a narrow screen: each cell says its column.
fn td_stacked(h: &mut String, cols: &[&str], cells: &[String]) {
    h.push_str("<tr>");
    for (c, col) in cells.iter().zip(cols) {
        let _ = write!(h, "<td data-col=\"{col}\">{c}</td>");
    }
    h.push_str("</tr>");
}

fn table_head(h: &mut String, class: &str, cols: &[&str]) {
    let _ = write!(h, "<div class=\"wide\"><table class=\"{class}\"><tr>");
    for c in cols {
        let _ = write!(h, "<th>{c}</th>");
    }
    h.push_str("</tr>");
}

/// `at` (Unix ms) as `<time>`: UTC ISO and how long ago, as of the snapshot's `now`.
fn when(at: u64, now: u64) -> String {
    use super::view::{ago, iso};
    format!("<time datetime=\"{i}\">{i}</time> <span class=\"ago\">({})</span>", ago(now, at), i = iso(at))
}

/// No table or text may widen the page: tables scroll inside their `.wide` box, and the
/// long ones (recoveries, events) stack their cells on a narrow screen.
const STYLE: &str = "body{font-family:sans-serif;margin:1em auto;max-width:64em;padding:0 .8em;overflow-wrap:anywhere;color:#222}\
    h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.4em}\
    .wide{overflow-x:auto;max-width:100%}table{border-collapse:collapse;margin:.4em 0;overflow-wrap:normal}\
    @media (max-width:640px){table.stack,table.stack tbody,table.stack tr,table.stack td{display:block}table.stack tr:first-child{display:none}\
    table.stack tr{border-top:1px solid #ccc;padding:.3em 0}table.stack td{border:0;padding:1px 4px;overflow-wrap:anywhere}\
    table.stack td::before{content:attr(data-col) \": \";color:#666}}\
    td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;vertical-align:top}\
    .bar{background:#eee;max-width:30em;height:1em}.bar div{background:#2ca02c;height:1em}.warn{color:#b00}\
    .figures{display:flex;flex-wrap:wrap;gap:.4em 1.6em;margin:.6em 0}.figures div{min-width:8em}.figures b{font-size:1.3em;display:block}\
    .chart{width:100%;max-width:640px;height:auto;display:block}.ago{color:#666}time{white-space:nowrap}";

/// The status page, from the status JSON alone (times as of its `now`).
pub fn render_status(status: &serde_json::Value) -> String {
    use super::view;
    let sum = &status["summary"];
    let now = status["now"].as_u64().unwrap_or(0);
    let phase = view::phase(status);
    let steps = sum["steps_committed"].as_u64().unwrap_or(0);
    let total = status["total_steps"].as_u64();
    let pct = total.map_or(0.0, |t| 100.0 * steps as f64 / t.max(1) as f64);
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta http-equiv=\"refresh\" content=\"5\"><title>Otter job status</title><style>{STYLE}</style></head><body>"
    );
    let _ = write!(
        h,
        "<h1>Otter job: {}</h1><p>generation <b>{}</b>, {} nodes, world size <b>{}</b>; recoveries {}, rollbacks {}. As of {}.</p>",
        escape(&phase),
        sum["generation"],
        sum["nodes"],
        sum["world"],
        sum["recoveries"],
        sum["rollbacks"],
        when(now, now)
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
        let until = x[1].as_u64().map_or("?".into(), view::iso);
        alerts.push(format!("Node {} is left out (it and another node could not reach each other) until {until}", escape(x[0].as_str().unwrap_or("?"))));
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
        escape(status["eta"].as_str().unwrap_or("unknown")),
        sum["last_loss"].as_f64().map_or("n/a".into(), |l| format!("{l:.4}"))
    );
    let losses = view::series(status, |s| s["loss"].as_f64());
    let lrs = view::series(status, |s| s["lr"].as_f64());
    let samples = view::per_second(status, "samples");
    let tokens = view::per_second(status, "tokens");
    let mfu = view::series(status, |s| s["mfu"].as_f64());
    let recent = |xs: &[(f64, f64)]| view::recent_mean(xs, 10).map_or("n/a".into(), view::num);
    let goodput = &status["goodput"];
    h.push_str("<div class=\"figures\">");
    let _ = write!(
        h,
        "<div id=\"goodput\" title=\"time in committed steps / wall time since the first rendezvous\">goodput<b>{}</b>{}</div>",
        goodput["ratio"].as_f64().map_or("n/a".into(), |g| format!("{:.1}%", 100.0 * g)),
        match (goodput["useful_seconds"].as_f64(), goodput["wall_seconds"].as_f64()) {
            (Some(u), Some(w)) => format!("{} of {} in committed steps", view::duration(u), view::duration(w)),
            _ => "no generation formed yet".into(),
        }
    );
    let lr = lrs.last().map_or("n/a".into(), |p| format!("{:.2e}", p.1));
    let mfu_text = view::recent_mean(&mfu, 10).map_or("n/a".into(), |m| format!("{:.1}%", 100.0 * m));
    for (name, value) in [("learning rate", lr), ("samples/s", recent(&samples)), ("tokens/s", recent(&tokens)), ("MFU", mfu_text)] {
        let _ = write!(h, "<div>{name}<b>{value}</b></div>");
    }
    h.push_str("</div><p class=\"note\">Rates: mean of the last 10 committed steps (every rank's samples or tokens / the step's time). MFU only where the ranks know their accelerator's peak.</p>");
    let markers = view::markers(status);
    let _ = write!(h, "<h2>Loss</h2>{}", chart_svg("loss", "#1f77b4", &losses, &markers));
    let _ = write!(h, "<h2>Learning rate</h2>{}", chart_svg("learning rate", "#9467bd", &lrs, &markers));
    let (tp, tp_label) = if tokens.len() >= 2 { (&tokens, "tokens/s") } else { (&samples, "samples/s") };
    let _ = write!(h, "<h2>Throughput</h2>{}", chart_svg(tp_label, "#2ca02c", tp, &markers));
    h.push_str("<h2>Members</h2>");
    table_head(&mut h, "members", &["node", "local ranks", "first rank"]);
    for m in status["members"].as_array().into_iter().flatten() {
        td(&mut h, &[escape(m["node_id"].as_str().unwrap_or("?")), m["local_ranks"].to_string(), m["first_rank"].to_string()]);
    }
    h.push_str("</table></div><h2>Ranks (last step)</h2>");
    table_head(&mut h, "ranks", &["rank", "compute s", "data wait s", "straggler"]);
    let secs = |v: &serde_json::Value| v.as_f64().map_or("-".into(), |s| format!("{s:.3}"));
    for r in status["ranks"].as_array().into_iter().flatten() {
        let flagged = r["straggler"] == true;
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td{}>{}</td></tr>",
            r["rank"],
            secs(&r["compute_seconds"]),
            secs(&r["data_wait_seconds"]),
            if flagged { " class=\"warn\"" } else { "" },
            if flagged { "yes" } else { "no" }
        );
    }
    h.push_str("</table></div><h2>Recoveries</h2>");
    let recoveries = view::recoveries(status);
    if recoveries.is_empty() {
        h.push_str("<p>none in the recent events</p>");
    } else {
        let cols = ["failure noticed", "generation", "cause", "took"];
        table_head(&mut h, "recoveries stack", &cols);
        for r in recoveries.iter().rev() {
            td_stacked(&mut h, &cols, &[when(r.at, now), r.generation.to_string(), escape(&r.cause), view::duration(r.seconds)]);
        }
        h.push_str("</table></div>");
    }
    let kept: Vec<u64> = status["checkpoints"].as_array().into_iter().flatten().filter_map(|v| v.as_u64()).collect();
    let _ = write!(
        h,
        "<h2>Checkpoints</h2><p>{}; saves failed in a row: {}</p>",
        match kept.last() {
            None => "none committed yet".into(),
            Some(n) => format!("kept: {}; step-{n}, the newest, is the one to resume from", kept.iter().map(|n| format!("step-{n}")).collect::<Vec<_>>().join(", ")),
        },
        sum["failed_saves"].as_u64().unwrap_or(0)
    );
    let log: Vec<&serde_json::Value> = status["checkpoint_log"].as_array().into_iter().flatten().collect();
    if !kept.is_empty() {
        table_head(&mut h, "checkpoints", &["checkpoint", "committed", "size"]);
        for n in kept.iter().rev() {
            let rec = log.iter().find(|c| c["step"].as_u64() == Some(*n));
            td(
                &mut h,
                &[
                    format!("step-{n}"),
                    rec.and_then(|c| c["at"].as_u64()).map_or("-".into(), |at| when(at, now)),
                    rec.and_then(|c| c["bytes"].as_u64()).map_or("-".into(), view::bytes),
                ],
            );
        }
        h.push_str("</table></div>");
    }
    h.push_str("<h2>Recent events</h2>");
    let cols = ["time (UTC)", "node", "generation", "event", "reason"];
    table_head(&mut h, "events stack", &cols);
    for e in status["events"].as_array().into_iter().flatten().take(50) {
        let reason = e["reason"].as_str().unwrap_or("");
        td_stacked(
            &mut h,
            &cols,
            &[
                e["at"].as_u64().map_or("?".into(), |at| when(at, now)),
                escape(view::event_node(e).unwrap_or("-")),
                e["generation"].to_string(),
                escape(e["kind"].as_str().unwrap_or("?")),
                escape(reason),
            ],
        );
    }
    h.push_str("</table></div></body></html>\n");
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
            "steps": [{"step": 0, "loss": 2.0, "world": 3, "generation": 1, "lr": 1e-3, "seconds": 0.5, "samples": 6, "tokens": 900},
                      {"step": 1, "loss": 1.8, "world": 3, "generation": 1, "lr": 1e-3, "seconds": 0.5, "samples": 6, "tokens": 900},
                      {"step": 2, "loss": 1.5, "world": 2, "generation": 2, "lr": 9e-4, "seconds": 0.25, "samples": 4, "tokens": 600}],
            "checkpoints": [2],
            "checkpoint_log": [{"step": 2, "at": 1_795_776_800_000u64, "bytes": 3_500_000}],
            "now": 1_795_776_804_882u64,
            "eta": "12 s",
            "goodput": {"ratio": 0.8125, "useful_seconds": 1.25, "wall_seconds": 1.538, "since": 1_795_776_803_344u64},
            "ranks": [{"rank": 0, "compute_seconds": 0.25, "data_wait_seconds": 0.01, "straggler": false},
                      {"rank": 1, "compute_seconds": 0.9, "data_wait_seconds": 0.02, "straggler": true}],
            "events": [{"at": 1_795_776_801_000u64, "generation": 2, "kind": "NodeLost", "node": "b", "reason": "node b lost: <watch closed>"}],
        });
        let page = render_status(&status);
        assert!(!page.contains("<script"), "no scripts, and worker-supplied text is escaped");
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        for (at, _) in page.match_indices("://") {
            let url = &page[page[..at].rfind(|c: char| !c.is_ascii_alphabetic()).map_or(0, |i| i + 1)..];
            assert!(url.starts_with("http://www.w3.org/2000/svg\""), "no external assets: {}", &url[..40.min(url.len())]);
        }
        assert!(!page.contains("src=") && !page.contains("<link"), "no external assets");
        assert!(page.contains("<polyline") && page.contains("3 of 12 steps committed (25.0%)"));
        assert_eq!(page.matches("class=\"marker world-change\"").count(), 3, "the world changed once, at step 2: marked on each chart");
        assert!(page.contains("<title>step 2: world 3 -&gt; 2</title>"), "{page}");
        assert!(page.contains("Running") && page.contains("step-2") && page.contains("ETA 12 s"));
        assert_eq!(page.matches("<svg class=\"chart\"").count(), 3, "loss, learning rate, throughput");
        for chart in page.split("<svg class=\"chart\"").skip(1) {
            let chart = &chart[..chart.find("</svg>").unwrap()];
            assert!(chart.contains("class=\"axis x\"") && chart.contains("class=\"axis y\"") && chart.contains("class=\"grid\""), "axes and grid: {chart}");
            assert!(chart.matches("</text>").count() >= 5, "tick labels: {chart}");
        }
        assert!(page.contains("tokens/s over committed steps"), "throughput in tokens where ranks report them");
        assert!(page.contains("<time datetime=\"2026-11-27T10:53:21Z\">") && page.contains("(3 s ago)"), "event times in ISO form and as an age");
        assert!(page.contains("<td>3.3 MiB</td>"), "checkpoint size");
        assert!(page.contains("goodput<b>81.2%</b>"), "{page}");
        assert!(page.contains("<td data-col=\"node\">b</td><td data-col=\"generation\">2</td><td data-col=\"event\">NodeLost</td>"), "the event's node and generation");
        assert!(page.contains("<td>0.020</td><td class=\"warn\">yes</td>"), "data wait, and the straggler is marked");
        assert!(page.contains("node b lost: &lt;watch closed&gt;"));
        assert!(!page.contains("class=\"warn\">DEGRADED"), "a healthy job raises no alert");
    }

    #[test]
    fn axis_ticks_are_round_numbers_inside_the_range() {
        assert_eq!(ticks(0.0, 100.0, 4, 1.0), [0.0, 50.0, 100.0]);
        assert_eq!(ticks(3.0, 57.0, 6, 1.0), [10.0, 20.0, 30.0, 40.0, 50.0]);
        assert_eq!(ticks(0.0, 3.0, 6, 1.0), [0.0, 1.0, 2.0, 3.0], "steps are whole");
        let lr = ticks(0.0, 1e-3, 4, 0.0);
        assert_eq!(lr.len(), 3);
        assert!((lr[1] - 5e-4).abs() < 1e-12);
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
        let page = render_status(&status);
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
