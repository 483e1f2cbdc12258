//! The coordinator's `/status` page of a running job, loaded in headless Chromium (Debian's
//! `chromium`, installed by scripts/setup.sh): the rendered DOM lists the members and the
//! loss curve, and the screenshot (saved to `target/test-artifacts/status-page.png`)
//! shows the curve's pixels.

mod common;

use common::job::*;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// Headless Chromium as the project runs it: no sandbox (root in CI), no GPU, none of the
/// background networking a closed machine refuses.
fn chromium(profile: &std::path::Path) -> Command {
    let bin = which("chromium").expect("the `chromium` binary (Debian package `chromium`; scripts/setup.sh installs it)");
    let mut c = Command::new(bin);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--window-size=1000,1600",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    c
}

#[test]
fn the_status_page_of_a_running_job_renders_members_and_loss_curve_in_chromium() {
    let d = tempfile::tempdir().unwrap();
    let job = start_live_job(d.path(), 400, 50);
    let url = format!("http://{}/status", job.http);
    // Wait until there is a curve to draw (a few committed steps).
    let t = Instant::now();
    while !http_get(&job.http, "/status").is_some_and(|p| p.contains("<polyline")) {
        assert!(t.elapsed() < Duration::from_secs(90), "no loss curve on {url}");
        std::thread::sleep(Duration::from_millis(300));
    }

    // The JSON pages its step list (a snapshot; polling it does not rebuild it per request).
    let t = Instant::now();
    let paged = loop {
        let p: serde_json::Value = serde_json::from_str(&http_get(&job.http, "/status.json?since=1&limit=2").unwrap()).unwrap();
        if !p["steps_page"]["next"].is_null() {
            break p;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "fewer than 4 steps committed: {}", p["steps_page"]);
        std::thread::sleep(Duration::from_millis(300));
    };
    let steps: Vec<u64> = paged["steps"].as_array().unwrap().iter().map(|s| s["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2], "{}", paged["steps_page"]);
    assert_eq!(paged["steps_page"]["next"], 3);
    assert!(http_get(&job.http, "/status.json?since=soon").is_none(), "a bad parameter is a 400");

    let dom = chromium(&d.path().join("profile-dom")).args(["--dump-dom", &url]).output().unwrap();
    assert!(dom.status.success(), "{}", String::from_utf8_lossy(&dom.stderr));
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(dom.contains("<td>a</td>") && dom.contains("<td>b</td>"), "members a and b listed:\n{dom}");
    assert!(dom.contains("<polyline") && dom.contains("loss curve"), "loss curve rendered:\n{dom}");
    assert!(dom.contains("world size <b>2</b>"), "{dom}");

    let artifacts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let out = chromium(&d.path().join("profile-shot")).arg(format!("--screenshot={}", shot.display())).arg(&url).output().unwrap();
    assert!(out.status.success() && shot.is_file(), "screenshot: {}", String::from_utf8_lossy(&out.stderr));
    drop(job);

    // The curve is drawn in #1f77b4: its pixels must be on the screenshot.
    let img = image::open(&shot).unwrap().to_rgb8();
    let curve = img.pixels().filter(|p| (p[0] as i32 - 0x1f).abs() < 40 && (p[1] as i32 - 0x77).abs() < 40 && (p[2] as i32 - 0xb4).abs() < 40).count();
    assert!(curve > 100, "{curve} pixels of the loss curve's colour in {}", shot.display());
    println!("status page rendered by Chromium: {}x{} screenshot with {curve} curve pixels at {}", img.width(), img.height(), shot.display());
}
