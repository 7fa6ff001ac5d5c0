-- walshift's own conformance case (not ported): a table keyed only by a replica identity index, no primary key (issue 14, finding 3).
CREATE TABLE ri_only (a int NOT NULL, b text);
CREATE UNIQUE INDEX ri_only_a ON ri_only (a);
ALTER TABLE ri_only REPLICA IDENTITY USING INDEX ri_only_a;
INSERT INTO ri_only VALUES (1, 'one'), (2, 'two'), (3, 'three');
