//! The generated gRPC types (proto/otter/v1) and their conversions to domain types. The
//! generated code stays at this edge.

pub mod pb {
    tonic::include_proto!("otter.v1");
}

use super::ledger::{BatchRef, StepLease};
use crate::model::identity::{ModelIdentity, TensorDigest, WeightFile};
use super::machine::Assignment;

/// What a rank measured of a step, for the status views (never for a decision).
pub fn step_report(r: &pb::StepDoneRequest) -> super::progress::StepReport {
    super::progress::StepReport {
        rank: r.rank as usize,
        step_seconds: r.step_seconds,
        compute_seconds: r.compute_seconds,
        data_wait_seconds: r.data_wait_seconds,
        samples: r.samples,
        tokens: r.tokens,
        mfu: r.mfu,
    }
}

pub fn lease_to_pb(l: StepLease) -> pb::StepLease {
    pb::StepLease { step: l.step, items: l.items.into_iter().map(|b| pb::Item { epoch: b.epoch, batch: b.batch }).collect() }
}

pub fn lease_from_pb(l: pb::StepLease) -> StepLease {
    StepLease { step: l.step, items: l.items.into_iter().map(|i| BatchRef { epoch: i.epoch, batch: i.batch }).collect() }
}

pub fn assignment_to_pb(a: Assignment, total_steps: u64, batches_per_step: u64) -> pb::Assignment {
    pb::Assignment {
        generation: a.generation,
        rank: a.rank as u32,
        world: a.world as u32,
        comm_addrs: a.comm_addrs,
        start_step: a.start_step,
        sync_from: a.sync_from.map(|r| r as u32),
        leases: a.leases.into_iter().map(lease_to_pb).collect(),
        total_steps,
        restore_step: a.restore_step,
        final_weights_only: a.final_weights_only,
        batches_per_step,
    }
}

/// Response metadata entry naming why a call was refused ([`super::Refusal::code`]).
pub const REFUSAL_HEADER: &str = "x-otter-refusal";
/// The code of a rendezvous long poll that ended before the assignment existed: call
/// again (the message says what the rendezvous waits for).
pub const RENDEZVOUS_PENDING: &str = "rendezvous-pending";

/// The refusal code a status carries, if any.
pub fn refusal_code(s: &tonic::Status) -> Option<&str> {
    s.metadata().get(REFUSAL_HEADER).and_then(|v| v.to_str().ok())
}

/// A status carrying refusal code `code`.
pub fn coded(mut s: tonic::Status, code: &str) -> tonic::Status {
    if let Ok(v) = code.parse() {
        s.metadata_mut().insert(REFUSAL_HEADER, v);
    }
    s
}

/// A client request with the join token attached.
pub fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Ok(v) = token.parse() {
        r.metadata_mut().insert(super::server::TOKEN_HEADER, v);
    }
    r
}

pub fn identity_to_pb(id: &ModelIdentity) -> pb::ModelIdentity {
    pb::ModelIdentity {
        digest: id.digest.clone(),
        config: id.config.clone(),
        tokenizer: id.tokenizer.clone(),
        weights: id
            .weights
            .iter()
            .map(|w| pb::WeightFile {
                name: w.name.clone(),
                bytes: w.bytes,
                header: w.header.clone(),
                tensors: w.tensors.iter().map(|t| pb::TensorDigest { name: t.name.clone(), xxh3: t.xxh3 }).collect(),
            })
            .collect(),
    }
}

/// A join's model identity, checked: present, and its digest that of its contents.
pub fn identity_from_pb(id: Option<pb::ModelIdentity>) -> Result<ModelIdentity, String> {
    let id = id.ok_or("JoinRequest.identity: missing (this otter-worker predates model identities: upgrade it)")?;
    let weights = id
        .weights
        .into_iter()
        .map(|w| WeightFile { name: w.name, bytes: w.bytes, header: w.header, tensors: w.tensors.into_iter().map(|t| TensorDigest { name: t.name, xxh3: t.xxh3 }).collect() })
        .collect();
    let got = ModelIdentity::new(id.config, id.tokenizer, weights);
    if got.digest != id.digest {
        return Err(format!("JoinRequest.identity: digest {} is not that of its contents ({})", id.digest, got.digest));
    }
    Ok(got)
}
