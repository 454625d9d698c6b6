//! Per-kernel GPU times from timestamp queries written between dispatches, for finding where a
//! forward step spends its time. On only when `BITNET_PROFILE` is set and the adapter can write
//! timestamps inside compute passes (native Vulkan, Metal, DX12).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::{Error, Result};

const CAPACITY: u32 = 4096;

pub(crate) struct Profiler {
    queries: wgpu::QuerySet,
    /// The label of each timestamp written since the last report; `None` marks a start.
    marks: Mutex<Vec<Option<&'static str>>>,
}

/// GPU time spent in one entry point over the profiled dispatches.
#[derive(Clone, Debug)]
pub struct KernelTime {
    pub entry: &'static str,
    pub dispatches: usize,
    pub millis: f64,
}

impl Profiler {
    pub(crate) fn features() -> wgpu::Features {
        wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES
    }

    pub(crate) fn new(device: &wgpu::Device) -> Self {
        Profiler {
            queries: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("profiler"),
                ty: wgpu::QueryType::Timestamp,
                count: CAPACITY,
            }),
            marks: Mutex::new(Vec::new()),
        }
    }

    /// Writes a timestamp after the work recorded so far in `pass`, labelled `entry` (the time
    /// since the previous timestamp goes to it) or a start when `None`.
    pub(crate) fn mark(&self, pass: &mut wgpu::ComputePass<'_>, entry: Option<&'static str>) {
        let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        if (marks.len() as u32) < CAPACITY {
            pass.write_timestamp(&self.queries, marks.len() as u32);
            marks.push(entry);
        }
    }

    /// Per-entry totals of everything marked since the last report, most expensive first.
    pub(crate) async fn report(
        &self,
        device: &wgpu::Device,
        queue: &wgpu::Queue,
        read: impl AsyncFnOnce(&wgpu::Buffer, usize) -> Result<Vec<u64>>,
    ) -> Result<Vec<KernelTime>> {
        let marks = std::mem::take(&mut *self.marks.lock().unwrap_or_else(|p| p.into_inner()));
        if marks.is_empty() {
            return Ok(Vec::new());
        }
        let resolved = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("profiler timestamps"),
            size: marks.len() as u64 * 8,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let mut encoder = device.create_command_encoder(&Default::default());
        encoder.resolve_query_set(&self.queries, 0..marks.len() as u32, &resolved, 0);
        queue.submit([encoder.finish()]);
        let ticks = read(&resolved, marks.len()).await?;
        let period = f64::from(queue.get_timestamp_period());
        let mut totals: HashMap<&'static str, (usize, f64)> = HashMap::new();
        for (i, mark) in marks.iter().enumerate().skip(1) {
            if let Some(entry) = mark {
                let ns = ticks[i].saturating_sub(ticks[i - 1]) as f64 * period;
                let slot = totals.entry(entry).or_default();
                slot.0 += 1;
                slot.1 += ns / 1e6;
            }
        }
        let mut out: Vec<KernelTime> = totals
            .into_iter()
            .map(|(entry, (dispatches, millis))| KernelTime {
                entry,
                dispatches,
                millis,
            })
            .collect();
        out.sort_by(|a, b| b.millis.total_cmp(&a.millis));
        if out.is_empty() {
            return Err(Error::Gpu("no timestamps were recorded".into()));
        }
        Ok(out)
    }
}
