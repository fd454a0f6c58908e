//! Shared experts after the routed experts (the order for runners that do not work in place)
//! peak lower than before them: the routed workspace is freed before the shared experts
//! allocate theirs. Measured on a tracking global allocator, so this binary holds one test.

use moe_backend_reference::CpuSharedExperts;
use moe_conformance::synthetic;
use moe_dispatch::{
    make_dispatcher, DispatcherConfig, MoeLayer, Router, RoutingMethod, SharedExpertOrder,
};
use moe_runner_core::{DType, DispatchFormat, MoeRunner, MoeRunnerConfig, QuantScheme, WeightDims};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

struct Tracking;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Relaxed) + layout.size();
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Relaxed);
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

fn layer(order: SharedExpertOrder) -> MoeLayer {
    let (e, h, i, k, is) = (16, 512, 256, 4, 256);
    let cfg = MoeRunnerConfig::new(e, h, i, k);
    let router = Router {
        method: RoutingMethod::Softmax { renormalize: true },
        num_experts: e,
        top_k: k,
        fused_shared_experts: 0,
        fused_shared_weight: 1.0,
    };
    let dispatcher = make_dispatcher("standard", &DispatcherConfig::single(e, h, 4096)).unwrap();
    let runner = MoeRunner::new(
        "reference",
        DispatchFormat::Standard,
        QuantScheme::F32,
        cfg.clone(),
    )
    .unwrap();
    let quant = synthetic::weights(
        WeightDims {
            experts: e,
            n1: 2 * i,
            hidden: h,
            inter: i,
        },
        QuantScheme::F32,
        1,
        &|_| {},
    )
    .unwrap();
    let shared = CpuSharedExperts::new(
        synthetic::uniform(2 * is * h, 0.05, 2),
        synthetic::uniform(h * is, 0.05, 3),
        is,
        &cfg,
    )
    .unwrap();
    MoeLayer::new(router, dispatcher, runner, quant, Some(Box::new(shared)))
        .unwrap()
        .with_shared_order(order)
}

/// Peak bytes above the live bytes at the start of one forward pass.
fn forward_peak(layer: &MoeLayer, m: usize) -> (usize, Vec<f32>) {
    let hidden = synthetic::hidden(m, 512, DType::F32, 9).unwrap();
    let logits = synthetic::logits(m, 16, 10).unwrap();
    let base = LIVE.load(Relaxed);
    PEAK.store(base, Relaxed);
    let out = layer.forward(&hidden, &logits).unwrap();
    (PEAK.load(Relaxed) - base, out.to_f32_vec().unwrap())
}

#[test]
fn deferred_shared_experts_lower_the_peak() {
    moe_conformance::link_backends();
    // One rayon thread keeps the measurement free of concurrent per-thread buffers.
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build_global()
        .unwrap();
    let m = 512;
    let before = layer(SharedExpertOrder::Before);
    let after = layer(SharedExpertOrder::After);
    let auto = layer(SharedExpertOrder::Auto);
    let (peak_before, out_before) = forward_peak(&before, m);
    let (peak_after, out_after) = forward_peak(&after, m);
    let (peak_auto, _) = forward_peak(&auto, m);
    assert_eq!(
        out_before, out_after,
        "the order must not change the result"
    );
    eprintln!("peak bytes: shared before {peak_before}, after {peak_after}, auto {peak_auto}");
    // The shared output [M, H] f32 alive through the routed pass is the difference.
    let shared_out = m * 512 * 4;
    assert!(
        peak_after + shared_out / 2 < peak_before,
        "after {peak_after} B, before {peak_before} B"
    );
    assert_eq!(
        peak_auto, peak_after,
        "not in place: Auto defers the shared experts"
    );
}
