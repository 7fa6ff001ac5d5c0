-- walshift's own conformance case: DML on the tables of 00-schema.sql.
INSERT INTO customer (id, name) SELECT g, 'c' || g FROM generate_series(3, 200) g;
INSERT INTO orders (id, customer_id) SELECT g, g FROM generate_series(3, 200) g;
UPDATE customer SET name = upper(name) WHERE id % 3 = 0;
UPDATE orders SET st = 'paid' WHERE id % 2 = 0;
-- @sync parents and children written together, triggers fired on the source only
DELETE FROM customer WHERE id % 5 = 0;
BEGIN;
INSERT INTO customer (id, name) VALUES (1000, 'late');
INSERT INTO orders (id, customer_id, note) VALUES (1000, 1000, 'parent and child in one transaction');
UPDATE orders SET customer_id = 1000 WHERE id = 1;
COMMIT;
-- @both a new enum value
ALTER TYPE status ADD VALUE 'refunded';
-- @src
UPDATE orders SET st = 'refunded' WHERE id = 2;
INSERT INTO orders (id, customer_id, st) VALUES (1001, 1000, 'refunded');
-- @sync cascaded deletes, a new parent, the new enum value
