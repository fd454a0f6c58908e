//! The `deepep_ll` all-to-all and the `masked_gemm` runner on GPUs: the dispatch layout byte for
//! byte against the CPU simulation, the combine against the simulation, the whole layer against
//! the expert-parallel reference for one rank and two, a CUDA-graph replay, a silent peer, and
//! bad input. Two ranks run on two GPUs when the machine has them, else on one GPU with two
//! streams. Ignored where no GPU is present.

use moe_backend_deepep_ll::{sim, LlDispatcher, LlWorld, MaskedGemmRunner, NcclId};
use moe_conformance::{ep, suite, synthetic};
use moe_dispatch::{DispatcherConfig, Wire};
use moe_runner_core::cuda::cudarc::driver::CudaContext;
use moe_runner_core::registry::FusedRunner;
use moe_runner_core::{
    quant_to_device, CudaDevice, DType, DeepEpLlCombineInput, DeepEpLlDispatchOutput, Device,
    MoeError, MoeRunnerConfig, QuantScheme, Tensor, TopK, WeightDims,
};
use std::time::Duration;

const E: usize = 16;
const H: usize = 512;
const I: usize = 256;
const K: usize = 4;
const T: usize = 24;

fn devices(ranks: usize) -> Vec<CudaDevice> {
    let count = CudaContext::device_count().expect("this test needs a CUDA device") as usize;
    assert!(count > 0, "this test needs a CUDA device");
    (0..ranks)
        .map(|r| CudaDevice::new(r % count).unwrap())
        .collect()
}

/// World sizes to test: 1 and 2, or only 1 when `MOE_TEST_MAX_RANKS=1` (compute-sanitizer runs
/// kernels one at a time, so ranks that wait on each other cannot both run under it).
fn rank_counts() -> Vec<usize> {
    let max = std::env::var("MOE_TEST_MAX_RANKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    (1..=max.min(2)).collect()
}

fn world_cfg(ranks: usize, wire: Wire) -> DispatcherConfig {
    DispatcherConfig {
        world_size: ranks,
        num_local_experts: E / ranks,
        routed_scaling_factor: Some(1.5),
        wire,
        // The activations are O(1): an NVFP4 global scale for an amax of 4.
        nvfp4_global_scale: 2688.0 / 4.0,
        ..DispatcherConfig::single(E, H, T).with_top_k(K)
    }
}

/// Per rank: a full batch on rank 0, fewer tokens on the others; skewed routing with drops.
fn inputs(ranks: usize, seed: u64) -> Vec<(Tensor, TopK)> {
    (0..ranks)
        .map(|r| {
            let m = if r == 0 { T } else { 7 };
            (
                synthetic::hidden(m, H, DType::Bf16, seed + r as u64).unwrap(),
                synthetic::topk(m, K, E, seed + 100 + r as u64, true, true).unwrap(),
            )
        })
        .collect()
}

fn on(dev: &CudaDevice, (h, t): &(Tensor, TopK)) -> (Tensor, TopK) {
    let d = Device::Cuda(dev.clone());
    (h.to_device(&d).unwrap(), t.to_device(&d).unwrap())
}

fn host<T: moe_runner_core::Element + Copy>(t: &Tensor) -> Vec<T> {
    t.to_host().unwrap().as_slice::<T>().unwrap().to_vec()
}

/// Dispatches every rank: in one launch pair per rank (`fused`), or with every send queued
/// before any receive, as split ranks would.
fn dispatch_all(
    ds: &[LlDispatcher],
    ins: &[(Tensor, TopK)],
    fused: bool,
) -> Vec<DeepEpLlDispatchOutput> {
    let moved: Vec<_> = ds.iter().zip(ins).map(|(d, i)| on(d.device(), i)).collect();
    if fused {
        return ds
            .iter()
            .zip(moved)
            .map(|(d, (h, t))| d.dispatch_now(&h, t).unwrap())
            .collect();
    }
    let hooks: Vec<_> = ds
        .iter()
        .zip(moved)
        .map(|(d, (h, t))| d.dispatch_send(&h, t).unwrap())
        .collect();
    hooks.into_iter().map(|h| h.recv().unwrap()).collect()
}

/// The received rows of `g` (GPU) and `w` (simulation) agree byte for byte: masked_m,
/// layout_range, and every valid row's hidden bytes, scales and src_info.
fn assert_layout(g: &DeepEpLlDispatchOutput, w: &DeepEpLlDispatchOutput, at: &str) {
    let [el, rt, _] = w.dims().unwrap();
    let counts = host::<i32>(&g.masked_m);
    assert_eq!(counts, host::<i32>(&w.masked_m), "{at}: masked_m");
    assert_eq!(
        host::<i64>(&g.layout_range),
        host::<i64>(&w.layout_range),
        "{at}: layout_range"
    );
    let (gx, wx) = (g.hidden.to_host().unwrap(), w.hidden.to_host().unwrap());
    let (gx, wx) = (gx.host_bytes().unwrap(), wx.host_bytes().unwrap());
    let row = gx.len() / (el * rt);
    let (gi, wi) = (host::<i32>(&g.src_info), host::<i32>(&w.src_info));
    assert_eq!(
        g.hidden_global_scale, w.hidden_global_scale,
        "{at}: global scale"
    );
    // Scales as bytes: f32 per 128 values (FP8) or E4M3 per 16 (NVFP4).
    let bytes = |t: &Tensor| t.to_host().unwrap().host_bytes().unwrap().to_vec();
    let scales = g
        .hidden_scale
        .as_ref()
        .map(|s| (bytes(s), bytes(w.hidden_scale.as_ref().unwrap())));
    for e in 0..el {
        for i in 0..counts[e] as usize {
            let at = format!("{at}: expert {e} row {i}");
            let o = (e * rt + i) * row;
            assert_eq!(&gx[o..o + row], &wx[o..o + row], "{at}: hidden bytes");
            assert_eq!(gi[e * rt + i], wi[e * rt + i], "{at}: src_info");
            if let Some((gs, ws)) = &scales {
                let per = gs.len() / (el * rt);
                let o = (e * rt + i) * per;
                assert_eq!(&gs[o..o + per], &ws[o..o + per], "{at}: scales");
            }
        }
    }
}

/// Random expert outputs `[E_local, R*T, H]` of rank `r` as bf16 values (rows past masked_m
/// hold noise that must not be read).
fn expert_outputs(ranks: usize, r: usize) -> Vec<f32> {
    let n = E / ranks * ranks * T * H;
    let v = synthetic::uniform(n, 2.0, 77 + r as u64);
    Tensor::from_f32(&v, &[n], DType::Bf16)
        .unwrap()
        .to_f32_vec()
        .unwrap()
}

#[test]
#[ignore = "needs a CUDA device"]
fn dispatch_layout_and_combine_match_the_simulation_bit_for_bit() {
    for ranks in rank_counts() {
        for wire in [Wire::Native, Wire::Fp8, Wire::Fp8Ue8m0, Wire::Nvfp4] {
            let cfg = world_cfg(ranks, wire);
            let ds = LlWorld::in_process(&devices(ranks), &cfg).unwrap();
            match_the_simulation(&ds, &cfg, &format!("R={ranks} {wire:?}"));
        }
    }
}

/// The NCCL transport on a world of one rank (NCCL sends to the rank itself): the same layout
/// and combine, byte for byte.
#[test]
#[ignore = "needs a CUDA device"]
fn nccl_world_of_one_matches_the_simulation() {
    for wire in [Wire::Native, Wire::Fp8, Wire::Fp8Ue8m0, Wire::Nvfp4] {
        let cfg = world_cfg(1, wire);
        let id = NcclId::new().unwrap();
        let d = LlWorld::nccl(&devices(1)[0], &cfg, &id, Duration::from_secs(60)).unwrap();
        assert_eq!(d.transport(), "nccl");
        match_the_simulation(&[d], &cfg, &format!("NCCL R=1 {wire:?}"));
    }
}

/// The NCCL transport sizes its exchanges from counts the host reads, which a CUDA graph
/// capture cannot do: capturing a dispatch is an error, not a graph that replays stale sizes.
#[test]
#[ignore = "needs a CUDA device"]
fn the_nccl_transport_refuses_graph_capture() {
    let cfg = world_cfg(1, Wire::Fp8);
    let dev = devices(1).remove(0);
    let d = LlWorld::nccl(&dev, &cfg, &NcclId::new().unwrap(), Duration::from_secs(60)).unwrap();
    let (h, t) = on(&dev, &inputs(1, 3)[0]);
    let captured = moe_runner_core::cuda::time_graph_ms(&dev, 0, 1, || {
        d.dispatch_now(&h, TopK::new(t.ids.clone(), t.weights.clone())?)
            .map(|_| ())
    });
    assert!(
        captured.is_err(),
        "a dispatch over NCCL was captured into a graph"
    );
}

/// Twice, so both buffer sets (and their epochs) are exercised: first with each half folded
/// into one launch, then split; every rank's layout and combine against the simulation.
fn match_the_simulation(ds: &[LlDispatcher], cfg: &DispatcherConfig, label: &str) {
    let ranks = ds.len();
    let ins = inputs(ranks, 5);
    let want = sim::dispatch(cfg, &ins).unwrap();
    for round in 0..2 {
        let fused = round == 0;
        let got = dispatch_all(ds, &ins, fused);
        let (el, rt) = (E / ranks, ranks * T);
        for (r, (g, w)) in got.iter().zip(&want.outputs).enumerate() {
            assert_layout(g, w, &format!("{label} rank {r} round {round}"));
        }
        // Combine random expert outputs (rows past masked_m hold noise that must not be read).
        let ys: Vec<Vec<f32>> = (0..ranks).map(|r| expert_outputs(ranks, r)).collect();
        let y_dev: Vec<Tensor> = ds
            .iter()
            .zip(&ys)
            .map(|(d, y)| {
                Tensor::from_f32(y, &[el, rt, H], DType::Bf16)
                    .unwrap()
                    .to_device(&Device::Cuda(d.device().clone()))
                    .unwrap()
            })
            .collect();
        let outs: Vec<Tensor> = if fused {
            ds.iter()
                .zip(&got)
                .zip(&y_dev)
                .map(|((d, g), y)| {
                    let m = g.topk.num_tokens();
                    let out = Tensor::zeros_cuda(d.device(), &[m, H], DType::Bf16).unwrap();
                    d.combine_into(y, g, &out).unwrap();
                    out
                })
                .collect()
        } else {
            let hooks: Vec<_> = ds
                .iter()
                .zip(&got)
                .zip(&y_dev)
                .map(|((d, g), y)| d.combine_send(y, g).unwrap())
                .collect();
            hooks.into_iter().map(|h| h.recv().unwrap()).collect()
        };
        let expect = sim::combine(cfg, &want, &ys, DType::Bf16).unwrap();
        for (r, (o, w)) in outs.iter().zip(&expect).enumerate() {
            let (o, w) = (o.to_host().unwrap(), w.clone());
            assert_eq!(
                o.host_bytes().unwrap(),
                w.host_bytes().unwrap(),
                "{label} rank {r} round {round}: combine"
            );
        }
        for d in ds {
            d.check().unwrap();
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn layer_over_ranks_matches_the_expert_parallel_reference() {
    moe_conformance::link_backends();
    for ranks in rank_counts() {
        for (wire, scheme) in [
            (Wire::Native, QuantScheme::Bf16),
            (Wire::Fp8, QuantScheme::Fp8Block128),
            (Wire::Native, QuantScheme::Fp8Block128),
        ] {
            let dcfg = world_cfg(ranks, wire);
            let mut cfg = MoeRunnerConfig::new(E, H, I, K);
            cfg.num_local_experts = E / ranks;
            cfg.routed_scaling_factor = dcfg.routed_scaling_factor;
            cfg.swiglu_limit = Some(7.0);
            let weights: Vec<_> = (0..ranks)
                .map(|r| {
                    synthetic::weights(WeightDims::of(&cfg), scheme, 60 + r as u64, &|_| {})
                        .unwrap()
                })
                .collect();
            let ds = LlWorld::in_process(&devices(ranks), &dcfg).unwrap();
            let runners: Vec<_> = ds
                .iter()
                .map(|d| MaskedGemmRunner::new(&cfg, &Device::Cuda(d.device().clone())).unwrap())
                .collect();
            let dw: Vec<_> = ds
                .iter()
                .zip(&weights)
                .map(|(d, w)| {
                    quant_to_device(w.as_ref(), &Device::Cuda(d.device().clone())).unwrap()
                })
                .collect();
            let ins = inputs(ranks, 9);
            let got = dispatch_all(&ds, &ins, false);
            let ys: Vec<_> = runners
                .iter()
                .zip(&got)
                .zip(&dw)
                .map(|((r, g), w)| r.run(g, w.as_ref()).unwrap())
                .collect();
            let hooks: Vec<_> = ds
                .iter()
                .zip(ys)
                .zip(&got)
                .map(|((d, y), g)| {
                    let y = moe_runner_core::downcast_combine::<DeepEpLlCombineInput>(
                        y,
                        moe_runner_core::DispatchFormat::DeepEpLowLatency,
                    )
                    .unwrap();
                    // Zero-copy: the runner wrote into the dispatcher's registered buffer.
                    assert_eq!(
                        y.hidden.cuda_ptr().unwrap(),
                        g.out_buffer.as_ref().unwrap().cuda_ptr().unwrap()
                    );
                    d.combine_send(&y.hidden, g).unwrap()
                })
                .collect();
            let outs: Vec<_> = hooks.into_iter().map(|h| h.recv().unwrap()).collect();
            for (d, r) in ds.iter().zip(&runners) {
                d.check().unwrap();
                r.check().unwrap();
            }
            let refs: Vec<_> = weights.iter().map(|w| w.as_ref()).collect();
            let want = ep::layer_outputs(&cfg, scheme, &refs, &ins).unwrap();
            for (r, (o, w)) in outs.iter().zip(&want).enumerate() {
                let c = suite::compare(&o.to_host().unwrap().to_f32_vec().unwrap(), w).unwrap();
                assert!(
                    c.within(suite::tolerance(scheme)),
                    "R={ranks} {wire:?} {scheme} rank {r}: {c:?}"
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device"]
fn graph_replay_of_dispatch_gemm_combine_matches_eager() {
    moe_conformance::link_backends();
    let dcfg = world_cfg(1, Wire::Fp8);
    let mut cfg = MoeRunnerConfig::new(E, H, I, K);
    cfg.routed_scaling_factor = dcfg.routed_scaling_factor;
    let d = LlWorld::in_process(&devices(1), &dcfg).unwrap().remove(0);
    let dev = d.device().clone();
    let device = Device::Cuda(dev.clone());
    let quant =
        synthetic::weights(WeightDims::of(&cfg), QuantScheme::Fp8Block128, 3, &|_| {}).unwrap();
    let dq = quant_to_device(quant.as_ref(), &device).unwrap();
    let runner = MaskedGemmRunner::new(&cfg, &device).unwrap();
    let (hidden, topk) = on(&dev, &inputs(1, 21)[0]);
    let layer = |out: &Tensor| -> moe_runner_core::Result<()> {
        let t = TopK::new(topk.ids.clone(), topk.weights.clone())?;
        let got = d.dispatch_send(&hidden, t)?.recv()?;
        let y = got
            .out_buffer
            .clone()
            .expect("deepep_ll registers an output buffer");
        runner.run_into(&got, dq.as_ref(), &y)?;
        d.combine_send(&y, &got)?.recv_into(out)
    };
    let eager = Tensor::zeros_cuda(&dev, &[T, H], DType::Bf16).unwrap();
    layer(&eager).unwrap();
    let eager = eager.to_host().unwrap().to_f32_vec().unwrap();
    let replayed = Tensor::zeros_cuda(&dev, &[T, H], DType::Bf16).unwrap();
    let times = moe_runner_core::cuda::time_graph_ms(&dev, 2, 5, || layer(&replayed)).unwrap();
    assert_eq!(times.len(), 5);
    d.check().unwrap();
    let replayed = replayed.to_host().unwrap().to_f32_vec().unwrap();
    assert!(eager.iter().all(|v| v.is_finite()) && eager.iter().any(|v| *v != 0.0));
    assert!(
        eager
            .iter()
            .zip(&replayed)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "replay differs from eager"
    );
}

#[test]
#[ignore = "needs a CUDA device"]
fn a_silent_peer_is_a_timeout_not_a_hang() {
    if rank_counts().len() < 2 {
        eprintln!("MOE_TEST_MAX_RANKS=1: the silent-peer test needs two ranks; not run");
        return;
    }
    let cfg = world_cfg(2, Wire::Fp8);
    let mut ds = LlWorld::in_process(&devices(2), &cfg).unwrap();
    ds[0].set_timeout(Duration::from_millis(50));
    let (h, t) = on(ds[0].device(), &inputs(1, 3)[0]);
    let started = std::time::Instant::now();
    let _ = ds[0].dispatch_send(&h, t).unwrap().recv().unwrap();
    let err = ds[0].check().unwrap_err();
    assert!(
        matches!(
            err,
            MoeError::PeerTimeout {
                rank: 0,
                timeout_ms: 50
            }
        ),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
#[ignore = "needs a CUDA device"]
fn bad_input_is_a_typed_error() {
    let cfg = world_cfg(1, Wire::Fp8);
    let ds = LlWorld::in_process(&devices(1), &cfg).unwrap();
    let d = &ds[0];
    let dev = Device::Cuda(d.device().clone());
    let hidden = synthetic::hidden(4, H, DType::Bf16, 1)
        .unwrap()
        .to_device(&dev)
        .unwrap();
    let ids = |v: i32| TopK::from_vecs(&[v; 4 * K], &[0.5; 4 * K], 4, K).unwrap();
    assert!(matches!(
        d.dispatch_send(&hidden, ids(E as i32)).err().unwrap(),
        MoeError::ExpertIdOutOfRange { .. }
    ));
    let many = synthetic::hidden(T + 1, H, DType::Bf16, 1)
        .unwrap()
        .to_device(&dev)
        .unwrap();
    let topk = synthetic::topk(T + 1, K, E, 2, false, false).unwrap();
    assert!(matches!(
        d.dispatch_send(&many, topk).err().unwrap(),
        MoeError::TooManyTokens { max: T, got, .. } if got == T + 1
    ));
    let short_k = TopK::from_vecs(&[0; 4], &[1.0; 4], 4, 1).unwrap();
    assert!(d.dispatch_send(&hidden, short_k).is_err());
    let wrong_h = synthetic::hidden(4, H / 2, DType::Bf16, 1)
        .unwrap()
        .to_device(&dev)
        .unwrap();
    assert!(matches!(
        d.dispatch_send(&wrong_h, ids(1)).err().unwrap(),
        MoeError::Shape { .. }
    ));
    // A dispatch output of another dispatcher, and expert outputs of the wrong shape.
    let other = LlWorld::in_process(&devices(1), &cfg).unwrap().remove(0);
    let got = other
        .dispatch_send(&hidden, ids(1))
        .unwrap()
        .recv()
        .unwrap();
    let y = got.out_buffer.clone().unwrap();
    assert!(matches!(
        d.combine_send(&y, &got).err().unwrap(),
        MoeError::Invalid { .. }
    ));
    let small = Tensor::zeros_cuda(other.device(), &[1, 1, H], DType::Bf16).unwrap();
    assert!(matches!(
        other.combine_send(&small, &got).err().unwrap(),
        MoeError::Shape { .. }
    ));
    other.combine_send(&y, &got).unwrap().recv().unwrap();
    other.check().unwrap();
    // Top-k sized differently from the buffers, and a hidden size FP8 groups cannot split.
    assert!(LlWorld::in_process(
        &devices(1),
        &DispatcherConfig {
            top_k: 0,
            ..cfg.clone()
        }
    )
    .is_err());
    let bad_h = DispatcherConfig {
        hidden_size: 200,
        ..cfg.clone()
    };
    assert!(matches!(
        LlWorld::in_process(&devices(1), &bad_h).err().unwrap(),
        MoeError::NotDivisible { divisor: 128, .. }
    ));
    // The masked runner rejects a masked_m past the buffer.
    let mcfg = MoeRunnerConfig::new(E, H, I, K);
    let runner = MaskedGemmRunner::new(&mcfg, &dev).unwrap();
    let quant =
        synthetic::weights(WeightDims::of(&mcfg), QuantScheme::Fp8Block128, 3, &|_| {}).unwrap();
    let dq = quant_to_device(quant.as_ref(), &dev).unwrap();
    let bad = DeepEpLlDispatchOutput {
        masked_m: Tensor::from_slice(&[T as i32 + 1; E], &[E], DType::I32).unwrap(),
        ..got
    };
    assert!(matches!(
        runner.run(&bad, dq.as_ref()).err().unwrap(),
        MoeError::Invalid { .. }
    ));
}

const CHILD_RANK: &str = "MOE_TEST_CHILD_RANK";
const CHILD_DIR: &str = "MOE_TEST_CHILD_DIR";

/// Two processes of one machine, a rank each (on two GPUs, or sharing one), mapping each
/// other's buffers through CUDA IPC: the layout and the combine match the simulation byte for
/// byte. The test runs itself twice as child processes, one per rank.
#[test]
#[ignore = "needs a CUDA device"]
fn two_processes_over_ipc_match_the_simulation() {
    two_processes(
        "two_processes_over_ipc_match_the_simulation",
        |dev, cfg, dir| LlWorld::ipc(dev, cfg, dir, Duration::from_secs(60)).unwrap(),
    );
}

/// Two processes on two GPUs whose rows travel through NCCL, the world's id exchanged through
/// a file as ranks on different machines would over a shared directory: the same layout and
/// combine, byte for byte. (NCCL does not put two ranks on one GPU.)
#[test]
#[ignore = "needs a CUDA device"]
fn two_processes_over_nccl_match_the_simulation() {
    if std::env::var(CHILD_RANK).is_err() && devices_present() < 2 {
        eprintln!("one GPU: NCCL needs a GPU per rank; the two-process NCCL test was not run");
        return;
    }
    two_processes(
        "two_processes_over_nccl_match_the_simulation",
        |dev, cfg, dir| {
            let timeout = Duration::from_secs(60);
            let id = NcclId::exchange(dir, cfg.rank, timeout).unwrap();
            let d = LlWorld::nccl(dev, cfg, &id, timeout).unwrap();
            assert_eq!(d.transport(), "nccl");
            d
        },
    );
}

fn devices_present() -> usize {
    CudaContext::device_count().expect("this test needs a CUDA device") as usize
}

/// Runs `test` (this test's own name) as two child processes, one per rank, each building its
/// dispatcher with `make` over a fresh rendezvous directory; in a child, runs the rank.
fn two_processes(
    test: &str,
    make: impl Fn(&CudaDevice, &DispatcherConfig, &std::path::Path) -> LlDispatcher,
) {
    if let Ok(rank) = std::env::var(CHILD_RANK) {
        let dir = std::env::var(CHILD_DIR).expect("the parent names the rendezvous directory");
        return child_rank(rank.parse().unwrap(), std::path::Path::new(&dir), make);
    }
    if rank_counts().len() < 2 {
        eprintln!("MOE_TEST_MAX_RANKS=1: the two-process test needs two ranks; not run");
        return;
    }
    let dir = std::env::temp_dir().join(format!("moe-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..2)
        .map(|r| {
            std::process::Command::new(&exe)
                .args(["--exact", test, "--include-ignored", "--nocapture"])
                .env(CHILD_RANK, r.to_string())
                .env(CHILD_DIR, &dir)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    for (r, o) in outputs.iter().enumerate() {
        assert!(
            o.status.success(),
            "rank {r} failed:\n{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("1 passed"),
            "rank {r} ran no test"
        );
    }
}

/// One rank of a two-process test.
fn child_rank(
    rank: usize,
    dir: &std::path::Path,
    make: impl Fn(&CudaDevice, &DispatcherConfig, &std::path::Path) -> LlDispatcher,
) {
    let cfg = DispatcherConfig {
        rank,
        ..world_cfg(2, Wire::Fp8)
    };
    let dev = devices(2).swap_remove(rank);
    let d = make(&dev, &cfg, dir);
    let ins = inputs(2, 5);
    let want = sim::dispatch(&cfg, &ins).unwrap();
    for round in 0..2 {
        let (h, t) = on(&dev, &ins[rank]);
        let got = d.dispatch_now(&h, t).unwrap();
        let label = format!("{} rank {rank} round {round}", d.transport());
        assert_layout(&got, &want.outputs[rank], &label);
        let ys: Vec<Vec<f32>> = (0..2).map(|r| expert_outputs(2, r)).collect();
        let y = Tensor::from_f32(&ys[rank], &[E / 2, 2 * T, H], DType::Bf16)
            .unwrap()
            .to_device(&Device::Cuda(dev.clone()))
            .unwrap();
        let out = Tensor::zeros_cuda(&dev, &[ins[rank].1.num_tokens(), H], DType::Bf16).unwrap();
        d.combine_into(&y, &got, &out).unwrap();
        let expect = sim::combine(&cfg, &want, &ys, DType::Bf16).unwrap();
        assert_eq!(
            out.to_host().unwrap().host_bytes().unwrap(),
            expect[rank].host_bytes().unwrap(),
            "{label}: combine"
        );
    }
    d.check().unwrap();
}

/// An NCCL world whose second rank never joins: joining ends in a timeout error, not a hang.
#[test]
#[ignore = "needs a CUDA device"]
fn a_missing_nccl_rank_is_a_timeout_not_a_hang() {
    let cfg = world_cfg(2, Wire::Fp8);
    let id = NcclId::new().unwrap();
    let started = std::time::Instant::now();
    let Err(err) = LlWorld::nccl(&devices(1)[0], &cfg, &id, Duration::from_millis(500)) else {
        panic!("a world of two ranks was joined by one");
    };
    assert!(
        matches!(err, MoeError::PeerTimeout { rank: 0, .. }),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(NcclId::from_hex(&id.to_hex()).is_ok());
    assert!(NcclId::from_hex("not an id").is_err());
}

/// Dispatch, masked GEMMs and combine into the caller's output allocate no device memory once
/// warm: the runner writes into the dispatcher's registered buffer and every tensor of the
/// dispatch output is a view of the dispatcher's buffers.
#[test]
#[ignore = "needs a CUDA device"]
fn warm_layers_allocate_nothing() {
    let dcfg = world_cfg(1, Wire::Fp8);
    let mut cfg = MoeRunnerConfig::new(E, H, I, K);
    cfg.routed_scaling_factor = dcfg.routed_scaling_factor;
    let d = LlWorld::in_process(&devices(1), &dcfg).unwrap().remove(0);
    let dev = d.device().clone();
    let device = Device::Cuda(dev.clone());
    let quant =
        synthetic::weights(WeightDims::of(&cfg), QuantScheme::Fp8Block128, 3, &|_| {}).unwrap();
    let dq = quant_to_device(quant.as_ref(), &device).unwrap();
    let runner = MaskedGemmRunner::new(&cfg, &device).unwrap();
    let (hidden, topk) = on(&dev, &inputs(1, 21)[0]);
    let out = Tensor::zeros_cuda(&dev, &[T, H], DType::Bf16).unwrap();
    let layer = || {
        let t = TopK::new(topk.ids.clone(), topk.weights.clone()).unwrap();
        let got = d.dispatch_now(&hidden, t).unwrap();
        let y = runner.run(&got, dq.as_ref()).unwrap();
        let y = moe_runner_core::downcast_combine::<DeepEpLlCombineInput>(
            y,
            moe_runner_core::DispatchFormat::DeepEpLowLatency,
        )
        .unwrap();
        d.combine_into(&y.hidden, &got, &out).unwrap();
    };
    layer();
    let before = moe_runner_core::cuda::device_allocations();
    for _ in 0..4 {
        layer();
    }
    d.check().unwrap();
    assert_eq!(moe_runner_core::cuda::device_allocations(), before);
}

/// Batches past 128 tokens are ranked in several chunks whose prefix sums the last block
/// publishes: the layout and the combine still match the simulation byte for byte.
#[test]
#[ignore = "needs a CUDA device"]
fn chunked_routing_matches_the_simulation() {
    for ranks in rank_counts() {
        let (t, h) = (300, 256);
        let cfg = DispatcherConfig {
            world_size: ranks,
            num_local_experts: E / ranks,
            routed_scaling_factor: Some(1.5),
            wire: Wire::Fp8,
            ..DispatcherConfig::single(E, h, t).with_top_k(K)
        };
        let ds = LlWorld::in_process(&devices(ranks), &cfg).unwrap();
        let ins: Vec<(Tensor, TopK)> = (0..ranks)
            .map(|r| {
                let m = if r == 0 { t } else { 201 };
                (
                    synthetic::hidden(m, h, DType::Bf16, 40 + r as u64).unwrap(),
                    synthetic::topk(m, K, E, 50 + r as u64, true, true).unwrap(),
                )
            })
            .collect();
        let want = sim::dispatch(&cfg, &ins).unwrap();
        let got = dispatch_all(&ds, &ins, true);
        for (r, (g, w)) in got.iter().zip(&want.outputs).enumerate() {
            assert_layout(g, w, &format!("chunked R={ranks} rank {r}"));
        }
        let (el, rt) = (E / ranks, ranks * t);
        let ys: Vec<Vec<f32>> = (0..ranks)
            .map(|r| {
                let v = synthetic::uniform(el * rt * h, 2.0, 90 + r as u64);
                Tensor::from_f32(&v, &[v.len()], DType::Bf16)
                    .unwrap()
                    .to_f32_vec()
                    .unwrap()
            })
            .collect();
        let outs: Vec<Tensor> = ds
            .iter()
            .zip(&got)
            .zip(&ys)
            .map(|((d, g), y)| {
                let y = Tensor::from_f32(y, &[el, rt, h], DType::Bf16)
                    .unwrap()
                    .to_device(&Device::Cuda(d.device().clone()))
                    .unwrap();
                let out =
                    Tensor::zeros_cuda(d.device(), &[g.topk.num_tokens(), h], DType::Bf16).unwrap();
                d.combine_into(&y, g, &out).unwrap();
                out
            })
            .collect();
        let expect = sim::combine(&cfg, &want, &ys, DType::Bf16).unwrap();
        for (r, (o, w)) in outs.iter().zip(&expect).enumerate() {
            assert_eq!(
                o.to_host().unwrap().host_bytes().unwrap(),
                w.host_bytes().unwrap(),
                "chunked R={ranks} rank {r}: combine"
            );
        }
        for d in &ds {
            d.check().unwrap();
        }
    }
}
