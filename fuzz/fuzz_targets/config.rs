//! `GluConfig::from_hf_json` on arbitrary text: an error or a config that validates, whose
//! activation round-trips through its name, and that builds a block.
#![no_main]

use candle_core::{DType, Device};
use candle_glu::{Activation, GluConfig, GluFeedForward};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let cfg = match GluConfig::from_hf_json(text) {
        Ok(cfg) => cfg,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    cfg.validate().expect("a parsed config validates");
    let name = cfg.activation.to_string();
    assert_eq!(
        name.parse::<Activation>().ok(),
        Some(cfg.activation),
        "{name}"
    );
    // Build it over zeros when small enough to stay within the fuzzer's memory limit.
    if cfg.hidden_size * cfg.intermediate_size <= 1 << 16 {
        let vb = candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu);
        let ffn = GluFeedForward::new(&cfg.clone().with_bias(false), vb).expect("zeros block");
        assert_eq!(ffn.config().hidden_size, cfg.hidden_size);
    }
});
