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
}

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
                     SELECT $1::bigint, p.id, $2::int, p.price * $2::int, $3::text, $4::text FROM products p WHERE p.id = $5::bigint",
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
                client.batch_execute("BEGIN").await?;
                let customer = 1 + (n * 7919) % customers.max(1);
                let qty = (1 + n % 4) as i32;
                client
                    .execute(
                        &place,
                        &[
                            &customer,
                            &qty,
                            &format!("{n} Side Road"),
                            &format!("City {}", n % 20),
                            &(1 + n % 50),
                        ],
                    )
                    .await?;
                stats.orders_placed += 1;
                if n % 5 == 0 {
                    stats.orders_shipped += client.execute(&ship, &[]).await?;
                }
                if n % 10 == 0 {
                    stats.orders_cancelled += client.execute(&cancel, &[]).await?;
                }
                client.batch_execute("COMMIT").await?;
                stats.transactions += 1;
                c.store(stats.transactions, Ordering::Relaxed);
            }
            Ok(stats)
        });
        Writer {
            stop,
            committed,
            handle,
        }
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
