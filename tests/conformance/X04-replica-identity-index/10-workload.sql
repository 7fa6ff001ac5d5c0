-- walshift's own conformance case: DML on the tables of 00-schema.sql.
INSERT INTO ri_only VALUES (4, 'four');
UPDATE ri_only SET b = 'uno' WHERE a = 1;
UPDATE ri_only SET a = 20 WHERE a = 2;
DELETE FROM ri_only WHERE a = 3;
-- @sync inserts, updates, a key update and a delete
