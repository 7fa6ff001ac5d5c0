-- walshift's own conformance case: the logged table that points at large objects changes; the
-- large objects and the unlogged table do not (their changes are not replicated by design).
UPDATE docs SET title = 'first, renamed' WHERE id = 1;
DELETE FROM docs WHERE id = 2;
INSERT INTO docs VALUES (3, 'third', NULL);
-- @sync the logged table's changes
