-- walshift's own conformance case: DML on the tables of 00-schema.sql.
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
-- @sync every key moves, one row changes again, a key is reused
