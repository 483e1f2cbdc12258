//! The worker side of a distributed job (`otter-worker`): the node agent ([`agent`]) and
//! the training process it starts per local rank ([`rank`]).

pub mod agent;
pub mod rank;
