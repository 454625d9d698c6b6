//! What callers run: a forward with the logits they ask for, the likelihood of a text, greedy
//! and sampled decoding with the token chosen on the GPU.

use super::*;

impl GpuModel {
    /// Runs `tokens` after the cached positions and returns their logits (see [`Logits`]).
    /// Errors leave the cache as it was.
    pub async fn forward(
        &mut self,
        ctx: &GpuContext,
        tokens: &[u32],
        which: Logits,
    ) -> Result<Vec<f32>> {
        self.check_tokens(tokens)?;
        let n = tokens.len();
        let logit_rows = match which {
            Logits::All => n.min(NLL_BLOCK),
            Logits::Last => 1,
        };
        self.scratch(ctx, n, logit_rows)?;
        let s = self.scratch.as_ref().expect("scratch was just made");
        ctx.queue
            .write_buffer(&s.tokens, 0, bytemuck::cast_slice(tokens));
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        {
            let pass = &mut encoder.begin_compute_pass(&Default::default());
            ctx.profile_start(pass);
            self.record_step(ctx, pass, &s.tokens, n, Some(which))?;
        }
        ctx.queue.submit([encoder.finish()]);
        let vocab = self.config.vocab_size;
        let mut logits = ctx.read(&s.logits, logit_rows * vocab).await?;
        if which == Logits::All {
            for first in (NLL_BLOCK..n).step_by(NLL_BLOCK) {
                let rows = (n - first).min(NLL_BLOCK);
                let mut encoder = ctx.device.create_command_encoder(&Default::default());
                self.record_logits(
                    ctx,
                    &mut encoder.begin_compute_pass(&Default::default()),
                    first,
                    rows,
                )?;
                ctx.queue.submit([encoder.finish()]);
                logits.extend(ctx.read::<f32>(&s.logits, rows * vocab).await?);
            }
        }
        self.len += n;
        Ok(logits)
    }

    /// Runs `tokens` after the cached positions and returns, for each of them but the last,
    /// the negative log-likelihood of the token that follows it (`cpu::nll` of its logits, in
    /// f32): what perplexity sums. Only those numbers are read back, and the logits are made
    /// [`NLL_BLOCK`] rows at a time, so a long window needs no `[tokens, vocab]` buffer.
    pub async fn nll(&mut self, ctx: &GpuContext, tokens: &[u32]) -> Result<Vec<f32>> {
        self.check_tokens(tokens)?;
        let n = tokens.len();
        let scored = n - 1;
        self.scratch(ctx, n, scored.clamp(1, NLL_BLOCK))?;
        let s = self.scratch.as_ref().expect("scratch was just made");
        ctx.queue
            .write_buffer(&s.tokens, 0, bytemuck::cast_slice(tokens));
        let vocab = self.config.vocab_size;
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        {
            let pass = &mut encoder.begin_compute_pass(&Default::default());
            ctx.profile_start(pass);
            self.record_step(ctx, pass, &s.tokens, n, None)?;
            for first in (0..scored).step_by(NLL_BLOCK) {
                let rows = (scored - first).min(NLL_BLOCK);
                self.record_logits(ctx, pass, first, rows)?;
                gpu::nll::record(
                    ctx,
                    pass,
                    &s.logits,
                    rows,
                    vocab,
                    &s.tokens,
                    first + 1,
                    &s.nll,
                    first,
                )?;
            }
        }
        ctx.queue.submit([encoder.finish()]);
        let nll = ctx.read(&s.nll, scored).await?;
        self.len += n;
        Ok(nll)
    }

    /// Greedy generation with each choice made on the GPU (`cpu::argmax` over the ids below
    /// `allowed`): runs `tokens` after the cached positions, then feeds each chosen token back,
    /// until `max_new` tokens are chosen, `on_token` returns false or the cache is full. Only
    /// the token is read back, and each step is submitted before the previous one's token is
    /// read, so the host's recording and readback overlap the GPU's work. As with
    /// [`GpuModel::forward`] and sampling, the last token chosen is not fed: the cache then holds
    /// `tokens` and every chosen token but the last. Returns the chosen tokens. The same tokens
    /// as [`GpuModel::forward`] with `cpu::argmax` on the host. After an error (logits with a NaN
    /// or `+inf`, say) the cache holds the positions fed before it.
    pub async fn greedy(
        &mut self,
        ctx: &GpuContext,
        tokens: &[u32],
        max_new: usize,
        allowed: usize,
        on_token: impl FnMut(u32) -> bool,
    ) -> Result<Vec<u32>> {
        self.decode(ctx, tokens, max_new, allowed, None, on_token)
            .await
    }

    /// As [`GpuModel::greedy`], with each token sampled on the GPU by `sampler`'s rules
    /// (`cpu::sample` over the ids below `allowed`, `gpu::sampling`), one of its draws per token:
    /// the tokens [`Sampler::sample`] picks from [`GpuModel::forward`]'s logits, but where a draw
    /// falls within float error of a candidate's edge. A greedy sampler decodes as `greedy` does.
    pub async fn sample(
        &mut self,
        ctx: &GpuContext,
        tokens: &[u32],
        max_new: usize,
        allowed: usize,
        sampler: &mut Sampler,
        on_token: impl FnMut(u32) -> bool,
    ) -> Result<Vec<u32>> {
        let sampler = (sampler.params().temperature > 0.0).then_some(sampler);
        self.decode(ctx, tokens, max_new, allowed, sampler, on_token)
            .await
    }

    async fn decode(
        &mut self,
        ctx: &GpuContext,
        tokens: &[u32],
        max_new: usize,
        allowed: usize,
        mut sampler: Option<&mut Sampler>,
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<Vec<u32>> {
        self.check_tokens(tokens)?;
        if !(1..=self.config.vocab_size).contains(&allowed) {
            return Err(Error::invalid(
                "allowed tokens",
                format!("{allowed}; the vocabulary has {}", self.config.vocab_size),
            ));
        }
        let mut chosen = Vec::new();
        if max_new == 0 {
            return Ok(chosen);
        }
        if self.choice.is_none() {
            let pair = |label: &str, bytes: u64| -> Result<[wgpu::Buffer; 2]> {
                Ok([ctx.storage(label, bytes)?, ctx.storage(label, bytes)?])
            };
            self.choice = Some(Choice {
                result: ctx.storage("token choice", argmax::RESULT_BYTES)?,
                staging: [
                    ctx.staging("token choice readback", argmax::RESULT_BYTES),
                    ctx.staging("token choice readback", argmax::RESULT_BYTES),
                ],
                draws: pair("sampling draw", sampling::DRAW_BYTES)?,
            });
        }
        self.scratch(ctx, tokens.len(), 1)?;
        let s = self.scratch.as_ref().expect("scratch was just made");
        ctx.queue
            .write_buffer(&s.tokens, 0, bytemuck::cast_slice(tokens));
        let prompt_tokens = s.tokens.clone();
        let mut in_flight = self.submit_choice(
            ctx,
            &prompt_tokens,
            tokens.len(),
            allowed,
            sampler.as_deref_mut(),
            0,
        )?;
        self.len += tokens.len();
        loop {
            let step = chosen.len();
            // The next step embeds this step's token straight from `result`.
            let next = if step + 1 < max_new && self.len < self.capacity {
                self.scratch(ctx, 1, 1)?;
                let result = self.choice.as_ref().expect("made above").result.clone();
                let slot = (step + 1) % 2;
                Some(self.submit_choice(ctx, &result, 1, allowed, sampler.as_deref_mut(), slot)?)
            } else {
                None
            };
            let staging = &self.choice.as_ref().expect("made above").staging[step % 2];
            let words: Vec<u32> = ctx.read_staging(staging, in_flight, 4).await?;
            let token = argmax::interpret([words[0], words[1], words[2], words[3]])?;
            chosen.push(token);
            let go_on = on_token(token);
            match next {
                // That step fed this token: it is in the cache now.
                Some(index) if go_on => {
                    self.len += 1;
                    in_flight = index;
                }
                _ => return Ok(chosen),
            }
        }
    }

    /// Submits one step of the `n` tokens in `tokens` at the cached positions, its choice (the
    /// argmax, or a sample with the sampler's next draw, written to draw buffer `slot`) into the
    /// choice buffer and a copy of that into staging buffer `slot`.
    pub(super) fn submit_choice(
        &self,
        ctx: &GpuContext,
        tokens: &wgpu::Buffer,
        n: usize,
        allowed: usize,
        sampler: Option<&mut Sampler>,
        slot: usize,
    ) -> Result<wgpu::SubmissionIndex> {
        let choice = self.choice.as_ref().expect("the caller made it");
        let s = self.scratch.as_ref().expect("the caller sized the scratch");
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        {
            let pass = &mut encoder.begin_compute_pass(&Default::default());
            ctx.profile_start(pass);
            self.record_step(ctx, pass, tokens, n, Some(Logits::Last))?;
            match sampler {
                Some(sampler) => {
                    // Two draw buffers: the step in flight keeps its own.
                    let draw = &choice.draws[slot];
                    let word = sampling::draw_word(sampler.next_draw());
                    ctx.queue.write_buffer(draw, 0, bytemuck::bytes_of(&word));
                    let params = *sampler.params();
                    sampling::record(ctx, pass, &s.logits, allowed, &params, draw, &choice.result)?;
                }
                None => argmax::record(ctx, pass, &s.logits, allowed, &choice.result)?,
            }
        }
        encoder.copy_buffer_to_buffer(
            &choice.result,
            0,
            &choice.staging[slot],
            0,
            argmax::RESULT_BYTES,
        );
        Ok(ctx.queue.submit([encoder.finish()]))
    }

    pub(super) fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        self.config.check_tokens(tokens)?;
        if tokens.len() > self.capacity - self.len {
            return Err(Error::invalid(
                "kv cache",
                format!(
                    "{} cached + {} new positions exceed the context of {}",
                    self.len,
                    tokens.len(),
                    self.capacity
                ),
            ));
        }
        Ok(())
    }
}
