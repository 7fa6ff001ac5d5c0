-- walshift's own conformance case: DML on the tables of 00-schema.sql.
UPDATE inc_b SET b = 'y2' WHERE a = 2;
DELETE FROM inc_b WHERE a = 3;
UPDATE inc_b SET a = 10 WHERE a = 1;
INSERT INTO inc_b VALUES (4, 'w', 4);
-- @sync updates, a delete and a key update
UPDATE inc_b SET b = 'w2', c = 40 WHERE a = 4;
DELETE FROM inc_b WHERE a = 10;
