-- walshift's own conformance case: DML on the tables of 00-schema.sql.
INSERT INTO nocols DEFAULT VALUES;
-- @sync an insert
DELETE FROM nocols WHERE ctid = (SELECT min(ctid) FROM nocols);
-- @sync a delete of one of several identical rows
