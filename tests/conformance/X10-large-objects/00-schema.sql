-- walshift's own conformance case (not ported): large objects. Logical decoding does not carry
-- them: the clone copies them (the copy's oid columns must not dangle) and walshift warns that
-- changes to them during the release are not replicated (issue 14, finding 7).
CREATE TABLE docs (id int PRIMARY KEY, title text, body oid);
INSERT INTO docs VALUES (1, 'first', lo_from_bytea(0, 'hello large object')),
                        (2, 'second', lo_from_bytea(0, decode(repeat('00ff', 5000), 'hex')));
