-- submit_sent_at: when a submit to FAL was sent whose answer has not been recorded. Set before
-- the request leaves, cleared by its answer. Still set after a crash, a reset or a timeout,
-- it says that FAL may hold a request for this job: the job then waits for FAL's callback
-- before anything is sent again.
ALTER TABLE jobs ADD COLUMN submit_sent_at TEXT;
