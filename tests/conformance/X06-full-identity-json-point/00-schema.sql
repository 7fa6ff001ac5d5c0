-- walshift's own conformance case (not ported): REPLICA IDENTITY FULL with columns whose types have no equality operator (json, point) (issue 14, finding 6).
CREATE TABLE full_json (id int, doc json, pt point, tags jsonb);
ALTER TABLE full_json REPLICA IDENTITY FULL;
INSERT INTO full_json VALUES (1, '{"a": 1}', '(1,2)', '["x"]'), (2, '{"b": [1, 2]}', '(3.5,4)', NULL), (3, NULL, NULL, '{}');
