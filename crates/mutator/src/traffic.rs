//! Simulated application traffic: a seeded mix of inserts, updates and deletes with realistic
//! values on `orders` (a new order placed with its first line, in one statement that writes
//! two tables), `order_items` and `customers` (or on `orders` alone), either steadily (a batch
//! every interval) or as a burst of exactly N operations.

use crate::config::{MutatorConfig, Traffic};
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
    /// A new order with its first line (`order_items`), in one statement.
    InsertWithLine {
        customer: i32,
        product: i32,
        qty: i32,
        price: String,
        status: &'static str,
    },
    /// A line added to an existing order.
    AddLine {
        target: f64,
        qty: i32,
        price: String,
    },
    SetLineQuantity {
        target: f64,
        qty: i32,
    },
    DeleteLine {
        target: f64,
    },
    AddCustomer {
        email: String,
        name: String,
    },
    SetTier {
        target: String,
        tier: &'static str,
    },
    DeleteCustomer {
        target: String,
    },
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

/// Customer tiers.
const TIERS: &[&str] = &["standard", "silver", "gold"];

/// An operation on the table `traffic` picks: orders three times in five, order lines one in
/// four, customers the rest.
fn plan_for(rng: &mut StdRng, traffic: Traffic, kind: Kind) -> Plan {
    if traffic == Traffic::Orders {
        return plan(rng, kind);
    }
    let target: f64 = rng.random_range(0.0..1.0);
    let uuid = |rng: &mut StdRng| {
        let (a, b): (u64, u64) = (rng.random(), rng.random());
        let h = format!("{a:016x}{b:016x}");
        format!(
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..]
        )
    };
    match rng.random_range(0..20) {
        0..=11 => match plan(rng, kind) {
            Plan::Insert {
                customer,
                product,
                qty,
                price,
                status,
            } => Plan::InsertWithLine {
                customer,
                product,
                qty,
                price,
                status,
            },
            other => other,
        },
        12..=16 => match kind {
            Kind::Insert => Plan::AddLine {
                target,
                qty: (1..10).fake_with_rng(rng),
                price: price(rng),
            },
            Kind::Update => Plan::SetLineQuantity {
                target,
                qty: (1..20).fake_with_rng(rng),
            },
            Kind::Delete => Plan::DeleteLine { target },
        },
        _ => match kind {
            Kind::Insert => Plan::AddCustomer {
                email: fake::faker::internet::en::SafeEmail().fake_with_rng(rng),
                name: fake::faker::name::en::Name().fake_with_rng(rng),
            },
            Kind::Update => Plan::SetTier {
                target: uuid(rng),
                tier: TIERS[rng.random_range(0..TIERS.len())],
            },
            Kind::Delete => Plan::DeleteCustomer { target: uuid(rng) },
        },
    }
}

fn price(rng: &mut StdRng) -> String {
    let cents: i64 = (199..50_000).fake_with_rng(rng);
    format!("{}.{:02}", cents / 100, cents % 100)
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
    Plan::Insert {
        customer: (1000..10_000).fake_with_rng(rng),
        product: (100..1000).fake_with_rng(rng),
        qty: (1..10).fake_with_rng(rng),
        price: price(rng),
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
const INSERT_WITH_LINE: &str =
    "WITH o AS (INSERT INTO public.orders (customer_id, product_id, quantity, unit_price, order_status)
                VALUES ($1, $2, $3, $4::text::numeric, $5) RETURNING id, product_id, quantity, unit_price)
     INSERT INTO public.order_items (order_id, line_no, sku, quantity, unit_price)
     SELECT o.id, 1, 'SKU-' || o.product_id || '-1', o.quantity, o.unit_price FROM o";
// A random line: the first of a random order that has lines (an index condition, as above).
macro_rules! pick_line {
    () => {
        "(SELECT i.order_id, i.line_no FROM public.order_items i
          WHERE i.order_id >= (SELECT min(order_id) + floor($1::float8 * (max(order_id) - min(order_id) + 1))::int
                               FROM public.order_items)
          ORDER BY i.order_id, i.line_no LIMIT 1)"
    };
}
const ADD_LINE: &str = concat!(
    "INSERT INTO public.order_items (order_id, line_no, sku, quantity, unit_price)
     SELECT o.id, coalesce((SELECT max(line_no) FROM public.order_items WHERE order_id = o.id), 0) + 1,
            'SKU-' || o.product_id || '-x', $2, $3::text::numeric
     FROM public.orders o WHERE o.id = ",
    pick_row!(),
    " ON CONFLICT DO NOTHING"
);
const SET_LINE_QUANTITY: &str = concat!(
    "UPDATE public.order_items SET quantity = $2 WHERE (order_id, line_no) = ",
    pick_line!(),
    " AND quantity <> $2"
);
const DELETE_LINE: &str = concat!(
    "DELETE FROM public.order_items WHERE (order_id, line_no) = ",
    pick_line!()
);
const ADD_CUSTOMER: &str = "INSERT INTO public.customers (email, full_name) VALUES ($1, $2)";
// A random customer: the first at or after a random uuid.
const SET_TIER: &str = "UPDATE public.customers SET tier = $2
     WHERE id = (SELECT id FROM public.customers WHERE id >= $1::text::uuid ORDER BY id LIMIT 1) AND tier <> $2";
const DELETE_CUSTOMER: &str = "DELETE FROM public.customers
     WHERE id = (SELECT id FROM public.customers WHERE id >= $1::text::uuid ORDER BY id LIMIT 1)";

/// Runs one planned operation; returns how many rows it changed (0 when an update or delete
/// found no row to change). Statements are prepared once a connection.
async fn execute(tx: &deadpool_postgres::Transaction<'_>, p: &Plan) -> Result<u64> {
    let (sql, what) = match p {
        Plan::SetStatus { .. } => (SET_STATUS, "updating an order"),
        Plan::SetQuantity { .. } => (SET_QUANTITY, "updating an order"),
        Plan::Delete { .. } => (DELETE, "deleting an order"),
        Plan::Insert { .. } => (INSERT, "inserting an order"),
        Plan::InsertWithLine { .. } => (INSERT_WITH_LINE, "inserting an order with its line"),
        Plan::AddLine { .. } => (ADD_LINE, "adding an order line"),
        Plan::SetLineQuantity { .. } => (SET_LINE_QUANTITY, "updating an order line"),
        Plan::DeleteLine { .. } => (DELETE_LINE, "deleting an order line"),
        Plan::AddCustomer { .. } => (ADD_CUSTOMER, "inserting a customer"),
        Plan::SetTier { .. } => (SET_TIER, "updating a customer"),
        Plan::DeleteCustomer { .. } => (DELETE_CUSTOMER, "deleting a customer"),
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
        }
        | Plan::InsertWithLine {
            customer,
            product,
            qty,
            price,
            status,
        } => {
            tx.execute(&stmt, &[customer, product, qty, price, status])
                .await
        }
        Plan::AddLine { target, qty, price } => tx.execute(&stmt, &[target, qty, price]).await,
        Plan::SetLineQuantity { target, qty } => tx.execute(&stmt, &[target, qty]).await,
        Plan::DeleteLine { target } => tx.execute(&stmt, &[target]).await,
        Plan::AddCustomer { email, name } => tx.execute(&stmt, &[email, name]).await,
        Plan::SetTier { target, tier } => tx.execute(&stmt, &[target, tier]).await,
        Plan::DeleteCustomer { target } => tx.execute(&stmt, &[target]).await,
    }
    .map_err(ctx(what))
}

/// Performs `n` operations, `per_tx` to a transaction, with its own client and generator.
async fn run_ops(
    pool: deadpool_postgres::Pool,
    traffic: Traffic,
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
            match one_transaction(&pool, traffic, tx_seed, in_tx).await {
                Ok(batch) => {
                    stats.add(&batch);
                    done += in_tx;
                    attempts = 0;
                    backoff.reset();
                    break;
                }
                Err(e) if (e.is_retryable() || lost_a_race(&e)) && attempts < MAX_ATTEMPTS => {
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

/// Whether another writer removed the order a new line was being added to (a foreign-key
/// violation): the same operations are tried again.
fn lost_a_race(e: &Error) -> bool {
    matches!(e, Error::Db { source, .. } if source.code().is_some_and(|c| c.code() == "23503"))
}

/// Attempts at one mutation transaction before the error is returned.
const MAX_ATTEMPTS: u32 = 10;

async fn one_transaction(
    pool: &deadpool_postgres::Pool,
    traffic: Traffic,
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
            plan_for(rng, traffic, kind)
        })
        .collect();
    let changed = try_join_all(plans.iter().map(|p| execute(&tx, p))).await?;
    let mut batch = MutationStats::default();
    let mut fallback = Vec::new();
    for (p, n) in plans.iter().zip(changed) {
        match p {
            Plan::Insert { .. } | Plan::InsertWithLine { .. } | Plan::AddCustomer { .. } => {
                batch.inserts += 1
            }
            _ if n == 0 => fallback.push(insert_plan(rng)),
            Plan::AddLine { .. } => batch.inserts += 1,
            Plan::Delete { .. } | Plan::DeleteLine { .. } | Plan::DeleteCustomer { .. } => {
                batch.deletes += 1
            }
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
            cfg.tables,
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
