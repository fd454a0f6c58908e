//! Config semantics, activation formulas, and tensor ownership rules.

use moe_runner_core::{ActivationOp, DType, GateUpLayout, MoeError, MoeRunnerConfig, Tensor};

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

#[test]
fn config_round_trips_through_json_with_defaults() {
    let json = r#"{"num_experts": 16, "num_local_experts": 8, "hidden_size": 256, "intermediate_size": 64, "top_k": 2, "swiglu_limit": 10.0}"#;
    let cfg: MoeRunnerConfig = serde_json::from_str(json).unwrap();
    assert!(cfg.is_gated && !cfg.inplace && !cfg.no_combine && cfg.gemm1_alpha.is_none());
    assert_eq!(cfg.swiglu_limit, Some(10.0));
    cfg.validate().unwrap();
    let back: MoeRunnerConfig =
        serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(back, cfg);
    assert!(serde_json::from_str::<MoeRunnerConfig>(r#"{"num_experts": 1, "bogus": 1}"#).is_err());
}

#[test]
fn activation_formulas_follow_the_design() {
    let mut cfg = MoeRunnerConfig::new(4, 32, 16, 2);
    let (g, u) = (3.0f32, -12.0f32);
    assert!((cfg.activation_kernel().unwrap().apply(g, u) - silu(g) * u).abs() < 1e-4);

    cfg.swiglu_limit = Some(2.0);
    let want = silu(2.0) * -2.0; // gate = min(3, 2), up = clamp(-12, -2, 2)
    assert!((cfg.activation_kernel().unwrap().apply(g, u) - want).abs() < 1e-6);

    cfg.gemm1_alpha = Some(1.702);
    let want = 2.0 / (1.0 + (-1.702f32 * 2.0).exp()) * (-2.0 + 1.0);
    assert!((cfg.activation_kernel().unwrap().apply(g, u) - want).abs() < 1e-6);

    let mut clamp = MoeRunnerConfig::new(4, 32, 16, 2);
    clamp.gemm1_clamp_limit = Some(1.0);
    let want = -silu(g).min(1.0); // the clamp after the SiLU
    assert!((clamp.activation_kernel().unwrap().apply(g, u) - want).abs() < 1e-6);
}

#[test]
fn inconsistent_options_are_config_errors() {
    let base = MoeRunnerConfig::new(4, 32, 16, 2);
    let cases: [fn(&mut MoeRunnerConfig); 9] = [
        |c| c.gemm1_alpha = Some(1.0),
        |c| {
            c.swiglu_limit = Some(1.0);
            c.gemm1_clamp_limit = Some(1.0)
        },
        |c| c.apply_router_weight_on_input = true,
        |c| {
            c.inplace = true;
            c.no_combine = true
        },
        |c| c.swiglu_limit = Some(f32::NAN),
        |c| c.top_k = 5,
        |c| c.num_local_experts = 8,
        |c| c.hidden_size = 0,
        |c| {
            c.is_gated = false;
            c.swiglu_limit = Some(1.0)
        },
    ];
    for (i, f) in cases.iter().enumerate() {
        let mut c = base.clone();
        f(&mut c);
        assert!(matches!(c.validate(), Err(MoeError::Config(_))), "case {i}");
    }
}

#[test]
fn gate_up_layouts_pick_the_right_columns() {
    assert_eq!(GateUpLayout::GateUp.columns(3, 10), (3, 13));
    assert_eq!(GateUpLayout::UpGate.columns(3, 10), (13, 3));
    assert_eq!(GateUpLayout::Interleaved.columns(3, 10), (6, 7));
}

#[test]
fn tensors_check_sizes_and_copy_on_write() {
    assert!(matches!(
        Tensor::from_slice(&[1f32, 2.0], &[3], DType::F32),
        Err(MoeError::Invalid { .. })
    ));
    assert!(matches!(
        Tensor::from_slice(&[1f32], &[1], DType::Bf16),
        Err(MoeError::DType { .. })
    ));
    let a = Tensor::from_f32(&[1.0, 2.0, 3.0, 4.0], &[2, 2], DType::Bf16).unwrap();
    let mut b = a.clone();
    b.write_f32(&[5.0, 6.0, 7.0, 8.0]).unwrap();
    assert_eq!(a.to_f32_vec().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    assert_eq!(b.to_f32_vec().unwrap(), vec![5.0, 6.0, 7.0, 8.0]);
    assert!(a.dims::<3>("a").is_err());
    assert_eq!(a.dims::<2>("a").unwrap(), [2, 2]);
}

#[test]
fn borrowed_host_memory_is_read_and_written_in_place() {
    let mut buf = vec![1.5f32, 2.5, 3.5];
    // SAFETY: `buf` outlives `t` and is not touched while `t` lives.
    let mut t =
        unsafe { Tensor::borrow_host(buf.as_mut_ptr().cast(), &[3], DType::F32, true).unwrap() };
    assert!(t.is_borrowed());
    t.as_mut_slice::<f32>().unwrap()[1] = 9.0;
    let read_only = t.clone();
    assert_eq!(read_only.as_slice::<f32>().unwrap(), &[1.5, 9.0, 3.5]);
    let mut ro = read_only;
    assert!(
        ro.as_mut_slice::<f32>().is_err(),
        "a clone never gains write access"
    );
    drop((t, ro));
    assert_eq!(buf[1], 9.0);
    let null = unsafe { Tensor::borrow_host(std::ptr::null_mut(), &[1], DType::F32, false) };
    assert!(null.is_err());
}

#[test]
fn no_gpu_is_a_typed_error() {
    // On machines without a driver (CI) this is NoCuda; with one, ordinal 4096 does not exist.
    assert!(matches!(
        moe_runner_core::Device::cuda(4096),
        Err(MoeError::NoCuda(_))
    ));
}
