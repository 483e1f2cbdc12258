//! The job's model identity, a part of the coordinator's state with its own rules
//! (issue 42): every rank of a job must run the same frozen weights, model config and
//! tokenizer ([`ModelIdentity`]).
//!
//! * Before the job's identity is fixed, each joining node's is recorded.
//! * The first generation fixes it ([`ModelCheck::fix`]): the identity held by most of
//!   the nodes forming it; a tie goes to the identity of the node with the lowest id (the
//!   one that will be rank 0). Nodes holding another identity are refused by name with
//!   the first file or tensor that differs, before any of their ranks trains.
//! * Once fixed, a node whose identity differs is refused at join ([`ModelCheck::admit`]).
//! * The identity is saved with the state and written into every checkpoint manifest; a
//!   coordinator that takes a job over from a manifest takes the identity with it, so a
//!   whole-job restart against a different base model is refused the same way, unless the
//!   operator names the change (`otter-coord start --accept-model-change weights,...`:
//!   [`ModelCheck::accept_change`]); the next generation then fixes the new identity,
//!   which may differ from the old one in the named parts only.

use crate::model::identity::{first_difference, Digest, Difference, ModelIdentity, Part};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use super::frozen::Frozen;

/// What the operator allowed to change (`--accept-model-change`), and from what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Replacing {
    pub previous: ModelIdentity,
    pub accept: Vec<Part>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelCheck {
    /// The job's identity, once fixed (saved with every state, shared by the saves' copies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    job: Option<Frozen<ModelIdentity>>,
    /// Before it is fixed: the identities nodes joined with, by digest.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    proposed: BTreeMap<Digest, ModelIdentity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    replacing: Option<Replacing>,
    /// Nodes refused for their model, and why: their agent and ranks hear it (instead of
    /// "unknown node") until the node joins again with the job's model. At most
    /// [`REFUSED_KEPT`], the latest.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    refused: BTreeMap<String, String>,
}

/// How many refused nodes are remembered.
pub const REFUSED_KEPT: usize = 1024;

/// Why a node's model cannot join the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch(pub String);

impl ModelCheck {
    /// The job's identity, once fixed.
    pub fn job(&self) -> Option<&ModelIdentity> {
        self.job.as_deref()
    }

    /// Starts from an identity fixed elsewhere (a checkpoint manifest's).
    pub fn fixed(identity: ModelIdentity) -> Self {
        Self { job: Some(Frozen::new(identity)), ..Self::default() }
    }

    /// Whether a node with `identity` may join: once the identity is fixed, only an equal
    /// one; while a change the operator named is pending, one that differs from the
    /// previous identity in the named parts only.
    pub fn admit(&self, identity: &ModelIdentity) -> Result<(), Mismatch> {
        if let Some(job) = self.job() {
            return match first_difference(job, identity) {
                None => Ok(()),
                Some(d) => Err(Mismatch(format!("its model differs from the job's: {d}"))),
            };
        }
        if let Some(r) = &self.replacing {
            return Self::allowed(r, identity);
        }
        Ok(())
    }

    fn allowed(r: &Replacing, identity: &ModelIdentity) -> Result<(), Mismatch> {
        let not_named: Vec<Part> = r.previous.parts_differing(identity).into_iter().filter(|p| !r.accept.contains(p)).collect();
        if not_named.is_empty() {
            return Ok(());
        }
        let first = first_difference(&r.previous, identity).map_or_else(String::new, |d: Difference| format!(" ({d})"));
        let parts: Vec<&str> = not_named.iter().map(|p| p.name()).collect();
        Err(Mismatch(format!(
            "its model differs from the job's previous model in {}{first}, which --accept-model-change does not name",
            parts.join(", ")
        )))
    }

    /// Why `node` was refused for its model, if it was (and has not joined since with the
    /// job's model).
    pub fn refused(&self, node: &str) -> Option<&str> {
        self.refused.get(node).map(String::as_str)
    }

    /// Remembers that `node` was refused, and why.
    pub fn note_refused(&mut self, node: &str, why: &str) {
        if self.refused.len() >= REFUSED_KEPT && !self.refused.contains_key(node) {
            // Bounded: forget an arbitrary old one (they only lose the precise message).
            let first = self.refused.keys().next().cloned();
            if let Some(k) = first {
                self.refused.remove(&k);
            }
        }
        self.refused.insert(node.to_string(), why.to_string());
    }

    /// Records the identity a node joined with (before the job's is fixed), and forgets
    /// an earlier refusal of it.
    pub fn admitted(&mut self, node: &str, identity: &ModelIdentity) {
        self.refused.remove(node);
        self.propose(identity);
    }

    /// Records the identity a node joined with (before the job's is fixed).
    pub fn propose(&mut self, identity: &ModelIdentity) {
        if self.job.is_none() {
            self.proposed.entry(identity.digest.clone()).or_insert_with(|| identity.clone());
        }
    }

    /// Fixes the job's identity from the nodes forming the first generation (node id ->
    /// the digest it joined with; nodes that reported none do not vote). Returns the nodes
    /// to refuse, each with why; nothing if it was fixed already.
    pub fn fix(&mut self, nodes: &BTreeMap<String, Option<Digest>>) -> Vec<(String, String)> {
        if self.job.is_some() {
            return Vec::new();
        }
        let mut refused = Vec::new();
        // Identities the operator's change does not allow are out, whatever their count.
        let eligible = |d: &Digest| match (&self.replacing, self.proposed.get(d)) {
            (Some(r), Some(id)) => Self::allowed(r, id).map_err(|m| m.0),
            (_, Some(_)) => Ok(()),
            (_, None) => Err("its identity was not recorded".to_string()),
        };
        let mut votes: BTreeMap<&Digest, (usize, &str)> = BTreeMap::new();
        for (node, d) in nodes {
            let Some(d) = d else { continue };
            match eligible(d) {
                Ok(()) => {
                    let v = votes.entry(d).or_insert((0, node.as_str()));
                    v.0 += 1;
                }
                Err(why) => refused.push((node.clone(), why)),
            }
        }
        // Most nodes; a tie to the identity of the lowest node id (`nodes` is sorted).
        let Some((&winner, _)) = votes.iter().max_by(|a, b| a.1 .0.cmp(&b.1 .0).then(b.1 .1.cmp(a.1 .1))) else {
            return refused;
        };
        let job = self.proposed.get(winner).cloned().expect("eligible identities are recorded");
        for (node, d) in nodes {
            if let Some(d) = d.as_ref().filter(|d| *d != winner && votes.contains_key(d)) {
                let why = match self.proposed.get(d).and_then(|id| first_difference(&job, id)) {
                    Some(diff) => format!("its model differs from the one the job fixed: {diff}"),
                    None => "its model differs from the one the job fixed".into(),
                };
                refused.push((node.clone(), why));
            }
        }
        self.job = Some(Frozen::new(job));
        self.proposed.clear();
        self.replacing = None;
        refused.sort();
        for (node, why) in &refused {
            self.note_refused(node, why);
        }
        refused
    }

    /// The operator allows `parts` of the model to change (`--accept-model-change`): the
    /// next generation fixes the identity again, from nodes that differ from the current
    /// one in those parts only. Returns the parts in which no change was pending (a no-op).
    pub fn accept_change(&mut self, parts: &[Part]) -> bool {
        let Some(job) = self.job.take() else { return false };
        let mut accept = parts.to_vec();
        accept.sort();
        accept.dedup();
        self.replacing = Some(Replacing { previous: (*job).clone(), accept });
        self.proposed.clear();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::identity::{TensorDigest, WeightFile};

    fn identity(w: u64, config: &str, tok: &str) -> ModelIdentity {
        let file = WeightFile { name: "model.safetensors".into(), bytes: 100, header: "h".into(), tensors: vec![TensorDigest { name: "vision.w".into(), xxh3: w }] };
        ModelIdentity::new(config.into(), tok.into(), vec![file])
    }

    fn nodes(list: &[(&str, &ModelIdentity)]) -> BTreeMap<String, Option<Digest>> {
        list.iter().map(|(n, id)| (n.to_string(), Some(id.digest.clone()))).collect()
    }

    #[test]
    fn the_first_generation_fixes_the_majority_identity_and_refuses_the_others_by_name() {
        let (good, bad) = (identity(1, "c", "t"), identity(2, "c", "t"));
        let mut m = ModelCheck::default();
        for id in [&good, &bad, &good] {
            assert_eq!(m.admit(id), Ok(()), "nothing is fixed yet");
            m.propose(id);
        }
        let refused = m.fix(&nodes(&[("a", &bad), ("b", &good), ("c", &good)]));
        assert_eq!(refused, vec![("a".to_string(), "its model differs from the one the job fixed: weight file model.safetensors: tensor vision.w differs (its bytes)".to_string())]);
        assert_eq!(m.job(), Some(&good));
        // Fixed: a later join with another identity is refused, an equal one admitted.
        assert_eq!(m.admit(&good), Ok(()));
        assert_eq!(m.admit(&identity(1, "c2", "t")), Err(Mismatch("its model differs from the job's: config.json differs".into())));
        assert_eq!(m.admit(&identity(1, "c", "t2")), Err(Mismatch("its model differs from the job's: the tokenizer file differs".into())));
        assert!(m.fix(&nodes(&[("d", &bad)])).is_empty(), "fixed once");
    }

    #[test]
    fn a_tie_goes_to_the_lowest_node_id_whatever_the_join_order() {
        let (x, y) = (identity(1, "c", "t"), identity(2, "c", "t"));
        for order in [[&x, &y], [&y, &x]] {
            let mut m = ModelCheck::default();
            for id in order {
                m.propose(id);
            }
            let refused = m.fix(&nodes(&[("a", &x), ("b", &y)]));
            assert_eq!(m.job(), Some(&x));
            assert_eq!(refused.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(), vec!["b"]);
        }
    }

    #[test]
    fn a_named_change_lets_that_part_change_and_nothing_else() {
        let old = identity(1, "c", "t");
        let mut m = ModelCheck::fixed(old.clone());
        let new_weights = identity(9, "c", "t");
        assert!(m.admit(&new_weights).is_err(), "refused without the operator's word");
        assert!(m.accept_change(&[Part::Weights]));
        assert_eq!(m.admit(&new_weights), Ok(()));
        let also_config = identity(9, "c2", "t");
        let e = m.admit(&also_config).unwrap_err().0;
        assert!(e.contains("in config") && e.contains("--accept-model-change does not name"), "{e}");
        m.propose(&new_weights);
        m.propose(&also_config);
        let refused = m.fix(&nodes(&[("a", &also_config), ("b", &new_weights)]));
        assert_eq!(m.job(), Some(&new_weights), "the eligible identity wins even against the lower node id");
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].0, "a");
        // The state (with the pending change) survives a save and reload.
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<ModelCheck>(&json).unwrap(), m);
    }

    #[test]
    fn nodes_that_reported_no_identity_do_not_vote() {
        let x = identity(1, "c", "t");
        let mut m = ModelCheck::default();
        m.propose(&x);
        let mut n = nodes(&[("b", &x)]);
        n.insert("a".into(), None);
        assert!(m.fix(&n).is_empty());
        assert_eq!(m.job(), Some(&x));
    }
}
