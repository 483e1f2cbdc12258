//! Fuzzed parsers (issue 19): every parser that reads input from outside the process gets
//! random bytes and mutations of a valid input (bytes flipped, inserted, deleted, cut).
//! None may panic (a panic fails the case); each returns its typed error naming the file
//! or field, or a value the rest of the code can use (exercised a little here). Hangs and
//! unbounded allocation would stop or kill the test run. `OTTER_FUZZ_CASES=N` runs N
//! random and N mutated cases per parser (default 2000 each).

use otter_core::data::images::open_store;
use otter_core::data::mimicit::{read_train_config, Instructions};
use otter_core::data::synth::{synth, ImagesFormat, SynthSpec};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::path::Path;

fn cases() -> u32 {
    std::env::var("OTTER_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000)
}

fn runner() -> TestRunner {
    TestRunner::new(Config { cases: cases(), failure_persistence: None, ..Config::default() })
}

/// One edit of a valid input.
#[derive(Debug, Clone)]
enum Edit {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Cut(usize),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<usize>().prop_map(Edit::Delete),
        any::<usize>().prop_map(Edit::Cut),
    ];
    prop::collection::vec(edit, 1..6)
}

fn apply(valid: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut v = valid.to_vec();
    for e in edits {
        let at = |i: usize, len: usize| if len == 0 { 0 } else { i % len };
        match *e {
            Edit::Flip(i, b) if !v.is_empty() => {
                let i = at(i, v.len());
                v[i] ^= b.max(1);
            }
            Edit::Insert(i, b) => {
                let i = at(i, v.len() + 1);
                v.insert(i, b);
            }
            Edit::Delete(i) if !v.is_empty() => {
                let i = at(i, v.len());
                v.remove(i);
            }
            Edit::Cut(i) => {
                let i = at(i, v.len() + 1);
                v.truncate(i);
            }
            _ => {}
        }
    }
    v
}

/// Runs `parse` on the file at `path` holding random bytes, then mutations of `valid`.
fn fuzz(name: &str, path: &Path, valid: &[u8], parse: impl Fn(&Path)) {
    let write = |bytes: &[u8]| std::fs::write(path, bytes).unwrap();
    let mut r = runner();
    r.run(&prop::collection::vec(any::<u8>(), 0..512), |bytes| {
        write(&bytes);
        parse(path);
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{name}, random bytes: {e}"));
    let mut r = runner();
    r.run(&edits(), |e| {
        write(&apply(valid, &e));
        parse(path);
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{name}, mutated: {e}"));
    write(valid);
    parse(path); // the valid input itself parses through the same path
}

fn synthetic(dir: &Path, format: ImagesFormat) -> otter_core::data::synth::SynthFiles {
    synth(dir, &SynthSpec { samples: 6, format, seed: 7, image_px: 8, distinct_images: 3 }).unwrap()
}

#[test]
fn mimicit_instructions_json_never_panics() {
    let d = tempfile::tempdir().unwrap();
    let files = synthetic(&d.path().join("syn"), ImagesFormat::Json);
    let valid = std::fs::read(&files.instructions).unwrap();
    fuzz("instructions", &d.path().join("x_instructions.json"), &valid, |p| {
        if let Ok(ins) = Instructions::open(p) {
            let ids: Vec<String> = ins.ids().cloned().collect();
            for id in ids {
                let _ = ins.get(&id);
            }
        }
    });
}

#[test]
fn mimicit_train_config_json_never_panics() {
    let d = tempfile::tempdir().unwrap();
    let files = synthetic(&d.path().join("syn"), ImagesFormat::Json);
    let valid = std::fs::read(&files.train_config).unwrap();
    fuzz("train config", &d.path().join("x_train.json"), &valid, |p| {
        let _ = read_train_config(p);
    });
}

/// The images file's ids as the synthetic data names them.
fn image_ids() -> Vec<String> {
    (0..4).map(|i| format!("SYN_IMG_{i:08}")).collect()
}

/// Opens mutated image files of `format` and reads every image of the valid file from them.
fn fuzz_image_store(format: ImagesFormat, file: &str) {
    let d = tempfile::tempdir().unwrap();
    let files = synthetic(&d.path().join("syn"), format);
    let valid = std::fs::read(&files.images).unwrap();
    fuzz(file, &d.path().join(file), &valid, |p| {
        if let Ok(store) = open_store(p) {
            for id in image_ids() {
                let _ = store.get(&id);
            }
        }
    });
}

#[test]
fn image_json_files_never_panic() {
    fuzz_image_store(ImagesFormat::Json, "x.json");
}

#[test]
fn parquet_image_files_never_panic() {
    fuzz_image_store(ImagesFormat::Parquet, "x.parquet");
}

#[test]
fn checkpoint_manifests_never_panic() {
    let d = tempfile::tempdir().unwrap();
    let step = d.path().join("step-4");
    std::fs::create_dir_all(&step).unwrap();
    otter_core::ckpt::write_manifest(&step, &otter_core::ckpt::Manifest::new(4, 2)).unwrap();
    let path = step.join("manifest.json");
    let valid = std::fs::read(&path).unwrap();
    fuzz("manifest", &path, &valid, |_| {
        let _ = otter_core::ckpt::read_manifest(&step);
    });
}

#[test]
fn hf_config_json_never_panics() {
    let d = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny_otter/config.json");
    let valid = std::fs::read(&fixture).unwrap();
    fuzz("config.json", &d.path().join("config.json"), &valid, |p| {
        if let Ok(hf) = otter_core::model::config::HfOtterConfig::from_file(p) {
            let _ = hf.resolve("fuzz");
        }
    });
}

#[test]
fn run_config_yaml_never_panics() {
    let d = tempfile::tempdir().unwrap();
    let valid = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/local-job.yaml")).unwrap();
    fuzz("run config", &d.path().join("job.yaml"), &valid, |p| {
        let _ = otter_core::run_config::RunConfig::from_file(p);
    });
}

#[test]
fn saved_coordinator_state_never_panics() {
    let d = tempfile::tempdir().unwrap();
    // A state as the coordinator saves it (zstd JSON), and the plain JSON of the previous
    // version, both mutated.
    let mut machine = otter_core::coord::machine::Machine::new(otter_core::coord::CoordConfig::new(1, 2), vec![40]).unwrap();
    for node in ["a", "b"] {
        machine.join(otter_core::coord::Millis(1000), node, 1, &otter_core::model::identity::ModelIdentity::synthetic("m")).unwrap();
    }
    let state = otter_core::coord::server::Persisted { machine, total_steps: None };
    let encoded = otter_core::coord::persist::encode_state(&state);
    let plain = serde_json::to_vec(&state).unwrap();
    for (name, valid) in [("state (zstd)", encoded), ("state (json)", plain)] {
        fuzz(name, &d.path().join("state.json"), &valid, |p| {
            let _ = otter_core::coord::persist::decode_state(&std::fs::read(p).unwrap(), "fuzz");
        });
    }
}

/// The coordinator's gRPC requests (as the handlers receive them once the token is
/// checked): valid requests of every kind, encoded, mutated, decoded by prost and handed
/// to a running coordinator whose two nodes are training. Whatever they say (any rank,
/// step, generation, node id, size), no handler panics, the coordinator keeps answering,
/// and the exactly-once check still holds at the end.
#[test]
fn grpc_requests_through_the_handlers_never_panic_nor_break_exactly_once() {
    use otter_core::coord::machine::Machine;
    use otter_core::coord::rpc::pb;
    use otter_core::coord::rpc::pb::coordinator_server::Coordinator as _;
    use otter_core::coord::server::Coordinator;
    use otter_core::coord::service::Service;
    use otter_core::coord::store::MemStore;
    use otter_core::coord::CoordConfig;
    use prost::Message;
    use std::time::Duration;
    use tonic::Request;

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let cfg = CoordConfig { join_timeout: Duration::from_millis(200), last_call: Duration::from_millis(50), ..CoordConfig::new(2, 4) };
    let svc = rt.block_on(async {
        let machine = Machine::new(cfg, vec![4000]).unwrap();
        let coord = Coordinator::open(machine, Box::new(MemStore::default()), String::new(), Duration::from_secs(1)).await.unwrap();
        // Time-driven transitions (last call, timeouts), as `serve` runs them.
        otter_core::coord::service::spawn_ticker(coord.clone());
        Service(coord)
    });
    // Two nodes join and form generation 1, so that fuzzed requests reach a running job.
    let generation = rt.block_on(async {
        for node in ["a", "b"] {
            svc.join(Request::new(pb::JoinRequest { node_id: node.into(), local_ranks: 1, identity: Some(otter_core::coord::rpc::identity_to_pb(&otter_core::model::identity::ModelIdentity::synthetic("m"))) })).await.unwrap();
        }
        let rdv = |node: &'static str| {
            let svc = svc.clone();
            async move {
                let r = pb::RendezvousRequest { node_id: node.into(), local_rank: 0, applied_step: None, comm_addr: format!("127.0.0.1:900{}", node.len()), last_generation: None };
                // Pending (the other node's check-in, the last call) answers "try again".
                let mut tries = 0;
                loop {
                    match svc.rendezvous(Request::new(r.clone())).await {
                        Err(e) if tries < 10 && e.code() == tonic::Code::Unavailable => tries += 1,
                        other => break other,
                    }
                }
            }
        };
        let (a, b) = tokio::join!(rdv("a"), rdv("b"));
        assert_eq!(a.unwrap().into_inner().generation, b.unwrap().into_inner().generation);
        let status: serde_json::Value = serde_json::from_str(&svc.status(Request::new(pb::StatusRequest {})).await.unwrap().into_inner().json).unwrap();
        status["summary"]["generation"].as_u64().unwrap()
    });
    // A valid request of each kind, encoded.
    let g = generation;
    let valid: Vec<Vec<u8>> = vec![
        pb::JoinRequest { node_id: "c".into(), local_ranks: 1, identity: Some(otter_core::coord::rpc::identity_to_pb(&otter_core::model::identity::ModelIdentity::synthetic("m"))) }.encode_to_vec(),
        pb::HeartbeatRequest { node_id: "a".into(), generation: g }.encode_to_vec(),
        pb::RendezvousRequest { node_id: "a".into(), local_rank: 0, applied_step: Some(0), comm_addr: "127.0.0.1:9001".into(), last_generation: Some(g) }.encode_to_vec(),
        pb::StepDoneRequest { generation: g, rank: 0, step: 0, loss: 2.5, step_seconds: 0.1, compute_seconds: 0.1, lr: 1e-3, ..Default::default() }.encode_to_vec(),
        pb::CheckpointDoneRequest { generation: g, rank: 1, step: 4, file: "shard-1.safetensors".into(), bytes: 64, crc32: 7, names: vec!["p".into()] }.encode_to_vec(),
        pb::FailureRequest { generation: g, rank: 1, reason: "peer".into(), blamed_rank: Some(0) }.encode_to_vec(),
        pb::UnreadableCheckpointRequest { generation: g, rank: 0, steps: 4, reason: "crc".into() }.encode_to_vec(),
        pb::CheckpointFailedRequest { generation: g, rank: 0, step: 4, kind: "disk-full".into(), reason: "ENOSPC".into() }.encode_to_vec(),
        pb::FinalWeightsRequest { generation: g, rank: 0, path: Some("/tmp/w".into()), error: None }.encode_to_vec(),
        pb::LeaveRequest { node_id: "b".into() }.encode_to_vec(),
    ];
    let call = |kind: usize, bytes: &[u8]| {
        let svc = svc.clone();
        let bytes = bytes.to_vec();
        rt.block_on(async move {
            // A handler that waits (a rendezvous, a durable save) is left after a moment.
            let limit = Duration::from_millis(20);
            macro_rules! go {
                ($t:ty, $m:ident) => {
                    if let Ok(r) = <$t>::decode(bytes.as_slice()) {
                        let _ = tokio::time::timeout(limit, svc.$m(Request::new(r))).await;
                    }
                };
            }
            match kind {
                0 => go!(pb::JoinRequest, join),
                1 => go!(pb::HeartbeatRequest, heartbeat),
                2 => go!(pb::RendezvousRequest, rendezvous),
                3 => go!(pb::StepDoneRequest, step_done),
                4 => go!(pb::CheckpointDoneRequest, checkpoint_done),
                5 => go!(pb::FailureRequest, report_failure),
                6 => go!(pb::UnreadableCheckpointRequest, report_unreadable_checkpoint),
                7 => go!(pb::CheckpointFailedRequest, checkpoint_failed),
                8 => go!(pb::FinalWeightsRequest, final_weights),
                _ => go!(pb::LeaveRequest, leave),
            }
        })
    };
    let mut r = TestRunner::new(Config { cases: cases() / 4, failure_persistence: None, ..Config::default() });
    r.run(&(0..valid.len(), edits()), |(kind, e)| {
        call(kind, &apply(&valid[kind], &e));
        Ok(())
    })
    .unwrap_or_else(|e| panic!("gRPC requests, mutated: {e}"));
    let mut r = TestRunner::new(Config { cases: cases() / 4, failure_persistence: None, ..Config::default() });
    r.run(&(0..valid.len(), prop::collection::vec(any::<u8>(), 0..64)), |(kind, bytes)| {
        call(kind, &bytes);
        Ok(())
    })
    .unwrap_or_else(|e| panic!("gRPC requests, random bytes: {e}"));
    let status: serde_json::Value = rt.block_on(async {
        let reply = tokio::time::timeout(Duration::from_secs(10), svc.status(Request::new(pb::StatusRequest {}))).await;
        serde_json::from_str(&reply.expect("the coordinator still answers").unwrap().into_inner().json).unwrap()
    });
    assert!(status["exactly_once"].get("Ok").is_some(), "exactly-once after fuzzed requests: {}", status["exactly_once"]);
    println!("after fuzzed requests: generation {}, phase {}", status["summary"]["generation"], status["summary"]["phase"]);
}

/// Found by the parquet fuzzing: one flipped byte of the column metadata made the parquet
/// reader panic ("column start and length should not be negative") instead of erring.
/// Opening such a file is now the file's error.
#[test]
fn a_parquet_file_that_makes_the_reader_panic_is_an_error_naming_the_file() {
    let d = tempfile::tempdir().unwrap();
    let files = synthetic(&d.path().join("syn"), ImagesFormat::Parquet);
    let valid = std::fs::read(&files.images).unwrap();
    let path = d.path().join("bad.parquet");
    std::fs::write(&path, apply(&valid, &[Edit::Flip(6756663879189058251, 31)])).unwrap();
    // The index opens; reading an image's row is where the reader gave up.
    let errors: Vec<String> = match open_store(&path) {
        Err(e) => vec![e.to_string()],
        Ok(store) => image_ids().iter().filter_map(|id| store.get(id).err()).map(|e| e.to_string()).collect(),
    };
    assert!(errors.iter().any(|m| m.contains("bad.parquet") && m.contains("malformed parquet file")), "{errors:?}");
}
