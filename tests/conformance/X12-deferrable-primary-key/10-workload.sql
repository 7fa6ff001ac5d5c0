-- walshift's own conformance case: with the fix (REPLICA IDENTITY FULL), two keys swap in one
-- statement (the deferred key allows it on both sides).
UPDATE swap_def SET k = 3 - k WHERE k IN (1, 2);
-- @sync two keys swapped in one statement
DELETE FROM swap_def WHERE k = 3;
UPDATE swap_def SET v = v || '!';
-- @sync a delete and an update of every row
