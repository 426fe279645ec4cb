//! Safetensors and sharded-index loading on arbitrary bytes, through `Checkpoint::open` on a
//! directory. The first byte picks what the rest is:
//! 0: `model.safetensors`;
//! 1: `model.safetensors.index.json`, beside a valid shard `model-00001-of-00001.safetensors`;
//! 2: `config.json`, beside a valid `model.safetensors`.
#![no_main]

mod common;

use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use libfuzzer_sys::fuzz_target;

/// A valid Llama-layout block, hidden 4, intermediate 8, with biases, as safetensors bytes.
fn valid_shard() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let dev = Device::Cpu;
        let mut ts = std::collections::HashMap::new();
        for (name, n, shape) in [
            ("gate_proj.weight", 32, vec![8, 4]),
            ("up_proj.weight", 32, vec![8, 4]),
            ("down_proj.weight", 32, vec![4, 8]),
            ("gate_proj.bias", 8, vec![8]),
            ("up_proj.bias", 8, vec![8]),
            ("down_proj.bias", 4, vec![4]),
        ] {
            let t = Tensor::arange(0f32, n as f32, &dev)
                .and_then(|t| t.affine(0.01, -0.1))
                .and_then(|t| t.reshape(shape))
                .expect("tensor");
            ts.insert(format!("model.layers.0.mlp.{name}"), t);
        }
        let path = common::scratch().join("valid.safetensors");
        candle_core::safetensors::save(&ts, &path).expect("save");
        std::fs::read(&path).expect("read back")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let shard = valid_shard();
    let dir = match mode % 3 {
        0 => common::lay_out(&[("model.safetensors", bytes)]),
        1 => common::lay_out(&[
            ("model.safetensors.index.json", bytes),
            ("model-00001-of-00001.safetensors", shard),
        ]),
        _ => common::lay_out(&[("config.json", bytes), ("model.safetensors", shard)]),
    };
    common::exercise(dir);
});
