-- walshift's own conformance case: DDL repeated on the copy, then DML on the new tables.
INSERT INTO base VALUES (2, 'two');
-- @both create two tables, one in a new schema
CREATE TABLE added (id int PRIMARY KEY, note text);
CREATE SCHEMA late;
CREATE TABLE late."Later" (k text PRIMARY KEY, n int);
-- @src
INSERT INTO added VALUES (1, 'one'), (2, 'two');
INSERT INTO late."Later" VALUES ('a', 1);
UPDATE base SET v = 'uno' WHERE id = 1;
-- @sync rows of the new tables replicated
UPDATE added SET note = 'uno' WHERE id = 1;
DELETE FROM added WHERE id = 2;
UPDATE late."Later" SET k = 'b' WHERE k = 'a';
-- @both add a column to a table created mid-stream
ALTER TABLE added ADD COLUMN extra int DEFAULT 7;
-- @src
INSERT INTO added (id, note) VALUES (3, 'three');
UPDATE added SET extra = 8 WHERE id = 1;
-- @sync updates and a column added mid-stream
