-- walshift's own conformance case: DML on the tables of 00-schema.sql.
INSERT INTO "Sales"."Order Lines" ("Id", "Qty", "unitPrice") VALUES (4, 3, 1.25);
UPDATE "Sales"."Order Lines" SET "Qty" = 7 WHERE "Id" = 1;
UPDATE "Sales"."Order Lines" SET "unitPrice" = 2 WHERE "Id" = 3;
DELETE FROM "Sales"."Order Lines" WHERE "Id" = 2;
INSERT INTO ops.moods VALUES (4, '{ok,ok,happy}', 'sad', 'd');
UPDATE ops.moods SET history = array_append(history, 'happy'), current = 'happy' WHERE id = 1;
UPDATE ops.moods SET history = NULL WHERE id = 3;
INSERT INTO ops.pairs VALUES (3, ROW(3, NULL), ARRAY[ROW(NULL, NULL)::ops.pair]);
UPDATE ops.pairs SET p = ROW(10, 'ten') WHERE id = 1;
INSERT INTO public."select" VALUES (3, 'where', 3, 'user', false);
UPDATE public."select" SET "where" = 'there', "Group" = NOT "Group" WHERE "from" = 1;
DELETE FROM public."select" WHERE "from" = 2;
INSERT INTO public."données" VALUES (3, 'Ünïcödé ✓', '日本');
UPDATE public."données" SET "valeur ✓" = 'crème' WHERE "clé" = 2;
INSERT INTO ops.same_name VALUES (3, 'ops3');
INSERT INTO public.same_name VALUES (3, 300);
UPDATE ops.same_name SET v = 'changed' WHERE id = 1;
DELETE FROM public.same_name WHERE id = 2;
-- @sync inserts, updates and deletes
BEGIN;
UPDATE "Sales"."Order Lines" SET "Id" = 10 WHERE "Id" = 1;
UPDATE "Sales"."MixedKey" SET "A" = 3 WHERE "A" = 1 AND "b" = 'x';
UPDATE "Sales"."MixedKey" SET "Ç" = NULL WHERE "A" = 2;
UPDATE ops.pairs SET id = 20, ps = NULL WHERE id = 2;
UPDATE public."données" SET "clé" = 30 WHERE "clé" = 3;
COMMIT;
-- @sync key updates in one transaction
DELETE FROM ops.moods;
INSERT INTO ops.moods VALUES (1, '{sad}', 'sad', 'again');
UPDATE public."select" SET "from" = "from" + 100;
-- @sync delete all, reinsert, update every key
