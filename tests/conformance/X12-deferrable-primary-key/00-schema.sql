-- walshift's own conformance case (not ported): a table whose only key is a DEFERRABLE primary
-- key. PostgreSQL cannot use a deferrable index as the replica identity, so once a publication
-- carries the table, the live site's UPDATE and DELETE on it fail ("cannot update table … because
-- it does not have a replica identity and publishes updates"). Preflight must refuse it before
-- creating the publication, naming the table and the fix.
CREATE TABLE swap_def (k int PRIMARY KEY DEFERRABLE INITIALLY DEFERRED, v text);
INSERT INTO swap_def VALUES (1, 'first'), (2, 'second'), (3, 'third');
