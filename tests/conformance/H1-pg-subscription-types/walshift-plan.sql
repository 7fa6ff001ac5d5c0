-- walshift's conformance harness plan for this folder (not vendored; see ../README.md).
-- tst_dom_constr has neither key nor replica identity: walshift refuses it by design, naming
-- it and the fix; the fix is applied and capture runs again.
-- @phase
-- @setup 00-schema.sql
-- @stream 10-workload.sql
-- @expect-refusal "public"."tst_dom_constr"
-- @expect-refusal REPLICA IDENTITY FULL
-- @fix
ALTER TABLE public.tst_dom_constr REPLICA IDENTITY FULL;
