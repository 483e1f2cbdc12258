//! Every shipped run config parses and validates.
use otter::run_config::RunConfig;

#[test]
fn shipped_configs_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") {
            let cfg = RunConfig::from_file(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            cfg.model_source(&p).unwrap();
            n += 1;
        }
    }
    assert!(n > 0);
}
