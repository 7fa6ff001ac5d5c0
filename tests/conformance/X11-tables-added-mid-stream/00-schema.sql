-- walshift's own conformance case (not ported): tables created on the source after the clone.
-- The FOR ALL TABLES publication picks them up; the release repeats the DDL on the copy
-- (`-- @both`), and their rows then arrive through replay.
CREATE TABLE base (id int PRIMARY KEY, v text);
INSERT INTO base VALUES (1, 'one');
