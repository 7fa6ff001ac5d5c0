-- walshift's own conformance case (not ported): a primary key with INCLUDE columns (issue 14, finding 1).
CREATE TABLE inc_b (a int, b text, c int, PRIMARY KEY (a) INCLUDE (b));
INSERT INTO inc_b VALUES (1, 'x', 1), (2, 'y', 2), (3, 'z', 3);
