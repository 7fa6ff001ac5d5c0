//! The demo's small shop: a schema, starting data, and a writer that keeps placing orders the
//! way a live site would (inserts, updates, the odd cancellation), counting what it committed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

/// Schema of the live (old) version of the shop.
pub const SCHEMA: &str = "
CREATE TABLE customers (
    id         bigint PRIMARY KEY,
    first_name text NOT NULL,
    last_name  text NOT NULL,
    email      text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE products (
    id     bigint PRIMARY KEY,
    name   text NOT NULL,
    price  numeric(10,2) NOT NULL
);
CREATE TABLE orders (
    id          bigserial PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES customers(id),
    product_id  bigint NOT NULL REFERENCES products(id),
    quantity    int NOT NULL,
    amount      numeric(12,2) NOT NULL,
    status      text NOT NULL DEFAULT 'placed',
    ship_street text,
    ship_city   text,
    placed_at   timestamptz NOT NULL DEFAULT now()
);
";

/// Starting rows: `customers` customers, 50 products, `orders` orders.
pub async fn seed(
    client: &Client,
    customers: i64,
    orders: i64,
) -> Result<(), tokio_postgres::Error> {
    client
        .batch_execute(&format!(
            "INSERT INTO customers (id, first_name, last_name, email)
               SELECT g, 'First' || g, 'Last' || g, 'customer' || g || '@example.com'
               FROM generate_series(1, {customers}) g;
             INSERT INTO products (id, name, price)
               SELECT g, 'Product ' || g, (g * 1.25)::numeric(10,2) FROM generate_series(1, 50) g;
             INSERT INTO orders (customer_id, product_id, quantity, amount, ship_street, ship_city)
               SELECT 1 + g % {customers}, 1 + g % 50, 1 + g % 3, ((1 + g % 3) * (1 + g % 50) * 1.25)::numeric(12,2),
                      g || ' Main Street', 'City ' || (g % 20)
               FROM generate_series(1, {orders}) g;
             ANALYZE;"
        ))
        .await
}

/// Which server a transaction ran on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The live site (the old schema).
    Live,
    /// The migrated copy (the release's schema), once the cutover switched.
    Copy,
}

/// How the writer reaches the shop.
#[derive(Clone, Copy, Debug)]
enum Route {
    /// A direct session to the live site: statements prepared once and reused; the fenced site
    /// refusing a write (session terminated, read-only) ends the writer, as a maintenance page
    /// would.
    Direct,
    /// Through PgBouncer (transaction pooling) in front of the live site on `live_port`, until
    /// the cutover repoints it to the copy on `copy_port`. Each transaction first asks
    /// `inet_server_port()` and speaks the schema of the server it landed on (the old one on
    /// the live site, the release's on the copy, as the new version of an application would).
    /// Statements are prepared and closed inside their transaction: PgBouncer 1.18 may give
    /// the next transaction another server connection, where a statement prepared earlier does
    /// not exist. Any error ends the writer with that error: the pooler holds transactions
    /// during the cutover, it never fails them.
    Pooled { live_port: u16, copy_port: u16 },
}

/// What the writer committed.
#[derive(Clone, Debug, Default)]
pub struct WriterStats {
    pub transactions: u64,
    /// Transactions committed on the live site (direct: all of them).
    pub on_live: u64,
    /// Transactions committed on the copy (through PgBouncer, after the switch).
    pub on_copy: u64,
    pub orders_placed: u64,
    pub orders_shipped: u64,
    pub orders_cancelled: u64,
    /// Id of the last order whose transaction committed. Through PgBouncer, only an order its
    /// own transaction did not cancel again counts.
    pub last_order_id: Option<i64>,
    /// Where that order was written.
    pub last_order_side: Option<Side>,
    /// The largest order id the live site handed the writer (through PgBouncer only).
    pub max_live_order_id: Option<i64>,
    /// The first order id the copy handed the writer (through PgBouncer only).
    pub first_copy_order_id: Option<i64>,
    /// The longest transaction, `BEGIN` sent to `COMMIT` acknowledged, in milliseconds:
    /// through PgBouncer it includes the time the pooler held it during the cutover.
    pub longest_txn_ms: f64,
    /// Why the writer stopped before being asked to (its session was terminated, the
    /// database turned read-only): the server's message. Direct route only.
    pub refused: Option<String>,
}

/// Writer failures.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("the shop's writer failed: {0}")]
    Sql(#[from] tokio_postgres::Error),
    #[error(
        "the writer's transaction #{txn} through PgBouncer failed after {committed} committed transactions, \
         where the pooler should have held it, not failed it: {source}"
    )]
    Pooled {
        txn: i64,
        committed: u64,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "the writer's transaction #{txn} ran on the server at port {port:?}, neither the live site ({live_port}) \
         nor the copy ({copy_port}): PgBouncer's entry for the shop points somewhere else"
    )]
    UnknownServer {
        txn: i64,
        port: Option<i32>,
        live_port: u16,
        copy_port: u16,
    },
}

/// The release the demo performs on the copy: `customers.first_name`/`last_name` become one
/// computed `full_name`; `orders.amount` is renamed `amount_eur` and gains `amount_cents`;
/// the shipping address moves to its own table.
pub const MIGRATION: &str = "
ALTER TABLE customers ADD COLUMN full_name text;
UPDATE customers SET full_name = first_name || ' ' || last_name;
ALTER TABLE customers ALTER COLUMN full_name SET NOT NULL,
                      DROP COLUMN first_name, DROP COLUMN last_name;
ALTER TABLE orders RENAME COLUMN amount TO amount_eur;
ALTER TABLE orders ADD COLUMN amount_cents bigint;
UPDATE orders SET amount_cents = (amount_eur * 100)::bigint;
ALTER TABLE orders ALTER COLUMN amount_cents SET NOT NULL;
CREATE TABLE shipping_addresses (order_id bigint PRIMARY KEY, street text NOT NULL, city text);
INSERT INTO shipping_addresses SELECT id, ship_street, ship_city FROM orders WHERE ship_street IS NOT NULL;
ALTER TABLE orders DROP COLUMN ship_street, DROP COLUMN ship_city;
";

/// The mapping that replays the old shop's changes into the migrated copy.
pub const MAPPING: &str = r#"
[[table]]
source = "customers"
[table.columns]
full_name = "first_name || ' ' || last_name"

[[table]]
source = "orders"
[table.columns]
amount_eur   = "amount"
amount_cents = "(amount * 100)::bigint"

[[table]]
source = "orders"
target = "shipping_addresses"
filter = "ship_street IS NOT NULL"
[table.columns]
order_id = "id"
street   = "ship_street"
city     = "ship_city"
"#;

/// The old schema's statements (the live site).
const PLACE_LIVE: &str = "INSERT INTO orders (customer_id, product_id, quantity, amount, ship_street, ship_city)
     SELECT $1::bigint, p.id, $2::int, p.price * $2::int, $3::text, $4::text FROM products p WHERE p.id = $5::bigint
     RETURNING id";
const SHIP: &str = "UPDATE orders SET status = 'shipped' WHERE id = (SELECT min(id) FROM orders WHERE status = 'placed')";
const CANCEL_LIVE: &str =
    "DELETE FROM orders WHERE id = (SELECT max(id) FROM orders WHERE status = 'placed')";
const CANCEL_LIVE_RETURNING: &str = "DELETE FROM orders WHERE id = (SELECT max(id) FROM orders WHERE status = 'placed') RETURNING id";

/// The release's statements (the copy): the amount in euros and cents, the address in its own
/// table, which a cancellation empties too.
const PLACE_COPY: &str = "WITH o AS (
       INSERT INTO orders (customer_id, product_id, quantity, amount_eur, amount_cents)
       SELECT $1::bigint, p.id, $2::int, p.price * $2::int, (p.price * $2::int * 100)::bigint
       FROM products p WHERE p.id = $5::bigint
       RETURNING id),
     a AS (INSERT INTO shipping_addresses (order_id, street, city)
           SELECT id, $3::text, $4::text FROM o WHERE $3::text IS NOT NULL)
     SELECT id FROM o";
const CANCEL_COPY: &str = "WITH d AS (
       DELETE FROM orders WHERE id = (SELECT max(id) FROM orders WHERE status = 'placed') RETURNING id),
     a AS (DELETE FROM shipping_addresses WHERE order_id IN (SELECT id FROM d))
     SELECT id FROM d";

/// One transaction's order: who, what, where.
struct Order {
    n: i64,
    customer: i64,
    qty: i32,
    street: Option<String>,
    city: String,
    product: i64,
}

impl Order {
    fn nth(n: i64, customers: i64) -> Order {
        Order {
            n,
            customer: 1 + (n * 7919) % customers.max(1),
            qty: (1 + n % 4) as i32,
            // Every fifteenth order has no shipping address (a pickup).
            street: (n % 15 != 0).then(|| format!("{n} Side Road")),
            city: format!("City {}", n % 20),
            product: 1 + n % 50,
        }
    }
}

/// What one pooled transaction did.
struct Pooled {
    side: Side,
    id: i64,
    shipped: u64,
    cancelled: Option<i64>,
}

/// A running writer; [`Writer::stop`] ends it and returns what it committed.
pub struct Writer {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    handle: tokio::task::JoinHandle<Result<WriterStats, WriterError>>,
}

impl Writer {
    /// Starts placing about `tps` transactions a second (each: one new order, and every
    /// fifth also ships one order; every tenth cancels — deletes — one) on a direct session to
    /// the live site; the fence refusing a write ends it ([`WriterStats::refused`]).
    pub fn start(client: Client, customers: i64, tps: u32) -> Writer {
        Self::spawn(client, customers, tps, Route::Direct)
    }

    /// As [`Writer::start`], on a session through PgBouncer whose entry points at the live
    /// site on `live_port` until a cutover repoints it to the copy on `copy_port`. Each
    /// transaction speaks the schema of the server it landed on; any error ends the writer
    /// with that error.
    pub fn start_pooled(
        client: Client,
        customers: i64,
        tps: u32,
        live_port: u16,
        copy_port: u16,
    ) -> Writer {
        Self::spawn(
            client,
            customers,
            tps,
            Route::Pooled {
                live_port,
                copy_port,
            },
        )
    }

    fn spawn(client: Client, customers: i64, tps: u32, route: Route) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let (s, c) = (stop.clone(), committed.clone());
        let handle = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / tps.max(1) as f64));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            match route {
                Route::Direct => direct(&client, customers, &mut tick, &s, &c).await,
                Route::Pooled {
                    live_port,
                    copy_port,
                } => pooled(&client, customers, &mut tick, &s, &c, live_port, copy_port).await,
            }
        });
        Writer {
            stop,
            committed,
            handle,
        }
    }

    /// Whether the writer has stopped (asked to, refused by the database, or failed).
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Transactions committed so far.
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    /// Stops after the current transaction and returns the totals.
    pub async fn stop(self) -> Result<WriterStats, WriterError> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.await.expect("writer task panicked")
    }
}

fn record_latency(stats: &mut WriterStats, began: Instant) {
    let ms = began.elapsed().as_secs_f64() * 1000.0;
    if ms > stats.longest_txn_ms {
        stats.longest_txn_ms = ms;
    }
}

async fn direct(
    client: &Client,
    customers: i64,
    tick: &mut tokio::time::Interval,
    stop: &AtomicBool,
    committed: &AtomicU64,
) -> Result<WriterStats, WriterError> {
    let mut stats = WriterStats::default();
    let place = client.prepare(PLACE_LIVE).await?;
    let ship = client.prepare(SHIP).await?;
    let cancel = client.prepare(CANCEL_LIVE).await?;
    let mut n: i64 = 0;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        n += 1;
        let o = Order::nth(n, customers);
        let began = Instant::now();
        let txn = async {
            client.batch_execute("BEGIN").await?;
            let id: i64 = client
                .query_one(
                    &place,
                    &[&o.customer, &o.qty, &o.street, &o.city, &o.product],
                )
                .await?
                .get(0);
            let shipped = if n % 5 == 0 {
                client.execute(&ship, &[]).await?
            } else {
                0
            };
            let cancelled = if n % 10 == 0 {
                client.execute(&cancel, &[]).await?
            } else {
                0
            };
            client.batch_execute("COMMIT").await?;
            Ok::<_, tokio_postgres::Error>((id, shipped, cancelled))
        };
        match txn.await {
            Ok((id, shipped, cancelled)) => {
                record_latency(&mut stats, began);
                stats.orders_placed += 1;
                stats.orders_shipped += shipped;
                stats.orders_cancelled += cancelled;
                stats.last_order_id = Some(id);
                stats.last_order_side = Some(Side::Live);
                stats.transactions += 1;
                stats.on_live += 1;
                committed.store(stats.transactions, Ordering::Relaxed);
            }
            // The site was fenced (session terminated, or read-only): a real
            // application would show its maintenance page now.
            Err(e) if refused(&e) => {
                stats.refused = Some(
                    e.as_db_error()
                        .map(|d| d.message().to_owned())
                        .unwrap_or_else(|| e.to_string()),
                );
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(stats)
}

async fn pooled(
    client: &Client,
    customers: i64,
    tick: &mut tokio::time::Interval,
    stop: &AtomicBool,
    committed: &AtomicU64,
    live_port: u16,
    copy_port: u16,
) -> Result<WriterStats, WriterError> {
    let mut stats = WriterStats::default();
    let mut n: i64 = 0;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        n += 1;
        let o = Order::nth(n, customers);
        let began = Instant::now();
        let done = pooled_txn(client, &o, live_port, copy_port)
            .await
            .map_err(|e| match e {
                WriterError::Sql(source) => WriterError::Pooled {
                    txn: n,
                    committed: stats.transactions,
                    source,
                },
                other => other,
            })?;
        record_latency(&mut stats, began);
        stats.transactions += 1;
        stats.orders_placed += 1;
        stats.orders_shipped += done.shipped;
        match done.side {
            Side::Live => {
                stats.on_live += 1;
                stats.max_live_order_id = stats.max_live_order_id.max(Some(done.id));
            }
            Side::Copy => {
                stats.on_copy += 1;
                stats.first_copy_order_id.get_or_insert(done.id);
            }
        }
        if let Some(gone) = done.cancelled {
            stats.orders_cancelled += 1;
            if stats.last_order_id == Some(gone) {
                stats.last_order_id = None;
                stats.last_order_side = None;
            }
        }
        if done.cancelled != Some(done.id) {
            stats.last_order_id = Some(done.id);
            stats.last_order_side = Some(done.side);
        }
        committed.store(stats.transactions, Ordering::Relaxed);
    }
    Ok(stats)
}

/// One transaction through PgBouncer: the server it landed on decides the schema it speaks.
async fn pooled_txn(
    client: &Client,
    o: &Order,
    live_port: u16,
    copy_port: u16,
) -> Result<Pooled, WriterError> {
    client.batch_execute("BEGIN").await?;
    let port: Option<i32> = client
        .query_one("SELECT inet_server_port()", &[])
        .await?
        .get(0);
    let side = match port {
        Some(p) if p == i32::from(live_port) => Side::Live,
        Some(p) if p == i32::from(copy_port) => Side::Copy,
        _ => {
            return Err(WriterError::UnknownServer {
                txn: o.n,
                port,
                live_port,
                copy_port,
            });
        }
    };
    let (place, cancel) = match side {
        Side::Live => (PLACE_LIVE, CANCEL_LIVE_RETURNING),
        Side::Copy => (PLACE_COPY, CANCEL_COPY),
    };
    let id: i64 = client
        .query_one(
            place,
            &[&o.customer, &o.qty, &o.street, &o.city, &o.product],
        )
        .await?
        .get(0);
    let shipped = if o.n % 5 == 0 {
        client.execute(SHIP, &[]).await?
    } else {
        0
    };
    let cancelled = if o.n % 10 == 0 {
        client.query_opt(cancel, &[]).await?.map(|r| r.get(0))
    } else {
        None
    };
    client.batch_execute("COMMIT").await?;
    Ok(Pooled {
        side,
        id,
        shipped,
        cancelled,
    })
}

/// An error a fenced source gives a writer: its session terminated, its connection gone, or
/// a write refused in a read-only transaction.
fn refused(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    e.is_closed()
        || e.as_db_error().is_some_and(|d| {
            [
                SqlState::ADMIN_SHUTDOWN,
                SqlState::READ_ONLY_SQL_TRANSACTION,
            ]
            .contains(d.code())
        })
        || e.to_string().contains("connection closed")
}
