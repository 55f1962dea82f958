//! `bench`: throughput, latency and memory of the pipeline, beside the machine's own
//! ceilings measured in the same run (see README, "Performance"). Run by `make bench` and
//! `make bench-quick` against clusters of its own.

mod ceilings;
mod cpu;
mod debezium;
mod procs;
mod report;
mod rounds;
mod setup;

use anyhow::{bail, Context, Result};
use cdc_core::db::tls::TlsSettings;
use cdc_core::table::TableSpec;
use ceilings::CopyFigure;
use clap::{Parser, Subcommand};
use procs::Runner;
use serde::Serialize;
use setup::Clusters;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Measures capture, apply, steady end-to-end delay and peak memory of the pipeline against
/// bare COPY ceilings measured in the same run; prints a table and writes it as JSON.
#[derive(Parser, Debug)]
#[command(name = "bench", version, args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    args: BenchArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Internal: run a command and print its wall time and peak RSS as JSON
    #[command(hide = true)]
    Measure {
        #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
}

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct BenchArgs {
    /// Operations of the workload (the mutator's mix, seeded); 0 skips the throughput and
    /// memory runs
    #[arg(long, default_value = "100000")]
    ops: u64,
    /// Update-every-row rounds: each updates every one of --round-rows orders and times the
    /// loader beside the least SQL doing the same work (0 skips them)
    #[arg(long, default_value = "10")]
    rounds: usize,
    /// Rows of the update-every-row rounds
    #[arg(long, default_value = "100000")]
    round_rows: u64,
    /// After the rounds, the history (and its plain copy) grown to this many rows with the
    /// past versions of long-deleted orders, then one more round (0 skips it)
    #[arg(long, default_value = "10000000")]
    growth_rows: u64,
    /// Runs of each measurement; figures are the median with min–max
    #[arg(long, default_value = "3")]
    runs: usize,
    /// Steady phases: the mutator's rates, operations per second or `max` (as fast as the
    /// writers go), comma separated; each is run --runs times
    #[arg(long, value_delimiter = ',', default_value = "2000,max", value_parser = steady_rate)]
    rate: Vec<SteadyRate>,
    /// Steady phases: the mutator's writers (its --concurrency)
    #[arg(long, default_value = "4")]
    steady_writers: usize,
    /// Steady phases: seconds of traffic (0 skips the phases)
    #[arg(long, default_value = "30")]
    steady_seconds: u64,
    /// Steady phase: seconds the pipeline's CPU is measured while idle, before the traffic
    /// (0 skips it)
    #[arg(long, default_value = "30")]
    idle_seconds: u64,
    /// A setting for the extractor and loader, as NAME=VALUE (repeatable; e.g.
    /// CDC_EXTRACTION_INTERVAL_SECONDS=1); by default they run at their defaults
    #[arg(long = "pipeline-env", value_parser = pipeline_env)]
    pipeline_env: Vec<(String, String)>,
    /// Peak memory is also measured at this multiple of --ops (one run; 0 skips it)
    #[arg(long, default_value = "10")]
    rss_factor: u64,
    /// Capture modes to measure
    #[arg(long, value_delimiter = ',', default_value = "timestamp,logical")]
    modes: Vec<String>,
    /// Seed of the workload
    #[arg(long, default_value = "42")]
    seed: u64,
    /// Tables of the workload: `orders` (the figures' single table, with its ceilings) or
    /// `all` (orders, customers and order_items, captured by one pipeline; no ceilings)
    #[arg(long, default_value = "orders", value_parser = ["orders", "all"])]
    tables: String,
    /// Workload writers (the mutator's --concurrency)
    #[arg(long, default_value = "1")]
    writers: usize,
    /// Workload operations per transaction (the mutator's --ops-per-transaction)
    #[arg(long, default_value = "100")]
    ops_per_transaction: u32,
    #[arg(long, env = "BENCH_DB_HOST", default_value = "127.0.0.1")]
    host: String,
    #[arg(long, env = "BENCH_SOURCE_PORT", default_value = "55634")]
    source_port: u16,
    #[arg(long, env = "BENCH_WAREHOUSE_PORT", default_value = "55633")]
    warehouse_port: u16,
    #[arg(long, env = "BENCH_DB_USER", default_value = "postgres")]
    user: String,
    #[arg(
        long,
        env = "BENCH_DB_PASSWORD",
        default_value = "postgres",
        hide_env_values = true
    )]
    #[serde(skip)]
    password: String,
    /// TLS to both clusters, passed on as DB_SSLMODE and WAREHOUSE_DB_SSLMODE (disable,
    /// prefer, require, verify-ca, verify-full)
    #[arg(long, env = "BENCH_DB_SSLMODE", default_value = "prefer")]
    sslmode: String,
    /// The CA certificate file (PEM) for verify-ca / verify-full, passed on as
    /// DB_SSLROOTCERT and WAREHOUSE_DB_SSLROOTCERT
    #[arg(long, env = "BENCH_DB_SSLROOTCERT")]
    sslrootcert: Option<PathBuf>,
    /// Debezium's embedded engine beside logical capture: it drains a copy of the extractor's
    /// slot in each throughput run (events compared one by one) and runs each steady phase in
    /// the pipeline's place; the directory `scripts/debezium.sh build` prints (`make
    /// bench-debezium` gives it)
    #[arg(long)]
    debezium: Option<PathBuf>,
    /// Where the pipeline's binaries are (default: beside this one)
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The source's init scripts
    #[arg(long, default_value = "init-scripts")]
    init_scripts: PathBuf,
    /// Scratch directory (change logs, state, the binaries' logs)
    #[arg(long, default_value = "target/bench/work")]
    work_dir: PathBuf,
    /// The results as JSON
    #[arg(long, default_value = "target/bench/results.json")]
    out: PathBuf,
}

fn main() {
    let cli = Cli::parse();
    if let Some(Command::Measure { command }) = &cli.command {
        match procs::wrapper_main(command) {
            Ok(code) => std::process::exit(code),
            Err(e) => {
                eprintln!("bench measure: {e:#}");
                std::process::exit(1);
            }
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(run(cli.args)) {
        eprintln!("bench: {e:#}");
        std::process::exit(1);
    }
}

/// One throughput run: a workload of `ops` operations captured in one go and applied.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ThroughputRun {
    pub ops: u64,
    pub workload_secs: f64,
    pub capture_events: u64,
    pub capture_bytes: u64,
    pub capture_secs: f64,
    pub capture_passes: u32,
    pub capture_cpu_secs: f64,
    pub extractor_rss_kb: u64,
    pub apply_secs: f64,
    pub versions: u64,
    pub loader_rss_kb: u64,
    pub capture_ceiling: Option<CopyFigure>,
    /// Logical mode: `pg_recvlogical` streaming the same backlog to /dev/null.
    pub recvlogical_secs: Option<f64>,
    pub apply_ceiling: Option<CopyFigure>,
    pub sql_merge: Option<CopyFigure>,
    pub debezium: Option<debezium::Drain>,
}

/// A steady phase's rate: operations per second, or as fast as the mutator's writers go.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum SteadyRate {
    PerSecond(f64),
    Max,
}

impl SteadyRate {
    /// How the report names the phase.
    pub fn label(self) -> String {
        match self {
            SteadyRate::PerSecond(r) => format!("{r} ops/s"),
            SteadyRate::Max => "top rate".to_owned(),
        }
    }

    /// The mutator's `--rate`: `max` is its highest, which no writer reaches.
    fn mutator_rate(self) -> String {
        match self {
            SteadyRate::PerSecond(r) => r.to_string(),
            SteadyRate::Max => "1000000".to_owned(),
        }
    }
}

fn steady_rate(s: &str) -> std::result::Result<SteadyRate, String> {
    match s.trim() {
        "max" => Ok(SteadyRate::Max),
        t => match t.parse::<f64>() {
            Ok(r) if r.is_finite() && (0.1..=1_000_000.0).contains(&r) => {
                Ok(SteadyRate::PerSecond(r))
            }
            _ => Err(format!(
                "'{t}' is neither `max` nor a rate from 0.1 to 1000000 operations per second"
            )),
        },
    }
}

/// One steady run: the mutator at a fixed rate with the pipeline at its default intervals.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SteadyRun {
    /// The phase (`SteadyRate::label`).
    pub rate: String,
    pub seconds: f64,
    pub ops: u64,
    pub versions: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Median delay in the last third of the window minus that of the first third.
    pub trend_ms: f64,
    /// From the mutator's stop until the warehouse's current rows equal the source.
    pub drain_secs: f64,
    /// Logical mode: the most WAL the slot held unconfirmed (sampled every 0.5 s).
    pub slot_lag_max_bytes: Option<f64>,
    /// CPU of the pipeline with no traffic, before the mutator starts.
    pub idle_cpu: Option<cpu::CpuShare>,
    /// CPU of the pipeline during the traffic.
    pub steady_cpu: Option<cpu::CpuShare>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ModeResults {
    pub mode: String,
    pub throughput: Vec<ThroughputRun>,
    pub steady: Vec<SteadyRun>,
    /// The same steady phases with Debezium's engine instead of the pipeline (`--debezium`).
    pub debezium_steady: Vec<debezium::Steady>,
    pub large: Option<ThroughputRun>,
    pub rounds: Vec<rounds::Round>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub postgres: String,
    pub os: String,
}

struct Bench {
    args: BenchArgs,
    clusters: Clusters,
    bin_dir: PathBuf,
    work: PathBuf,
    spec: TableSpec,
    /// The Debezium build (`--debezium`), checked.
    debezium: Option<PathBuf>,
}

async fn run(args: BenchArgs) -> Result<()> {
    for m in &args.modes {
        if m != "timestamp" && m != "logical" {
            bail!("--modes: '{m}' is not a capture mode (timestamp, logical)");
        }
    }
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if args.rounds > 0 && args.round_rows == 0 {
        bail!("--round-rows must be at least 1");
    }
    let debezium = args
        .debezium
        .as_deref()
        .map(debezium::check_dir)
        .transpose()?;
    if debezium.is_some()
        && (args.tables != "orders"
            || !args.modes.iter().any(|m| m == "logical")
            || (args.ops == 0 && args.steady_seconds == 0))
    {
        bail!(
            "--debezium compares logical capture of orders: it needs `logical` in --modes, \
             --tables orders, and throughput runs (--ops) or steady phases (--steady-seconds)"
        );
    }
    let bin_dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the bench binary's directory")?
            .to_path_buf(),
    };
    let work = std::path::absolute(&args.work_dir)?;
    let clusters = Clusters {
        host: args.host.clone(),
        source_port: args.source_port,
        warehouse_port: args.warehouse_port,
        user: args.user.clone(),
        password: args.password.clone(),
        tls: TlsSettings::validate("BENCH_DB", &args.sslmode, args.sslrootcert.as_deref())?,
        init_scripts: std::path::absolute(&args.init_scripts)?,
    };
    let version: String = clusters
        .connect(clusters.source_port, "postgres")
        .await?
        .query_one("SELECT current_setting('server_version')", &[])
        .await?
        .get(0);
    let machine = Machine {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        postgres: version,
        os: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
    };
    let bench = Bench {
        args: args.clone(),
        clusters,
        bin_dir,
        work,
        spec: TableSpec::orders(),
        debezium,
    };
    eprintln!(
        "bench: {} cores, PostgreSQL {}, {} operations, {} run(s), modes {}",
        machine.cores,
        machine.postgres,
        args.ops,
        args.runs,
        args.modes.join(",")
    );
    let mut results = Vec::new();
    for mode in &args.modes {
        let mut r = ModeResults {
            mode: mode.clone(),
            ..Default::default()
        };
        for i in (0..args.runs).filter(|_| args.ops > 0) {
            eprintln!("bench: {mode}: throughput run {}/{}", i + 1, args.runs);
            r.throughput.push(
                bench
                    .throughput(mode, args.ops, args.seed + i as u64, true)
                    .await?,
            );
        }
        if args.steady_seconds > 0 {
            for (k, &rate) in args.rate.iter().enumerate() {
                for i in 0..args.runs {
                    eprintln!(
                        "bench: {mode}: steady run at {} {}/{}",
                        rate.label(),
                        i + 1,
                        args.runs
                    );
                    // The idle pipeline is measured before the first phase's traffic.
                    r.steady.push(
                        bench
                            .steady(mode, rate, k == 0, args.seed + i as u64)
                            .await?,
                    );
                    if bench.debezium.is_some() && mode == "logical" {
                        eprintln!(
                            "bench: {mode}: steady run at {} with Debezium {}/{}",
                            rate.label(),
                            i + 1,
                            args.runs
                        );
                        r.debezium_steady.push(
                            bench
                                .steady_debezium(rate, k == 0, args.seed + i as u64)
                                .await?,
                        );
                    }
                }
            }
        }
        if args.rounds > 0 {
            eprintln!(
                "bench: {mode}: {} update-every-row rounds over {} rows",
                args.rounds, args.round_rows
            );
            r.rounds = bench.rounds(mode).await?;
        }
        if args.rss_factor > 1 && args.ops > 0 {
            let ops = args.ops * args.rss_factor;
            eprintln!("bench: {mode}: memory run at {ops} operations");
            r.large = Some(bench.throughput(mode, ops, args.seed, false).await?);
        }
        results.push(r);
    }
    let report = report::Report::new(machine, args.clone(), results);
    print!("{}", report.table());
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    eprintln!("bench: results written to {}", args.out.display());
    Ok(())
}

impl Bench {
    /// A clean scratch directory for one run, and a runner whose binaries use it.
    fn runner(&self, mode: &str, label: &str) -> Result<Runner> {
        let work = self.work.join(format!("{mode}-{label}"));
        if work.exists() {
            std::fs::remove_dir_all(&work)?;
        }
        std::fs::create_dir_all(&work)?;
        let mut env = self.clusters.env(mode, &self.args.tables, &work);
        env.extend(self.args.pipeline_env.iter().cloned());
        Ok(Runner {
            bin_dir: self.bin_dir.clone(),
            env,
            log_dir: work.join("logs"),
            cwd: work,
        })
    }

    async fn throughput(
        &self,
        mode: &str,
        ops: u64,
        seed: u64,
        ceilings: bool,
    ) -> Result<ThroughputRun> {
        self.clusters.fresh().await?;
        let runner = self.runner(mode, &format!("throughput-{ops}"))?;
        let ceilings = ceilings && self.args.tables == "orders";
        let log_dir = runner.cwd.join("cdc_logs");
        // The initial copy (the sample rows), applied before the measured workload.
        runner.measured("extractor", &["--once"]).await?;
        runner.measured("scd2-loader", &["--once"]).await?;
        let mut run = ThroughputRun {
            ops,
            ..Default::default()
        };
        let (ops_s, seed_s) = (ops.to_string(), seed.to_string());
        let (writers, per_tx) = (
            self.args.writers.to_string(),
            self.args.ops_per_transaction.to_string(),
        );
        let m = runner
            .measured(
                "mutator",
                &[
                    "--count",
                    &ops_s,
                    "--seed",
                    &seed_s,
                    "--concurrency",
                    &writers,
                    "--ops-per-transaction",
                    &per_tx,
                    "--tables",
                    &self.args.tables,
                ],
            )
            .await?;
        run.workload_secs = m.secs;

        let source = self.clusters.source().await?;
        if ceilings {
            ceilings::warm(&source).await?;
            run.capture_ceiling = Some(ceilings::capture(&source, mode).await?);
        }
        let debezium = self
            .debezium
            .as_deref()
            .filter(|_| ceilings && mode == "logical");
        if debezium.is_some() {
            debezium::copy_slot(&source).await?;
        }
        let recvlogical = if ceilings && mode == "logical" {
            ceilings::Recvlogical::prepare(&source).await?
        } else {
            None
        };
        // Capture: passes until one finds nothing (logical passes are capped at
        // CDC_MAX_CHANGES_PER_PASS changes); the empty pass is not counted.
        loop {
            let before = change_logs(&log_dir)?.len();
            let m = runner.measured("extractor", &["--once"]).await?;
            run.extractor_rss_kb = run.extractor_rss_kb.max(m.max_rss_kb);
            if change_logs(&log_dir)?.len() == before {
                break;
            }
            run.capture_secs += m.secs;
            run.capture_cpu_secs += m.cpu_secs;
            run.capture_passes += 1;
        }
        let files = change_logs(&log_dir)?;
        for f in &files {
            run.capture_bytes += std::fs::metadata(f)?.len();
            run.capture_events += count_lines(f)?;
        }
        if let Some(r) = recvlogical {
            run.recvlogical_secs = Some(r.run(&runner, &self.clusters, &source).await?);
        }
        if let Some(dir) = debezium {
            let key = &self.spec.key[0].name;
            let d = debezium::drain(dir, &runner, &self.clusters, &source, &files, key).await?;
            eprintln!(
                "bench: {mode}: Debezium drained the same {} events in {:.2} s (extractor {:.2} s)",
                d.events, d.secs, run.capture_secs
            );
            run.debezium = Some(d);
        }
        let merge_input = if ceilings {
            Some(ceilings::merge_input(&files, &self.spec)?)
        } else {
            None
        };

        let mut wh = self.clusters.warehouse().await?;
        let before = self.versions(&wh).await?;
        let m = runner.measured("scd2-loader", &["--once"]).await?;
        run.apply_secs = m.secs;
        run.loader_rss_kb = m.max_rss_kb;
        let after = self.versions(&wh).await?;
        run.versions = (after - before) as u64;
        let pending = change_logs(&log_dir)?.len();
        if pending > 0 {
            bail!(
                "{pending} change-log file(s) were not applied; see {}",
                runner.log_dir.display()
            );
        }
        runner
            .measured("scd2-loader", &["verify"])
            .await
            .context("the history the bench produced does not verify")?;
        if let Some((input, _events)) = merge_input {
            run.apply_ceiling = Some(ceilings::apply(&wh, &self.spec).await?);
            run.sql_merge = Some(ceilings::sql_merge(&mut wh, &self.spec, &input).await?);
        }
        Ok(run)
    }

    async fn steady(
        &self,
        mode: &str,
        rate: SteadyRate,
        measure_idle: bool,
        seed: u64,
    ) -> Result<SteadyRun> {
        self.clusters.fresh().await?;
        let runner = self.runner(mode, "steady")?;
        let mut extractor = runner.spawn("extractor", &[])?;
        // The loader refuses a change-log directory the extractor has not made yet.
        let made = Instant::now() + Duration::from_secs(60);
        while !runner.cwd.join("cdc_logs").join(".pipeline").exists() && Instant::now() < made {
            extractor.check_alive()?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut loader = runner.spawn("scd2-loader", &[])?;
        // Wait until the initial copy is in the warehouse.
        let wh = self.clusters.warehouse().await?;
        let source = self.clusters.source().await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.fingerprint(&wh, true).await.ok()
            != Some(self.fingerprint(&source, false).await?)
        {
            extractor.check_alive()?;
            loader.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "the initial copy did not reach the warehouse within 60 s; see {}",
                    runner.log_dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The pipeline's processes, found before the mutator connects.
        let pipeline = cpu::Pipeline::find(extractor.pid()?, loader.pid()?, &source, &wh).await?;
        let idle_cpu = if measure_idle && self.args.idle_seconds > 0 {
            let before = pipeline.sample()?;
            tokio::time::sleep(Duration::from_secs(self.args.idle_seconds)).await;
            extractor.check_alive()?;
            loader.check_alive()?;
            Some(before.share_until(&pipeline.sample()?))
        } else {
            None
        };
        let t0 = chrono::Utc::now();
        let started = Instant::now();
        let busy_from = pipeline.sample()?;
        let mutator_args = self.steady_mutator_args(rate, seed);
        let mutator = runner.spawn("mutator", &as_strs(&mutator_args))?;
        // Logical mode: how much WAL the slot holds unconfirmed, sampled twice a second.
        let mut slot_lag = Vec::new();
        let until = Instant::now() + Duration::from_secs(self.args.steady_seconds);
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            if mode == "logical" {
                let lag = source
                    .query_opt(
                        "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::float8
                         FROM pg_replication_slots WHERE slot_name = $1",
                        &[&setup::SLOT],
                    )
                    .await?;
                slot_lag.extend(lag.map(|r| r.get::<_, f64>(0)));
            }
            tokio::time::sleep(left.min(Duration::from_millis(500))).await;
        }
        let steady_cpu = busy_from.share_until(&pipeline.sample()?);
        extractor.check_alive()?;
        loader.check_alive()?;
        let mutator_log = mutator.log.clone();
        mutator.stop().await?;
        let seconds = started.elapsed().as_secs_f64();
        let stopped = Instant::now();
        let target = self.fingerprint(&source, false).await?;
        let deadline = stopped + Duration::from_secs(120);
        while self.fingerprint(&wh, true).await? != target {
            extractor.check_alive()?;
            loader.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "the warehouse did not catch up within 120 s of the mutator's stop; see {}",
                    runner.log_dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let drain_secs = stopped.elapsed().as_secs_f64();
        extractor.stop().await?;
        loader.stop().await?;

        // Delay of each version: the commit of the batch that wrote it (track_commit_timestamp
        // on the warehouse; the batch's row is never updated) minus its change time.
        let mut rows = Vec::new();
        for history in self.histories() {
            rows.extend(
                wh.query(
                    &format!(
                        "SELECT (extract(epoch FROM pg_xact_commit_timestamp(b.xmin) - h.valid_from) * 1000)::float8,
                                extract(epoch FROM h.valid_from - $1)::float8
                         FROM {history} h JOIN public.cdc_applied_batches b USING (batch_id)
                         WHERE h.valid_from >= $1"
                    ),
                    &[&t0],
                )
                .await
                .context("reading the delays (the warehouse needs track_commit_timestamp = on)")?,
            );
        }
        let delays: Vec<(f64, f64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        Ok(SteadyRun {
            rate: rate.label(),
            seconds,
            ops: mutator_ops(&mutator_log)?,
            versions: delays.len() as u64,
            drain_secs,
            slot_lag_max_bytes: slot_lag.iter().copied().reduce(f64::max),
            idle_cpu,
            steady_cpu: Some(steady_cpu),
            ..report::delay_figures(&delays, seconds)
        })
    }
}

impl Bench {
    /// A steady phase with Debezium's engine in the pipeline's place (`--debezium`): the
    /// initial copy taken (which makes the publication), then the engine on a slot of its own,
    /// idle, then the same traffic as `steady`; each change's delay is the time the engine
    /// handed it over minus its commit time on the source.
    async fn steady_debezium(
        &self,
        rate: SteadyRate,
        measure_idle: bool,
        seed: u64,
    ) -> Result<debezium::Steady> {
        let dir = self.debezium.as_deref().context("no --debezium")?;
        self.clusters.fresh().await?;
        let runner = self.runner("logical", "steady-debezium")?;
        runner.measured("extractor", &["--once"]).await?;
        let source = self.clusters.source().await?;
        let follower = debezium::Follower::start(dir, &runner, &self.clusters, &source).await?;
        let sample = || cpu::GroupSample::of(&follower.pids);
        let mutator_args = self.steady_mutator_args(rate, seed);
        let mutator_args = as_strs(&mutator_args);
        // The JVM compiles the engine's paths under load: 10 s of the same traffic first,
        // not counted, so that the phase measures the engine as it runs for long.
        let warm_up = runner.spawn("mutator", &mutator_args)?;
        tokio::time::sleep(Duration::from_secs(10)).await;
        warm_up.stop().await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle_cpu = if measure_idle && self.args.idle_seconds > 0 {
            let before = sample();
            tokio::time::sleep(Duration::from_secs(self.args.idle_seconds)).await;
            Some(before.share_until(&sample()))
        } else {
            None
        };
        let t0 = chrono::Utc::now();
        let started = Instant::now();
        let busy_from = sample();
        let mutator = runner.spawn("mutator", &mutator_args)?;
        tokio::time::sleep(Duration::from_secs(self.args.steady_seconds)).await;
        let cpu = busy_from.share_until(&sample());
        let mutator_log = mutator.log.clone();
        mutator.stop().await?;
        let seconds = started.elapsed().as_secs_f64();
        let delays = follower.finish(&source, t0).await?;
        let d = report::delay_figures(&delays, seconds);
        Ok(debezium::Steady {
            rate: rate.label(),
            // The last run's stop line: the measured traffic's, not the warm-up's.
            ops: mutator_ops(&mutator_log)?,
            seconds,
            events: delays.len() as u64,
            p50_ms: d.p50_ms,
            p99_ms: d.p99_ms,
            max_ms: d.max_ms,
            trend_ms: d.trend_ms,
            idle_cpu,
            cpu,
        })
    }

    /// The mutator's arguments in a steady phase.
    fn steady_mutator_args(&self, rate: SteadyRate, seed: u64) -> Vec<String> {
        [
            "--rate",
            &rate.mutator_rate(),
            "--concurrency",
            &self.args.steady_writers.to_string(),
            "--seed",
            &seed.to_string(),
            "--tables",
            &self.args.tables,
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// The history tables of the workload.
    fn histories(&self) -> Vec<&'static str> {
        match self.args.tables.as_str() {
            "all" => vec![
                "public.dim_orders_history",
                "public.dim_customers_history",
                "public.dim_order_items_history",
            ],
            _ => vec!["public.dim_orders_history"],
        }
    }

    /// Versions in the workload's history tables.
    async fn versions(&self, wh: &tokio_postgres::Client) -> Result<i64> {
        let mut n = 0;
        for h in self.histories() {
            n += wh
                .query_one(&format!("SELECT count(*) FROM {h}"), &[])
                .await?
                .get::<_, i64>(0);
        }
        Ok(n)
    }

    /// What the source holds (`history` false) or the history's current rows hold: orders'
    /// rows, and with all tables the other two tables' row counts.
    async fn fingerprint(&self, client: &tokio_postgres::Client, history: bool) -> Result<String> {
        let mut parts = vec![
            fingerprint(
                client,
                if history {
                    WAREHOUSE_FINGERPRINT
                } else {
                    SOURCE_FINGERPRINT
                },
            )
            .await?,
        ];
        if self.args.tables == "all" {
            for t in ["customers", "order_items"] {
                let sql = if history {
                    format!("SELECT count(*)::text FROM public.dim_{t}_history WHERE is_current")
                } else {
                    format!("SELECT count(*)::text FROM public.{t}")
                };
                parts.push(fingerprint(client, &sql).await?);
            }
        }
        Ok(parts.join("/"))
    }
}

const SOURCE_FINGERPRINT: &str = "SELECT count(*)::text || ':' || coalesce(md5(string_agg(id::text || ':' || quantity || ':' || order_status, ',' ORDER BY id)), '')
     FROM public.orders";
const WAREHOUSE_FINGERPRINT: &str = "SELECT count(*)::text || ':' || coalesce(md5(string_agg(order_key::text || ':' || quantity || ':' || order_status, ',' ORDER BY order_key)), '')
     FROM public.dim_orders_history WHERE is_current";

async fn fingerprint(client: &tokio_postgres::Client, sql: &str) -> Result<String> {
    Ok(client.query_one(sql, &[]).await?.get(0))
}

/// `--pipeline-env NAME=VALUE`.
fn pipeline_env(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("'{s}' must be NAME=VALUE")),
    }
}

/// The operations the mutator reported when it stopped (its last `mutator stopped` line).
fn mutator_ops(log: &Path) -> Result<u64> {
    let text = std::fs::read_to_string(log)?;
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("mutator stopped"))
        .with_context(|| format!("no 'mutator stopped' line in {}", log.display()))?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    // tracing's JSON puts an event's fields beside `message` (or under `fields`).
    let f = v.get("fields").unwrap_or(&v);
    Ok(["inserts", "updates", "deletes"]
        .iter()
        .map(|k| f[k].as_u64().unwrap_or(0))
        .sum())
}

fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// The change-log files waiting in `dir`, in name order.
fn change_logs(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "jsonl")
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    files.sort();
    Ok(files)
}

fn count_lines(path: &Path) -> Result<u64> {
    let bytes = std::fs::read(path)?;
    Ok(bytes.iter().filter(|&&b| b == b'\n').count() as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn flags_are_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
