-- walshift's conformance harness plan for this folder (see ../README.md).
-- @phase
-- @setup 00-schema.sql
-- @stream 10-workload.sql
-- @expect-refusal "public"."swap_def"
-- @expect-refusal REPLICA IDENTITY FULL
-- @fix
ALTER TABLE public.swap_def REPLICA IDENTITY FULL;
