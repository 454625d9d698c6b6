use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::gpu::profiler::{KernelTime, Profiler};
use crate::gpu::shaders::{Kernel, ShaderVariant};
use crate::{Error, Result};

/// What an adapter can do that matters to the kernels here.
#[derive(Clone, Debug, PartialEq)]
pub struct Capabilities {
    /// Subgroup operations (used for exact integer reductions).
    pub subgroups: bool,
    /// Smallest and largest subgroup size the adapter reports.
    pub subgroup_size: (u32, u32),
    /// The adapter offers 16-bit float arithmetic in shaders.
    pub shader_f16: bool,
    /// WGSL `packed_4x8_integer_dot_product` (`dot4I8Packed`).
    pub dot4: bool,
    /// Largest storage buffer binding, in bytes.
    pub max_storage_binding: u64,
    /// Largest buffer, in bytes.
    pub max_buffer: u64,
    /// Largest number of workgroups along one dispatch dimension.
    pub max_workgroups_per_dimension: u32,
    /// Workgroup memory one workgroup may use, in bytes.
    pub max_workgroup_memory: u32,
    /// The adapter's own memory in bytes, where the backend tells (Vulkan: its device-local
    /// heaps); WebGPU, Metal, DX12 and GL do not.
    pub device_memory: Option<u64>,
}

impl Capabilities {
    fn of(adapter: &wgpu::Adapter, limits: &wgpu::Limits, instance: &wgpu::Instance) -> Self {
        let features = adapter.features();
        let info = adapter.get_info();
        Capabilities {
            subgroups: features.contains(wgpu::Features::SUBGROUP),
            subgroup_size: (info.subgroup_min_size, info.subgroup_max_size),
            shader_f16: features.contains(wgpu::Features::SHADER_F16),
            dot4: instance
                .wgsl_language_features()
                .contains(wgpu::WgslLanguageFeatures::Packed4x8IntegerDotProduct),
            max_storage_binding: limits.max_storage_buffer_binding_size,
            max_buffer: limits.max_buffer_size,
            max_workgroups_per_dimension: limits.max_compute_workgroups_per_dimension,
            max_workgroup_memory: limits.max_compute_workgroup_storage_size,
            device_memory: device_memory(adapter),
        }
    }

    /// The shader variant that uses everything this adapter offers.
    pub fn best_variant(&self) -> ShaderVariant {
        ShaderVariant {
            subgroups: self.subgroups,
            dot4: self.dot4,
        }
    }
}

#[cfg(not(any(target_arch = "wasm32", target_vendor = "apple")))]
fn device_memory(adapter: &wgpu::Adapter) -> Option<u64> {
    // SAFETY: only reads the physical device's properties through the instance wgpu keeps
    // alive; nothing is created or destroyed.
    let hal = unsafe { adapter.as_hal::<wgpu::hal::api::Vulkan>() }?;
    let instance = hal.shared_instance().raw_instance();
    // SAFETY: the physical device belongs to that instance.
    let props =
        unsafe { instance.get_physical_device_memory_properties(hal.raw_physical_device()) };
    let heaps = props.memory_heaps_as_slice();
    Some(
        heaps
            .iter()
            .filter(|h| h.flags.contains(ash::vk::MemoryHeapFlags::DEVICE_LOCAL))
            .map(|h| h.size)
            .sum(),
    )
}

#[cfg(any(target_arch = "wasm32", target_vendor = "apple"))]
fn device_memory(_adapter: &wgpu::Adapter) -> Option<u64> {
    None
}

/// One line describing an adapter, for listings.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    pub info: wgpu::AdapterInfo,
    pub capabilities: Capabilities,
}

/// An opened GPU: device, queue, capabilities and the pipeline cache.
///
/// Kernels record into a caller's [`wgpu::ComputePass`]; the caller submits. Results come back
/// with [`GpuContext::read`], which never blocks on the web.
pub struct GpuContext {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    capabilities: Capabilities,
    variant: ShaderVariant,
    pipelines: Mutex<HashMap<PipelineKey, wgpu::ComputePipeline>>,
    /// Entry point of each cached pipeline, for the profiler's labels.
    entries: Mutex<HashMap<wgpu::ComputePipeline, &'static str>>,
    /// Uniform buffers by content and bind groups by pipeline and buffers: a decode step records
    /// the same few hundred dispatches every time, and creating these anew costs more CPU time
    /// than the GPU spends on many of the kernels.
    uniforms: Mutex<HashMap<Vec<u8>, wgpu::Buffer>>,
    bind_groups: Mutex<HashMap<BindGroupKey, wgpu::BindGroup>>,
    /// Read-only tables by content (rope's cos/sin: one per step, shared by every layer).
    tables: Mutex<HashMap<Vec<u8>, wgpu::Buffer>>,
    /// Scratch buffers by purpose and size, reused by every dispatch that asks for one: wgpu
    /// orders the dispatches of a pass that share a buffer.
    scratch: Mutex<HashMap<(&'static str, u64), wgpu::Buffer>>,
    device_error: Arc<Mutex<Option<String>>>,
    /// Why the device was lost, once it is.
    lost: Arc<Mutex<Option<String>>>,
    profiler: Option<Profiler>,
}

/// Cached entries stop being reused, and everything they hold is released, beyond this many:
/// the caches keep buffers alive, so they must not grow with every temporary a caller makes.
const CACHE_LIMIT: usize = 4096;
/// The same for cached tables and scratch buffers, which can be large.
const BUFFER_CACHE_LIMIT: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct BindGroupKey {
    pipeline: wgpu::ComputePipeline,
    buffers: Vec<(wgpu::Buffer, u64, Option<u64>)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PipelineKey {
    kernel: Kernel,
    entry: &'static str,
    variant: ShaderVariant,
    constants: Vec<(&'static str, u64)>,
}

fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
}

impl GpuContext {
    /// Opens the best adapter: the one named by `WGPU_ADAPTER_NAME` (a case-insensitive
    /// substring) if set, else the high-performance one, among the backends of `WGPU_BACKEND`
    /// (e.g. `vulkan`, `gl`, `metal`, `dx12`; all by default).
    ///
    /// ```
    /// # pollster::block_on(async {
    /// match bitnet_wgpu::gpu::GpuContext::new().await {
    ///     Ok(gpu) => println!("running on {}", gpu.adapter_info().name),
    ///     Err(e) => println!("CPU only: {e}"),
    /// }
    /// # });
    /// ```
    pub async fn new() -> Result<Self> {
        let instance = instance();
        let adapter = pick_adapter(&instance).await?;
        let limits = adapter.limits();
        Self::open(&instance, adapter, limits).await
    }

    /// Opens the adapter [`GpuContext::new`] picks with no more than `limits` (nor more than it
    /// offers): how an adapter that offers only those runs, such as one with WebGPU's defaults
    /// (`wgpu::Limits::default()`: 16 KiB of workgroup memory, 128 MiB per storage binding).
    pub async fn with_limits(limits: wgpu::Limits) -> Result<Self> {
        let instance = instance();
        let adapter = pick_adapter(&instance).await?;
        let limits = limits.or_worse_values_from(&adapter.limits());
        Self::open(&instance, adapter, limits).await
    }

    async fn open(
        instance: &wgpu::Instance,
        adapter: wgpu::Adapter,
        limits: wgpu::Limits,
    ) -> Result<Self> {
        let capabilities = Capabilities::of(&adapter, &limits, instance);
        let mut required_features = wgpu::Features::empty();
        if capabilities.subgroups {
            required_features |= wgpu::Features::SUBGROUP;
        }
        let profile = cfg!(not(target_arch = "wasm32"))
            && std::env::var_os("BITNET_PROFILE").is_some()
            && adapter.features().contains(Profiler::features());
        if profile {
            required_features |= Profiler::features();
        }
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("bitnet"),
                required_features,
                required_limits: limits,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::Gpu(format!("request_device: {e}")))?;
        let device_error = Arc::new(Mutex::new(None));
        let sink = device_error.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mut slot = sink.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert_with(|| e.to_string());
        }));
        let lost = Arc::new(Mutex::new(None));
        let sink = lost.clone();
        device.set_device_lost_callback(move |reason, message| {
            let mut slot = sink.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert_with(|| match reason {
                wgpu::DeviceLostReason::Destroyed => "destroyed".to_string(),
                wgpu::DeviceLostReason::Unknown if message.is_empty() => "reason unknown".into(),
                wgpu::DeviceLostReason::Unknown => message,
            });
        });
        let profiler = profile.then(|| Profiler::new(&device));
        Ok(GpuContext {
            profiler,
            entries: Mutex::new(HashMap::new()),
            uniforms: Mutex::new(HashMap::new()),
            bind_groups: Mutex::new(HashMap::new()),
            tables: Mutex::new(HashMap::new()),
            scratch: Mutex::new(HashMap::new()),
            device,
            queue,
            info: adapter.get_info(),
            variant: capabilities.best_variant(),
            capabilities,
            pipelines: Mutex::new(HashMap::new()),
            device_error,
            lost,
        })
    }

    /// Lists every adapter the backends of `WGPU_BACKEND` offer (native only: a browser offers one).
    #[cfg(not(target_arch = "wasm32"))]
    pub async fn adapters() -> Vec<AdapterSummary> {
        let instance = instance();
        let mut out = Vec::new();
        for adapter in instance.enumerate_adapters(wgpu::Backends::all()).await {
            out.push(AdapterSummary {
                info: adapter.get_info(),
                capabilities: Capabilities::of(&adapter, &adapter.limits(), &instance),
            });
        }
        out
    }

    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// The adapter's name for messages: its own, or, where the backend tells none (WebGPU in a
    /// browser hides it), the backend's.
    pub fn adapter_name(&self) -> String {
        match (self.info.name.as_str(), self.info.backend) {
            ("", wgpu::Backend::BrowserWebGpu) => "WebGPU".to_string(),
            ("", backend) => format!("a {backend} adapter"),
            (name, _) => name.to_string(),
        }
    }

    pub fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    /// The shader variant kernels are compiled with.
    pub fn variant(&self) -> ShaderVariant {
        self.variant
    }

    /// Compiles kernels with `variant` from now on. Asking for a capability the adapter lacks is
    /// an error; turning one off is always allowed (every variant gives the same results).
    pub fn set_variant(&mut self, variant: ShaderVariant) -> Result<()> {
        let best = self.capabilities.best_variant();
        if (variant.subgroups && !best.subgroups) || (variant.dot4 && !best.dot4) {
            return Err(Error::invalid(
                "shader variant",
                format!("{variant:?} needs more than the adapter offers ({best:?})"),
            ));
        }
        self.variant = variant;
        Ok(())
    }

    /// The cached pipeline for one entry point of a kernel, compiled on first use.
    pub(crate) fn pipeline(
        &self,
        kernel: Kernel,
        entry: &'static str,
        constants: &[(&'static str, u64)],
    ) -> Result<wgpu::ComputePipeline> {
        let key = PipelineKey {
            kernel,
            entry,
            variant: self.variant,
            constants: constants.to_vec(),
        };
        let mut cache = self.pipelines.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = cache.get(&key) {
            return Ok(p.clone());
        }
        let source = kernel.source(self.variant);
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(kernel.name()),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            });
        let values: Vec<(&str, f64)> = constants.iter().map(|&(k, v)| (k, v as f64)).collect();
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &values,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        self.check()?;
        cache.insert(key, pipeline.clone());
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pipeline.clone(), entry);
        Ok(pipeline)
    }

    /// Returns the first error the device reported since the last call, if any.
    pub fn check(&self) -> Result<()> {
        let mut slot = self.device_error.lock().unwrap_or_else(|p| p.into_inner());
        match slot.take() {
            Some(message) => Err(self.error(message)),
            None => Ok(()),
        }
    }

    /// Why the device was lost, once it is: every later call on this context fails with
    /// [`Error::DeviceLost`].
    pub fn lost(&self) -> Option<String> {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A failure the device reported, as [`Error::DeviceLost`] when the device is gone (whatever
    /// the symptom: an invalid buffer, a failed map or poll) and as [`Error::Gpu`] otherwise.
    fn error(&self, message: impl ToString) -> Error {
        // wgpu reports a loss from a poll that finds the queue drained, which a failing call
        // may not have reached yet (natively; on the web the browser reports it by itself).
        #[cfg(not(target_arch = "wasm32"))]
        if self.lost().is_none() {
            let _ = self.device.poll(wgpu::PollType::Wait {
                submission_index: None,
                timeout: Some(std::time::Duration::from_secs(1)),
            });
        }
        match self.lost() {
            Some(reason) => Error::DeviceLost(reason),
            None => Error::Gpu(message.to_string()),
        }
    }

    /// Checks that one binding of `bytes` fits the adapter's limits.
    pub fn check_binding(&self, what: &str, bytes: u64) -> Result<()> {
        let caps = &self.capabilities;
        if bytes > caps.max_buffer {
            return Err(Error::Limit {
                what: what.to_string(),
                limit: "max_buffer_size",
                needed: bytes,
                available: caps.max_buffer,
            });
        }
        if bytes > caps.max_storage_binding {
            return Err(Error::Limit {
                what: what.to_string(),
                limit: "max_storage_buffer_binding_size",
                needed: bytes,
                available: caps.max_storage_binding,
            });
        }
        Ok(())
    }

    /// A storage buffer holding `data` (at least 4 bytes, so that empty tensors can be bound).
    pub fn upload<T: bytemuck::Pod>(&self, label: &str, data: &[T]) -> Result<wgpu::Buffer> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        self.check_binding(label, bytes.len() as u64)?;
        let size = (bytes.len() as u64).max(4).next_multiple_of(4);
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: true,
        });
        buffer
            .slice(..)
            .get_mapped_range_mut()
            .map_err(|e| self.error(e))?
            .slice(..bytes.len())
            .copy_from_slice(bytes);
        buffer.unmap();
        Ok(buffer)
    }

    /// An uninitialised storage buffer of `bytes` bytes (at least 4).
    pub fn storage(&self, label: &str, bytes: u64) -> Result<wgpu::Buffer> {
        self.check_binding(label, bytes)?;
        Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.max(4).next_multiple_of(4),
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        }))
    }

    /// A read-only storage buffer holding `data`, shared by every caller asking for the same
    /// bytes (which must never be written).
    pub(crate) fn upload_shared<T: bytemuck::Pod>(
        &self,
        label: &str,
        data: &[T],
    ) -> Result<wgpu::Buffer> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let mut cache = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(buffer) = cache.get(bytes) {
            return Ok(buffer.clone());
        }
        if cache.len() >= BUFFER_CACHE_LIMIT {
            cache.clear();
        }
        let buffer = self.upload(label, data)?;
        cache.insert(bytes.to_vec(), buffer.clone());
        Ok(buffer)
    }

    /// A storage buffer of `bytes` for intermediate results, the same one for every caller
    /// asking with the same `purpose` and size.
    pub(crate) fn scratch(&self, purpose: &'static str, bytes: u64) -> Result<wgpu::Buffer> {
        let mut cache = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(buffer) = cache.get(&(purpose, bytes)) {
            return Ok(buffer.clone());
        }
        if cache.len() >= BUFFER_CACHE_LIMIT {
            cache.clear();
        }
        let buffer = self.storage(purpose, bytes)?;
        cache.insert((purpose, bytes), buffer.clone());
        Ok(buffer)
    }

    /// A uniform buffer holding `data`, shared by every caller asking for the same bytes.
    pub(crate) fn uniform<T: bytemuck::Pod>(&self, label: &str, data: &T) -> wgpu::Buffer {
        let bytes = bytemuck::bytes_of(data);
        let mut cache = self.uniforms.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(buffer) = cache.get(bytes) {
            return buffer.clone();
        }
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: (bytes.len() as u64).next_multiple_of(16),
            usage: wgpu::BufferUsages::UNIFORM,
            mapped_at_creation: true,
        });
        if let Ok(mut view) = buffer.slice(..).get_mapped_range_mut() {
            view.slice(..bytes.len()).copy_from_slice(bytes);
        }
        buffer.unmap();
        cache.insert(bytes.to_vec(), buffer.clone());
        buffer
    }

    /// Reads `count` elements of `T` back from the start of `buffer`, after everything already
    /// submitted. Awaits without blocking on the web; polls the device natively.
    pub async fn read<T: bytemuck::Pod>(
        &self,
        buffer: &wgpu::Buffer,
        count: usize,
    ) -> Result<Vec<T>> {
        let bytes = (count * size_of::<T>()) as u64;
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let padded = bytes.next_multiple_of(4);
        let staging = self.staging("readback", padded);
        let mut encoder = self.device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, padded);
        let submission = self.queue.submit([encoder.finish()]);
        self.read_staging(&staging, submission, count).await
    }

    /// A buffer the host maps to read what a copy put there (see [`GpuContext::read_staging`]).
    pub(crate) fn staging(&self, label: &str, bytes: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes.max(4).next_multiple_of(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Reads `count` elements of `T` from `staging` (see [`GpuContext::staging`]) once
    /// `submission`, which filled it, has finished; later submissions may still be running
    /// (natively this waits for that one only). Leaves the buffer unmapped, ready for the next
    /// copy.
    pub(crate) async fn read_staging<T: bytemuck::Pod>(
        &self,
        staging: &wgpu::Buffer,
        submission: wgpu::SubmissionIndex,
        count: usize,
    ) -> Result<Vec<T>> {
        let (tx, rx) = futures_channel::oneshot::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |result| {
            let _ = tx.send(result);
        });
        #[cfg(not(target_arch = "wasm32"))]
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: Some(submission),
                timeout: None,
            })
            .map_err(|e| self.error(format!("poll: {e}")))?;
        #[cfg(target_arch = "wasm32")]
        let _ = submission;
        let mapped = rx
            .await
            .map_err(|_| self.error("the readback was dropped before it finished"))?;
        mapped.map_err(|e| self.error(format!("map_async: {e}")))?;
        self.check()?;
        let view = staging.get_mapped_range(..).map_err(|e| self.error(e))?;
        let out = bytemuck::pod_collect_to_vec(&view[..count * size_of::<T>()]);
        drop(view);
        staging.unmap();
        Ok(out)
    }

    /// Records a dispatch of `pipeline` over `groups` workgroups into `pass`, spread over two
    /// dimensions when one would exceed the adapter's limit. wgpu orders dispatches of one pass
    /// that share a buffer, so a chain of kernels can live in a single pass. Shaders recover the flat workgroup
    /// index as `id.x + id.y * num.x` and ignore indices past their work.
    pub(crate) fn dispatch(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        pipeline: &wgpu::ComputePipeline,
        entries: &[wgpu::BindingResource<'_>],
        groups: u32,
    ) {
        let bind_group = self.bind_group(pipeline, entries);
        let max = self.capabilities.max_workgroups_per_dimension.max(1);
        let (x, y) = if groups <= max {
            (groups, 1)
        } else {
            (max, groups.div_ceil(max))
        };
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(x, y, 1);
        if let Some(profiler) = &self.profiler {
            let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            profiler.mark(pass, Some(entries.get(pipeline).copied().unwrap_or("?")));
        }
    }

    /// The bind group of `pipeline` over `entries` (bindings 0, 1, ...), cached when they are
    /// all buffers.
    fn bind_group(
        &self,
        pipeline: &wgpu::ComputePipeline,
        entries: &[wgpu::BindingResource<'_>],
    ) -> wgpu::BindGroup {
        let buffers: Option<Vec<_>> = entries
            .iter()
            .map(|resource| match resource {
                wgpu::BindingResource::Buffer(b) => {
                    Some((b.buffer.clone(), b.offset, b.size.map(|s| s.get())))
                }
                _ => None,
            })
            .collect();
        let Some(buffers) = buffers else {
            return self.create_bind_group(pipeline, entries);
        };
        let key = BindGroupKey {
            pipeline: pipeline.clone(),
            buffers,
        };
        let mut cache = self.bind_groups.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(group) = cache.get(&key) {
            return group.clone();
        }
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        let group = self.create_bind_group(pipeline, entries);
        cache.insert(key, group.clone());
        group
    }

    fn create_bind_group(
        &self,
        pipeline: &wgpu::ComputePipeline,
        entries: &[wgpu::BindingResource<'_>],
    ) -> wgpu::BindGroup {
        let layout = pipeline.get_bind_group_layout(0);
        let entries: Vec<wgpu::BindGroupEntry<'_>> = entries
            .iter()
            .enumerate()
            .map(|(i, resource)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: resource.clone(),
            })
            .collect();
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &layout,
            entries: &entries,
        })
    }

    /// Whether `BITNET_PROFILE` turned the per-kernel profiler on (see [`GpuContext::profile`]).
    pub fn profiling(&self) -> bool {
        self.profiler.is_some()
    }

    /// Marks the start of profiled work in `pass` (nothing when not profiling).
    pub fn profile_start(&self, pass: &mut wgpu::ComputePass<'_>) {
        if let Some(profiler) = &self.profiler {
            profiler.mark(pass, None);
        }
    }

    /// GPU time per entry point of the dispatches recorded since the last call, after they have
    /// been submitted. Empty when not profiling.
    pub async fn profile(&self) -> Result<Vec<KernelTime>> {
        match &self.profiler {
            None => Ok(Vec::new()),
            Some(p) => {
                p.report(&self.device, &self.queue, async |b, n| {
                    self.read::<u64>(b, n).await
                })
                .await
            }
        }
    }
}

async fn pick_adapter(instance: &wgpu::Instance) -> Result<wgpu::Adapter> {
    #[cfg(not(target_arch = "wasm32"))]
    if let Ok(wanted) = std::env::var("WGPU_ADAPTER_NAME") {
        let wanted = wanted.to_lowercase();
        let adapters = instance.enumerate_adapters(wgpu::Backends::all()).await;
        let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
        return adapters
            .into_iter()
            .find(|a| a.get_info().name.to_lowercase().contains(&wanted))
            .ok_or_else(|| {
                Error::NoAdapter(format!(
                    "WGPU_ADAPTER_NAME={wanted} matches none of the adapters found: {names:?}"
                ))
            });
    }
    instance
        .request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            force_fallback_adapter: false,
            compatible_surface: None,
            apply_limit_buckets: false,
        })
        .await
        .map_err(|e| {
            Error::NoAdapter(format!(
                "{e} (install a Vulkan driver, e.g. Mesa's lavapipe: apt-get install mesa-vulkan-drivers; \
                 in a browser, WebGPU must be enabled)"
            ))
        })
}
