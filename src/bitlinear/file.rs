//! Saving and loading a [`BitLinear`] as safetensors.
//!
//! Tensors (all little-endian):
//!
//! | name | dtype | shape | when |
//! | --- | --- | --- | --- |
//! | `weight` | U8 | `[out/4, in]` | [`StorageFormat::TwoBit`], `out % 4 == 0`: Hugging Face's offline layout |
//! | `weight_words` | U32 | `[out, ceil(in/16)]` | [`StorageFormat::TwoBit`], other `out`: this crate's GPU layout |
//! | `weight_base3` | U8 | `[ceil(out*in/5)]` | [`StorageFormat::Base3`]: 5 trits per byte |
//! | `weight_scale` | F32 | `[1]` or `[out]` | always: `1 / mean|W|`, per tensor or per channel |
//! | `bias` | F32 | `[out]` | if the layer has one |
//!
//! The `weight` + `weight_scale` pair is exactly what transformers' BitNet integration loads for one
//! linear of `microsoft/bitnet-b1.58-2B-4T` (packed along the output dimension in four quarter
//! blocks, `weight_scale = 1 / mean|W|`, divided by), so a per-tensor `TwoBit` file is readable
//! there once its tensors are renamed to the module's path. The header's `format` is `pt` because
//! transformers refuses safetensors files whose `format` is anything else; our own description
//! lives in the other metadata keys.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::BitLinear;
use crate::cpu::{ScaleGranularity, TernaryWeights};
use crate::packing::{base3, gpu_words, hf};
use crate::{Error, Result};

/// How the ternary codes are stored in a file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StorageFormat {
    /// 2 bits per weight, in Hugging Face's layout where it applies (16x smaller than f32).
    #[default]
    TwoBit,
    /// 1.6 bits per weight, five weights per byte (20x smaller than f32), readable only here.
    Base3,
}

impl StorageFormat {
    /// The name used in the file's metadata.
    pub fn name(self) -> &'static str {
        match self {
            StorageFormat::TwoBit => "2bit",
            StorageFormat::Base3 => "base3",
        }
    }
}

const WEIGHT_HF: &str = "weight";
const WEIGHT_WORDS: &str = "weight_words";
const WEIGHT_BASE3: &str = "weight_base3";
const SCALE: &str = "weight_scale";
const BIAS: &str = "bias";

/// Which of the three weight tensors holds the codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    Hf,
    Words,
    Base3,
}

impl Layout {
    fn tensor(self) -> &'static str {
        match self {
            Layout::Hf => WEIGHT_HF,
            Layout::Words => WEIGHT_WORDS,
            Layout::Base3 => WEIGHT_BASE3,
        }
    }

    fn format(self) -> StorageFormat {
        match self {
            Layout::Hf | Layout::Words => StorageFormat::TwoBit,
            Layout::Base3 => StorageFormat::Base3,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Layout::Hf => "hf_offline",
            Layout::Words => "gpu_words",
            Layout::Base3 => "base3",
        }
    }
}

fn granularity_name(g: ScaleGranularity) -> &'static str {
    match g {
        ScaleGranularity::PerTensor => "per_tensor",
        ScaleGranularity::PerChannel => "per_channel",
    }
}

fn le_bytes_f32(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn st_error(context: &str) -> impl FnOnce(safetensors::SafeTensorError) -> Error + '_ {
    move |e| Error::Safetensors(format!("{context}: {e}"))
}

impl BitLinear {
    /// The layer as the bytes of a safetensors file (see the module docs for the tensors).
    pub fn to_safetensors_bytes(&self, format: StorageFormat) -> Result<Vec<u8>> {
        let (out, inp) = (self.out_features(), self.in_features());
        let codes = self.ternary().codes;
        let layout = match format {
            StorageFormat::TwoBit if out % 4 == 0 => Layout::Hf,
            StorageFormat::TwoBit => Layout::Words,
            StorageFormat::Base3 => Layout::Base3,
        };
        let (weight_bytes, weight_dtype, weight_shape) = match layout {
            Layout::Hf => (hf::pack(&codes, out, inp)?, Dtype::U8, vec![out / 4, inp]),
            Layout::Words => (
                self.packed
                    .words
                    .iter()
                    .flat_map(|w| w.to_le_bytes())
                    .collect(),
                Dtype::U32,
                vec![out, gpu_words::words_per_row(inp)],
            ),
            Layout::Base3 => {
                let bytes = base3::pack(&codes)?;
                let len = bytes.len();
                (bytes, Dtype::U8, vec![len])
            }
        };
        let scale_bytes = le_bytes_f32(self.scales());
        let bias_bytes = self.bias().map(le_bytes_f32);

        let view = |dtype, shape, data| {
            TensorView::new(dtype, shape, data).map_err(st_error("building a tensor"))
        };
        let mut tensors = vec![
            (
                layout.tensor(),
                view(weight_dtype, weight_shape, &weight_bytes)?,
            ),
            (
                SCALE,
                view(Dtype::F32, vec![self.scales().len()], &scale_bytes)?,
            ),
        ];
        if let Some(bytes) = &bias_bytes {
            tensors.push((BIAS, view(Dtype::F32, vec![out], bytes)?));
        }

        let footprint = self.memory_footprint();
        let stored =
            weight_bytes.len() + scale_bytes.len() + bias_bytes.as_ref().map_or(0, Vec::len);
        let zeros = codes.iter().filter(|&&c| c == 0).count();
        let metadata: HashMap<String, String> = [
            ("format", "pt".to_string()),
            ("bitnet.storage_format", format.name().to_string()),
            ("bitnet.layout", layout.name().to_string()),
            ("bitnet.in_features", inp.to_string()),
            ("bitnet.out_features", out.to_string()),
            (
                "bitnet.granularity",
                granularity_name(self.granularity()).to_string(),
            ),
            (
                "bitnet.bits_per_weight",
                format!(
                    "{:.4}",
                    8.0 * weight_bytes.len() as f64 / codes.len() as f64
                ),
            ),
            ("bitnet.params", footprint.params.to_string()),
            ("bitnet.stored_bytes", stored.to_string()),
            ("bitnet.f32_bytes", footprint.f32_bytes.to_string()),
            ("bitnet.f16_bytes", footprint.f16_bytes.to_string()),
            (
                "bitnet.ratio_vs_f32",
                format!("{:.3}", footprint.f32_bytes as f64 / stored as f64),
            ),
            (
                "bitnet.ratio_vs_f16",
                format!("{:.3}", footprint.f16_bytes as f64 / stored as f64),
            ),
            (
                "bitnet.zero_fraction",
                format!("{:.6}", zeros as f64 / codes.len() as f64),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        safetensors::serialize(tensors, Some(metadata)).map_err(st_error("serializing"))
    }

    /// Reads a layer written by [`BitLinear::to_safetensors_bytes`], checking every tensor's
    /// presence, dtype, shape and codes, and the metadata against them.
    pub fn from_safetensors_bytes(bytes: &[u8]) -> Result<Self> {
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(st_error(
            "not a complete safetensors file (truncated or corrupt?)",
        ))?;
        let file = SafeTensors::deserialize(bytes).map_err(st_error(
            "not a complete safetensors file (truncated or corrupt?)",
        ))?;
        let empty = HashMap::new();
        let meta = header.metadata().as_ref().unwrap_or(&empty);
        let out = meta_usize(meta, "bitnet.out_features")?;
        let inp = meta_usize(meta, "bitnet.in_features")?;

        for name in file.names() {
            if ![WEIGHT_HF, WEIGHT_WORDS, WEIGHT_BASE3, SCALE, BIAS].contains(&name) {
                return Err(Error::Safetensors(format!(
                    "unexpected tensor `{name}` in a BitLinear file"
                )));
            }
        }
        let present: Vec<Layout> = [Layout::Hf, Layout::Words, Layout::Base3]
            .into_iter()
            .filter(|l| file.names().contains(&l.tensor()))
            .collect();
        let layout = match present[..] {
            [one] => one,
            [] => {
                return Err(Error::Safetensors(format!(
                    "missing tensor: none of `{WEIGHT_HF}`, `{WEIGHT_WORDS}`, `{WEIGHT_BASE3}` is present"
                )));
            }
            _ => {
                return Err(Error::Safetensors(format!(
                    "ambiguous weights: more than one of `{WEIGHT_HF}`, `{WEIGHT_WORDS}`, `{WEIGHT_BASE3}`"
                )));
            }
        };
        if let Some(stated) = meta.get("bitnet.storage_format")
            && stated != layout.format().name()
        {
            return Err(Error::Safetensors(format!(
                "metadata says storage_format {stated} but the file holds `{}`",
                layout.tensor()
            )));
        }

        let weight = tensor(&file, layout.tensor())?;
        let codes = match layout {
            Layout::Hf => {
                if out % 4 != 0 {
                    return Err(Error::Safetensors(format!(
                        "tensor `{WEIGHT_HF}` needs out_features divisible by 4, got {out}"
                    )));
                }
                expect(&weight, layout.tensor(), Dtype::U8, &[out / 4, inp])?;
                hf::unpack(weight.data(), out, inp)
            }
            Layout::Words => {
                expect(
                    &weight,
                    layout.tensor(),
                    Dtype::U32,
                    &[out, gpu_words::words_per_row(inp)],
                )?;
                let words: Vec<u32> = weight
                    .data()
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                gpu_words::unpack(&words, out, inp)
            }
            Layout::Base3 => {
                let n = out
                    .checked_mul(inp)
                    .ok_or_else(|| Error::Safetensors(format!("{out} x {inp} overflows")))?;
                expect(&weight, layout.tensor(), Dtype::U8, &[base3::byte_len(n)])?;
                base3::unpack(weight.data(), n)
            }
        }
        .map_err(|e| Error::Safetensors(format!("tensor `{}`: {e}", layout.tensor())))?;

        let scale_view = tensor(&file, SCALE)?;
        expect_dtype(&scale_view, SCALE, Dtype::F32)?;
        let scale_count = match scale_view.shape() {
            [1] => 1,
            [n] if *n == out => out,
            other => {
                return Err(Error::Safetensors(format!(
                    "tensor `{SCALE}` has shape {other:?}, expected [1] or [{out}]"
                )));
            }
        };
        let scales = f32s(scale_view.data());
        if let Some(stated) = meta.get("bitnet.granularity") {
            let consistent = match stated.as_str() {
                "per_tensor" => scale_count == 1,
                "per_channel" => scale_count == out,
                _ => false,
            };
            if !consistent {
                return Err(Error::Safetensors(format!(
                    "metadata says granularity {stated:?} but `{SCALE}` has {scale_count} value(s)"
                )));
            }
        }

        let bias = if file.names().contains(&BIAS) {
            let view = tensor(&file, BIAS)?;
            expect(&view, BIAS, Dtype::F32, &[out])?;
            Some(f32s(view.data()))
        } else {
            None
        };

        let weights = TernaryWeights {
            rows: out,
            cols: inp,
            codes,
            scales,
        };
        BitLinear::from_ternary(weights, bias)
            .map_err(|e| Error::Safetensors(format!("tensors `{SCALE}`/`{BIAS}`: {e}")))
    }

    /// Writes the layer to `path` atomically: the bytes go to `path.tmp`, which is renamed over
    /// `path` only once complete, so a failure never leaves a partial file behind.
    pub fn save(&self, path: impl AsRef<Path>, format: StorageFormat) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_safetensors_bytes(format)?;
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = Path::new(&tmp);
        let io = |p: &Path| {
            let p = p.display().to_string();
            move |source| Error::Io { path: p, source }
        };
        let written = (|| {
            use std::io::Write;
            let mut file = std::fs::File::create(tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()
        })();
        if let Err(e) = written
            .map_err(io(tmp))
            .and_then(|()| std::fs::rename(tmp, path).map_err(io(path)))
        {
            let _ = std::fs::remove_file(tmp);
            return Err(e);
        }
        Ok(())
    }

    /// Reads a layer saved by [`BitLinear::save`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_safetensors_bytes(&bytes)
            .map_err(|e| Error::Safetensors(format!("{}: {e}", path.display())))
    }
}

fn tensor<'a>(file: &SafeTensors<'a>, name: &str) -> Result<TensorView<'a>> {
    file.tensor(name)
        .map_err(|_| Error::Safetensors(format!("missing tensor `{name}`")))
}

/// Checks a tensor's dtype and shape, naming it in the error.
fn expect(view: &TensorView<'_>, name: &str, dtype: Dtype, shape: &[usize]) -> Result<()> {
    expect_dtype(view, name, dtype)?;
    if view.shape() != shape {
        return Err(Error::Safetensors(format!(
            "tensor `{name}` has shape {:?}, expected {shape:?}",
            view.shape()
        )));
    }
    Ok(())
}

fn expect_dtype(view: &TensorView<'_>, name: &str, dtype: Dtype) -> Result<()> {
    if view.dtype() == dtype {
        Ok(())
    } else {
        Err(Error::Safetensors(format!(
            "tensor `{name}` has dtype {:?}, expected {dtype:?}",
            view.dtype()
        )))
    }
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn meta_usize(meta: &HashMap<String, String>, key: &str) -> Result<usize> {
    let value = meta
        .get(key)
        .ok_or_else(|| Error::Safetensors(format!("metadata lacks `{key}`")))?;
    match value.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(Error::Safetensors(format!(
            "metadata `{key}` is {value:?}, not a positive integer"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::WeightQuantOptions;
    use rand::{Rng, SeedableRng, rngs::SmallRng};

    fn random_layer(
        rng: &mut SmallRng,
        out: usize,
        inp: usize,
        g: ScaleGranularity,
        bias: bool,
    ) -> BitLinear {
        let w: Vec<f32> = (0..out * inp)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let bias = bias.then(|| (0..out).map(|_| rng.random_range(-2.0..2.0)).collect());
        let opts = WeightQuantOptions {
            granularity: g,
            ..Default::default()
        };
        BitLinear::from_f32(&w, out, inp, bias, opts).unwrap()
    }

    fn assert_identical(a: &BitLinear, b: &BitLinear) {
        let (ta, tb) = (a.ternary(), b.ternary());
        assert_eq!((ta.rows, ta.cols), (tb.rows, tb.cols));
        assert_eq!(ta.codes, tb.codes);
        assert_eq!(bits(&ta.scales), bits(&tb.scales));
        assert_eq!(a.bias().map(bits), b.bias().map(bits));
        assert_eq!(a, b);
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    fn names(bytes: &[u8]) -> Vec<String> {
        let mut n: Vec<String> = SafeTensors::deserialize(bytes)
            .unwrap()
            .names()
            .into_iter()
            .map(String::from)
            .collect();
        n.sort();
        n
    }

    #[test]
    fn round_trips_bit_exactly() {
        let mut rng = SmallRng::seed_from_u64(3);
        for (out, inp) in [(1, 1), (4, 3), (5, 17), (8, 100), (33, 129), (12, 16)] {
            for g in [ScaleGranularity::PerTensor, ScaleGranularity::PerChannel] {
                for bias in [false, true] {
                    let layer = random_layer(&mut rng, out, inp, g, bias);
                    for format in [StorageFormat::TwoBit, StorageFormat::Base3] {
                        let bytes = layer.to_safetensors_bytes(format).unwrap();
                        let back = BitLinear::from_safetensors_bytes(&bytes).unwrap();
                        assert_identical(&layer, &back);
                        let weight = match (format, out % 4) {
                            (StorageFormat::Base3, _) => WEIGHT_BASE3,
                            (StorageFormat::TwoBit, 0) => WEIGHT_HF,
                            (StorageFormat::TwoBit, _) => WEIGHT_WORDS,
                        };
                        let mut expected = vec![weight.to_string(), SCALE.to_string()];
                        if bias {
                            expected.push(BIAS.to_string());
                        }
                        expected.sort();
                        assert_eq!(names(&bytes), expected, "{out}x{inp} {format:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn two_bit_uses_hugging_face_layout_and_metadata() {
        let mut rng = SmallRng::seed_from_u64(4);
        let layer = random_layer(&mut rng, 8, 5, ScaleGranularity::PerTensor, false);
        let bytes = layer.to_safetensors_bytes(StorageFormat::TwoBit).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let w = file.tensor(WEIGHT_HF).unwrap();
        assert_eq!((w.dtype(), w.shape()), (Dtype::U8, &[2, 5][..]));
        assert_eq!(w.data(), hf::pack(&layer.ternary().codes, 8, 5).unwrap());
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().as_ref().unwrap();
        assert_eq!(meta["format"], "pt");
        assert_eq!(meta["bitnet.storage_format"], "2bit");
        assert_eq!(meta["bitnet.layout"], "hf_offline");
        assert_eq!(meta["bitnet.in_features"], "5");
        assert_eq!(meta["bitnet.out_features"], "8");
        assert_eq!(meta["bitnet.granularity"], "per_tensor");
        assert_eq!(meta["bitnet.bits_per_weight"], "2.0000");
        assert!(
            meta.contains_key("bitnet.ratio_vs_f32") && meta.contains_key("bitnet.zero_fraction")
        );
    }

    #[test]
    fn large_layer_files_are_16x_and_20x_smaller() {
        let codes: Vec<i8> = (0..1024 * 1024).map(|i| (i % 3) as i8 - 1).collect();
        let layer = BitLinear::from_ternary(
            TernaryWeights {
                rows: 1024,
                cols: 1024,
                codes,
                scales: vec![2.0],
            },
            None,
        )
        .unwrap();
        let f32_bytes = 4.0 * 1024.0 * 1024.0;
        let two = layer
            .to_safetensors_bytes(StorageFormat::TwoBit)
            .unwrap()
            .len() as f64;
        let three = layer
            .to_safetensors_bytes(StorageFormat::Base3)
            .unwrap()
            .len() as f64;
        // The header adds well under 1 KiB.
        assert!((f32_bytes / two - 16.0).abs() < 0.1, "{}", f32_bytes / two);
        assert!(
            (f32_bytes / three - 20.0).abs() < 0.1,
            "{}",
            f32_bytes / three
        );
    }

    #[test]
    fn save_and_load_through_a_file() {
        let mut rng = SmallRng::seed_from_u64(5);
        let layer = random_layer(&mut rng, 6, 19, ScaleGranularity::PerChannel, true);
        let dir = std::env::temp_dir().join(format!("bitlinear-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("layer.safetensors");
        for format in [StorageFormat::TwoBit, StorageFormat::Base3] {
            layer.save(&path, format).unwrap();
            assert!(!dir.join("layer.safetensors.tmp").exists());
            assert_identical(&layer, &BitLinear::load(&path).unwrap());
        }
        // Saving into a missing directory fails cleanly and leaves nothing behind.
        let bad = dir.join("missing").join("layer.safetensors");
        assert!(matches!(
            layer.save(&bad, StorageFormat::TwoBit),
            Err(Error::Io { .. })
        ));
        assert!(!bad.exists());
        assert!(matches!(
            BitLinear::load(dir.join("absent")),
            Err(Error::Io { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn truncated_file_is_an_error() {
        let mut rng = SmallRng::seed_from_u64(6);
        let layer = random_layer(&mut rng, 4, 9, ScaleGranularity::PerTensor, true);
        for format in [StorageFormat::TwoBit, StorageFormat::Base3] {
            let bytes = layer.to_safetensors_bytes(format).unwrap();
            for cut in [0, 4, 8, 20, bytes.len() / 2, bytes.len() - 1] {
                let err = BitLinear::from_safetensors_bytes(&bytes[..cut]).unwrap_err();
                assert!(matches!(err, Error::Safetensors(_)), "{err}");
                assert!(err.to_string().contains("truncated"), "{err}");
            }
        }
    }

    /// A file with the given tensors and the metadata of a `out x inp` layer.
    fn custom(
        out: usize,
        inp: usize,
        tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)],
        extra: &[(&str, &str)],
    ) -> Vec<u8> {
        let views: Vec<(&str, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, d, s, b)| (*n, TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        let mut meta: HashMap<String, String> = HashMap::from([
            ("bitnet.out_features".into(), out.to_string()),
            ("bitnet.in_features".into(), inp.to_string()),
        ]);
        for (k, v) in extra {
            meta.insert(k.to_string(), v.to_string());
        }
        safetensors::serialize(views, Some(meta)).unwrap()
    }

    fn error_of(bytes: &[u8]) -> String {
        match BitLinear::from_safetensors_bytes(bytes) {
            Err(e @ Error::Safetensors(_)) => e.to_string(),
            other => panic!("expected a safetensors error, got {other:?}"),
        }
    }

    #[test]
    fn bad_tensors_are_named() {
        let weight = || (WEIGHT_HF, Dtype::U8, vec![1, 2], vec![0x55, 0x55]);
        let scale = || (SCALE, Dtype::F32, vec![1], 1.5f32.to_le_bytes().to_vec());
        // The well-formed baseline loads.
        let ok =
            BitLinear::from_safetensors_bytes(&custom(4, 2, &[weight(), scale()], &[])).unwrap();
        assert_eq!(ok.ternary().codes, [0; 8]);

        let wrong_dtype = (SCALE, Dtype::F16, vec![2], vec![0; 4]);
        let e = error_of(&custom(4, 2, &[weight(), wrong_dtype], &[]));
        assert!(e.contains("`weight_scale`") && e.contains("dtype"), "{e}");

        let e = error_of(&custom(
            4,
            2,
            &[(WEIGHT_HF, Dtype::I8, vec![1, 2], vec![0; 2]), scale()],
            &[],
        ));
        assert!(e.contains("`weight`") && e.contains("dtype"), "{e}");

        let e = error_of(&custom(
            4,
            2,
            &[(WEIGHT_HF, Dtype::U8, vec![2, 1], vec![0x55; 2]), scale()],
            &[],
        ));
        assert!(e.contains("`weight`") && e.contains("shape"), "{e}");

        let e = error_of(&custom(4, 2, &[weight()], &[]));
        assert!(e.contains("missing tensor `weight_scale`"), "{e}");

        let e = error_of(&custom(4, 2, &[scale()], &[]));
        assert!(e.contains("missing tensor"), "{e}");

        let bad_code = (WEIGHT_HF, Dtype::U8, vec![1, 2], vec![0x55, 0x57]);
        let e = error_of(&custom(4, 2, &[bad_code, scale()], &[]));
        assert!(e.contains("`weight`"), "{e}");

        let bad_trits = (WEIGHT_BASE3, Dtype::U8, vec![2], vec![0, 250]);
        let e = error_of(&custom(4, 2, &[bad_trits, scale()], &[]));
        assert!(e.contains("`weight_base3`"), "{e}");

        let bad_padding = (
            WEIGHT_WORDS,
            Dtype::U32,
            vec![3, 1],
            [0x5555_5555u32, 0x5555_5554, 0]
                .iter()
                .flat_map(|w| w.to_le_bytes())
                .collect(),
        );
        let e = error_of(&custom(3, 2, &[bad_padding, scale()], &[]));
        assert!(e.contains("`weight_words`"), "{e}");

        let bias = (BIAS, Dtype::F32, vec![3], vec![0; 12]);
        let e = error_of(&custom(4, 2, &[weight(), scale(), bias], &[]));
        assert!(e.contains("`bias`") && e.contains("shape"), "{e}");

        let zero_scale = (SCALE, Dtype::F32, vec![1], 0f32.to_le_bytes().to_vec());
        let e = error_of(&custom(4, 2, &[weight(), zero_scale], &[]));
        assert!(e.contains("scale"), "{e}");

        let e = error_of(&custom(
            4,
            2,
            &[weight(), scale()],
            &[("bitnet.granularity", "per_channel")],
        ));
        assert!(e.contains("granularity"), "{e}");

        let e = error_of(&custom(
            4,
            2,
            &[weight(), scale()],
            &[("bitnet.storage_format", "base3")],
        ));
        assert!(e.contains("storage_format"), "{e}");

        let e = error_of(&custom(
            4,
            2,
            &[weight(), scale(), ("extra", Dtype::U8, vec![1], vec![0])],
            &[],
        ));
        assert!(e.contains("`extra`"), "{e}");

        let no_meta = safetensors::serialize(
            [(
                SCALE,
                TensorView::new(Dtype::F32, vec![1], &[0, 0, 128, 63]).unwrap(),
            )],
            None,
        )
        .unwrap();
        assert!(
            error_of(&no_meta).contains("in_features")
                || error_of(&no_meta).contains("out_features")
        );
    }
}
