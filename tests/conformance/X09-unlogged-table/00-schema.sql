-- walshift's own conformance case (not ported): an UNLOGGED table. Logical decoding does not
-- carry its changes: the clone copies it (never an empty table without a word) and walshift
-- says that later changes are not replicated (issue 14, finding 7).
CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY, v text);
INSERT INTO scratch VALUES (1, 'kept'), (2, 'also kept');
CREATE TABLE logged (id int PRIMARY KEY, v text);
INSERT INTO logged VALUES (1, 'one');
