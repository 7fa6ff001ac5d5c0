//! The demo's small shop: a schema, starting data, and a writer that keeps placing orders the
//! way a live site would (inserts, updates, the odd cancellation), counting what it committed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

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

/// What the writer committed.
#[derive(Clone, Debug, Default)]
pub struct WriterStats {
    pub transactions: u64,
    pub orders_placed: u64,
    pub orders_shipped: u64,
    pub orders_cancelled: u64,
    /// Id of the last order whose transaction committed.
    pub last_order_id: Option<i64>,
    /// Why the writer stopped before being asked to (its session was terminated, the
    /// database turned read-only): the server's message.
    pub refused: Option<String>,
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

/// A running writer; [`Writer::stop`] ends it and returns what it committed.
pub struct Writer {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    handle: tokio::task::JoinHandle<Result<WriterStats, tokio_postgres::Error>>,
}

impl Writer {
    /// Starts placing about `tps` transactions a second (each: one new order, and every
    /// fifth also ships one order; every tenth cancels — deletes — one).
    pub fn start(client: Client, customers: i64, tps: u32) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let (s, c) = (stop.clone(), committed.clone());
        let handle = tokio::spawn(async move {
            let mut stats = WriterStats::default();
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / tps.max(1) as f64));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let place = client
                .prepare(
                    "INSERT INTO orders (customer_id, product_id, quantity, amount, ship_street, ship_city)
                     SELECT $1::bigint, p.id, $2::int, p.price * $2::int, $3::text, $4::text FROM products p WHERE p.id = $5::bigint
                     RETURNING id",
                )
                .await?;
            let ship = client
                .prepare("UPDATE orders SET status = 'shipped' WHERE id = (SELECT min(id) FROM orders WHERE status = 'placed')")
                .await?;
            let cancel = client
                .prepare("DELETE FROM orders WHERE id = (SELECT max(id) FROM orders WHERE status = 'placed')")
                .await?;
            let mut n: i64 = 0;
            while !s.load(Ordering::Relaxed) {
                tick.tick().await;
                n += 1;
                let customer = 1 + (n * 7919) % customers.max(1);
                let qty = (1 + n % 4) as i32;
                // Every fifteenth order has no shipping address (a pickup).
                let street = (n % 15 != 0).then(|| format!("{n} Side Road"));
                let txn = async {
                    client.batch_execute("BEGIN").await?;
                    let id: i64 = client
                        .query_one(
                            &place,
                            &[
                                &customer,
                                &qty,
                                &street,
                                &format!("City {}", n % 20),
                                &(1 + n % 50),
                            ],
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
                        stats.orders_placed += 1;
                        stats.orders_shipped += shipped;
                        stats.orders_cancelled += cancelled;
                        stats.last_order_id = Some(id);
                        stats.transactions += 1;
                        c.store(stats.transactions, Ordering::Relaxed);
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
                    Err(e) => return Err(e),
                }
            }
            Ok(stats)
        });
        Writer {
            stop,
            committed,
            handle,
        }
    }

    /// Whether the writer has stopped (asked to, or refused by the database).
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Transactions committed so far.
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    /// Stops after the current transaction and returns the totals.
    pub async fn stop(self) -> Result<WriterStats, tokio_postgres::Error> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.await.expect("writer task panicked")
    }
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
