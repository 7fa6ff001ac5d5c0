-- walshift's own conformance case: DML on the tables of 00-schema.sql.
-- issue 14, finding 1
UPDATE inc_b SET b = 'y2' WHERE a = 2;
DELETE FROM inc_b WHERE a = 3;
UPDATE inc_b SET a = 10 WHERE a = 1;
INSERT INTO inc_b VALUES (4, 'w', 4);
-- @sync a primary key with INCLUDE columns
-- issue 14, finding 2
INSERT INTO idt_always (pk, name) VALUES (3, 'three');
UPDATE idt_always SET name = 'uno' WHERE pk = 1;
DELETE FROM idt_always WHERE pk = 2;
INSERT INTO idt_default (name) VALUES ('three');
INSERT INTO idt_default (id, name) VALUES (100, 'explicit');
UPDATE idt_default SET name = 'uno' WHERE id = 1;
UPDATE idt_default SET id = 50 WHERE id = 2;
INSERT INTO idt_key (name) VALUES ('three');
UPDATE idt_key SET name = 'uno' WHERE id = 1;
DELETE FROM idt_key WHERE id = 2;
-- @sync identity columns
-- issue 14, finding 3
INSERT INTO ri_only VALUES (4, 'four');
UPDATE ri_only SET b = 'uno' WHERE a = 1;
UPDATE ri_only SET a = 20 WHERE a = 2;
DELETE FROM ri_only WHERE a = 3;
-- @sync a table keyed by a replica identity index only
-- issue 14, finding 5
INSERT INTO nocols DEFAULT VALUES;
DELETE FROM nocols WHERE ctid = (SELECT min(ctid) FROM nocols);
-- @sync a table with no columns
-- issue 14, finding 6
UPDATE full_json SET tags = '["y"]' WHERE id = 1;
UPDATE full_json SET pt = '(0,0)' WHERE id = 2;
DELETE FROM full_json WHERE id = 3;
INSERT INTO full_json VALUES (4, '[1, 2, 3]', '(9,9)', '{"k": "v"}');
-- @sync REPLICA IDENTITY FULL with json and point columns
TRUNCATE parent CASCADE;
INSERT INTO parent VALUES (3, 'p3');
INSERT INTO child (parent_id) VALUES (3);
TRUNCATE counters RESTART IDENTITY;
INSERT INTO counters (n) VALUES (30);
-- @sync TRUNCATE CASCADE and RESTART IDENTITY
BEGIN;
UPDATE swap SET k = -1 WHERE k = 1;
UPDATE swap SET k = 1 WHERE k = 2;
UPDATE swap SET k = 2 WHERE k = -1;
UPDATE swap_pair SET b = 0 WHERE (a, b) = (1, 1);
UPDATE swap_pair SET b = 1 WHERE (a, b) = (1, 2);
UPDATE swap_pair SET b = 2 WHERE (a, b) = (1, 0);
COMMIT;
-- @sync two rows swap their keys in one transaction
BEGIN;
UPDATE swap SET k = k + 10;
UPDATE swap SET v = v || '!' WHERE k = 11;
DELETE FROM swap WHERE k = 13;
INSERT INTO swap VALUES (3, 'new third');
COMMIT;
