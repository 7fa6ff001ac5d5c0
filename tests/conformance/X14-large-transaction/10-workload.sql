-- walshift's own conformance case: 60 000 inserts, 30 000 updates, 10 000 deletes, 5 000 key
-- updates in one transaction, then small ones on the same keys.
BEGIN;
INSERT INTO big SELECT g, g, NULL FROM generate_series(5001, 65000) g;
UPDATE big SET n = n + 1 WHERE id % 2 = 0;
DELETE FROM big WHERE id % 6 = 1;
UPDATE big SET id = id + 100000 WHERE id % 12 = 5;
UPDATE big SET n = -n WHERE id BETWEEN 1 AND 3000;
COMMIT;
-- @sync one transaction larger than a batch
UPDATE big SET n = 0 WHERE id % 1000 = 0;
DELETE FROM big WHERE id > 100000 AND id % 7 = 0;
INSERT INTO big VALUES (1, 1, 'reused key');
-- @sync small transactions after it
