//! The whole transformer on the GPU against the CPU reference forward, on a tiny random model
//! with awkward sizes (hidden 40, head_dim 20, grouped-query attention), of every family.

use bitnet_wgpu::cpu;
use bitnet_wgpu::formats::hf;
use bitnet_wgpu::gpu::GpuContext;
use bitnet_wgpu::gpu::table::TableStorage;
use bitnet_wgpu::model::{
    self, DecodePath, Family, GpuModel, KvCache, Logits, ModelConfig, ModelWeights, Sampler,
    SamplingParams,
};
use half::f16;

/// Logit tolerance, relative to the largest logit: the GPU's float ops (rope's cos/sin,
/// attention's exp, summation orders) differ from the CPU's in the last bits, and an activation
/// that lands on the other side of a rounding boundary changes its int8 code by one.
pub const LOGIT_TOL: f32 = 2e-3;

/// The tables as the GPU stores them (f16), so that the reference loses nothing to storage;
/// scaled up so that logits spread enough for greedy choices to be clear.
fn f16_table(values: &[f32]) -> Vec<f32> {
    values
        .iter()
        .map(|&v| f16::from_f32(50.0 * v).to_f32())
        .collect()
}

/// A tiny random model of `family`.
pub fn tiny_model(seed: u64, tied: bool, family: Family) -> ModelWeights {
    let config = ModelConfig {
        vocab_size: 37,
        hidden_size: 40,
        intermediate_size: 56,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: 20,
        max_position_embeddings: 64,
        rope_theta: 10000.0,
        tie_word_embeddings: tied,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
        family,
        ..ModelConfig::bitnet_b158_2b4t()
    };
    let mut weights = model::synthetic(&config, seed);
    weights.embed_tokens = f16_table(&weights.embed_tokens);
    if !tied {
        weights.lm_head = Some(f16_table(&model::synthetic(&config, seed + 1).embed_tokens));
    }
    weights
}

fn assert_logits_close(gpu: &[f32], cpu: &[f32], what: &str) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: logit count");
    let scale = cpu.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        assert!(
            (g - c).abs() <= LOGIT_TOL * scale,
            "{what}: logit {i}: gpu {g} cpu {c} (scale {scale})"
        );
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Prompt logits (the GEMM path), then token-by-token decoding (the GEMV path) with the KV cache,
/// and greedy generation giving the same tokens, for tied and untied heads, in every family;
/// both decode paths give the same bits.
pub async fn gpu_model_matches_cpu(ctx: &GpuContext) {
    let cases = Family::ALL
        .into_iter()
        .flat_map(|family| [(11, true, family), (12, false, family)]);
    for (seed, tied, family) in cases {
        let weights = tiny_model(seed, tied, family);
        let case = format!("{family:?} seed {seed}");
        let prompt: Vec<u32> = vec![1, 5, 9, 30, 36, 0, 17, 22, 3, 8];
        let mut cache = KvCache::new(&weights.config);
        let cpu_prompt = model::forward(&weights, &prompt, &mut cache).expect("cpu forward");
        let mut gpu = GpuModel::new(ctx, &weights, 64, TableStorage::F16).expect("upload model");
        assert_eq!(
            GpuModel::required_bytes(&weights.config, 64, TableStorage::F16),
            gpu.weight_and_cache_bytes(),
            "the memory estimate is what the upload takes"
        );
        let gpu_prompt = gpu
            .forward(ctx, &prompt, Logits::All)
            .await
            .expect("gpu forward");
        assert_logits_close(&gpu_prompt, &cpu_prompt, &format!("{case}: prompt"));

        // Uploaded from the checkpoint's bytes a layer at a time: the same model, bit for bit.
        // 1bitLLM's models have no packed Hugging Face layout to write.
        match hf::config_json(&weights.config) {
            Ok(json) => {
                let bytes = hf::to_safetensors_bytes(&weights, &[]).expect("safetensors");
                let checkpoint = hf::Checkpoint::from_bytes(&json, &[&bytes]).expect("checkpoint");
                let mut streamed = GpuModel::new(ctx, &checkpoint, 64, TableStorage::F16)
                    .expect("upload checkpoint");
                let streamed_prompt = streamed
                    .forward(ctx, &prompt, Logits::All)
                    .await
                    .expect("gpu forward");
                assert_eq!(streamed_prompt, gpu_prompt, "{case}: from the checkpoint");
            }
            Err(e) => assert_eq!(family, Family::OneBitLlm, "{case}: {e}"),
        }

        let vocab = weights.config.vocab_size;
        let mut cpu_next = argmax(&cpu_prompt[cpu_prompt.len() - vocab..]);
        let mut gpu_next = argmax(&gpu_prompt[gpu_prompt.len() - vocab..]);
        let mut steps = Vec::new();
        for step in 0..12 {
            assert_eq!(gpu_next, cpu_next, "{case}: greedy token {step}");
            let c = model::forward(&weights, &[cpu_next], &mut cache).expect("cpu step");
            let g = gpu
                .forward(ctx, &[gpu_next], Logits::Last)
                .await
                .expect("gpu step");
            assert_logits_close(&g, &c, &format!("{case}: decode step {step}"));
            steps.push((gpu_next, g.clone()));
            cpu_next = argmax(&c);
            gpu_next = argmax(&g);
        }
        assert_eq!(gpu.len(), prompt.len() + 12);

        // Greedy on the GPU, each step submitted before the last token is read: the tokens
        // the host's argmax picks from the same logits.
        let first = cpu::argmax(&gpu_prompt[gpu_prompt.len() - vocab..]).expect("argmax");
        let mut expected = vec![first];
        expected.extend(steps.iter().map(|(_, l)| cpu::argmax(l).expect("argmax")));
        let mut piped = GpuModel::new(ctx, &weights, 64, TableStorage::F16).expect("upload model");
        let mut streamed = Vec::new();
        let chosen = piped
            .greedy(ctx, &prompt, expected.len(), vocab, |t| {
                streamed.push(t);
                true
            })
            .await
            .expect("greedy");
        assert_eq!(chosen, expected, "{case}: pipelined greedy");
        assert_eq!(streamed, expected, "{case}: streamed tokens");
        assert_eq!(piped.len(), prompt.len() + expected.len() - 1);
        // Stopping early leaves the last token unfed; feeding it goes on where the loop was.
        piped.reset();
        let mut seen = 0;
        let chosen = piped
            .greedy(ctx, &prompt, 10, vocab, |_| {
                seen += 1;
                seen < 3
            })
            .await
            .expect("greedy");
        assert_eq!(chosen, expected[..3], "{case}: stopped greedy");
        assert_eq!(piped.len(), prompt.len() + 2);
        let resumed = piped
            .forward(ctx, &[chosen[2]], Logits::Last)
            .await
            .expect("step");
        assert!(
            resumed
                .iter()
                .zip(&steps[2].1)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{case}: resuming after a stop"
        );
        // Only the allowed ids are chosen.
        piped.reset();
        let few = piped
            .greedy(ctx, &prompt, 4, 3, |_| true)
            .await
            .expect("greedy");
        assert!(few.iter().all(|&t| t < 3), "{few:?}");

        // The other decode path gives the same bits, where the adapter runs both; without the
        // fused kernels' workgroup memory (WebGPU's default 16 KiB), the model keeps to the
        // separate ones.
        let mut other = GpuModel::new(ctx, &weights, 64, TableStorage::F16).expect("upload model");
        let path = match other.decode_path() {
            DecodePath::Fused => DecodePath::Separate,
            DecodePath::Separate => DecodePath::Fused,
        };
        if path == DecodePath::Fused && !path.supported(ctx, &weights.config) {
            assert_eq!(other.decode_path(), DecodePath::Separate);
            assert!(
                other.set_decode_path(ctx, path).is_err(),
                "{case}: the fused path refused"
            );
        } else {
            other
                .set_decode_path(ctx, path)
                .expect("both paths run here");
            other
                .forward(ctx, &prompt, Logits::Last)
                .await
                .expect("prompt");
            for (step, (token, logits)) in steps.iter().enumerate() {
                let got = other
                    .forward(ctx, &[*token], Logits::Last)
                    .await
                    .expect("step");
                let same = got
                    .iter()
                    .zip(logits)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{case}: {path:?} decode step {step} differs");
            }
        }

        // A whole sequence at once equals prompt + cached steps, on the GPU alone.
        let mut fresh = GpuModel::new(ctx, &weights, 64, TableStorage::F16).expect("upload model");
        let all: Vec<u32> = prompt.iter().copied().chain([4, 6]).collect();
        let whole = fresh.forward(ctx, &all, Logits::Last).await.expect("whole");
        gpu.reset();
        gpu.forward(ctx, &prompt, Logits::Last)
            .await
            .expect("prompt");
        gpu.forward(ctx, &[4], Logits::Last).await.expect("step");
        let stepped = gpu.forward(ctx, &[6], Logits::Last).await.expect("step");
        assert_logits_close(&stepped, &whole, &format!("{case}: cache vs recompute"));

        assert!(
            gpu.forward(ctx, &[37], Logits::Last).await.is_err(),
            "token out of vocab"
        );
        assert!(
            gpu.forward(ctx, &[], Logits::Last).await.is_err(),
            "no tokens"
        );
        let too_many = vec![0u32; 64];
        assert!(
            gpu.forward(ctx, &too_many, Logits::Last).await.is_err(),
            "past the context"
        );
        assert_eq!(
            gpu.len(),
            prompt.len() + 2,
            "errors leave the cache as it was"
        );
    }
}

/// A model bigger than the adapter's memory is refused before anything is uploaded, with what it
/// needs and what the adapter has; Vulkan adapters always report their memory.
pub async fn too_big_model_is_refused(ctx: &GpuContext) {
    let mut config = ModelConfig::bitnet_b158_2b4t();
    config.num_hidden_layers = 1_000_000;
    let fits = GpuModel::check_fits(ctx, &config, 4096, TableStorage::F16);
    match ctx.capabilities().device_memory {
        Some(bytes) => {
            let message = fits.expect_err("13 TB fits no adapter").to_string();
            let has = format!("has {:.2} GB", bytes as f64 / 1e9);
            assert!(
                message.contains("needs") && message.contains(&has),
                "{message}"
            );
        }
        None => {
            assert_ne!(ctx.adapter_info().backend, wgpu::Backend::Vulkan);
            assert!(fits.is_ok(), "without a figure nothing is refused early");
        }
    }
    let tiny = tiny_model(1, true, Family::BitNet);
    GpuModel::check_fits(ctx, &tiny.config, 64, TableStorage::F16).expect("a tiny model fits");
}

/// `GpuModel::nll` over a window of three logit blocks: `cpu::nll` of the GPU's own logits (f32
/// against f64), and of the CPU reference's within the logit tolerance.
pub async fn gpu_nll_matches_cpu(ctx: &GpuContext) {
    let mut weights = tiny_model(13, false, Family::BitNet);
    weights.config.max_position_embeddings = 160;
    let tokens: Vec<u32> = (0..150).map(|i| (i * 7 + 3) % 37).collect();
    let vocab = weights.config.vocab_size;
    let mut gpu = GpuModel::new(ctx, &weights, 160, TableStorage::F16).expect("upload model");
    let got = gpu.nll(ctx, &tokens).await.expect("gpu nll");
    assert_eq!(got.len(), tokens.len() - 1);
    assert_eq!(gpu.len(), tokens.len());
    gpu.reset();
    let logits = gpu
        .forward(ctx, &tokens, Logits::All)
        .await
        .expect("gpu forward");
    let mut cache = KvCache::new(&weights.config);
    let cpu_logits = model::forward(&weights, &tokens, &mut cache).expect("cpu forward");
    for (i, &g) in got.iter().enumerate() {
        let row = |l: &[f32]| l[i * vocab..(i + 1) * vocab].to_vec();
        let same_logits = cpu::nll(&row(&logits), tokens[i + 1]);
        assert!(
            (f64::from(g) - same_logits).abs() <= 1e-4 * (1.0 + same_logits.abs()),
            "token {i}: gpu {g}, cpu::nll of the same logits {same_logits}"
        );
        let scale = row(&cpu_logits).iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let reference = cpu::nll(&row(&cpu_logits), tokens[i + 1]);
        assert!(
            (f64::from(g) - reference).abs() <= f64::from(2.0 * LOGIT_TOL * scale),
            "token {i}: gpu {g}, cpu reference {reference}"
        );
    }
}

/// Sampled decoding on the GPU, each step submitted before the last token is read: the tokens
/// `Sampler` picks on the host from the same logits with the same seed, at several settings, and
/// only among the allowed ids.
pub async fn gpu_sampled_decoding_matches_host(ctx: &GpuContext) {
    let weights = tiny_model(17, true, Family::BitNet);
    let vocab = weights.config.vocab_size;
    let prompt = [1, 5, 9, 30];
    let mut gpu = GpuModel::new(ctx, &weights, 64, TableStorage::F16).expect("upload model");
    // The tiny model's logits are steep (its tables are scaled up): hot temperatures spread them.
    let settings = [
        (30.0, 0, 1.0, vocab),
        (20.0, 0, 0.9, vocab),
        (40.0, 5, 0.95, 20),
    ];
    for (seed, (temperature, top_k, top_p, allowed)) in settings.into_iter().enumerate() {
        let params = SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: seed as u64,
        };
        let what = format!("{params:?}, {allowed} allowed");
        let mut host = Sampler::new(params).expect("sampler");
        gpu.reset();
        let mut logits = gpu
            .forward(ctx, &prompt, Logits::Last)
            .await
            .expect("prompt");
        let mut expected = Vec::new();
        for _ in 0..24 {
            logits[allowed..].fill(f32::NEG_INFINITY);
            let token = host.sample(&logits).expect("host sample");
            expected.push(token);
            logits = gpu
                .forward(ctx, &[token], Logits::Last)
                .await
                .expect("step");
        }
        gpu.reset();
        let mut sampler = Sampler::new(params).expect("sampler");
        let chosen = gpu
            .sample(ctx, &prompt, expected.len(), allowed, &mut sampler, |_| {
                true
            })
            .await
            .expect("sample");
        assert_eq!(chosen, expected, "{what}");
        let distinct: std::collections::BTreeSet<_> = chosen.iter().collect();
        assert!(
            distinct.len() > 3,
            "{what}: too few distinct tokens to tell: {chosen:?}"
        );
        assert_eq!(gpu.len(), prompt.len() + expected.len() - 1);
    }
}

/// `Logits::All` over more tokens than one storage binding holds the logits of (at 2B4T's
/// vocabulary of 128256, 262 tokens under WebGPU's default 128 MiB), made in blocks that each
/// fit. `ctx` offers a small binding limit (see [`LOGITS_BINDING_LIMIT`]), so that the test stays
/// cheap: the lm_head of 300 tokens at 128256 takes most of a minute on lavapipe.
pub async fn gpu_logits_all_past_the_binding_limit(ctx: &GpuContext) {
    let config = ModelConfig {
        vocab_size: 5000,
        hidden_size: 8,
        intermediate_size: 8,
        num_hidden_layers: 1,
        num_attention_heads: 1,
        num_key_value_heads: 1,
        head_dim: 8,
        max_position_embeddings: 150,
        ..ModelConfig::bitnet_b158_2b4t()
    };
    let mut weights = model::synthetic(&config, 14);
    weights.embed_tokens = f16_table(&weights.embed_tokens);
    let tokens: Vec<u32> = (0..150).map(|i| (i * 7919 + 3) % 5000).collect();
    let vocab = config.vocab_size;
    assert!(
        (tokens.len() * vocab * 4) as u64 > ctx.capabilities().max_storage_binding,
        "the logits must not fit one binding"
    );
    let mut gpu = GpuModel::new(ctx, &weights, 150, TableStorage::F16).expect("upload model");
    let got = gpu
        .forward(ctx, &tokens, Logits::All)
        .await
        .expect("gpu forward");
    let mut cache = KvCache::new(&weights.config);
    let want = model::forward(&weights, &tokens, &mut cache).expect("cpu forward");
    assert_eq!(got.len(), want.len(), "logit count");
    for (t, (g, c)) in got.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
        assert_logits_close(g, c, &format!("token {t}"));
    }
    assert_eq!(gpu.len(), tokens.len());
}

/// The storage binding limit for [`gpu_logits_all_past_the_binding_limit`]: 2 MiB, over the
/// 1.3 MB of one block of logits and under the 3 MB of them all (three blocks).
pub const LOGITS_BINDING_LIMIT: u64 = 2 << 20;
