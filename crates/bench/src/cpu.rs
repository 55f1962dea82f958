//! CPU time the pipeline spends: the extractor and loader processes, and the PostgreSQL
//! backends serving them (found in `pg_stat_activity` by the pipeline's application name),
//! read from `/proc/<pid>/stat` (user + system time of every thread, the exited ones too).
//! Backends are only measured when the clusters run on this machine.

use anyhow::{Context, Result};
use serde::Serialize;
use std::time::Instant;

/// The application name every connection of the pipeline's binaries gives.
const APPLICATION_NAME: &str = "cdc-historical-warehouse";

/// Shares of one core (percent) over a window.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CpuShare {
    pub extractor: f64,
    /// The extractor's backends on the source (its capture connection).
    pub source_backends: f64,
    pub loader: f64,
    /// The backends on the warehouse: the loader's and the extractor's run records.
    pub warehouse_backends: f64,
}

impl CpuShare {
    pub fn total(&self) -> f64 {
        self.extractor + self.source_backends + self.loader + self.warehouse_backends
    }
}

/// The processes of a running pipeline.
pub struct Pipeline {
    extractor: i32,
    loader: i32,
    source_backends: Vec<i32>,
    warehouse_backends: Vec<i32>,
}

/// CPU ticks of each process at one moment.
pub struct Sample {
    at: Instant,
    extractor: u64,
    loader: u64,
    source_backends: Vec<Option<u64>>,
    warehouse_backends: Vec<Option<u64>>,
}

impl Pipeline {
    /// The pipeline's processes; call it while only the extractor and the loader are
    /// connected with the pipeline's application name (before the mutator starts).
    pub async fn find(
        extractor: u32,
        loader: u32,
        source: &tokio_postgres::Client,
        warehouse: &tokio_postgres::Client,
    ) -> Result<Pipeline> {
        Ok(Pipeline {
            extractor: extractor as i32,
            loader: loader as i32,
            source_backends: backends(source).await?,
            warehouse_backends: backends(warehouse).await?,
        })
    }

    pub fn sample(&self) -> Result<Sample> {
        Ok(Sample {
            at: Instant::now(),
            extractor: ticks(self.extractor).context("reading the extractor's CPU time")?,
            loader: ticks(self.loader).context("reading the loader's CPU time")?,
            source_backends: self.source_backends.iter().map(|p| ticks(*p)).collect(),
            warehouse_backends: self.warehouse_backends.iter().map(|p| ticks(*p)).collect(),
        })
    }
}

impl Sample {
    /// The share of one core each part used from `self` to `later`.
    pub fn share_until(&self, later: &Sample) -> CpuShare {
        let hz = clock_ticks_per_second();
        let secs = later.at.duration_since(self.at).as_secs_f64().max(1e-3);
        let pct = |ticks: u64| ticks as f64 / hz / secs * 100.0;
        let sum = |a: &[Option<u64>], b: &[Option<u64>]| {
            a.iter()
                .zip(b)
                .filter_map(|(a, b)| Some(b.as_ref()?.saturating_sub(*a.as_ref()?)))
                .sum::<u64>()
        };
        CpuShare {
            extractor: pct(later.extractor.saturating_sub(self.extractor)),
            loader: pct(later.loader.saturating_sub(self.loader)),
            source_backends: pct(sum(&self.source_backends, &later.source_backends)),
            warehouse_backends: pct(sum(&self.warehouse_backends, &later.warehouse_backends)),
        }
    }
}

/// CPU ticks of a group of processes at one moment (one that has exited counts nothing).
pub struct GroupSample {
    at: Instant,
    ticks: Vec<Option<u64>>,
}

impl GroupSample {
    pub fn of(pids: &[i32]) -> GroupSample {
        GroupSample {
            at: Instant::now(),
            ticks: pids.iter().map(|p| ticks(*p)).collect(),
        }
    }

    /// The share of one core (percent) the group used from `self` to `later`.
    pub fn share_until(&self, later: &GroupSample) -> f64 {
        let secs = later.at.duration_since(self.at).as_secs_f64().max(1e-3);
        let used: u64 = self
            .ticks
            .iter()
            .zip(&later.ticks)
            .filter_map(|(a, b)| Some(b.as_ref()?.saturating_sub(*a.as_ref()?)))
            .sum();
        used as f64 / clock_ticks_per_second() / secs * 100.0
    }
}

async fn backends(client: &tokio_postgres::Client) -> Result<Vec<i32>> {
    Ok(client
        .query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            &[&APPLICATION_NAME],
        )
        .await
        .context("reading the pipeline's backends from pg_stat_activity")?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// User + system CPU ticks of `pid` (all its threads), if it runs here.
fn ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name in parentheses: state is field 3; utime and stime are 14, 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Linux reports CPU times in USER_HZ, 100 a second on every architecture it runs on.
fn clock_ticks_per_second() -> f64 {
    100.0
}
