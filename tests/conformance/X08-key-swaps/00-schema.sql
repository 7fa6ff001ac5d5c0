-- walshift's own conformance case (not ported): two rows swap their keys in one transaction (single and composite keys), then every key moves.
CREATE TABLE swap (k int PRIMARY KEY, v text);
INSERT INTO swap VALUES (1, 'first'), (2, 'second'), (3, 'third');
CREATE TABLE swap_pair (a int, b int, v text, PRIMARY KEY (a, b));
INSERT INTO swap_pair VALUES (1, 1, 'one-one'), (1, 2, 'one-two');
