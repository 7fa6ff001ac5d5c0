-- walshift's own conformance case: DML on the tables of 00-schema.sql.
UPDATE full_json SET tags = '["y"]' WHERE id = 1;
UPDATE full_json SET pt = '(0,0)' WHERE id = 2;
DELETE FROM full_json WHERE id = 3;
INSERT INTO full_json VALUES (4, '[1, 2, 3]', '(9,9)', '{"k": "v"}');
-- @sync updates and a delete matched on json and point values
