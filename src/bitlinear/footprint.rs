//! How much memory a [`BitLinear`] saves, counted in real bytes rather than ideal bits.

use super::BitLinear;
use crate::packing::base3;

/// Bytes of one layer in each representation; scales and bias are included everywhere, so the
/// ratios are what a model actually saves, not the ideal 16x / 20x (which large layers approach).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryFootprint {
    /// Number of weights (`out_features * in_features`).
    pub params: u64,
    /// 2-bit codes as held in memory and on the GPU (rows padded to 16 weights), f32 scales and
    /// f32 bias.
    pub packed_bytes: u64,
    /// 1.6-bit base-3 storage ([`crate::StorageFormat::Base3`]: 5 weights per byte), f32 scales
    /// and f32 bias.
    pub base3_bytes: u64,
    /// The same layer as a plain f32 linear (weights and bias).
    pub f32_bytes: u64,
    /// The same layer as a plain f16 linear (weights and bias).
    pub f16_bytes: u64,
}

impl MemoryFootprint {
    pub(super) fn of(layer: &BitLinear) -> Self {
        let params = (layer.out_features() * layer.in_features()) as u64;
        let scale_bytes = 4 * layer.scales().len() as u64;
        let bias_count = layer.bias().map_or(0, |b| b.len()) as u64;
        MemoryFootprint {
            params,
            packed_bytes: 4 * layer.packed().words.len() as u64 + scale_bytes + 4 * bias_count,
            base3_bytes: base3::byte_len(params as usize) as u64 + scale_bytes + 4 * bias_count,
            f32_bytes: 4 * (params + bias_count),
            f16_bytes: 2 * (params + bias_count),
        }
    }

    /// How many times smaller the packed layer is than its f32 original.
    pub fn ratio_vs_f32(&self) -> f64 {
        self.f32_bytes as f64 / self.packed_bytes as f64
    }

    /// How many times smaller the packed layer is than its f16 original.
    pub fn ratio_vs_f16(&self) -> f64 {
        self.f16_bytes as f64 / self.packed_bytes as f64
    }

    /// Packed bits per weight, overheads included (2 plus padding, scales and bias).
    pub fn bits_per_weight(&self) -> f64 {
        8.0 * self.packed_bytes as f64 / self.params as f64
    }

    /// How many times smaller 1.6-bit storage is than f32.
    pub fn base3_ratio_vs_f32(&self) -> f64 {
        self.f32_bytes as f64 / self.base3_bytes as f64
    }

    /// Stored bits per weight in 1.6-bit storage, overheads included.
    pub fn base3_bits_per_weight(&self) -> f64 {
        8.0 * self.base3_bytes as f64 / self.params as f64
    }
}

impl std::fmt::Display for MemoryFootprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} weights: f32 {} B, f16 {} B, 2-bit {} B ({:.3} bits/weight, {:.2}x vs f32, {:.2}x vs f16), \
             1.6-bit {} B ({:.3} bits/weight, {:.2}x vs f32)",
            self.params,
            self.f32_bytes,
            self.f16_bytes,
            self.packed_bytes,
            self.bits_per_weight(),
            self.ratio_vs_f32(),
            self.ratio_vs_f16(),
            self.base3_bytes,
            self.base3_bits_per_weight(),
            self.base3_ratio_vs_f32(),
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::BitLinear;
    use crate::cpu::{ScaleGranularity, TernaryWeights, WeightQuantOptions};

    fn layer(out: usize, inp: usize, scales: usize, bias: bool) -> BitLinear {
        let w = TernaryWeights {
            rows: out,
            cols: inp,
            codes: (0..out * inp).map(|i| (i % 3) as i8 - 1).collect(),
            scales: vec![1.0; scales],
        };
        BitLinear::from_ternary(w, bias.then(|| vec![0.0; out])).unwrap()
    }

    #[test]
    fn square_layer_reaches_16x_and_20x() {
        let m = layer(1024, 1024, 1, false).memory_footprint();
        assert_eq!(m.params, 1 << 20);
        assert_eq!(m.f32_bytes, 4 << 20);
        assert_eq!(m.f16_bytes, 2 << 20);
        assert_eq!(m.packed_bytes, (1 << 18) + 4);
        assert_eq!(m.base3_bytes, (1u64 << 20).div_ceil(5) + 4);
        assert!(
            (m.ratio_vs_f32() - 16.0).abs() < 1e-3,
            "{}",
            m.ratio_vs_f32()
        );
        assert!((m.ratio_vs_f16() - 8.0).abs() < 1e-3);
        assert!((m.bits_per_weight() - 2.0).abs() < 1e-4);
        assert!(
            (m.base3_ratio_vs_f32() - 20.0).abs() < 1e-3,
            "{}",
            m.base3_ratio_vs_f32()
        );
        assert!((m.base3_bits_per_weight() - 1.6).abs() < 1e-4);
    }

    #[test]
    fn overheads_are_counted() {
        // 17 columns pad to 32 in the packed rows; per-channel scales and bias cost 4 B each.
        let m = layer(5, 17, 5, true).memory_footprint();
        assert_eq!(m.params, 85);
        assert_eq!(m.packed_bytes, 5 * 8 + 5 * 4 + 5 * 4);
        assert_eq!(m.base3_bytes, 17 + 5 * 4 + 5 * 4);
        assert_eq!(m.f32_bytes, 4 * 90);
        assert_eq!(m.f16_bytes, 2 * 90);
        assert!(m.ratio_vs_f32() < 16.0 && m.bits_per_weight() > 2.0);
    }

    #[test]
    fn from_f32_counts_the_same() {
        let w = vec![0.25f32; 64 * 48];
        let opts = WeightQuantOptions {
            granularity: ScaleGranularity::PerChannel,
            ..Default::default()
        };
        let m = BitLinear::from_f32(&w, 64, 48, None, opts)
            .unwrap()
            .memory_footprint();
        assert_eq!(m.packed_bytes, 64 * 48 / 4 + 64 * 4);
    }
}
