//! Attention's core for one new token on the CPU: `softmax(q·kᵀ/√d)·v` for every query head
//! against the KV cache as it lies (views of its buffers), each cached key and value read once
//! for the query heads that share it, on the calling thread.
//!
//! With candle's ops the same step is two batched matmuls and a softmax over tiny matrices
//! (3 KV heads × 3 queries × the context), whose thread dispatch costs far more than their
//! arithmetic: 90–140 µs a layer at 64–256 cached tokens (AMD EPYC Zen 4, 2 threads), about 4 ms
//! of an 18.6 ms decode step. Prefill keeps candle's ops, whose matmuls are then large enough to
//! pay for their threads; so would a context of many thousand tokens, which this op, on one
//! thread, does not split.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape};

/// `softmax(q·kᵀ·scale)·v` per KV head, every cached key visible (one new token).
///
/// `q` is `[batch, kv_heads, group, d]` (the query heads that share each KV head), contiguous;
/// `k` and `v` are `[batch, kv_heads, len, d]` with unit stride in `d` (views of the cache's
/// buffers); the result has `q`'s shape. f32 only.
#[derive(Debug, Clone, Copy)]
pub struct DecodeAttention {
    /// `1/√d`.
    pub scale: f32,
}

/// Lanes of the dot products' partial sums (one AVX-512 vector of f32).
const LANES: usize = 16;

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "smollm2-decode-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) = (qs, ks, vs) else {
            candle_core::bail!("decode attention: q, k and v must be f32")
        };
        let (b, kvh, group, d) = ql.shape().dims4()?;
        let (kb, kh, len, kd) = kl.shape().dims4()?;
        if (kb, kh, kd) != (b, kvh, d) || vl.shape() != kl.shape() || len == 0 {
            candle_core::bail!(
                "decode attention: q {:?}, k {:?}, v {:?}",
                ql.dims(),
                kl.dims(),
                vl.dims()
            )
        }
        let Some((q0, _)) = ql.contiguous_offsets() else {
            candle_core::bail!("decode attention: q must be contiguous")
        };
        // Rows of keys and values `d` apart within a head, heads and batches anywhere.
        let rows = |l: &Layout| -> candle_core::Result<(usize, usize, usize)> {
            match *l.stride() {
                [sb, sh, sl, 1] if sl == d => Ok((l.start_offset(), sb, sh)),
                _ => candle_core::bail!("decode attention: k and v rows must be contiguous"),
            }
        };
        let ((k0, kbs, khs), (v0, vbs, vhs)) = (rows(kl)?, rows(vl)?);
        let mut out = vec![0f32; b * kvh * group * d];
        // Row g: query head g of the group against every key.
        let mut scores = vec![0f32; group * len];
        for bi in 0..b {
            for h in 0..kvh {
                let keys = &k[k0 + bi * kbs + h * khs..][..len * d];
                let values = &v[v0 + bi * vbs + h * vhs..][..len * d];
                let row = (bi * kvh + h) * group * d;
                let queries = &q[q0 + row..][..group * d];
                // Each key and each value read once for the whole group.
                for (j, key) in keys.chunks_exact(d).enumerate() {
                    for (g, query) in queries.chunks_exact(d).enumerate() {
                        scores[g * len + j] = dot(query, key) * self.scale;
                    }
                }
                for s in scores.chunks_exact_mut(len) {
                    softmax(s);
                }
                let ys = &mut out[row..row + group * d];
                for (j, value) in values.chunks_exact(d).enumerate() {
                    for (g, y) in ys.chunks_exact_mut(d).enumerate() {
                        let p = scores[g * len + j];
                        for (y, &v) in y.iter_mut().zip(value) {
                            *y += p * v;
                        }
                    }
                }
            }
        }
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }
}

/// `Σ a·b` in `LANES` partial sums (so that the compiler vectorises it), then their sum.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += a[i] * b[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `exp(s − max s) / Σ exp(s − max s)` in place, as candle's `softmax_last_dim`.
fn softmax(s: &mut [f32]) {
    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in s.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in s.iter_mut() {
        *v /= sum;
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::DecodeAttention;

    /// The op against candle's matmuls and softmax, with the keys and values as views into a
    /// longer cache buffer (as the KV cache hands them over), two batches.
    #[test]
    fn decode_attention_matches_candle_ops() {
        let dev = Device::Cpu;
        let (b, kvh, group, d, cap) = (2, 3, 3, 64, 40);
        // Fixed values in [-2, 2] (sines of a spread of angles): the same on every run.
        let values = |shape: (usize, usize, usize, usize), seed: f32| {
            let n = shape.0 * shape.1 * shape.2 * shape.3;
            let v: Vec<f32> = (0..n)
                .map(|i| 2.0 * (i as f32 * 0.7311 + seed).sin())
                .collect();
            Tensor::from_vec(v, shape, &dev).unwrap()
        };
        let q = values((b, kvh, group, d), 0.1);
        let kc = values((b, kvh, cap, d), 0.2);
        let vc = values((b, kvh, cap, d), 0.3);
        let scale = 1.0 / (d as f32).sqrt();
        // Views that start past the buffer's first position, as well as at it.
        for (start, len) in [(0, 1), (0, 17), (3, 33), (5, 35)] {
            let k = kc.narrow(2, start, len).unwrap();
            let v = vc.narrow(2, start, len).unwrap();
            let ours = q
                .apply_op3_no_bwd(&k, &v, &DecodeAttention { scale })
                .unwrap();
            let scores = (q.matmul(&k.t().unwrap()).unwrap() * f64::from(scale)).unwrap();
            let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
            let theirs = probs.matmul(&v.contiguous().unwrap()).unwrap();
            let diff = (ours - theirs)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "{len} cached tokens from {start}: {diff}");
        }
        let half = q.to_dtype(DType::F16).unwrap();
        let err = half
            .apply_op3_no_bwd(&kc, &vc, &DecodeAttention { scale })
            .unwrap_err();
        assert!(err.to_string().contains("must be f32"), "{err}");
    }
}
