-- walshift's own conformance case (not ported): generated stored columns, domains over
-- composites, arrays of enums, several schemas with the same table name, quoted mixed-case
-- identifiers, reserved words and unicode names.
CREATE SCHEMA "Sales";
CREATE SCHEMA ops;
CREATE TYPE ops.mood AS ENUM ('sad', 'ok', 'happy');
CREATE TYPE ops.pair AS (x int, label text);
CREATE DOMAIN ops.pos_pair AS ops.pair CHECK ((VALUE).x > 0);
CREATE DOMAIN ops.short_text AS varchar(20) NOT NULL;

CREATE TABLE "Sales"."Order Lines" (
    "Id" int PRIMARY KEY,
    "Qty" int NOT NULL,
    "unitPrice" numeric(10, 2),
    total numeric GENERATED ALWAYS AS ("Qty" * "unitPrice") STORED,
    "Label" text GENERATED ALWAYS AS ('line ' || "Id"::text) STORED
);
CREATE TABLE ops.moods (id int PRIMARY KEY, history ops.mood[], current ops.mood, code ops.short_text);
CREATE TABLE ops.pairs (id int PRIMARY KEY, p ops.pos_pair, ps ops.pair[]);
CREATE TABLE public."select" ("from" int PRIMARY KEY, "where" text, "order" int, "user" text, "Group" boolean);
CREATE TABLE public."données" ("clé" int PRIMARY KEY, "valeur ✓" text, "日本語" text);
CREATE TABLE ops.same_name (id int PRIMARY KEY, v text);
CREATE TABLE public.same_name (id int PRIMARY KEY, v int);
CREATE TABLE "Sales"."MixedKey" ("A" int, "b" text, "Ç" date, PRIMARY KEY ("b", "A"));

INSERT INTO "Sales"."Order Lines" ("Id", "Qty", "unitPrice") VALUES (1, 2, 3.50), (2, 1, 10), (3, 5, NULL);
INSERT INTO ops.moods VALUES (1, '{sad,ok}', 'ok', 'a'), (2, '{}', NULL, 'b'), (3, '{happy,NULL}', 'happy', 'c');
INSERT INTO ops.pairs VALUES (1, ROW(1, 'one'), ARRAY[ROW(1, 'a')::ops.pair, NULL]), (2, ROW(2, 'two, "quoted"'), '{}');
INSERT INTO public."select" VALUES (1, 'here', 1, 'me', true), (2, NULL, NULL, NULL, NULL);
INSERT INTO public."données" VALUES (1, 'café', 'テスト'), (2, 'naïve', NULL);
INSERT INTO ops.same_name VALUES (1, 'ops'), (2, 'ops2');
INSERT INTO public.same_name VALUES (1, 100), (2, 200);
INSERT INTO "Sales"."MixedKey" VALUES (1, 'x', '2024-01-01'), (2, 'x', '2024-02-29');
