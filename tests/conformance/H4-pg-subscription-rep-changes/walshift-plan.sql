-- walshift's conformance harness plan for this folder (not vendored; see ../README.md).
-- Tables with neither key nor replica identity (and REPLICA IDENTITY NOTHING) are refused by
-- design, naming each and the fix; 10-workload.sql says the fix was applied ("already so, the fix
-- walshift's refusal named"). The unlogged table tu1 is copied once and not replicated: walshift
-- must say so (issue 14, finding 7); it is compared after the clone only.
-- @phase
-- @setup 00-schema.sql
-- @stream 10-workload.sql
-- @expect-refusal "t001"."tab_notrep"
-- @expect-refusal "t001"."tab_ins"
-- @expect-refusal "t001"."tab_full"
-- @expect-refusal "t001"."tab_full2"
-- @expect-refusal "t001"."tab_nothing"
-- @expect-refusal "t001"."tab_no_replidentity_index"
-- @expect-refusal "t001"."tab_no_col"
-- @expect-refusal "t006"."test1"
-- @expect-refusal REPLICA IDENTITY FULL
-- @fix
ALTER TABLE t001.tab_notrep REPLICA IDENTITY FULL;
ALTER TABLE t001.tab_ins REPLICA IDENTITY FULL;
ALTER TABLE t001.tab_full REPLICA IDENTITY FULL;
ALTER TABLE t001.tab_full2 REPLICA IDENTITY FULL;
ALTER TABLE t001.tab_nothing REPLICA IDENTITY FULL;
ALTER TABLE t001.tab_no_replidentity_index REPLICA IDENTITY FULL;
ALTER TABLE t001.tab_no_col REPLICA IDENTITY FULL;
ALTER TABLE t006.test1 REPLICA IDENTITY FULL;
-- @expect-warning UNLOGGED
-- @expect-warning tu1
-- @not-replicated "t100"."tu1"
