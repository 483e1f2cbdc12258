//! A simulated node: the worker's side of the coordinator protocol (join, rendezvous,
//! one `StepDone` per step, a checkpoint shard every `save_every` steps, rendezvous again
//! at a stop) without training, over real gRPC. Tests drive a real coordinator (or a pair
//! on etcd, through a failover) through tens of thousands of steps with it, which real
//! training processes would take hours for. Its shards are empty files (the coordinator
//! checks their sizes, not their contents).

use super::client::{call, call_with_patience, connect, Client};
use super::rpc::{pb, with_token};
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::time::Duration;

pub struct SimNode {
    /// Coordinator replicas (the first that answers is used; a failover reconnects).
    pub addrs: Vec<String>,
    pub token: String,
    pub node_id: String,
    /// The job's checkpoint directory (`<train.out_dir>/checkpoints`).
    pub ckpt_dir: PathBuf,
    pub save_every: u64,
}

/// What one simulated node did.
#[derive(Debug, Clone, Default)]
pub struct SimReport {
    pub steps_done: u64,
    pub generations: u64,
    pub checkpoints: u64,
}

impl SimNode {
    /// Runs the node's one rank until the job ends.
    pub async fn run(&self) -> Result<SimReport> {
        let mut c: Client = connect(&self.addrs, Duration::from_secs(30)).await?;
        let token = self.token.clone();
        let node_id = self.node_id.clone();
        call(&mut c, &self.addrs, |mut c| {
            let req = with_token(pb::JoinRequest { node_id: node_id.clone(), local_ranks: 1, identity: Some(super::rpc::identity_to_pb(&crate::model::identity::ModelIdentity::synthetic("simulated"))) }, &token);
            async move { c.join(req).await }
        })
        .await
        .with_context(|| format!("{node_id}: join"))?;
        let mut report = SimReport::default();
        let (mut applied, mut last_generation) = (None::<u64>, None::<u64>);
        // Once told that the job ends, a coordinator that went away has ended it (the real
        // worker hears it on its watch stream).
        let mut ending = false;
        'generations: loop {
            let a = loop {
                let req = pb::RendezvousRequest { node_id: node_id.clone(), local_rank: 0, applied_step: applied, comm_addr: format!("{node_id}:0"), last_generation };
                let patience = if ending { Duration::from_secs(10) } else { Duration::from_secs(120) };
                let r = call_with_patience(&mut c, &self.addrs, patience, |mut c| {
                    let req = with_token(req.clone(), &token);
                    async move { c.rendezvous(req).await }
                })
                .await;
                match r {
                    Ok(a) => break a,
                    Err(s) if super::rpc::refusal_code(&s) == Some(super::rpc::RENDEZVOUS_PENDING) => continue,
                    Err(s) if super::rpc::refusal_code(&s) == Some("job-over") => return Ok(report),
                    Err(s) if ending && super::rpc::refusal_code(&s).is_none() => return Ok(report),
                    Err(s) => return Err(anyhow::anyhow!("{node_id}: rendezvous: {s}")),
                }
            };
            report.generations += 1;
            last_generation = Some(a.generation);
            if a.final_weights_only {
                ending = true;
                self.finish(&mut c, &a).await?;
                continue 'generations; // the other ranks wait for the job to end
            }
            let mut step = a.start_step;
            loop {
                let req = pb::StepDoneRequest { generation: a.generation, rank: a.rank, step, loss: 2.0 + 1.0 / (step + 1) as f64, lr: 1e-4, step_seconds: 0.0, compute_seconds: 0.0, ..Default::default() };
                let reply = match call(&mut c, &self.addrs, |mut c| {
                    let req = with_token(req, &token);
                    async move { c.step_done(req).await }
                })
                .await
                {
                    Ok(r) => r,
                    // The generation ended under us (a member was lost): check in again.
                    Err(s) if super::rpc::refusal_code(&s).is_some() => continue 'generations,
                    Err(s) => return Err(anyhow::anyhow!("{node_id}: step {step}: {s}")),
                };
                applied = Some(step);
                report.steps_done += 1;
                let last = reply.stop_after == Some(step) && reply.finished;
                if self.save_every > 0 && (step + 1) % self.save_every == 0 && !last {
                    self.checkpoint(&mut c, &a, step).await?;
                    report.checkpoints += 1;
                }
                if last {
                    ending = true;
                    self.finish(&mut c, &a).await?;
                }
                if reply.stop_after == Some(step) {
                    continue 'generations;
                }
                step += 1;
            }
        }
    }

    /// Every step is trained: rank 0 reports the final weights (as the worker does once it
    /// has written them); the job ends with that.
    async fn finish(&self, c: &mut Client, a: &pb::Assignment) -> Result<()> {
        if a.rank != 0 {
            return Ok(());
        }
        let req = pb::FinalWeightsRequest { generation: a.generation, rank: 0, path: Some("simulated".into()), error: None };
        let token = self.token.clone();
        match call(c, &self.addrs, |mut c| {
            let req = with_token(req.clone(), &token);
            async move { c.final_weights(req).await }
        })
        .await
        {
            Ok(_) => Ok(()),
            Err(s) if super::rpc::refusal_code(&s).is_some() => Ok(()),
            Err(s) => Err(anyhow::anyhow!("{}: final weights: {s}", self.node_id)),
        }
    }

    async fn checkpoint(&self, c: &mut Client, a: &pb::Assignment, step: u64) -> Result<()> {
        let file = format!("rank-{:05}.safetensors", a.rank);
        let dir = crate::ckpt::step_dir(&self.ckpt_dir, step + 1);
        std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
        std::fs::File::create(dir.join(&file))?;
        let req = pb::CheckpointDoneRequest { generation: a.generation, rank: a.rank, step, file, bytes: 0, crc32: 0, names: Vec::new() };
        let token = self.token.clone();
        match call(c, &self.addrs, |mut c| {
            let req = with_token(req.clone(), &token);
            async move { c.checkpoint_done(req).await }
        })
        .await
        {
            Ok(_) => Ok(()),
            Err(s) if super::rpc::refusal_code(&s).is_some() => Ok(()), // its generation is gone: the checkpoint is abandoned
            Err(s) => Err(anyhow::anyhow!("{}: checkpoint after step {step}: {s}", self.node_id)),
        }
    }
}
