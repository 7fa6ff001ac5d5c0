-- walshift's own conformance case (not ported): one source transaction larger than a replay
-- batch (default 50 000 changes), whose changes touch the same keys several times, with TOASTed
-- values left unchanged by later updates.
CREATE TABLE big (id int PRIMARY KEY, n int, doc text);
INSERT INTO big SELECT g, g, CASE WHEN g % 1000 = 0 THEN repeat(md5(g::text), 400) END FROM generate_series(1, 5000) g;
