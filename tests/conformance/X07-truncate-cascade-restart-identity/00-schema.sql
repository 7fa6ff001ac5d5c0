-- walshift's own conformance case (not ported): TRUNCATE … CASCADE over a foreign key and TRUNCATE … RESTART IDENTITY.
CREATE TABLE parent (id int PRIMARY KEY, name text);
CREATE TABLE child (id serial PRIMARY KEY, parent_id int REFERENCES parent);
INSERT INTO parent VALUES (1, 'p1'), (2, 'p2');
INSERT INTO child (parent_id) VALUES (1), (1), (2);
CREATE TABLE counters (id serial PRIMARY KEY, n int);
INSERT INTO counters (n) VALUES (10), (20);
