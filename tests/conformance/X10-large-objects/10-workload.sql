-- walshift's own conformance case: the table pointing at the large objects changes; the large
-- objects do not (their changes are not replicated by design).
UPDATE docs SET title = 'first, renamed' WHERE id = 1;
DELETE FROM docs WHERE id = 2;
INSERT INTO docs VALUES (3, 'third', NULL);
-- @sync the table's changes
