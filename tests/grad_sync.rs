//! Data parallelism's sync point: only trainable gradients, bucketed in name order,
//! undefined gradients as zeros, averaged over ranks, written back; and a 2-rank
//! data-parallel Trainer equals one process accumulating both micro-batches.

mod common;

use common::*;
use otter::comm::ring::RingGroup;
use otter::tensors::TensorFile;
use otter::train::grad_sync::GradBuckets;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;
use tch::{Kind, Tensor};

/// `world` ranks on threads, each with a ring group: `f(rank, group)`.
fn on_ranks<T: Send>(world: usize, f: impl Fn(usize, &mut RingGroup) -> T + Sync) -> Vec<T> {
    let ls: Vec<TcpListener> = (0..world).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let addrs: Vec<SocketAddr> = ls.iter().map(|l| l.local_addr().unwrap()).collect();
    std::thread::scope(|s| {
        let hs: Vec<_> = ls
            .iter()
            .enumerate()
            .map(|(r, l)| {
                let (addrs, f) = (&addrs, &f);
                s.spawn(move || f(r, &mut RingGroup::connect(r, addrs, l, Duration::from_secs(10)).unwrap()))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn buckets_average_gradients_by_name_with_undefined_ones_as_zeros() {
    let out = on_ranks(2, |rank, g| {
        let a = Tensor::arange(12, (Kind::Float, tch::Device::Cpu)).reshape([3, 4]).set_requires_grad(true);
        let b = Tensor::from_slice(&[1f32, -2.0, 3.0, 0.5, 7.0]).set_requires_grad(true);
        let c = Tensor::from_slice(&[4f32, 5.0]).set_requires_grad(true);
        // Each rank lists its parameters in a different order; the layout sorts by name.
        let params: Vec<(&str, &Tensor)> = if rank == 0 { vec![("a", &a), ("b", &b), ("c", &c)] } else { vec![("c", &c), ("b", &b), ("a", &a)] };
        let loss = if rank == 0 {
            (&a * 2.0).sum(Kind::Float) + (&b * &b).sum(Kind::Float) // c: no gradient
        } else {
            (&a * 4.0).sum(Kind::Float) + (&c * 3.0).sum(Kind::Float) // b: no gradient
        };
        loss.backward();
        let buckets = GradBuckets::new(&params, 40); // a (48 B) alone, then b + c
        assert_eq!(buckets.num_buckets(), 2);
        buckets.all_reduce_mean(&params, g).unwrap();
        (Vec::<f32>::try_from(a.grad().reshape([-1])).unwrap(), Vec::<f32>::try_from(b.grad()).unwrap(), Vec::<f32>::try_from(c.grad()).unwrap())
    });
    for (a, b, c) in &out {
        assert!(a.iter().all(|&x| x == 3.0), "a: mean of 2 and 4: {a:?}");
        assert_eq!(b, &[1.0, -2.0, 3.0, 0.5, 7.0], "b: mean of 2b and zeros");
        assert_eq!(c, &[1.5, 1.5], "c: mean of zeros and 3");
    }
}

fn fixture_micro_batches() -> Vec<otter::train::TensorBatch> {
    let f = TensorFile::read(&fixtures().join("train/adamw_cosine.safetensors")).unwrap();
    let n = f.get("input_ids").unwrap().size()[0];
    assert!(n >= 2, "the fixture batch has {n} samples");
    (0..2)
        .map(|i| otter::train::TensorBatch {
            vision_x: f.get("vision_x").unwrap().narrow(0, i, 1),
            input_ids: f.get("input_ids").unwrap().narrow(0, i, 1),
            attention_mask: f.get("attention_mask").unwrap().narrow(0, i, 1),
            labels: f.get("labels").unwrap().narrow(0, i, 1),
        })
        .collect()
}

fn trainer() -> otter::train::Trainer {
    use otter::model::{weights::LoadOptions, Otter};
    use otter::train::{optim::AdamWConfig, StepConfig, Trainer};
    let model = Otter::load_dir(&tiny_model(), LoadOptions::default()).unwrap();
    Trainer::new(model, StepConfig { lr: 1e-3, warmup_steps: 2, total_steps: 6, clip: Some(1.0), adamw: AdamWConfig::default() })
}

#[test]
fn two_data_parallel_ranks_equal_one_process_accumulating_both_micro_batches() {
    let steps = 6;
    let micro = fixture_micro_batches();
    let mut single = trainer();
    let want: Vec<f64> = (0..steps).map(|_| single.step(&micro).loss).collect();
    let ranks = on_ranks(2, |rank, g| {
        let mut t = trainer();
        let mine = fixture_micro_batches().swap_remove(rank);
        let buckets = GradBuckets::new(&t.model.trainable(), 64 << 10);
        let losses: Vec<f64> = (0..steps).map(|_| t.step_synced(std::slice::from_ref(&mine), Some((&buckets, g))).unwrap().loss).collect();
        let params: Vec<(String, Tensor)> = t.model.trainable().into_iter().map(|(n, p)| (n.to_string(), p.copy())).collect();
        (losses, params)
    });
    for s in 0..steps {
        let dp = (ranks[0].0[s] + ranks[1].0[s]) / 2.0;
        assert!((dp - want[s]).abs() <= 1e-5, "step {s}: data-parallel loss {dp} vs single-process {}", want[s]);
    }
    let mut worst = 0f64;
    for (name, p) in single.model.trainable() {
        for (_, params) in &ranks {
            let q = &params.iter().find(|(n, _)| n == name).unwrap().1;
            worst = worst.max(max_abs_diff(p, q));
        }
    }
    assert!(worst <= 1e-5, "parameters differ by {worst}");
    let r0: Vec<&Tensor> = ranks[0].1.iter().map(|(_, t)| t).collect();
    let r1: Vec<&Tensor> = ranks[1].1.iter().map(|(_, t)| t).collect();
    assert!(r0.iter().zip(&r1).all(|(a, b)| a.equal(b)), "both ranks hold identical parameters");
    println!("data-parallel vs single process: max param |diff| {worst:.2e}");
}
