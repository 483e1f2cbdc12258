//! What an operator keeps open during a run, checked on a live CPU job:
//!
//! * the coordinator's `/status` page loaded in headless Chromium (Debian's `chromium`,
//!   installed by scripts/setup.sh): members, event times in ISO form, axes on every chart,
//!   a world-change marker (with its hover title) after a worker is killed, the goodput
//!   figure, and no horizontal scrolling in a 390 px (phone-width) window. Screenshots at
//!   1280 px and 390 px are saved to `target/test-artifacts/status-page-{wide,narrow}.png`.
//! * `otter-coord status --watch` under a pseudo-terminal: the screen is redrawn every
//!   second with the step advancing, and Ctrl-C ends it cleanly.
//!
//! **How "no horizontal scrolling" is checked.** The page has no scripts (and must keep
//! having none), and headless Chromium will not make a window narrower than 500 px, so
//! the test lays out a copy of the page (it is self-contained: a copy renders the same) in
//! a 390 px wide `<iframe srcdoc>` of a wrapper page of its own. The iframe is the phone's
//! viewport; the wrapper (same origin as a srcdoc frame) has the one script, which writes
//! the frame document's `scrollWidth` and `clientWidth` into the DOM that `--dump-dom`
//! returns: the page scrolls sideways exactly when `scrollWidth > clientWidth`. The same
//! measure of a copy with a 1200 px wide element added must report overflow, so the check
//! is shown able to fail on every run. The narrow screenshot is of that frame, cropped to
//! its 390 px.

use crate::common;

use common::job::*;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One live job at a time: the test machines have few cores.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Headless Chromium as the project runs it: no sandbox (root in CI), no GPU, none of the
/// background networking a closed machine refuses; a `width` x `height` window.
fn chromium(profile: &Path, width: u32, height: u32) -> Command {
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
    ])
    .arg(format!("--window-size={width},{height}"))
    .arg(format!("--user-data-dir={}", profile.display()));
    c
}

fn dump_dom(profile: &Path, width: u32, url: &str) -> String {
    let out = chromium(profile, width, 1600).args(["--dump-dom", url]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A file showing `html` in a `width` x `height` px frame (a phone's viewport), with the
/// measuring script if `probe`: see the module comment.
fn framed(dir: &Path, name: &str, html: &str, width: u32, height: u32, probe: bool) -> String {
    let copy = html.replace("<meta http-equiv=\"refresh\" content=\"5\">", "");
    let srcdoc = copy.replace('&', "&amp;").replace('"', "&quot;");
    let script = "<script>window.onload=function(){var f=document.getElementById('f');var e=f.contentDocument.documentElement;\
                  document.body.setAttribute('data-widths',e.scrollWidth+' '+e.clientWidth+' '+f.contentWindow.innerWidth);};</script>";
    let file = dir.join(format!("{name}.html"));
    std::fs::write(
        &file,
        format!(
            "<!doctype html><html><body style=\"margin:0\"><iframe id=\"f\" style=\"width:{width}px;height:{height}px;border:0;display:block\" srcdoc=\"{srcdoc}\"></iframe>{}</body></html>",
            if probe { script } else { "" }
        ),
    )
    .unwrap();
    format!("file://{}", file.display())
}

/// (scrollWidth, clientWidth, innerWidth) of `html` laid out `width` px wide.
fn layout_widths(dir: &Path, name: &str, html: &str, width: u32) -> (u64, u64, u64) {
    let url = framed(dir, name, html, width, 1600, true);
    let dom = dump_dom(&dir.join(format!("profile-{name}")), 1000, &url);
    let at = dom.find("data-widths=\"").unwrap_or_else(|| panic!("no measure in the DOM of {name}:\n{dom}")) + 13;
    let w: Vec<u64> = dom[at..at + dom[at..].find('"').unwrap()].split(' ').map(|x| x.parse().unwrap()).collect();
    (w[0], w[1], w[2])
}

fn screenshot(profile: &Path, width: u32, height: u32, url: &str, name: &str) -> PathBuf {
    let artifacts = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join(name);
    let _ = std::fs::remove_file(&shot);
    let out = chromium(profile, width, height).arg(format!("--screenshot={}", shot.display())).arg(url).output().unwrap();
    assert!(out.status.success() && shot.is_file(), "screenshot: {}", String::from_utf8_lossy(&out.stderr));
    shot
}

fn status_json(job: &LiveJob) -> serde_json::Value {
    serde_json::from_str(&http_get(&job.http, "/status.json").unwrap_or_else(|| "{}".into())).unwrap_or_default()
}

fn wait_status(job: &LiveJob, what: &str, limit: Duration, ok: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let s = status_json(job);
        if ok(&s) {
            return s;
        }
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}; status summary {}", s["summary"]);
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn the_status_page_shows_times_charts_goodput_and_a_world_change_and_fits_a_phone() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let mut job = start_live_job_of(d.path(), &["a", "b", "c"], 2, 2000, 10, "");
    let before = wait_status(&job, "3 ranks training", Duration::from_secs(120), |s| s["summary"]["world"] == 3 && s["summary"]["steps_committed"].as_u64() >= Some(4));
    let generation = before["summary"]["generation"].as_u64().unwrap();

    // The JSON pages its step list (a snapshot; polling it does not rebuild it per request).
    let paged: serde_json::Value = serde_json::from_str(&http_get(&job.http, "/status.json?since=1&limit=2").unwrap()).unwrap();
    let steps: Vec<u64> = paged["steps"].as_array().unwrap().iter().map(|s| s["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2], "{}", paged["steps_page"]);
    assert_eq!(paged["steps_page"]["next"], 3);
    assert!(http_get(&job.http, "/status.json?since=soon").is_none(), "a bad parameter is a 400");

    // kill -9 of worker c (its rank process dies with it: PDEATHSIG); the two others go on.
    drop(job.workers.remove(2));
    let after = wait_status(&job, "a few steps of the 2 survivors", Duration::from_secs(90), |s| {
        s["steps"].as_array().is_some_and(|v| v.iter().filter(|x| x["generation"].as_u64() > Some(generation) && x["world"] == 2).count() >= 4)
    });
    let changed_at = after["steps"].as_array().unwrap().iter().find(|x| x["world"] == 2).unwrap()["step"].as_u64().unwrap();

    let url = format!("http://{}/status", job.http);
    let page = http_get(&job.http, "/status").unwrap();
    let dom = dump_dom(&d.path().join("profile-dom"), 1280, &url);
    assert!(dom.contains("<td>a</td>") && dom.contains("<td>b</td>"), "members a and b listed:\n{dom}");
    assert!(dom.contains("world size <b>2</b>"), "{dom}");
    // Event times in ISO form (UTC), with their age.
    let iso = dom.split("<time datetime=\"").skip(1).map(|t| &t[..t.find('"').unwrap()]).collect::<Vec<_>>();
    assert!(iso.len() > 3, "event times as <time>: {iso:?}");
    for t in &iso {
        let b = t.as_bytes();
        assert!(t.len() == 20 && b[4] == b'-' && b[7] == b'-' && b[10] == b'T' && b[13] == b':' && b[16] == b':' && b[19] == b'Z', "{t} is not UTC ISO 8601");
    }
    assert!(dom.contains(" ago)</span>"), "times also as an age");
    // Axes on each chart: loss, learning rate, throughput.
    let charts: Vec<&str> = dom.split("<svg class=\"chart\"").skip(1).map(|c| &c[..c.find("</svg>").unwrap()]).collect();
    assert_eq!(charts.len(), 3, "three charts:\n{dom}");
    for c in &charts {
        assert!(c.contains("class=\"axis x\"") && c.contains("class=\"axis y\"") && c.contains("class=\"grid\""), "axes and gridlines: {c}");
        assert!(c.contains(">step</text>") && c.matches("</text>").count() >= 6, "tick labels and the axis title: {c}");
        assert!(c.contains("<polyline"), "a curve: {c}");
    }
    // The world change, on the step axis, with what happened as its hover title.
    let marker = format!("<title>step {changed_at}: world 3 -&gt; 2 (");
    let title = &page[page.find(&marker).unwrap_or_else(|| panic!("{marker} on the page:\n{page}")) + 7..];
    let title = &title[..title.find("</title>").unwrap()];
    assert!(title.contains("node c"), "the marker says which node: {title}");
    assert!(dom.contains("class=\"marker world-change\""), "{dom}");
    // The goodput figure: a percentage, and what it is made of.
    let g = &dom[dom.find("id=\"goodput\"").expect("the goodput figure")..];
    let pct: f64 = g[g.find("<b>").unwrap() + 3..g.find("%</b>").unwrap()].parse().unwrap();
    assert!(pct > 0.0 && pct <= 100.0 && g.contains("in committed steps"), "{}", &g[..200.min(g.len())]);
    let goodput = after["goodput"]["ratio"].as_f64().unwrap();
    let metrics = http_get(&job.http, "/metrics").unwrap();
    assert!(metrics.contains("otter_goodput_ratio{scope=\"job\"}"), "the same figure as a metric");
    assert!(goodput > 0.0 && goodput < 1.0, "a kill costs the job time: goodput {goodput}");
    assert!(dom.contains("<h2>Recoveries</h2><div class=\"wide\"><table"), "the recovery is listed");

    // No horizontal scrolling at 390 px; the same measure sees a 1200 px element.
    let (scroll, client, inner) = layout_widths(d.path(), "narrow", &page, 390);
    assert_eq!(inner, 390, "the viewport is phone-width");
    assert!(scroll <= client, "the page scrolls sideways at 390 px: scrollWidth {scroll} > clientWidth {client}");
    let broken = page.replace("<h2>Progress</h2>", "<div style=\"width:1200px\">wide</div><h2>Progress</h2>");
    let (scroll_b, client_b, _) = layout_widths(d.path(), "broken", &broken, 390);
    assert!(scroll_b > client_b, "the measure must see a 1200 px element: {scroll_b} <= {client_b}");

    let wide = screenshot(&d.path().join("profile-wide"), 1280, 2600, &url, "status-page-wide.png");
    let narrow_url = framed(d.path(), "narrow-shot", &page, 390, 4000, false);
    let narrow = screenshot(&d.path().join("profile-narrow"), 500, 4000, &narrow_url, "status-page-narrow.png");
    let cropped = image::open(&narrow).unwrap().crop_imm(0, 0, 390, 4000);
    cropped.save(&narrow).unwrap();
    drop(job);
    // The loss curve is drawn in #1f77b4: its pixels must be on both screenshots.
    for (shot, least) in [(&wide, 200), (&narrow, 100)] {
        let img = image::open(shot).unwrap().to_rgb8();
        let curve = img.pixels().filter(|p| (p[0] as i32 - 0x1f).abs() < 40 && (p[1] as i32 - 0x77).abs() < 40 && (p[2] as i32 - 0xb4).abs() < 40).count();
        assert!(curve > least, "{curve} pixels of the loss curve's colour in {}", shot.display());
        println!("{}: {}x{}, {curve} loss-curve pixels", shot.display(), img.width(), img.height());
    }
    println!("marker: {title}");
    println!("world change at step {changed_at}; goodput {goodput:.3}; at 390 px: scrollWidth {scroll}, clientWidth {client} (with a 1200 px element: {scroll_b})");
}

/// A pseudo-terminal whose slave end is the child's stdin, stdout, stderr and controlling
/// terminal (so Ctrl-C typed into the master reaches it as SIGINT); returns the master.
fn spawn_in_pty(cmd: &mut Command, cols: u16, rows: u16) -> (std::process::Child, std::fs::File) {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    let (mut master, mut slave) = (0, 0);
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: openpty writes two descriptors into the ints; the name and termios are null
    // (unused), the window size is read.
    let rc = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &ws) };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened and are owned here alone.
    let (master, slave) = unsafe { (std::fs::File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    cmd.stdin(Stdio::from(slave.try_clone().unwrap())).stdout(Stdio::from(slave.try_clone().unwrap())).stderr(Stdio::from(slave));
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    (child, master)
}

/// The step number of each screen (`step N of M`), in order.
fn steps_on_screens(out: &str) -> Vec<u64> {
    out.split("\x1b[H\x1b[2J")
        .skip(1)
        .filter_map(|screen| {
            let at = screen.find("] step ")? + 7;
            screen[at..].split(' ').next()?.parse().ok()
        })
        .collect()
}

#[test]
fn status_watch_redraws_the_job_every_second_under_a_terminal_and_ends_on_ctrl_c() {
    let _serial = serial();
    let d = tempfile::tempdir().unwrap();
    let job = start_live_job(d.path(), 2000, 1000);
    wait_status(&job, "2 ranks training", Duration::from_secs(120), |s| s["summary"]["steps_committed"].as_u64() >= Some(2));
    let mut cmd = Command::new(common::coord_bin());
    cmd.args(["status", "--coord", &job.addr, "--watch"]).env("OTTER_JOIN_TOKEN", TOKEN);
    let (mut child, mut master) = spawn_in_pty(&mut cmd, 120, 40);
    drop(cmd); // the parent's copies of the slave end: the master reads EOF (EIO) once the child is gone
    let screen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = {
        let (screen, mut master) = (screen.clone(), master.try_clone().unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = master.read(&mut buf) {
                screen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let text = || String::from_utf8_lossy(&screen.lock().unwrap()).into_owned();
    let started = Instant::now();
    let t = Instant::now();
    while steps_on_screens(&text()).len() < 5 {
        assert!(t.elapsed() < Duration::from_secs(20), "fewer than 5 screens in 20 s:\n{}", text());
        std::thread::sleep(Duration::from_millis(100));
    }
    let seen = steps_on_screens(&text());
    assert!(seen.windows(2).all(|w| w[0] <= w[1]) && seen.last() > seen.first(), "the step advances from screen to screen: {seen:?}");
    let last = text();
    let last = &last[last.rfind("\x1b[H\x1b[2J").unwrap()..];
    for want in ["Otter job: Running", "world 2 (nodes a, b)", "loss ", "lr ", "tokens/s ", "goodput ", "last events:", "RendezvousComplete"] {
        assert!(last.contains(want), "{want:?} on the screen:\n{last}");
    }
    // Ctrl-C, typed at the terminal: a clean exit, the cursor shown again.
    std::io::Write::write_all(&mut master, b"\x03").unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "still running 10 s after Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(master);
    reader.join().unwrap();
    assert!(status.success(), "exit after Ctrl-C: {status:?}");
    assert!(text().ends_with("\x1b[?25h\r\n"), "the cursor is shown again: {:?}", &text()[text().len().saturating_sub(40)..]);
    println!("{} screens in {:.1} s, steps {seen:?}", steps_on_screens(&text()).len(), started.elapsed().as_secs_f64());
    drop(job);
}
