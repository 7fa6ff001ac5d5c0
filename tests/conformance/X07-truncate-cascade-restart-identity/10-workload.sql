-- walshift's own conformance case: DML on the tables of 00-schema.sql.
TRUNCATE parent CASCADE;
INSERT INTO parent VALUES (3, 'p3');
INSERT INTO child (parent_id) VALUES (3);
TRUNCATE counters RESTART IDENTITY;
INSERT INTO counters (n) VALUES (30);
-- @sync truncates and the rows after them
BEGIN;
INSERT INTO counters (n) VALUES (40);
TRUNCATE counters RESTART IDENTITY;
INSERT INTO counters (n) VALUES (50);
COMMIT;
-- @sync a truncate between inserts in one transaction
