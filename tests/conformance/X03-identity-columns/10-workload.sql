-- walshift's own conformance case: DML on the tables of 00-schema.sql.
UPDATE idt_always SET name = 'uno' WHERE pk = 1;
UPDATE idt_default SET name = 'uno' WHERE id = 1;
UPDATE idt_key SET name = 'uno' WHERE id = 1;
-- @sync updates of cloned rows
INSERT INTO idt_always (pk, name) VALUES (3, 'three');
DELETE FROM idt_always WHERE pk = 2;
INSERT INTO idt_default (name) VALUES ('three');
INSERT INTO idt_default (id, name) VALUES (100, 'explicit');
UPDATE idt_default SET id = 50 WHERE id = 2;
INSERT INTO idt_key (name) VALUES ('three');
DELETE FROM idt_key WHERE id = 2;
-- @sync inserts, deletes, a key update
UPDATE idt_always SET name = 'tres' WHERE pk = 3;
