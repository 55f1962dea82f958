//! Simulated application traffic on `orders`: a seeded mix of inserts, updates and deletes
//! with realistic values, either steadily (a batch every interval) or as a burst of exactly N
//! operations.

use crate::config::MutatorConfig;
use cdc_core::db::{self, ctx};
use cdc_core::error::{error_chain, Error, Result};
use cdc_core::shutdown::Shutdown;
use fake::rand::rngs::StdRng;
use fake::rand::{RngExt, SeedableRng};
use fake::Fake;
use futures_util::future::try_join_all;
use std::time::Duration;
use tokio::time::MissedTickBehavior;

/// Order statuses, in the order an order moves through them.
pub const STATUSES: &[&str] = &[
    "pending",
    "confirmed",
    "processing",
    "shipped",
    "delivered",
    "cancelled",
    "returned",
];

/// The operation mix, in percent: inserts, updates, deletes.
pub const MIX: (u32, u32, u32) = (40, 45, 15);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MutationStats {
    pub inserts: u64,
    pub updates: u64,
    pub deletes: u64,
}

impl MutationStats {
    pub fn total(&self) -> u64 {
        self.inserts + self.updates + self.deletes
    }

    fn add(&mut self, o: &MutationStats) {
        self.inserts += o.inserts;
        self.updates += o.updates;
        self.deletes += o.deletes;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Insert,
    Update,
    Delete,
}

fn pick(rng: &mut StdRng) -> Kind {
    let roll: u32 = rng.random_range(0..100);
    if roll < MIX.0 {
        Kind::Insert
    } else if roll < MIX.0 + MIX.1 {
        Kind::Update
    } else {
        Kind::Delete
    }
}

/// One planned operation, its values drawn from the generator.
enum Plan {
    SetStatus {
        target: f64,
        status: &'static str,
    },
    SetQuantity {
        target: f64,
        qty: i32,
    },
    Delete {
        target: f64,
    },
    Insert {
        customer: i32,
        product: i32,
        qty: i32,
        price: String,
        status: &'static str,
    },
}

fn plan(rng: &mut StdRng, kind: Kind) -> Plan {
    let target: f64 = rng.random_range(0.0..1.0);
    match kind {
        Kind::Update if rng.random_bool(0.6) => Plan::SetStatus {
            target,
            status: STATUSES[rng.random_range(0..STATUSES.len())],
        },
        Kind::Update => Plan::SetQuantity {
            target,
            qty: (1..20).fake_with_rng(rng),
        },
        Kind::Delete => Plan::Delete { target },
        Kind::Insert => insert_plan(rng),
    }
}

fn insert_plan(rng: &mut StdRng) -> Plan {
    let cents: i64 = (199..50_000).fake_with_rng(rng);
    Plan::Insert {
        customer: (1000..10_000).fake_with_rng(rng),
        product: (100..1000).fake_with_rng(rng),
        qty: (1..10).fake_with_rng(rng),
        price: format!("{}.{:02}", cents / 100, cents % 100),
        status: STATUSES[rng.random_range(0..3)],
    }
}

// A random existing row. The bound is a scalar subquery so that it is an index condition (a
// join with the min/max row made the planner scan the index up to the target: O(rows) an
// operation).
macro_rules! pick_row {
    () => {
        "(SELECT o.id FROM public.orders o
          WHERE o.id >= (SELECT min(id) + floor($1::float8 * (max(id) - min(id) + 1))::int FROM public.orders)
          ORDER BY o.id LIMIT 1)"
    };
}
const SET_STATUS: &str = concat!(
    "UPDATE public.orders SET order_status = $2 WHERE id = ",
    pick_row!(),
    " AND order_status <> $2"
);
const SET_QUANTITY: &str = concat!(
    "UPDATE public.orders SET quantity = $2 WHERE id = ",
    pick_row!(),
    " AND quantity <> $2"
);
const DELETE: &str = concat!("DELETE FROM public.orders WHERE id = ", pick_row!());
const INSERT: &str =
    "INSERT INTO public.orders (customer_id, product_id, quantity, unit_price, order_status)
     VALUES ($1, $2, $3, $4::text::numeric, $5)";

/// Runs one planned operation; returns how many rows it changed (0 when an update or delete
/// found no row to change). Statements are prepared once a connection.
async fn execute(tx: &deadpool_postgres::Transaction<'_>, p: &Plan) -> Result<u64> {
    let (sql, what) = match p {
        Plan::SetStatus { .. } => (SET_STATUS, "updating an order"),
        Plan::SetQuantity { .. } => (SET_QUANTITY, "updating an order"),
        Plan::Delete { .. } => (DELETE, "deleting an order"),
        Plan::Insert { .. } => (INSERT, "inserting an order"),
    };
    let stmt = tx.prepare_cached(sql).await.map_err(ctx(what))?;
    match p {
        Plan::SetStatus { target, status } => tx.execute(&stmt, &[target, status]).await,
        Plan::SetQuantity { target, qty } => tx.execute(&stmt, &[target, qty]).await,
        Plan::Delete { target } => tx.execute(&stmt, &[target]).await,
        Plan::Insert {
            customer,
            product,
            qty,
            price,
            status,
        } => {
            tx.execute(&stmt, &[customer, product, qty, price, status])
                .await
        }
    }
    .map_err(ctx(what))
}

/// Performs `n` operations, `per_tx` to a transaction, with its own client and generator.
async fn run_ops(
    pool: deadpool_postgres::Pool,
    seed: u64,
    n: u64,
    per_tx: u32,
    shutdown: Shutdown,
) -> Result<MutationStats> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut stats = MutationStats::default();
    let mut done = 0;
    let mut backoff = db::Backoff::default();
    let mut attempts = 0;
    while done < n && !shutdown.is_triggered() {
        let in_tx = (per_tx as u64).min(n - done);
        // A deadlock or serialization failure between writers, or a lost connection, retries
        // the same operations (same seed) with backoff.
        let tx_seed: u64 = rng.random();
        loop {
            match one_transaction(&pool, tx_seed, in_tx).await {
                Ok(batch) => {
                    stats.add(&batch);
                    done += in_tx;
                    attempts = 0;
                    backoff.reset();
                    break;
                }
                Err(e) if e.is_retryable() && attempts < MAX_ATTEMPTS => {
                    attempts += 1;
                    tracing::debug!(error = %error_chain(&e), attempts, "mutation transaction failed; retrying");
                    if shutdown.sleep(backoff.next_delay()).await {
                        return Ok(stats);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(stats)
}

/// Attempts at one mutation transaction before the error is returned.
const MAX_ATTEMPTS: u32 = 10;

async fn one_transaction(
    pool: &deadpool_postgres::Pool,
    seed: u64,
    ops: u64,
) -> Result<MutationStats> {
    let rng = &mut StdRng::seed_from_u64(seed);
    let mut client = pool.get().await.map_err(|e| Error::Pool {
        context: "getting a writer connection".into(),
        source: e,
    })?;
    let tx = client
        .transaction()
        .await
        .map_err(ctx("starting a mutation transaction"))?;
    // The transaction's operations are sent pipelined (one round trip for all, executed in
    // order); an update or delete that found no row becomes an insert, so that every
    // operation changes exactly one row.
    let plans: Vec<Plan> = (0..ops)
        .map(|_| {
            let kind = pick(rng);
            plan(rng, kind)
        })
        .collect();
    let changed = try_join_all(plans.iter().map(|p| execute(&tx, p))).await?;
    let mut batch = MutationStats::default();
    let mut fallback = Vec::new();
    for (p, n) in plans.iter().zip(changed) {
        match p {
            Plan::Insert { .. } => batch.inserts += 1,
            _ if n == 0 => fallback.push(insert_plan(rng)),
            Plan::Delete { .. } => batch.deletes += 1,
            _ => batch.updates += 1,
        }
    }
    try_join_all(fallback.iter().map(|p| execute(&tx, p))).await?;
    batch.inserts += fallback.len() as u64;
    tx.commit().await.map_err(ctx("committing mutations"))?;
    Ok(batch)
}

/// Runs `total` operations spread over `concurrency` writers.
async fn burst(
    pool: &deadpool_postgres::Pool,
    cfg: &MutatorConfig,
    seed: u64,
    total: u64,
    shutdown: &Shutdown,
) -> Result<MutationStats> {
    let workers = cfg.concurrency as u64;
    let mut handles = Vec::with_capacity(cfg.concurrency);
    for w in 0..workers {
        let share = total / workers + u64::from(w < total % workers);
        if share == 0 {
            continue;
        }
        handles.push(tokio::spawn(run_ops(
            pool.clone(),
            seed.wrapping_add(w.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            share,
            cfg.ops_per_transaction,
            shutdown.clone(),
        )));
    }
    let mut stats = MutationStats::default();
    for h in handles {
        let s = h
            .await
            .map_err(|e| Error::setup("mutator worker", e.to_string()))??;
        stats.add(&s);
    }
    Ok(stats)
}

/// Runs the mutator: a burst of `count` operations, or steady batches until shutdown.
pub async fn run(cfg: &MutatorConfig, shutdown: Shutdown) -> Result<MutationStats> {
    // Connect once with retry so that an unreachable source is reported clearly.
    let probe = db::connect(&cfg.source, &shutdown).await?;
    drop(probe);
    let pool = db::pool(&cfg.source, cfg.concurrency)?;
    tracing::info!(source = %cfg.source.display(), seed = cfg.seed, count = ?cfg.count, "mutator started");
    let mut total = MutationStats::default();
    if let Some(count) = cfg.count {
        total = burst(&pool, cfg, cfg.seed, count, &shutdown).await?;
    } else {
        // Fixed rate: batches of a tenth of a second's operations on a fixed schedule (a late
        // batch is caught up, so the offered rate holds whenever the source keeps up).
        // Otherwise a batch, then a pause of `interval`.
        let (batch, period) = match cfg.rate {
            Some(rate) => {
                let batch = (rate / 10.0).ceil().max(1.0);
                (batch as u32, Duration::from_secs_f64(batch / rate))
            }
            None => (cfg.batch_size, cfg.interval),
        };
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
        let mut round: u64 = 0;
        loop {
            if cfg.rate.is_some() {
                tokio::select! {
                    _ = ticks.tick() => {}
                    () = shutdown.wait() => break,
                }
            }
            let seed = cfg
                .seed
                .wrapping_add(round.wrapping_mul(0xD1B5_4A32_D192_ED03));
            match burst(&pool, cfg, seed, u64::from(batch), &shutdown).await {
                Ok(s) => {
                    if cfg.rate.is_some() {
                        tracing::debug!(
                            inserts = s.inserts,
                            updates = s.updates,
                            deletes = s.deletes,
                            "mutation batch"
                        );
                    } else {
                        tracing::info!(
                            inserts = s.inserts,
                            updates = s.updates,
                            deletes = s.deletes,
                            "mutation batch"
                        );
                    }
                    total.add(&s);
                }
                Err(e) if e.is_retryable() => {
                    tracing::warn!(error = %error_chain(&e), "mutation batch failed; will retry");
                }
                Err(e) => return Err(e),
            }
            round += 1;
            if shutdown.is_triggered() || (cfg.rate.is_none() && shutdown.sleep(cfg.interval).await)
            {
                break;
            }
        }
    }
    tracing::info!(
        inserts = total.inserts,
        updates = total.updates,
        deletes = total.deletes,
        "mutator stopped"
    );
    Ok(total)
}
