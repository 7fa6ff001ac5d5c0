-- walshift's own conformance case (not ported): what logical decoding does not carry. An
-- UNLOGGED table and large objects: copied by the clone (never left behind without a word),
-- and walshift says that later changes to them are not replicated (issue 14, finding 7).
CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY, v text);
INSERT INTO scratch VALUES (1, 'kept'), (2, 'also kept');
CREATE TABLE docs (id int PRIMARY KEY, title text, body oid);
INSERT INTO docs VALUES (1, 'first', lo_from_bytea(0, 'hello large object')),
                        (2, 'second', lo_from_bytea(0, decode(repeat('00ff', 5000), 'hex')));
