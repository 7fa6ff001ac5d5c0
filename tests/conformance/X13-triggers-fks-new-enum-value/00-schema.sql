-- walshift's own conformance case (not ported): the clone copies triggers and foreign keys, so
-- the copy has them while replay writes: a trigger that rewrites a column and one that writes an
-- audit row must not fire on the copy (the source's results arrive through replay), and rows
-- whose parent is written in the same batch must land whatever connection carries them. Then an
-- enum gains a value mid-stream (the release repeats the DDL on the copy) and rows use it.
CREATE TYPE status AS ENUM ('new', 'paid');
CREATE TABLE customer (id int PRIMARY KEY, name text, touched timestamptz);
CREATE TABLE orders (id int PRIMARY KEY, customer_id int NOT NULL REFERENCES customer ON DELETE CASCADE,
                     st status NOT NULL DEFAULT 'new', note text);
CREATE TABLE audit (id bigserial PRIMARY KEY, what text NOT NULL);
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN NEW.touched := clock_timestamp(); RETURN NEW; END $$;
CREATE TRIGGER customer_touch BEFORE INSERT OR UPDATE ON customer FOR EACH ROW EXECUTE FUNCTION touch();
CREATE FUNCTION log_order() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN INSERT INTO audit (what) VALUES (TG_OP || ' ' || NEW.id); RETURN NEW; END $$;
CREATE TRIGGER orders_log AFTER INSERT OR UPDATE ON orders FOR EACH ROW EXECUTE FUNCTION log_order();
INSERT INTO customer (id, name) VALUES (1, 'ann'), (2, 'bob');
INSERT INTO orders (id, customer_id) VALUES (1, 1), (2, 2);
