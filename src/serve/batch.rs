//! Continuous batching: one thread owns the engine and runs every active sequence one step at a
//! time in a single forward (the CPU engine's [`CpuEngine::forward_batch`]), new requests joining
//! between steps and finished or abandoned ones leaving.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use crate::Result;
use crate::model::{CpuEngine, Engine, KvCache, Logits, Sampler};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// Prompt tokens a sequence feeds per step: a long prompt joining the batch is processed over
/// several steps, so the sequences already decoding keep getting tokens while it is read.
const PREFILL_CHUNK: usize = 256;

/// One request for the batch: the prompt's ids and how to continue them.
pub(crate) struct Job {
    /// The request's id, for the log.
    pub id: String,
    pub prompt_ids: Vec<u32>,
    /// Ids that end the answer (the tokenizer's eos, a chat template's end of turn); not shown.
    pub stop_ids: Vec<u32>,
    /// Texts that end the answer; the text stops before them.
    pub stop_texts: Vec<String>,
    pub max_tokens: usize,
    pub sampler: Sampler,
    /// Where the answer goes; once its receiver is gone the sequence is dropped.
    pub events: UnboundedSender<Event>,
}

/// What a job reports, in order: text pieces, then `Done` or `Failed`.
#[derive(Debug)]
pub(crate) enum Event {
    Text(String),
    Done {
        finish: Finish,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(String),
}

/// Why an answer ended, as OpenAI's `finish_reason` says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Finish {
    /// An end token or a stop text.
    Stop,
    /// `max_tokens` or the context.
    Length,
}

impl Finish {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// The engine a batch runs on: the CPU engine decodes many sequences in one forward, each with
/// its own cache; another engine (the GPU's, whose cache is on the device) runs one sequence at
/// a time.
pub(crate) enum Backend {
    Batched(Box<CpuEngine>),
    Single(Engine),
}

impl Backend {
    pub(crate) fn new(engine: Engine) -> Self {
        match engine {
            Engine::Cpu(cpu) => Backend::Batched(cpu),
            other => Backend::Single(other),
        }
    }

    /// The most sequences decoded together given the `wanted` number.
    fn batch_limit(&self, wanted: usize) -> usize {
        match self {
            Backend::Batched(_) => wanted.max(1),
            Backend::Single(_) => 1,
        }
    }

    fn vocab(&self) -> usize {
        match self {
            Backend::Batched(e) => e.config().vocab_size,
            Backend::Single(e) => e.config().vocab_size,
        }
    }

    /// The cache for a new sequence of `prompt` and how many of its ids it holds already:
    /// the longest start it shares with a finished sequence's, else a new one.
    fn cache_for(&self, prompt: &[u32], prefixes: &mut Prefixes) -> (Option<KvCache>, usize) {
        match self {
            Backend::Batched(e) => match prefixes.take(prompt) {
                Some((cache, reused)) => (Some(cache), reused),
                None => (Some(e.new_cache()), 0),
            },
            Backend::Single(_) => (None, 0),
        }
    }

    /// One step of `sequences`, each with its next tokens: the logits of each one's last token.
    fn step(&mut self, sequences: &mut [Sequence<'_>]) -> Result<Vec<f32>> {
        match self {
            Backend::Batched(engine) => {
                let mut work: Vec<(&mut KvCache, &[u32])> = sequences
                    .iter_mut()
                    .map(|s| {
                        let next = next_tokens(&s.job.prompt_ids, s.fed, &s.generated);
                        (
                            s.cache.as_mut().expect("a batched sequence has a cache"),
                            next,
                        )
                    })
                    .collect();
                engine.forward_batch(&mut work)
            }
            Backend::Single(engine) => {
                let [sequence] = sequences else {
                    unreachable!("a single-sequence engine runs one sequence at a time")
                };
                if sequence.fed == 0 {
                    engine.reset();
                }
                // `Logits::Last` gives at least the last row: keep only it.
                let vocab = engine.config().vocab_size;
                let mut logits =
                    pollster::block_on(engine.forward(sequence.next_tokens(), Logits::Last))?;
                Ok(logits.split_off(logits.len() - vocab))
            }
        }
    }
}

#[derive(Clone, Copy)]
struct Limits {
    /// Sequences decoded together.
    batch: usize,
    /// Positions of a sequence.
    context: usize,
}

/// The handle the HTTP side submits jobs through.
pub(crate) struct Batcher {
    jobs: Option<mpsc::Sender<Job>>,
    /// Jobs submitted and not finished: queued or decoding.
    load: Arc<AtomicUsize>,
    capacity: usize,
    thread: Option<JoinHandle<()>>,
}

impl Batcher {
    /// Starts the thread that runs `backend`: at most `max_batch` sequences together (one on a
    /// backend that cannot batch), up to `max_queue` more waiting, each answer ending at
    /// `context` positions.
    pub(crate) fn start(
        backend: Backend,
        tokenizer: Arc<Tokenizer>,
        max_batch: usize,
        max_queue: usize,
        context: usize,
    ) -> Self {
        let (jobs, receiver) = mpsc::channel();
        let load = Arc::new(AtomicUsize::new(0));
        let limits = Limits {
            batch: backend.batch_limit(max_batch),
            context,
        };
        let thread_load = load.clone();
        let thread = std::thread::spawn(move || {
            run(backend, &tokenizer, limits, receiver, &thread_load);
        });
        Batcher {
            jobs: Some(jobs),
            load,
            capacity: limits.batch + max_queue,
            thread: Some(thread),
        }
    }

    /// Queues `job`; `false` when the queue is full.
    pub(crate) fn submit(&self, job: Job) -> bool {
        let taken = self
            .load
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.capacity).then_some(n + 1)
            });
        if taken.is_err() {
            return false;
        }
        let jobs = self.jobs.as_ref().expect("jobs are taken until shutdown");
        let sent = jobs.send(job).is_ok();
        if !sent {
            self.load.fetch_sub(1, Ordering::SeqCst);
        }
        sent
    }

    /// Jobs queued or decoding.
    pub(crate) fn load(&self) -> usize {
        self.load.load(Ordering::SeqCst)
    }
}

impl Drop for Batcher {
    /// Lets the thread finish the jobs it has, then waits for it.
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A job being decoded.
struct Sequence<'t> {
    job: Job,
    cache: Option<KvCache>,
    /// Ids of the prompt and the answer given to the engine so far.
    fed: usize,
    /// Of those, the ones an earlier request's cache held.
    reused: usize,
    generated: Vec<u32>,
    decoder: StreamDecoder<'t>,
    /// The answer's text so far, and how much of it was sent (the rest may start a stop text).
    text: String,
    sent: usize,
    started: Instant,
    first_token: Option<Duration>,
    /// The most sequences a step of this one ran together.
    largest_batch: usize,
}

impl<'t> Sequence<'t> {
    /// The sequence of `job`, continuing `cache` (on a backend that batches) whose first
    /// `reused` positions hold the start of its prompt.
    fn new(job: Job, cache: Option<KvCache>, reused: usize, tokenizer: &'t Tokenizer) -> Self {
        Sequence {
            cache,
            fed: reused,
            reused,
            generated: Vec::new(),
            decoder: tokenizer.stream_decoder(),
            text: String::new(),
            sent: 0,
            started: Instant::now(),
            first_token: None,
            largest_batch: 0,
            job,
        }
    }

    fn next_tokens(&self) -> &[u32] {
        next_tokens(&self.job.prompt_ids, self.fed, &self.generated)
    }

    /// Takes the step's logits of this sequence's last fed token: chooses the next token once
    /// the prompt is in (among the first `allowed` ids), streams its text. Returns why the
    /// answer ended, if it did: a stop, `max_tokens`, or `context` positions fed.
    fn advance(
        &mut self,
        logits: &mut [f32],
        allowed: usize,
        context: usize,
    ) -> Result<Option<Finish>> {
        self.fed += self.next_tokens().len();
        if self.fed < self.job.prompt_ids.len() {
            return Ok(None);
        }
        logits[allowed..].fill(f32::NEG_INFINITY);
        let id = self.job.sampler.sample(logits)?;
        self.first_token
            .get_or_insert_with(|| self.started.elapsed());
        self.generated.push(id);
        if self.job.stop_ids.contains(&id) {
            self.text += &self.decoder.finish()?;
            return Ok(Some(self.finish(Finish::Stop)));
        }
        self.text += &self.decoder.step(id)?;
        if let Some(end) = self.stop_text_at() {
            self.text.truncate(end);
            return Ok(Some(self.finish(Finish::Stop)));
        }
        if self.generated.len() >= self.job.max_tokens || self.fed >= context {
            self.text += &self.decoder.finish()?;
            return Ok(Some(self.finish(Finish::Length)));
        }
        // Text that may be the start of a stop text waits for the tokens after it.
        let held = self.stop_text_start();
        self.send_text(held);
        Ok(None)
    }

    /// Where the first stop text starts in the answer, if one is there.
    fn stop_text_at(&self) -> Option<usize> {
        let longest = self.job.stop_texts.iter().map(String::len).max()?;
        let mut from = self.sent.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        self.job
            .stop_texts
            .iter()
            .filter_map(|stop| self.text[from..].find(stop.as_str()).map(|at| from + at))
            .min()
    }

    /// The start of the longest end of the answer that begins a stop text (the text's length
    /// when none does).
    fn stop_text_start(&self) -> usize {
        let text = &self.text;
        (self.sent..text.len())
            .filter(|&at| text.is_char_boundary(at))
            .find(|&at| {
                let tail = &text[at..];
                self.job
                    .stop_texts
                    .iter()
                    .any(|stop| stop.starts_with(tail))
            })
            .unwrap_or(text.len())
    }

    fn send_text(&mut self, upto: usize) {
        if upto > self.sent {
            let piece = self.text[self.sent..upto].to_string();
            self.sent = upto;
            let _ = self.job.events.send(Event::Text(piece));
        }
    }

    fn finish(&mut self, finish: Finish) -> Finish {
        self.send_text(self.text.len());
        let _ = self.job.events.send(Event::Done {
            finish,
            prompt_tokens: self.job.prompt_ids.len(),
            completion_tokens: self.generated.len(),
        });
        finish
    }

    /// The request's log line.
    fn log(&self, how: &str) {
        let first = self
            .first_token
            .map_or("-".into(), |t| format!("{} ms", t.as_millis()));
        eprintln!(
            "{} {how}: {} prompt ({} reused) + {} new tokens in {} ms (first token {first}, \
             batches of up to {})",
            self.job.id,
            self.job.prompt_ids.len(),
            self.reused,
            self.generated.len(),
            self.started.elapsed().as_millis(),
            self.largest_batch
        );
    }
}

/// The ids a sequence's next step feeds, `fed` of its prompt and answer being in: a part of the
/// prompt, or the last new token.
fn next_tokens<'a>(prompt: &'a [u32], fed: usize, generated: &'a [u32]) -> &'a [u32] {
    if fed < prompt.len() {
        &prompt[fed..prompt.len().min(fed + PREFILL_CHUNK)]
    } else {
        std::slice::from_ref(generated.last().expect("fed past the prompt"))
    }
}

/// The batching loop: until every sender is gone and nothing is left to decode. Each answer
/// ends at `context` positions.
fn run(
    mut backend: Backend,
    tokenizer: &Tokenizer,
    limits: Limits,
    jobs: mpsc::Receiver<Job>,
    load: &AtomicUsize,
) {
    let vocab = backend.vocab();
    let allowed = tokenizer.vocab_size().min(vocab);
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut active: Vec<Sequence<'_>> = Vec::new();
    let mut open = true;
    let mut prefixes = Prefixes {
        kept: VecDeque::new(),
        limit: limits.context,
    };
    loop {
        if open && active.is_empty() && waiting.is_empty() {
            match jobs.recv() {
                Ok(job) => waiting.push_back(job),
                Err(mpsc::RecvError) => open = false,
            }
        }
        while open {
            match jobs.try_recv() {
                Ok(job) => waiting.push_back(job),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => open = false,
            }
        }
        // Requests whose client left free their place before the step.
        waiting.retain(|job| {
            let keep = !job.events.is_closed();
            if !keep {
                eprintln!("{} cancelled while waiting", job.id);
                load.fetch_sub(1, Ordering::SeqCst);
            }
            keep
        });
        for s in active.extract_if(.., |s| s.job.events.is_closed()) {
            leave(s, "cancelled", load, &mut prefixes);
        }
        while active.len() < limits.batch {
            let Some(job) = waiting.pop_front() else {
                break;
            };
            let (cache, reused) = backend.cache_for(&job.prompt_ids, &mut prefixes);
            active.push(Sequence::new(job, cache, reused, tokenizer));
        }
        if active.is_empty() {
            if !open {
                return;
            }
            continue;
        }
        let batch = active.len();
        for s in &mut active {
            s.largest_batch = s.largest_batch.max(batch);
        }
        match backend.step(&mut active) {
            Ok(mut logits) => {
                let mut ended = Vec::new();
                for (i, (s, row)) in active
                    .iter_mut()
                    .zip(logits.chunks_exact_mut(vocab))
                    .enumerate()
                {
                    match s.advance(row, allowed, limits.context) {
                        Ok(None) => {}
                        Ok(Some(finish)) => ended.push((i, finish.as_str())),
                        Err(e) => {
                            let _ = s.job.events.send(Event::Failed(e.to_string()));
                            ended.push((i, "failed"));
                        }
                    }
                }
                for (i, how) in ended.into_iter().rev() {
                    leave(active.remove(i), how, load, &mut prefixes);
                }
            }
            Err(e) => {
                for s in active.drain(..) {
                    let _ = s.job.events.send(Event::Failed(e.to_string()));
                    leave(s, "failed", load, &mut prefixes);
                }
            }
        }
    }
}

/// A sequence that ends (finished, failed, abandoned): its log line, its place freed, its
/// cache kept for a request that starts the same way.
fn leave(s: Sequence<'_>, how: &str, load: &AtomicUsize, prefixes: &mut Prefixes) {
    s.log(how);
    load.fetch_sub(1, Ordering::SeqCst);
    if let Some(cache) = s.cache {
        let ids = s.job.prompt_ids.iter().chain(&s.generated);
        prefixes.keep(ids.copied().take(cache.len()).collect(), cache);
    }
}

/// The caches of finished sequences with the ids they hold, for requests that start the same
/// way (a chat client sends the whole conversation every turn: only the new turn is then
/// processed): at most `limit` positions in all, the oldest dropped first.
struct Prefixes {
    kept: VecDeque<(Vec<u32>, KvCache)>,
    limit: usize,
}

impl Prefixes {
    fn keep(&mut self, ids: Vec<u32>, cache: KvCache) {
        self.kept.push_back((ids, cache));
        let mut total: usize = self.kept.iter().map(|(ids, _)| ids.len()).sum();
        while total > self.limit {
            let (ids, _) = self.kept.pop_front().expect("a total over the limit");
            total -= ids.len();
        }
    }

    /// The kept cache sharing the longest start with `prompt`, cut to that start (all of the
    /// prompt but its last id at most: its logits choose the first new token), and that length;
    /// `None` when no cache shares a first id.
    fn take(&mut self, prompt: &[u32]) -> Option<(KvCache, usize)> {
        let shared = |ids: &[u32]| {
            let same = ids.iter().zip(prompt).take_while(|(a, b)| a == b).count();
            same.min(prompt.len().saturating_sub(1))
        };
        let (best, len) = self
            .kept
            .iter()
            .enumerate()
            .map(|(i, (ids, _))| (i, shared(ids)))
            .max_by_key(|&(i, len)| (len, i))?;
        if len == 0 {
            return None;
        }
        let (_, mut cache) = self.kept.remove(best).expect("an index of kept");
        cache.truncate(len);
        Some((cache, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;

    #[test]
    fn prefixes_give_the_longest_shared_start_within_their_limit() {
        let cache = || KvCache::new(&ModelConfig::bitnet_b158_2b4t());
        let mut prefixes = Prefixes {
            kept: VecDeque::new(),
            limit: 10,
        };
        prefixes.keep(vec![1, 2, 3], cache());
        prefixes.keep(vec![1, 2, 3, 4, 5], cache());
        prefixes.keep(vec![7, 8], cache());
        assert_eq!(prefixes.take(&[9, 1]).map(|(_, n)| n), None);
        // All of the prompt but its last id, from the longest match.
        assert_eq!(prefixes.take(&[1, 2, 3, 4]).map(|(_, n)| n), Some(3));
        assert_eq!(prefixes.kept.len(), 2);
        assert_eq!(prefixes.take(&[1, 2, 3, 9, 9]).map(|(_, n)| n), Some(3));
        assert_eq!(prefixes.take(&[7]), None);
        // Past the limit of positions, the oldest go.
        prefixes.keep(vec![5; 6], cache());
        prefixes.keep(vec![6; 6], cache());
        let kept: Vec<u32> = prefixes.kept.iter().map(|(ids, _)| ids[0]).collect();
        assert_eq!(kept, [6]);
    }
}
