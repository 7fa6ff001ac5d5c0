-- walshift's conformance harness plan for this folder (not vendored; see ../README.md), as the
-- headers of the files describe: Pagila, then 10-ddl.sql and 11-special-dml.sql before the
-- snapshot; streamed: 20-dml-pgoutput.sql, 11-special-dml.sql again, 21-dml-test-decoding.sql,
-- 22-additions.sql, each in its own psql session; one catch-up at the end.
-- Tables without key or replica identity are refused by design, naming them and the fix.
-- @phase
-- @load-pagila
-- @setup 10-ddl.sql
-- @setup 11-special-dml.sql
-- @stream 20-dml-pgoutput.sql
-- @stream 11-special-dml.sql
-- @stream 21-dml-test-decoding.sql
-- @stream 22-additions.sql
-- @expect-refusal "public"."""dqname"""
-- @expect-refusal "public"."xpto2"
-- @expect-refusal REPLICA IDENTITY FULL
-- @fix
ALTER TABLE public."""dqname""" REPLICA IDENTITY FULL;
ALTER TABLE public.xpto2 REPLICA IDENTITY FULL;
