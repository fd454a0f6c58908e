//! A runner defined and registered only here, in the tests crate, plugs in without any edit to
//! runner-core or dispatch: `MoeRunner` finds it, and it passes the conformance suite against
//! the reference. It is a fused function built on the naive oracle.

use moe_conformance::cases::{base_config, hidden_dtype, TOKENS, VARIANTS};
use moe_conformance::{oracle::naive_moe, suite, synthetic};
use moe_runner_core::inventory;
use moe_runner_core::registry::{registered_paths, DeviceKind, FusedFunc, FusedRunner, PathKind};
use moe_runner_core::{
    downcast_dispatch, CombineInput, Device, DispatchFormat, DispatchOutput, MoeRunner,
    MoeRunnerConfig, QuantInfo, QuantScheme, Result, StandardCombineInput, StandardDispatchOutput,
    Tensor, WeightDims,
};

const PLUGIN: &str = "plugin_naive";

struct NaiveFused {
    cfg: MoeRunnerConfig,
}

impl FusedRunner for NaiveFused {
    fn run(
        &self,
        input: &dyn DispatchOutput,
        quant: &dyn QuantInfo,
    ) -> Result<Box<dyn CombineInput>> {
        let d =
            downcast_dispatch::<StandardDispatchOutput>(input, PLUGIN, DispatchFormat::Standard)?;
        let m = d.num_tokens();
        let out = naive_moe(
            &d.hidden.to_f32_vec()?,
            &d.topk,
            quant,
            &self.cfg,
            d.hidden.dtype(),
        )?;
        let shape = self.cfg.output_shape(m);
        Ok(Box::new(StandardCombineInput {
            hidden: Tensor::from_f32(&out, &shape, d.hidden.dtype())?,
        }))
    }
}

inventory::submit! {
    FusedFunc {
        format: DispatchFormat::Standard,
        runner: PLUGIN,
        schemes: &QuantScheme::ALL,
        device: DeviceKind::Cpu,
        priority: -1,
        make: |cfg, _device| Ok(Box::new(NaiveFused { cfg: cfg.clone() })),
    }
}

#[test]
fn plugin_is_found_and_passes_the_suite() {
    moe_conformance::link_backends();
    let path = registered_paths()
        .into_iter()
        .find(|p| p.runner == PLUGIN)
        .expect("plugin registered");
    assert_eq!(path.kind, PathKind::Fused);
    let mut checked = 0;
    for &scheme in &[
        QuantScheme::Bf16,
        QuantScheme::Fp8Block128,
        QuantScheme::Nvfp4,
    ] {
        for variant in VARIANTS {
            let mut cfg = base_config();
            (variant.apply)(&mut cfg);
            let runner =
                MoeRunner::new(PLUGIN, DispatchFormat::Standard, scheme, cfg.clone()).unwrap();
            assert_eq!(runner.path_kind(), PathKind::Fused);
            let dims = WeightDims {
                experts: 8,
                n1: cfg.gemm1_columns(),
                hidden: 256,
                inter: 128,
            };
            let quant = synthetic::weights(dims, scheme, 42, &|_| {}).unwrap();
            for &m in TOKENS {
                let hidden =
                    synthetic::hidden(m, 256, hidden_dtype(scheme), 43 + m as u64).unwrap();
                let topk = synthetic::topk(m, cfg.top_k, 8, 44, true, true).unwrap();
                let c = suite::check_against_reference(&runner, &hidden, &topk, quant.as_ref())
                    .unwrap();
                assert!(
                    c.within(suite::tolerance(scheme)),
                    "{scheme} {} M={m}: {c:?}",
                    variant.name
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 3 * VARIANTS.len() * TOKENS.len());
}

#[test]
fn auto_prefers_the_higher_priority_path() {
    moe_conformance::link_backends();
    // The plugin registers priority -1, below the reference's 0.
    let r = MoeRunner::auto(
        &Device::cpu(),
        DispatchFormat::Standard,
        QuantScheme::Bf16,
        base_config(),
    )
    .unwrap();
    assert_eq!(r.runner(), "reference");
}
