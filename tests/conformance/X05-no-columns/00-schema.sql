-- walshift's own conformance case (not ported): a table with no columns, REPLICA IDENTITY FULL (issue 14, finding 5).
CREATE TABLE nocols ();
ALTER TABLE nocols REPLICA IDENTITY FULL;
INSERT INTO nocols DEFAULT VALUES;
INSERT INTO nocols DEFAULT VALUES;
INSERT INTO nocols DEFAULT VALUES;
