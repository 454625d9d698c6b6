//! The BitLinear layer: a drop-in replacement for a linear layer whose weights are ternary
//! {-1, 0, +1} with absmean scale(s) and whose inputs are quantized to int8 per token.
//!
//! The layer keeps its weights packed (2 bits per weight, the GPU's private layout) so that the
//! copy in host memory is as small as the one on the GPU; [`BitLinear::ternary`] unpacks them
//! on demand. It runs on the CPU ([`BitLinear::forward_cpu`], the reference) or the GPU
//! ([`BitLinear::to_gpu`]), and is saved to and loaded from safetensors ([`StorageFormat`]).

mod file;
mod footprint;
#[cfg(feature = "gpu")]
mod gpu;

pub use file::StorageFormat;
pub use footprint::MemoryFootprint;
#[cfg(feature = "gpu")]
pub use gpu::GpuBitLinear;

use crate::cpu::{self, PackedTernary, ScaleGranularity, TernaryWeights, WeightQuantOptions};
use crate::packing::gpu_words;
use crate::{Error, Result};

/// A linear layer `y = x · Wᵀ + b` with ternary `W` and int8-quantized `x` (BitNet b1.58).
///
/// The product is `y = (x_q · W_tᵀ) / (s_x · s_w) + b`, with the integer dot product exact; the
/// scales follow Hugging Face's convention (`s_w = 1 / mean|W|`, so `W ≈ W_t / s_w`).
///
/// ```
/// use bitnet_wgpu::BitLinear;
/// use bitnet_wgpu::cpu::WeightQuantOptions;
///
/// // 3 outputs, 4 inputs; the weights quantize to {-1, 0, +1} times one scale.
/// let weights = [
///     0.9, -1.1, 0.0, 1.0, //
///     -1.0, 0.1, 1.2, 0.0, //
///     0.0, 0.0, -0.8, 1.0,
/// ];
/// let layer = BitLinear::from_f32(&weights, 3, 4, Some(vec![0.0, 1.0, 0.0]), WeightQuantOptions::default())?;
/// assert_eq!(layer.ternary().codes, [1, -1, 0, 1, -1, 0, 1, 0, 0, 0, -1, 1]);
///
/// // Two tokens in, two rows of three features out.
/// let y = layer.forward_cpu(&[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0], 2)?;
/// assert_eq!(y.len(), 6);
/// let s = layer.scales()[0];
/// assert!((y[0] - 1.0 / s).abs() < 1e-6); // token 0 picks column 0 of each row
/// assert!((y[1] - (1.0 - 1.0 / s)).abs() < 1e-6);
///
/// // About 16x smaller than f32 in memory, 20x in 1.6-bit storage (for large layers).
/// println!("{:.1}x", layer.memory_footprint().ratio_vs_f32());
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct BitLinear {
    packed: PackedTernary,
    bias: Option<Vec<f32>>,
}

impl BitLinear {
    /// Quantizes `weights` (`[out_features, in_features]`, row-major, as in `nn.Linear`) to
    /// ternary codes with absmean scale(s) and packs them.
    pub fn from_f32(
        weights: &[f32],
        out_features: usize,
        in_features: usize,
        bias: Option<Vec<f32>>,
        opts: WeightQuantOptions,
    ) -> Result<Self> {
        check_bias(bias.as_deref(), out_features)?;
        let packed = cpu::ternary_pack(weights, out_features, in_features, opts)?;
        Ok(BitLinear { packed, bias })
    }

    /// Wraps weights that are already ternary (e.g. from a checkpoint), checking every code and
    /// scale.
    pub fn from_ternary(weights: TernaryWeights, bias: Option<Vec<f32>>) -> Result<Self> {
        let TernaryWeights {
            rows,
            cols,
            codes,
            scales,
        } = weights;
        if rows == 0 || cols == 0 {
            return Err(Error::Empty("weight matrix"));
        }
        let len = rows
            .checked_mul(cols)
            .ok_or_else(|| Error::invalid("weight shape", format!("{rows} x {cols} overflows")))?;
        if codes.len() != len {
            return Err(Error::shape(
                "ternary codes",
                format!("{rows} x {cols} = {len}"),
                codes.len(),
            ));
        }
        if let Some(i) = codes.iter().position(|c| !(-1..=1).contains(c)) {
            return Err(Error::invalid(
                "ternary codes",
                format!(
                    "code {} at row {}, column {} is not -1, 0 or +1",
                    codes[i],
                    i / cols,
                    i % cols
                ),
            ));
        }
        check_scales(&scales, rows)?;
        check_bias(bias.as_deref(), rows)?;
        let words = gpu_words::pack(&codes, rows, cols)?;
        Ok(BitLinear {
            packed: PackedTernary {
                rows,
                cols,
                words,
                scales,
            },
            bias,
        })
    }

    pub fn in_features(&self) -> usize {
        self.packed.cols
    }

    pub fn out_features(&self) -> usize {
        self.packed.rows
    }

    /// The codes unpacked, with their scale(s): what the file formats and the CPU matmul take.
    pub fn ternary(&self) -> TernaryWeights {
        let codes = gpu_words::unpack(&self.packed.words, self.packed.rows, self.packed.cols)
            .expect("the words were packed from checked codes of this shape");
        TernaryWeights {
            rows: self.packed.rows,
            cols: self.packed.cols,
            codes,
            scales: self.packed.scales.clone(),
        }
    }

    /// The packed weights in the GPU's private layout.
    pub fn packed(&self) -> &PackedTernary {
        &self.packed
    }

    /// One scale (per tensor) or `out_features` scales (per channel), `1 / mean|W|` each.
    pub fn scales(&self) -> &[f32] {
        &self.packed.scales
    }

    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// A layer with one output has one scale either way; it counts as per tensor.
    pub fn granularity(&self) -> ScaleGranularity {
        if self.packed.scales.len() == 1 {
            ScaleGranularity::PerTensor
        } else {
            ScaleGranularity::PerChannel
        }
    }

    /// `y = BitLinear(x)` for `rows` tokens of `in_features` each, on the CPU.
    ///
    /// A NaN or infinity in `x` is an [`Error::NonFinite`] naming its position: the reference
    /// refuses rather than propagates. (The GPU path through [`GpuBitLinear::record`] cannot
    /// report errors without a readback, so there a non-finite token yields a row of NaN;
    /// [`GpuBitLinear::forward`] checks its host input like this function does.)
    pub fn forward_cpu(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        check_input(x, rows, self.in_features())?;
        let acts = cpu::act_quant(x, rows, self.in_features())?;
        cpu::ternary_matmul(&acts, &self.ternary(), self.bias())
    }

    /// Uploads the packed weights, scales and bias once; the returned layer runs on `ctx`.
    #[cfg(feature = "gpu")]
    pub fn to_gpu(&self, ctx: &crate::gpu::GpuContext) -> Result<GpuBitLinear> {
        GpuBitLinear::upload(ctx, self)
    }

    /// Bytes this layer takes packed (in memory and in each file format) against f32 and f16.
    pub fn memory_footprint(&self) -> MemoryFootprint {
        MemoryFootprint::of(self)
    }
}

/// Identical codes, scales and bias; the packed words are a function of the codes.
impl PartialEq for BitLinear {
    fn eq(&self, other: &Self) -> bool {
        self.packed.rows == other.packed.rows
            && self.packed.cols == other.packed.cols
            && self.packed.words == other.packed.words
            && bits(&self.packed.scales) == bits(&other.packed.scales)
            && self.bias.as_deref().map(bits) == other.bias.as_deref().map(bits)
    }
}

/// Compares floats bit for bit, so that a round trip is checked exactly (NaN included).
fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// Scales divide the accumulator, so each must be finite and positive.
fn check_scales(scales: &[f32], rows: usize) -> Result<()> {
    if scales.len() != 1 && scales.len() != rows {
        return Err(Error::shape(
            "weight scales",
            format!("1 or {rows}"),
            scales.len(),
        ));
    }
    if let Some((i, &s)) = scales
        .iter()
        .enumerate()
        .find(|(_, s)| !(s.is_finite() && **s > 0.0))
    {
        return Err(Error::invalid(
            "weight scales",
            format!("scale {i} is {s}; scales must be finite and positive"),
        ));
    }
    Ok(())
}

fn check_bias(bias: Option<&[f32]>, out_features: usize) -> Result<()> {
    let Some(bias) = bias else { return Ok(()) };
    if bias.len() != out_features {
        return Err(Error::shape("bias", out_features, bias.len()));
    }
    if let Some((i, &value)) = bias.iter().enumerate().find(|(_, b)| !b.is_finite()) {
        return Err(Error::NonFinite {
            what: "bias",
            row: 0,
            col: i,
            value,
        });
    }
    Ok(())
}

/// Shape and finiteness of an input `[rows, cols]`, shared by the CPU and GPU forwards.
fn check_input(x: &[f32], rows: usize, cols: usize) -> Result<()> {
    let len = rows
        .checked_mul(cols)
        .ok_or_else(|| Error::invalid("input shape", format!("{rows} x {cols} overflows")))?;
    if x.len() != len {
        return Err(Error::shape(
            "BitLinear input",
            format!("{rows} x {cols} = {len}"),
            x.len(),
        ));
    }
    if let Some((i, &value)) = x.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(Error::NonFinite {
            what: "BitLinear input",
            row: i / cols,
            col: i % cols,
            value,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::SmallRng};

    fn random_layer(
        rng: &mut SmallRng,
        out: usize,
        inp: usize,
        granularity: ScaleGranularity,
        with_bias: bool,
    ) -> BitLinear {
        let w: Vec<f32> = (0..out * inp)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let bias = with_bias.then(|| (0..out).map(|_| rng.random_range(-1.0..1.0)).collect());
        let opts = WeightQuantOptions {
            granularity,
            ..Default::default()
        };
        BitLinear::from_f32(&w, out, inp, bias, opts).unwrap()
    }

    #[test]
    fn forward_matches_dequantized_product() {
        let mut rng = SmallRng::seed_from_u64(1);
        for (out, inp, rows) in [(1, 1, 1), (5, 17, 3), (33, 129, 9), (4, 16, 0)] {
            for granularity in [ScaleGranularity::PerTensor, ScaleGranularity::PerChannel] {
                let layer = random_layer(&mut rng, out, inp, granularity, true);
                let x: Vec<f32> = (0..rows * inp)
                    .map(|_| rng.random_range(-3.0..3.0))
                    .collect();
                let y = layer.forward_cpu(&x, rows).unwrap();
                assert_eq!(y.len(), rows * out);
                let w = layer.ternary();
                let acts = cpu::act_quant(&x, rows, inp).unwrap();
                for r in 0..rows {
                    for o in 0..out {
                        let dot: f64 = (0..inp)
                            .map(|k| {
                                f64::from(acts.codes[r * inp + k]) * f64::from(w.codes[o * inp + k])
                            })
                            .sum();
                        let s_w = w.scales[if w.scales.len() == 1 { 0 } else { o }];
                        let expected = dot / (f64::from(acts.scales[r]) * f64::from(s_w))
                            + f64::from(layer.bias().unwrap()[o]);
                        let got = f64::from(y[r * out + o]);
                        assert!(
                            (got - expected).abs() <= 1e-5 * expected.abs().max(1.0),
                            "{got} vs {expected}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn from_ternary_round_trips_codes() {
        let codes: Vec<i8> = (0..35).map(|i| (i % 3) as i8 - 1).collect();
        let w = TernaryWeights {
            rows: 5,
            cols: 7,
            codes: codes.clone(),
            scales: vec![0.5, 1.0, 2.0, 3.0, 4.0],
        };
        let layer = BitLinear::from_ternary(w.clone(), None).unwrap();
        assert_eq!(layer.ternary(), w);
        assert_eq!(layer.granularity(), ScaleGranularity::PerChannel);
        assert_eq!((layer.out_features(), layer.in_features()), (5, 7));
    }

    #[test]
    fn bad_weights_are_rejected() {
        let ok = TernaryWeights {
            rows: 2,
            cols: 2,
            codes: vec![1, 0, -1, 0],
            scales: vec![1.0],
        };
        let with = |f: &dyn Fn(&mut TernaryWeights)| {
            let mut w = ok.clone();
            f(&mut w);
            BitLinear::from_ternary(w, None)
        };
        assert!(with(&|_| ()).is_ok());
        assert!(matches!(
            with(&|w| w.codes[2] = 2),
            Err(Error::Invalid { .. })
        ));
        assert!(matches!(
            with(&|w| w.codes.pop().map(drop).unwrap_or(())),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            with(&|w| w.scales = vec![1.0; 3]),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            with(&|w| w.scales[0] = f32::NAN),
            Err(Error::Invalid { .. })
        ));
        assert!(matches!(
            with(&|w| w.scales[0] = 0.0),
            Err(Error::Invalid { .. })
        ));
        assert!(matches!(with(&|w| w.rows = 0), Err(Error::Empty(_))));
        assert!(matches!(
            BitLinear::from_ternary(ok.clone(), Some(vec![0.0; 3])),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            BitLinear::from_ternary(ok, Some(vec![0.0, f32::INFINITY])),
            Err(Error::NonFinite { .. })
        ));
    }

    #[test]
    fn forward_rejects_bad_input() {
        let mut rng = SmallRng::seed_from_u64(2);
        let layer = random_layer(&mut rng, 3, 4, ScaleGranularity::PerTensor, false);
        assert!(matches!(
            layer.forward_cpu(&[0.0; 7], 2),
            Err(Error::Shape { .. })
        ));
        let mut x = [0.5f32; 8];
        x[6] = f32::NAN;
        match layer.forward_cpu(&x, 2) {
            Err(Error::NonFinite { row, col, .. }) => assert_eq!((row, col), (1, 2)),
            other => panic!("expected NonFinite, got {other:?}"),
        }
        x[6] = f32::NEG_INFINITY;
        assert!(matches!(
            layer.forward_cpu(&x, 2),
            Err(Error::NonFinite { .. })
        ));
    }
}
