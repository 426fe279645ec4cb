//! GGUF loading on arbitrary bytes: `Checkpoint::open` on them as `model.gguf`, then every way
//! of loading layer 0, quantized and dequantized, and a forward pass.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = common::lay_out(&[("model.gguf", data)]);
    common::exercise(&dir.join("model.gguf"));
});
