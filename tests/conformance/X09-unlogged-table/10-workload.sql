-- walshift's own conformance case: the logged table changes; the unlogged one is compared after
-- the clone only (see walshift-plan.sql).
UPDATE logged SET v = 'uno' WHERE id = 1;
INSERT INTO logged VALUES (2, 'two');
-- @sync the logged table's changes
